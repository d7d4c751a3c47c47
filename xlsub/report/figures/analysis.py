"""The analyze stage's figures (see `xlsub.report.figures`): each takes tables of `xlsub.report.tables` by table id and
returns {figure id: `CaptionedFigure`}."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from xlsub.artifacts import BASE_MODEL, FULL_MODEL, RANDOM_MODEL, TABLE, SubnetworkId, subnetwork_key
from xlsub.report.figures import CKA_CMAP, JACCARD_CMAP, MAX_ANNOTATED_COLUMNS, PPL_CMAP, RATIO_CMAP, SPREAD_CMAP, CaptionedFigure
from xlsub.report.similarity_tables import LENGTH_ONLY, LENGTH_RESTRICTED
from xlsub.report.tables import language_name, several_seeds
from xlsub.stats.language_distance import paired_matrices

_CONTROLS = {  # CKA condition (a pairing or a model key) -> legend label, line style
    "parallel": ("parallel sentences, full model", "-"),
    "shuffled": ("shuffled (non-parallel) pairs, full model", "--"),
    BASE_MODEL: ("parallel, model before finetuning", "-."),
    RANDOM_MODEL: ("parallel, randomly initialised model", ":"),
}


_POOLED = {"heads": "subnetworks", "neurons": "neuron subnetworks"}  # how a unit's subnetworks are pooled in a bar


def display_label(label) -> str:
    """How a row or column is shown: `German` for `de`, `German (seed 1)` for `de-s1`, `full model` for `full`."""
    label = str(label)
    if label == FULL_MODEL:
        return "full model"
    found = subnetwork_key(label)
    if found is None:
        return language_name(label)
    unit, sid = found
    return f"{language_name(sid.language)}{' neurons' if unit == 'neurons' else ''} (seed {sid.seed})"


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The table with language codes and subnetwork ids replaced by names on both axes."""
    shown = table.copy()
    shown.index = [display_label(i) for i in table.index]
    shown.columns = [display_label(c) for c in table.columns]
    return shown


