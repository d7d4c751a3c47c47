"""The analyze stage's neuron figures (see `xlsub.report.figures`): each takes tables of
`xlsub.report.neuron_tables` by table id and returns {figure id: `CaptionedFigure`}, on the colour scales the
head figures use."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from xlsub.report.figures import JACCARD_CMAP, MAX_ANNOTATED_COLUMNS, RATIO_CMAP, CaptionedFigure
from xlsub.report.figures.analysis import display_label
from xlsub.report.neuron_tables import NEURON_TABLE, by_language
from xlsub.report.tables import language_name


def _heatmaps(tables: list[tuple[pd.DataFrame, str]], *, cmap: str, norm=None, vmin=None, vmax=None, cbar_label: str,
              xlabel: str = "", ylabel: str = "") -> Figure:
    """One panel per (table, title), rows and columns shown by name (`display_label`), one colour bar on the last."""
    rows, cols = tables[0][0].shape
    fig = Figure(figsize=(len(tables) * (1.6 + 0.62 * cols) + 1.2, 1.6 + 0.5 * rows), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for i, (ax, (table, title)) in enumerate(zip(axes, tables)):
        shown = table.copy()
        shown.index, shown.columns = [display_label(r) for r in table.index], [display_label(c) for c in table.columns]
        last = i == len(tables) - 1
        sns.heatmap(shown, ax=ax, cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax,
                    annot=cols <= MAX_ANNOTATED_COLUMNS, fmt=".2f", annot_kws={"size": 8}, linewidths=0.5, linecolor="white",
                    cbar=last, cbar_kws={"label": cbar_label} if last else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if i == 0 else "")
        ax.tick_params(axis="x", labelrotation=45)
        ax.tick_params(axis="y", labelrotation=0)
    colorbar = axes[-1].collections[0].colorbar
    if isinstance(norm, LogNorm) and colorbar is not None:  # plain numbers on a log scale: 0.8, 1, 1.25, not 8 x 10^-1
        ticks = [t for t in (0.33, 0.5, 0.67, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 3) if norm.vmin <= t <= norm.vmax]
        colorbar.minorticks_off()
        colorbar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    return fig


def _ratio_norm(*tables: pd.DataFrame) -> LogNorm:
    """A log colour scale centred at 1, symmetric in log space, shared by all `tables` (as the head figures')."""
    values = np.concatenate([t.to_numpy(dtype=float).ravel() for t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    span = max(float(np.abs(np.log(values)).max()) if values.size else 0.0, math.log(1.05))
    return LogNorm(vmin=math.exp(-span), vmax=math.exp(span))


def deactivation_figure(tables: Mapping[str, pd.DataFrame]) -> dict[str, CaptionedFigure]:
    """`neuron_deactivation`: perplexity with a language's neurons off over the full model's, per evaluation
    language (rows: the mean over seeds), beside random neurons of the same count per layer, on one log colour
    scale centred at 1."""
    main = tables[NEURON_TABLE.neuron_deactivation]
    control = tables.get(NEURON_TABLE.neuron_deactivation_random)
    panels = [(by_language(main), "language's neurons off")]
    if control is not None:
        panels.append((by_language(control), "random neurons off, same count per layer"))
    fig = _heatmaps(panels, cmap=RATIO_CMAP, norm=_ratio_norm(*(t for t, _ in panels)), cbar_label="perplexity / full-model perplexity",
                    xlabel="evaluated on", ylabel="neurons switched off")
    fig.suptitle("Perplexity with a language's neurons switched off, relative to the full model")
    seeds = " (mean over seeds)" if len(main) != len(panels[0][0]) else ""
    caption = ("Perplexity on each language (columns) with one language's feed-forward neurons switched off (rows)"
               f"{seeds}, over the full model's" + (", beside as many random neurons per layer (mean over draws)" if control is not None else "")
               + "; a dark diagonal means a language's neurons matter most to it.")
    ids = (NEURON_TABLE.neuron_deactivation,) + ((NEURON_TABLE.neuron_deactivation_random,) if control is not None else ())
    return {NEURON_TABLE.neuron_deactivation: CaptionedFigure(fig, caption, ids)}


def jaccard_figure(tables: Mapping[str, pd.DataFrame]) -> dict[str, CaptionedFigure]:
    """`neuron_jaccard`: Jaccard of the languages' neuron sets (first seed) beside its chance level."""
    observed, chance = tables[NEURON_TABLE.neuron_jaccard], tables[NEURON_TABLE.neuron_jaccard_expected]
    fig = _heatmaps([(observed, "neuron sets"), (chance, "random sets, same count per layer")], cmap=JACCARD_CMAP, vmin=0,
                    vmax=1, cbar_label="Jaccard")
    fig.suptitle("Overlap of the languages' neuron sets")
    caption = ("Jaccard index of the languages' neuron sets (first seed), beside the exact expectation for random sets with "
               "the same number of neurons per layer; p-values per pair in neuron_jaccard_pvalue.")
    return {NEURON_TABLE.neuron_jaccard: CaptionedFigure(fig, caption, (NEURON_TABLE.neuron_jaccard, NEURON_TABLE.neuron_jaccard_expected,
                                                                         NEURON_TABLE.neuron_jaccard_pvalue))}


def layers_figure(tables: Mapping[str, pd.DataFrame], colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """`neuron_layers`: share of each language's neurons in each layer, pooled, against the eligible neurons'."""
    table = tables[NEURON_TABLE.neuron_layers]
    x = np.asarray(table.columns, dtype=float)
    fig = Figure(figsize=(max(5.0, 1.5 + 0.45 * len(x)) + 1.8, 4), layout="constrained")
    ax = fig.subplots()
    for row in table.index:
        values = table.loc[row].to_numpy(dtype=float)
        if row == "eligible":
            ax.plot(x, values, "--", color="black", linewidth=2, label="eligible neurons")
        elif row == "pooled":
            ax.plot(x, values, "-", color="grey", linewidth=2.5, label="all languages pooled")
        else:
            ax.plot(x, values, "-", marker="o", markersize=4, color=colours.get(row), label=language_name(row), alpha=0.8)
    ax.set_xticks(x, [str(int(v)) for v in x])
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("share of the neurons")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center")
    ax.set_title("Where the language neurons sit")
    caption = ("Share of each language's neurons in each layer (mean over seeds), of all languages' neurons pooled, and of the "
               "neurons eligible for selection (dashed), the distribution a language's neurons would have if chosen at random.")
    return {NEURON_TABLE.neuron_layers: CaptionedFigure(fig, caption, (NEURON_TABLE.neuron_layers, NEURON_TABLE.neuron_outer_layers))}


def neuron_figures(tables: Mapping[str, pd.DataFrame], colours: Mapping[str, tuple]) -> dict[str, CaptionedFigure]:
    """Every neuron figure whose tables are present."""
    drawn = {}
    if NEURON_TABLE.neuron_deactivation in tables:
        drawn |= deactivation_figure(tables)
    if NEURON_TABLE.neuron_jaccard in tables:
        drawn |= jaccard_figure(tables)
    if NEURON_TABLE.neuron_layers in tables:
        drawn |= layers_figure(tables, colours)
    return drawn
