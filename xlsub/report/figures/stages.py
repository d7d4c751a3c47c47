"""The finetune and prune stages' figures (see `xlsub.report.figures`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
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
                   xlabel: str = "evaluated on", robust_log: bool = False) -> Figure:
    """A rows x columns heatmap with the values annotated (e.g. subnetwork x evaluation language). With
    `robust_log` (positive values: perplexities and their ratios), the colour scale is logarithmic and capped
    (`robust_log_range`), so that one extreme cell does not flatten the rest; the caption says so."""
    fig = Figure(figsize=(1.8 + 0.8 * table.shape[1], 1.2 + 0.55 * table.shape[0]), layout="tight")
    ax = fig.subplots()
    scale = robust_log_range(table, center) if robust_log else None
    if scale is None:
        sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, center=center, cbar_kws={"label": label}, ax=ax)
    else:
        lo, hi, capped = scale
        sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, norm=LogNorm(lo, hi), ax=ax,
                    cbar_kws={"label": f"{label} (log scale)", "extend": "both" if capped else "neither"})
        title += f"\ncolour: log scale{f', capped to {lo:.3g}-{hi:.3g} (numbers exact)' if capped else ''}"
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return fig


def robust_log_range(table: pd.DataFrame, center: float | None = None, quantile: float = 0.9) -> tuple[float, float, bool] | None:
    """(low, high, capped) of a log colour scale over the table's positive values: their `quantile` range,
    made symmetric about `center` on the log scale where given (ratio 1 in the middle); `capped` where a cell
    lies outside. None where no value is positive and finite."""
    values = table.to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return None
    lo, hi = (float(v) for v in np.quantile(values, [1 - quantile, quantile]))
    if center is not None:
        spread = max(hi / center, center / lo)
        lo, hi = center / spread, center * spread
    if hi <= lo * (1 + 1e-9):  # every value alike
        lo, hi = lo / 1.1, hi * 1.1
    return lo, hi, bool(values.min() < lo * (1 - 1e-9) or values.max() > hi * (1 + 1e-9))


def cross_perplexity_figures(matrix: pd.DataFrame, relative: pd.DataFrame, control: bool = False, *,
                             stem: str | None = None, what: str | None = None) -> dict[str, Figure]:
    """The prune stage's heatmaps of the cross-language perplexity matrix and of the same relative to the
    full model (`xlsub.models.pruning.cross_perplexity_matrix`, `relative_perplexity`), by table id: `cross_ppl`
    and `cross_ppl_relative`, or with `control` (the random-mask matrices) `cross_ppl_random` and
    `cross_ppl_random_relative`. Another stage's matrices (the neurons stage's deactivation matrix) name
    their own `stem` and say `what` the rows are."""
    default_stem, default_what = (CROSS_PPL_RANDOM, "random mask of the same size per layer") if control else (CROSS_PPL, "language subnetwork")
    stem, what = stem or default_stem, what or default_what
    return {stem: matrix_heatmap(matrix, f"Perplexity: {what} (rows) on each language (columns)", "perplexity", robust_log=True),
            f"{stem}_relative": matrix_heatmap(relative, f"Perplexity relative to the full model: {what}", "ppl / full ppl",
                                               fmt=".2f", cmap=RATIO_CMAP, center=1.0, robust_log=True)}