def _by_language(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A table with one row per subnetwork (`de-s0`) as the mean and std (ddof=1) over each language's
    seeds; with one seed per language, or any other table, the table by language without a spread."""
    if table.index.name != "subnetwork":
        return table, None
    grouped = table.groupby(table.index.map(lambda row: SubnetworkId.parse(row).language), sort=False)
    return grouped.mean(), grouped.std(ddof=1) if _several_seeds(table) else None


def _several_seeds(table: pd.DataFrame | None) -> bool:
    """Whether a per-subnetwork table has more than one seed of some language."""
    if table is None or table.index.name != "subnetwork":
        return False
    return several_seeds([SubnetworkId.parse(row) for row in table.index])


def _heatmap(ax, table: pd.DataFrame, *, cmap: str, norm=None, vmin=None, vmax=None, fmt: str = ".2f",
             cbar: bool = True, cbar_label: str = "", cbar_ax=None, xlabel: str = "", ylabel: str = "", title: str = ""):
    annotate = table.shape[1] <= MAX_ANNOTATED_COLUMNS
    sns.heatmap(_display(table), ax=ax, cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax,
                annot=annotate, fmt=fmt, annot_kws={"size": 8}, square=False, linewidths=0.5, linecolor="white",
                cbar=cbar, cbar_ax=cbar_ax, cbar_kws={"label": cbar_label} if cbar else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return ax


def _heatmap_figure(n_panels: int, rows: int, cols: int, extra_width: float = 1.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(n_panels * (1.6 + 0.62 * cols) + extra_width, 1.6 + 0.5 * rows), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _ratio_norm(*tables: pd.DataFrame) -> LogNorm:
    """A log colour scale centred at 1 and symmetric in log space, shared by all `tables`."""
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    span = max(float(np.abs(np.log(values)).max()) if values.size else 0.0, math.log(1.05))
    return LogNorm(vmin=math.exp(-span), vmax=math.exp(span))


def _log_norm(*tables: pd.DataFrame) -> LogNorm:
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    low, high = (float(values.min()), float(values.max())) if values.size else (1.0, 10.0)
    return LogNorm(vmin=low, vmax=high if high > low else low * 1.01)


def _log_ticks(ax, norm: LogNorm, centre: float | None = None) -> None:
    """Plain-number ticks (200, 500, 1000; or 0.5, 1, 2 around `centre`) on a log-scaled colour bar, at
    least an eighth of the range apart."""
    colorbar = ax.collections[0].colorbar
    if colorbar is None:
        return
    candidates = sorted({m * 10.0**e for e in range(-3, 8) for m in (1, 2, 3, 5)}
                        | ({0.25, 0.33, 0.67, 0.8, 0.9, 1.1, 1.25, 1.5, 3, 4} if centre else set()))
    candidates = [t for t in candidates if norm.vmin <= t <= norm.vmax]
    gap = (math.log(norm.vmax) - math.log(norm.vmin)) / 8
    start = centre if centre in candidates else (candidates[len(candidates) // 2] if candidates else None)
    ticks = [start] if start is not None else []
    for side in (reversed([t for t in candidates if t < start]), (t for t in candidates if t > start)) if ticks else ():
        last = start
        for t in side:
            if abs(math.log(t) - math.log(last)) >= gap:
                ticks.append(t)
                last = t
    ticks.sort()
    colorbar.minorticks_off()
    colorbar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])


def _ppl_format(table: pd.DataFrame) -> str:
    values = table.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    largest = float(np.abs(values).max()) if values.size else 0.0
    return ".0f" if largest >= 100 else ".1f" if largest >= 10 else ".2f"


def _per_layer_lines(ax, table: pd.DataFrame, colours: Mapping[str, tuple], *, style: str = "-", label_suffix: str = "",
                     marker: str = "o") -> None:
    """One line per language over the layers; with several seeds per subnetwork language, the mean and a
    +-1 std band."""
    mean, std = _by_language(table)
    x = np.asarray(mean.columns, dtype=float)
    for lang in mean.index:
        colour = colours.get(lang)
        ax.plot(x, mean.loc[lang].to_numpy(dtype=float), style, marker=marker, markersize=4, color=colour,
                label=f"{language_name(lang)}{label_suffix}")
        if std is not None and std.loc[lang].notna().any():
            m, s = mean.loc[lang].to_numpy(dtype=float), std.loc[lang].to_numpy(dtype=float)
            ax.fill_between(x, m - s, m + s, color=colour, alpha=0.2, linewidth=0)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{int(v)}" for v in x])


def _cka_ylim(ax, *tables: pd.DataFrame) -> None:
    """0 to 1 for every CKA axis, extended below 0 only where a debiased estimate falls there."""
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values)]
    low = min(0.0, float(values.min()) - 0.03) if values.size else 0.0
    ax.set_ylim(low, 1.03)


def mask_figures(tables: Mapping[str, pd.DataFrame], n_seeds: int = 1) -> dict[str, CaptionedFigure]:
    """`mask_jaccard`: observed Jaccard of kept heads beside its random-mask chance level; with several
    seeds (`n_seeds` the most per language) also `mask_jaccard_seeds`: the spread over seed pairs and each
    language's agreement with itself across seeds. Tables of `xlsub.report.tables.mask_overlap_tables`."""
    observed, expected = tables[TABLE.mask_jaccard], tables[TABLE.mask_jaccard_expected]
    k = len(observed)
    fig, axes = _heatmap_figure(2, k, k)
    several = TABLE.mask_jaccard_std in tables
    left = "mean over seed pairs" if several else "observed"
    _heatmap(axes[0], observed, cmap=JACCARD_CMAP, vmin=0, vmax=1, cbar=False, title=f"Jaccard of kept heads ({left})",
             xlabel="subnetwork language", ylabel="subnetwork language")
    _heatmap(axes[1], expected, cmap=JACCARD_CMAP, vmin=0, vmax=1, cbar_label="Jaccard index",
             title="expected for random masks, same heads per layer", xlabel="subnetwork language")
    fig.suptitle("Overlap of the attention heads kept by each language's subnetwork")
    seeds_note = (f"; mean over pairs of {n_seeds} pruning seeds, the diagonal is each language's agreement with itself "
                  "across seeds" if several else "")
    drawn = {TABLE.mask_jaccard: CaptionedFigure(
        fig, "Jaccard index of the heads kept by two languages' subnetworks (left) beside its exact expectation "
             f"for random masks keeping as many heads in every layer (right){seeds_note}.",
        (TABLE.mask_jaccard, TABLE.mask_jaccard_expected))}
    if not several:
        return drawn
    std, stability = tables[TABLE.mask_jaccard_std], tables[TABLE.mask_seed_stability]
    fig = Figure(figsize=(2 * (1.6 + 0.62 * k) + 1.5, 1.6 + 0.5 * max(k, 6)), layout="constrained")
    ax_std, ax_stab = fig.subplots(1, 2)
    finite = std.to_numpy(dtype=float)
    top = max(0.05, float(np.nanmax(finite)) if np.isfinite(finite).any() else 0.05)
    _heatmap(ax_std, std, cmap=SPREAD_CMAP, vmin=0, vmax=top, cbar_label="std of Jaccard over seed pairs",
             title="spread of the Jaccard index over seeds", xlabel="subnetwork language", ylabel="subnetwork language")
    names = [language_name(l) for l in stability.index]
    x = np.arange(len(names))
    ax_stab.bar(x, stability["mean"], yerr=stability["std"].fillna(0), capsize=3, color=sns.color_palette("colorblind")[0],
                label="observed (mean ± std over seed pairs)")
    ax_stab.scatter(x, stability["expected"], marker="_", s=400, color="black", zorder=3, label="expected for random masks")
    ax_stab.set_xticks(x, names, rotation=45)
    ax_stab.set_ylim(0, 1.05)
    ax_stab.set_ylabel("Jaccard index between seeds")
    ax_stab.set_xlabel("subnetwork language")
    ax_stab.set_title("same language, different pruning seeds")
    ax_stab.legend(loc="lower right", fontsize=8)
    fig.suptitle("How stable the subnetworks are across pruning seeds")
    drawn["mask_jaccard_seeds"] = CaptionedFigure(
        fig, "Standard deviation of the between-language Jaccard index over seed pairs (left) and each "
             "language's Jaccard with itself across pruning seeds against its random-mask chance level (right).",
        (TABLE.mask_jaccard_std, TABLE.mask_seed_stability))
    return drawn


def _per_layer_bars(ax, table: pd.DataFrame, colours: Mapping[str, tuple]) -> None:
    """Grouped bars: one group per layer, one bar per subnetwork language; with several seeds, the mean and
    +-1 std error bars over seeds."""
    mean, std = _by_language(table)
    x = np.arange(mean.shape[1])
    width = 0.8 / max(len(mean), 1)
    for i, lang in enumerate(mean.index):
        err = None if std is None else std.loc[lang].fillna(0).to_numpy(dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), mean.loc[lang].to_numpy(dtype=float), width, yerr=err, capsize=2,
               color=colours.get(lang), label=language_name(lang), error_kw={"linewidth": 0.8})
    ax.set_xticks(x, [str(c) for c in mean.columns])


