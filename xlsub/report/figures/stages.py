"""The finetune and prune stages' figures (see `xlsub.report.figures`)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from xlsub.artifacts import CROSS_PPL, CROSS_PPL_RANDOM
from xlsub.report.figures import RATIO_CMAP


def perplexity_bars(table: pd.DataFrame) -> Figure:
    """Grouped bars of perplexity per language: before and after fine-tuning, and the unigram floor.

    `table` has a `lang` column and one column per kind (ppl_before, ppl_after, ppl_unigram).
    """
    kinds = [c for c in ("ppl_before", "ppl_after", "ppl_unigram") if c in table]
    long = table.melt(id_vars="lang", value_vars=kinds, var_name="model", value_name="perplexity")
    long["model"] = long["model"].map({"ppl_before": "before", "ppl_after": "after", "ppl_unigram": "unigram"})
    fig = Figure(figsize=(1.2 + 0.9 * len(table), 4), layout="tight")
    ax = fig.subplots()
    sns.barplot(data=long, x="lang", y="perplexity", hue="model", ax=ax, palette="colorblind")
    ax.set_yscale("log")
    ax.set_xlabel("language")
    ax.set_ylabel("masked-token perplexity (log scale)")
    ax.set_title("Perplexity on each language's test set")
    ax.legend(title=None)
    return fig


def head_mask_heatmap(mask, importance, title: str) -> Figure:
    """Layers x heads: colour is the head's importance, kept heads annotated with it, pruned heads crossed out."""
    layers, heads = mask.shape
    fig = Figure(figsize=(1.5 + 0.55 * heads, 1.2 + 0.45 * layers), layout="tight")
    ax = fig.subplots()
    labels = [[f"{importance[l, h]:.2f}" if mask[l, h] else "×" for h in range(heads)] for l in range(layers)]
    sns.heatmap(importance.numpy() if hasattr(importance, "numpy") else importance, annot=labels, fmt="", cmap="viridis",
                vmin=0, vmax=1, cbar_kws={"label": "importance"}, linewidths=0.5, linecolor="white", ax=ax)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    kept = int(mask.sum())
    ax.set_title(f"{title}: {kept}/{layers * heads} heads kept (× = pruned)")
    return fig


def matrix_heatmap(table: pd.DataFrame, title: str, label: str, fmt: str = ".0f", cmap: str = "rocket_r", center=None,
                   xlabel: str = "evaluated on") -> Figure:
    """A rows x columns heatmap with the values annotated (e.g. subnetwork x evaluation language)."""
    fig = Figure(figsize=(1.8 + 0.8 * table.shape[1], 1.2 + 0.55 * table.shape[0]), layout="tight")
    ax = fig.subplots()
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, center=center, cbar_kws={"label": label}, ax=ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return fig


def cross_perplexity_figures(matrix: pd.DataFrame, relative: pd.DataFrame, control: bool = False) -> dict[str, Figure]:
    """The prune stage's heatmaps of the cross-language perplexity matrix and of the same relative to the
    full model (`xlsub.models.pruning.cross_perplexity_matrix`, `relative_perplexity`), by table id: `cross_ppl`
    and `cross_ppl_relative`, or with `control` (the random-mask matrices) `cross_ppl_random` and
    `cross_ppl_random_relative`."""
    stem, what = (CROSS_PPL_RANDOM, "random mask of the same size per layer") if control else (CROSS_PPL, "language subnetwork")
    return {stem: matrix_heatmap(matrix, f"Perplexity: {what} (rows) on each language (columns)", "perplexity"),
            f"{stem}_relative": matrix_heatmap(relative, f"Perplexity relative to the full model: {what}", "ppl / full ppl",
                                               fmt=".2f", cmap=RATIO_CMAP, center=1.0)}