def heads_kept_figure(tables: Mapping[str, pd.DataFrame], colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """`heads_kept_per_layer`: share of heads (and of attention parameters) kept per layer, one bar per
    subnetwork language (mean ± std over seeds). Tables of `xlsub.report.tables.heads_kept_tables`."""
    heads = tables[TABLE.heads_kept_per_layer]
    params = tables.get(TABLE.params_kept_per_layer)
    panels = [(heads, "share of heads kept")] + ([(params, "share of attention parameters kept")] if params is not None else [])
    groups = len(_by_language(heads)[0]) * heads.shape[1]
    fig = Figure(figsize=(len(panels) * max(5.0, 1.0 + 0.16 * groups) + 1.8, 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (table, label) in zip(axes, panels):
        _per_layer_bars(ax, table, colours)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("transformer layer")
        ax.set_ylabel(label)
        ax.set_title(label + " per layer")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="subnetwork")
    fig.suptitle("Where pruning removed heads: share kept in each layer")
    several = _several_seeds(heads)
    caption = ("Share of each layer's attention heads" + (" and attention parameters (query, key, value, output; "
               "the output bias and LayerNorm always stay)" if params is not None else "")
               + " kept by each language's subnetwork" + ("; mean ± std over pruning seeds" if several else "") + ".")
    return {TABLE.heads_kept_per_layer: CaptionedFigure(fig, caption, tuple(t for t in (TABLE.heads_kept_per_layer, TABLE.params_kept_per_layer)
                                                                         if t in tables))}


def perplexity_figures(tables: Mapping[str, pd.DataFrame]) -> dict[str, CaptionedFigure]:
    """`cross_ppl`: the cross-language perplexity matrix (and its random-mask control) on one log colour
    scale; `cross_ppl_relative`: the same relative to the full model, on a log scale centred at 1. Tables
    of `xlsub.report.tables.seed_averaged_perplexity_tables`."""
    raw, rel = tables[TABLE.cross_ppl], tables[TABLE.cross_ppl_relative]
    raw_ctl, rel_ctl = tables.get(TABLE.cross_ppl_random), tables.get(TABLE.cross_ppl_random_relative)
    by_seed = tuple(t for t in (TABLE.cross_ppl_by_seed, TABLE.cross_ppl_random_by_seed) if t in tables)
    seeds = " (rows: mean over pruning seeds)" if by_seed else ""
    panels = [(raw, "language subnetwork")] + ([(raw_ctl, "random mask, same heads per layer")] if raw_ctl is not None else [])
    norm = _log_norm(*(t for t, _ in panels))
    fig, axes = _heatmap_figure(len(panels), raw.shape[0], raw.shape[1])
    for i, (ax, (table, what)) in enumerate(zip(axes, panels)):
        _heatmap(ax, table, cmap=PPL_CMAP, norm=norm, fmt=_ppl_format(table), cbar=i == len(panels) - 1,
                 cbar_label="perplexity (log colour scale)", title=what, xlabel="evaluated on",
                 ylabel="subnetwork" if i == 0 else "")
    _log_ticks(axes[-1], norm)
    fig.suptitle("Masked-LM perplexity of each subnetwork on each language")
    drawn = {TABLE.cross_ppl: CaptionedFigure(
        fig, "Perplexity of each language's subnetwork (rows) on every language's test set (columns)"
             + (", beside random masks of the same size per layer" if raw_ctl is not None else "")
             + f"; first row: the full model{seeds}.",
        (TABLE.cross_ppl,) + ((TABLE.cross_ppl_random,) if raw_ctl is not None else ()) + by_seed)}

    panels = [(rel, "language subnetwork")] + ([(rel_ctl, "random mask, same heads per layer")] if rel_ctl is not None else [])
    norm = _ratio_norm(*(t for t, _ in panels))
    fig, axes = _heatmap_figure(len(panels), rel.shape[0], rel.shape[1])
    for i, (ax, (table, what)) in enumerate(zip(axes, panels)):
        _heatmap(ax, table, cmap=RATIO_CMAP, norm=norm, fmt=".2f", cbar=i == len(panels) - 1,
                 cbar_label="perplexity / full-model perplexity", title=what, xlabel="evaluated on",
                 ylabel="subnetwork" if i == 0 else "")
    _log_ticks(axes[-1], norm, centre=1)
    fig.suptitle("Perplexity relative to the full model (1 = no loss; shared log scale)")
    drawn[TABLE.cross_ppl_relative] = CaptionedFigure(
        fig, "Each subnetwork's perplexity divided by the full model's on the same language"
             + (" (left) and the same for random masks of the same size per layer (right), on one colour scale"
                if rel_ctl is not None else "") + f"{seeds}.",
        (TABLE.cross_ppl_relative,) + ((TABLE.cross_ppl_random_relative,) if rel_ctl is not None else ()))
    return drawn


def _layer_label(layer: int, last: int) -> str:
    return "layer 0 (embeddings)" if layer == 0 else f"layer {layer}" + (" (last)" if layer == last else "")


def cka_figures(tables: Mapping[str, pd.DataFrame], reference: str, kind: str,
                colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """`cka_vs_reference`: CKA with the reference language per layer of the full model; `cka_pairs`: every
    pair of languages at the chosen layers; `cka_controls`: parallel sentences against the controls, one
    panel per language. Tables of `xlsub.report.tables.cka_reference_tables` and `cka_pairs_table`."""
    ref_name = language_name(reference)
    curves = tables[TABLE.cka_vs_reference]
    last = int(curves.columns[-1])
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _per_layer_lines(ax, curves, colours)
    _cka_ylim(ax, curves)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"{kind} CKA with {ref_name}")
    ax.set_title(f"Similarity of parallel sentences to their {ref_name} translation, full model")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="language")
    drawn = {TABLE.cka_vs_reference: CaptionedFigure(
        fig, f"{kind.capitalize()} CKA between the full model's representations of {ref_name} sentences and "
             "their translations, per layer.", (TABLE.cka_vs_reference,))}

    pairs = tables[TABLE.cka_pairs]
    layers = list(dict.fromkeys(pairs.index.get_level_values("layer")))
    k = pairs.shape[1]
    fig, axes = _heatmap_figure(len(layers), k, k)
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        _heatmap(ax, pairs.loc[layer], cmap=CKA_CMAP, vmin=0, vmax=1, cbar=i == len(layers) - 1, cbar_label=f"{kind} CKA",
                 title=_layer_label(layer, last), xlabel="language", ylabel="language" if i == 0 else "")
    fig.suptitle(f"{kind.capitalize()} CKA between every pair of languages, full model")
    drawn[TABLE.cka_pairs] = CaptionedFigure(
        fig, f"{kind.capitalize()} CKA between the full model's representations of parallel sentences in every "
             f"pair of languages at layers {', '.join(map(str, layers))} (0 = embeddings).", (TABLE.cka_pairs,))

    controls = tables[TABLE.cka_controls]
    conditions = list(dict.fromkeys(controls.index.get_level_values("condition")))
    langs = list(dict.fromkeys(controls.index.get_level_values("language")))
    panels = langs + ["mean"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols + 2.6, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, panel in zip(axes, panels):
        for condition in conditions:
            label, style = _CONTROLS[condition]
            if panel == "mean":
                values = controls.loc[condition].mean(axis=0)
                colour = "black"
            else:
                if (condition, panel) not in controls.index:
                    continue
                values, colour = controls.loc[(condition, panel)], colours.get(panel)
            ax.plot(np.asarray(values.index, dtype=float), values.to_numpy(dtype=float), style, color=colour,
                    marker="o" if condition == "parallel" else None, markersize=3, label=label)
        ax.set_title(f"{language_name(panel)} vs {ref_name}" if panel != "mean" else "mean over languages")
        _cka_ylim(ax, controls)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(f"{kind} CKA")
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_xticks(np.asarray(controls.columns, dtype=float))
    handles, labels = axes[len(panels) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"Is the CKA with {ref_name} more than chance? Parallel sentences against controls")
    drawn[TABLE.cka_controls] = CaptionedFigure(
        fig, f"{kind.capitalize()} CKA with {ref_name} per layer for parallel sentences in the full model (solid) "
             "against the same sentences paired at random (dashed)"
             + "".join(f", {_CONTROLS[c][0].split(', ')[1]} ({'dash-dot' if c == BASE_MODEL else 'dotted'})"
                       for c in (BASE_MODEL, RANDOM_MODEL) if c in conditions) + "; same y scale.",
        (TABLE.cka_controls,))
    return drawn


def subnetwork_cka_figure(tables: Mapping[str, pd.DataFrame], kind: str,
                          colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """`cka_full_vs_subnetwork`: CKA between the full model and each subnetwork on its own language per layer
    (mean ± std over seeds) and on every language at the last layer. Tables of
    `xlsub.report.tables.cka_subnetwork_tables`."""
    curves = tables.get(TABLE.cka_full_vs_subnetwork)
    last = tables.get(TABLE.cka_full_vs_subnetwork_last_layer)
    widths = ([6.5] if curves is not None else []) + ([1.6 + 0.62 * last.shape[1]] if last is not None else [])
    height = max(4.2, 1.6 + 0.5 * (last.shape[0] if last is not None else 0))
    fig = Figure(figsize=(sum(widths) + 2.2, height), layout="constrained")
    axes = list(fig.subplots(1, len(widths), squeeze=False, width_ratios=widths)[0])
    several = _several_seeds(curves)
    if curves is not None:
        ax = axes.pop(0)
        _per_layer_lines(ax, curves, colours)
        _cka_ylim(ax, curves)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(f"{kind} CKA, full model vs subnetwork")
        ax.set_title("each subnetwork on its own language")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, title_fontsize=8,
                  title="subnetwork language" + (" (mean ± std over seeds)" if several else ""))
    if last is not None:
        ax = axes.pop(0)
        _heatmap(ax, last, cmap=CKA_CMAP, vmin=0, vmax=1, cbar_label=f"{kind} CKA", title="last layer, every language",
                 xlabel="evaluated on", ylabel="subnetwork")
    fig.suptitle("How much a subnetwork changes the full model's representations")
    caption = (f"{kind.capitalize()} CKA between the full model and each language's subnetwork on that language per "
               "layer (left" + ("; mean ± std over pruning seeds" if several else "") + ") and on every language at "
               "the last layer (right" + ("; mean over seeds" if several else "") + ").")
    return {TABLE.cka_full_vs_subnetwork: CaptionedFigure(
        fig, caption, tuple(t for t in (TABLE.cka_full_vs_subnetwork, TABLE.cka_full_vs_subnetwork_last_layer) if t in tables))}


def token_overlap_figure(table: pd.DataFrame, reference: str, kind: str,
                         colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """`token_overlap`: each language's token overlap with the reference language, and against its
    similarity to it (Jaccard of kept heads, last-layer CKA) where those columns are present."""
    ref_name = language_name(reference)
    others = [c for c in ("jaccard_with_reference", "cka_last_layer_with_reference") if c in table and table[c].notna().any()]
    fig = Figure(figsize=(5.5 + 4.8 * bool(others), 4), layout="constrained")
    axes = fig.subplots(1, 1 + bool(others), squeeze=False)[0]
    names = [language_name(l) for l in table.index]
    # error bars: the bootstrap interval over sentences, where the table has one
    yerr = [table["token_overlap"] - table["lo"], table["hi"] - table["token_overlap"]] if {"lo", "hi"} <= set(table) else None
    axes[0].bar(names, table["token_overlap"], yerr=yerr, capsize=3, color=[colours.get(l) for l in table.index])
    axes[0].set_ylim(0, 1.03)
    axes[0].set_ylabel(f"share of tokens also in the {ref_name} sentence")
    axes[0].set_xlabel("language")
    axes[0].tick_params(axis="x", labelrotation=45)
    axes[0].set_title(f"Token overlap with {ref_name}")
    if others:
        ax = axes[1]
        for column, marker, label, offset in (("jaccard_with_reference", "o", "Jaccard of kept heads", (4, 3)),
                                              ("cka_last_layer_with_reference", "s", f"{kind} CKA, last layer", (4, -9))):
            if column not in others:
                continue
            ax.scatter(table["token_overlap"], table[column], marker=marker, c=[colours.get(l) for l in table.index],
                       label=label, edgecolors="black", linewidths=0.5)
            for lang, x, y in zip(table.index, table["token_overlap"], table[column]):
                if np.isfinite(y):
                    ax.annotate(lang, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        # zoomed to the points (from 0): overlaps and similarities of a few tenths would crowd one corner of 0..1
        overlap = table["token_overlap"].to_numpy(dtype=float)
        ax.set_xlim(0, min(1.03, float(np.nanmax(overlap, initial=0.0)) * 1.25 + 0.02))
        _cka_ylim(ax, table[others])
        similarity = table[others].to_numpy(dtype=float)
        ax.set_ylim(top=min(1.03, float(np.nanmax(similarity, initial=0.0)) * 1.2 + 0.03))
        ax.set_xlabel(f"token overlap with {ref_name}")
        ax.set_ylabel(f"similarity to {ref_name}")
        ax.set_title("Does shared vocabulary explain the similarity?")
        # neutral legend markers: the points are coloured by language
        handles = [Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=label)
                   for column, m, label in (("jaccard_with_reference", "o", "Jaccard of kept heads"),
                                            ("cka_last_layer_with_reference", "s", f"{kind} CKA, last layer")) if column in others]
        ax.legend(handles=handles, fontsize=8)
        ax.grid(alpha=0.3)
    caption = (f"Mean share of a sentence's tokens that also occur in its {ref_name} translation (clipped counts)"
               + (f", against each language's similarity to {ref_name}" if others else "") + "."
               + (" Error bars: 95% bootstrap interval over sentences." if yerr is not None else ""))
    return {TABLE.token_overlap: CaptionedFigure(fig, caption, (TABLE.token_overlap,))}


def equal_size_figure(table: pd.DataFrame) -> dict[str, CaptionedFigure]:
    """`equal_size_jaccard`: every language pair's Jaccard of kept heads along the pruning trajectories, at
    equal sparsity (the same number of heads off), against the exact chance band of random masks of the
    same per-layer sizes. Table of `xlsub.stats.overlap.equal_size_jaccard` (its keys as columns or index)."""
    table = table.reset_index() if "frac_pruned" not in table.columns else table
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    by_step = table.groupby("frac_pruned")
    x = np.asarray(list(by_step.groups), dtype=float)
    ax.fill_between(x, by_step["chance_lo"].mean(), by_step["chance_hi"].mean(), color="grey", alpha=0.25,
                    label="random masks: 95% band (mean over pairs)")
    ax.plot(x, by_step["expected"].mean(), "--", color="grey", label="random masks: expectation")
    for _, pair in table.groupby(["language_a", "language_b"]):
        ax.plot(pair["frac_pruned"], pair["jaccard"], color=sns.color_palette("colorblind")[0], alpha=0.25, linewidth=0.8)
    ax.plot(x, by_step["jaccard"].mean(), "o-", color="black", markersize=3, label="language pairs: mean (thin: each pair)")
    ax.set_xlabel("fraction of heads pruned (both languages)")
    ax.set_ylabel("Jaccard of kept heads")
    ax.set_ylim(0, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Do languages keep the same heads at equal sparsity?")
    return {TABLE.equal_size_jaccard: CaptionedFigure(
        fig, "Jaccard of the heads two languages' pruning trajectories keep after the same number of steps (thin lines: "
             "each pair, black: the mean), against random masks with the same heads per layer (exact expectation "
             "and 95% band).", (TABLE.equal_size_jaccard,))}


def specificity_figure(table: pd.DataFrame) -> dict[str, CaptionedFigure]:
    """`specificity_gap`: per subnetwork language, mean relative perplexity on the other languages minus on
    its own, with its 95% bootstrap interval, beside the same for random masks of the same sizes."""
    names = [language_name(l) for l in table.index]
    x = np.arange(len(names))
    fig = Figure(figsize=(1.8 + 0.8 * len(names), 4.0), layout="constrained")
    ax = fig.subplots()
    colours = sns.color_palette("colorblind")
    for offset, stem, label, colour in ((-0.15, "gap", "language subnetwork", colours[0]),
                                         (0.15, "random_gap", "random mask, same heads per layer", colours[7])):
        values = table[stem].to_numpy(dtype=float)
        errors = np.vstack([values - table[f"{stem}_lo"].to_numpy(dtype=float), table[f"{stem}_hi"].to_numpy(dtype=float) - values])
        ax.errorbar(x + offset, values, yerr=np.where(np.isfinite(errors), errors, 0), fmt="o", capsize=3, color=colour, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=45)
    ax.set_ylabel("relative ppl: other languages − own")
    ax.set_xlabel("subnetwork language")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("Does a subnetwork serve its own language best?")
    return {TABLE.specificity_gap: CaptionedFigure(
        fig, "Language-specificity gap of each subnetwork (mean perplexity relative to the full model on the other "
             "languages minus on its own language; mean over seeds) with 95% paired-bootstrap intervals over test "
             "chunks, beside random masks with the same heads per layer (draws resampled too).", (TABLE.specificity_gap,))}


def retrieval_figure(table: pd.DataFrame, reference: str, colours: Mapping[str, tuple], n: int) -> dict[str, CaptionedFigure]:
    """`retrieval`: top-1 translation retrieval per layer, full model (solid) and random-init model
    (dotted) where encoded, one colour per language, chance 1/n."""
    ref_name = language_name(reference)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for (model, lang), values in table.iterrows():
        if model not in (FULL_MODEL, RANDOM_MODEL):
            continue
        ax.plot(np.asarray(values.index, dtype=float), values.to_numpy(dtype=float), "-" if model == FULL_MODEL else ":",
                color=colours.get(lang), marker="o" if model == FULL_MODEL else None, markersize=3,
                label=f"{language_name(lang)}" + ("" if model == FULL_MODEL else " (random init)"))
    ax.axhline(1 / n, color="black", linewidth=0.8, linestyle="--", label=f"chance (1/{n})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"top-1 retrieval of the {ref_name} translation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Can a sentence's {ref_name} translation be found by cosine?")
    return {"retrieval": CaptionedFigure(
        fig, f"Top-1 accuracy of retrieving each sentence's {ref_name} translation among all {n} {ref_name} sentences by "
             "cosine similarity after centring each language (solid: full model, dotted: randomly initialised model; "
             "dashed: chance).", (TABLE.retrieval_top1,))}


def rsa_figure(table: pd.DataFrame, reference: str) -> dict[str, CaptionedFigure]:
    """`rsa`: RSA with the reference language at the last layer per model and language (the subnetworks
    pooled into their mean), p from Mantel at the null the table's `null` column names."""
    models = table.index.get_level_values("model")
    pooled = models.map(lambda m: _POOLED[found[0]] + " (mean)" if (found := subnetwork_key(m)) is not None else m)
    wide = table["rsa"].groupby([pooled, table.index.get_level_values("language")], sort=False).mean().unstack(0)
    wide = wide.reindex(list(dict.fromkeys(table.index.get_level_values("language"))))
    restricted = "null" in table and (table["null"] == LENGTH_RESTRICTED).all()
    fig = Figure(figsize=(1.8 + 0.9 * len(wide), 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(wide))
    width = 0.8 / max(1, wide.shape[1])
    for i, model in enumerate(wide.columns):
        label = "full model" if model == FULL_MODEL else _CONTROLS.get(model, (f"{model} encoder" if model == LENGTH_ONLY else model,))[0]
        ax.bar(x + i * width - 0.4 + width / 2, wide[model].to_numpy(dtype=float), width, label=label)
    ax.set_xticks(x, [language_name(l) for l in wide.index], rotation=45)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"RSA with {language_name(reference)} (Spearman)")
    ax.legend(fontsize=7)
    ax.set_title("Representational similarity (last layer)")
    return {TABLE.rsa: CaptionedFigure(
        fig, f"Spearman correlation between the dissimilarity matrices (1 - cosine) of parallel sentences in each language "
             f"and in {language_name(reference)} at the last layer, for the full model, the subnetworks (mean), the controls "
             "and a content-free length-only encoder; Mantel permutation p-values in the table"
             + (", pairings permuted only among sentences whose source has the same token count." if restricted
                else ", pairings permuted freely (no token counts: not length-controlled)."), (TABLE.rsa,))}


def length_control_figure(table: pd.DataFrame, reference: str, kind: str) -> dict[str, CaptionedFigure]:
    """`cka_length`: per model (full, the subnetworks pooled, base, random, the length-only encoder), mean
    over languages of the parallel CKA, the length-matched null mean and the CKA of length residuals
    (descriptive only: not a length control)."""
    def group(model: str) -> str:
        if model == FULL_MODEL:
            return "full model"
        if (found := subnetwork_key(model)) is not None:
            return _POOLED[found[0]]
        return _CONTROLS[model][0].removeprefix("parallel, ") if model in _CONTROLS else f"{model} encoder"

    columns = ["cka", "length_null_mean", "residual_cka"]
    labels = table.index.get_level_values("model").map(group)
    means = table[columns].groupby(labels, sort=False).mean()
    is_subnetwork = table.index.get_level_values("model").map(lambda m: subnetwork_key(m) is not None).to_numpy()
    fig = Figure(figsize=(2.2 + 1.4 * len(means), 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(means))
    for i, (column, label) in enumerate((("cka", "parallel"), ("length_null_mean", "length-matched pairings (null mean)"),
                                         ("residual_cka", "after regressing out token count (descriptive, not a control)"))):
        ax.bar(x + (i - 1) * 0.27, means[column].to_numpy(dtype=float), 0.27, label=label)
    ax.set_xticks(x, list(means.index), rotation=20, fontsize=8)
    ax.set_ylabel(f"{kind} CKA with {language_name(reference)}, mean over languages")
    ax.legend(fontsize=7)
    ax.set_title("How much of the similarity is sentence length?")
    k = len(set(table.index.get_level_values("model")[is_subnetwork]))
    pooled = f" The subnetworks' bars pool {k} subnetwork{'s' if k > 1 else ''}." if k else ""
    return {TABLE.cka_length: CaptionedFigure(
        fig, f"{kind.capitalize()} CKA with {language_name(reference)} at the last layer (mean over languages): parallel "
             "pairs, the mean of pairings that keep the source sentence's token count (the length-restricted null every "
             "representation test uses), and the CKA of residuals after regressing each representation on its token count; "
             "a content-free length-only encoder is the negative control. The residual CKA is descriptive, not a length "
             "control: regressing out token count leaves the length-only encoder more of it than the trained model, so "
             f"length still drives it.{pooled}", (TABLE.cka_length,))}


def power_figure(table: pd.DataFrame, limits: Mapping[str, float]) -> dict[str, CaptionedFigure]:
    """`power`: each measure's power (share of planted draws detected at p < 0.05) against the signal-to-noise
    ratio of the planted shared signal, with its Wilson 95% interval and the 0.8 line; the length-only encoder's
    rejection rates (`snr` NaN rows) in the legend."""
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    rows = table.reset_index()
    planted, control = rows[rows["snr"].notna()], rows[rows["snr"].isna()]
    for measure, levels in planted.groupby("measure", sort=False):
        levels = levels.sort_values("snr")
        limit = limits.get(measure, math.nan)
        label = f"{measure} (power ≥ 0.8 from SNR {limit:.3g})" if np.isfinite(limit) else f"{measure} (power < 0.8 at every level)"
        line, = ax.plot(levels["snr"], levels["power"], "o-", label=label)
        ax.fill_between(levels["snr"], levels["power_lo"], levels["power_hi"], color=line.get_color(), alpha=0.15, linewidth=0)
    for _, row in control.iterrows():
        ax.plot([], [], " ", label=f"{row['measure']}: {row['power']:.2f} [{row['power_lo']:.2f}, {row['power_hi']:.2f}]")
    ax.axhline(0.8, color="black", linewidth=0.8, linestyle="--", label="power 0.8")
    ax.axhline(0.05, color="grey", linewidth=0.8, linestyle=":", label="alpha 0.05")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("signal-to-noise ratio of the planted shared signal")
    ax.set_ylabel("power (share of draws with p < 0.05)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Power: how strong a shared signal each measure detects here")
    draws = int(planted["n_draws"].max()) if len(planted) else 0
    return {TABLE.power: CaptionedFigure(
        fig, f"Power of CKA, RSA and retrieval at the length-restricted null: the share of {draws} planted draws per level "
             "detected at p < 0.05 (each permutation test stopped early once p < 0.05 is out of reach), with Wilson 95% "
             "intervals, against the signal-to-noise ratio at which a partner shares the full model's reference-language "
             "vectors, at the demo's n and d; levels found by bisection on log SNR. A measure's detection limit is the "
             "weakest tested ratio with power ≥ 0.8. The length-only encoder's rejection rate (legend) should be near 0.05.",
        (TABLE.power,))}


def language_distance_figure(table: pd.DataFrame, distances: Mapping[str, pd.DataFrame],
                             matrices: Mapping[str, pd.DataFrame], labels: Mapping[str, str]) -> dict[str, CaptionedFigure]:
    """`language_distance`: one panel per (analysis matrix, URIEL distance): every language pair's value
    against the two languages' distance, the Mantel r and p in the title from `table` (`distance_correlations`
    indexed by distance and measure). `labels`: {measure: axis label}."""
    fig = Figure(figsize=(0.6 + 2.9 * len(distances), 0.6 + 2.6 * len(matrices)), layout="constrained")
    axes = fig.subplots(len(matrices), len(distances), squeeze=False, sharex="col", sharey="row")
    for row, (measure, matrix) in enumerate(matrices.items()):
        for col, (distance, dist) in enumerate(distances.items()):
            ax = axes[row][col]
            langs, x, y = paired_matrices(dist, matrix)
            i, j = np.triu_indices(len(langs), 1)
            ax.scatter(x[i, j], y[i, j], s=18, color=sns.color_palette("colorblind")[0], edgecolor="white", linewidth=0.5)
            r, p = table.loc[(distance, measure), ["spearman_r", "p_value"]]
            ax.set_title(f"r = {r:.2f}, p = {p:.3g}" if np.isfinite(r) else "r: too few languages", fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(matrices) - 1:
                ax.set_xlabel(f"{distance} distance (URIEL)")
            if col == 0:
                ax.set_ylabel(labels.get(measure, measure), fontsize=8)
    fig.suptitle("Do typologically closer languages share more?")
    return {TABLE.language_distance: CaptionedFigure(
        fig, "Each language pair's value in the analysis matrices (rows; asymmetric ones averaged over both directions) "
             "against the two languages' URIEL distance (columns; Littell et al. 2017); Spearman r and two-sided Mantel "
             "p from relabelling the languages.", (TABLE.language_distance, TABLE.language_distance_uriel))}
