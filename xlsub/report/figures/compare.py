"""The compare stage's figures (see `xlsub.report.figures`): the mean over analyze runs with ± one standard deviation
(ddof=1) and each run's value. They take the summaries of `xlsub.report.compare.summarise` (key columns, then
`mean`, `std`, `n` and one column per run ID) and return `CaptionedFigure`s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xlsub.report.figures import CaptionedFigure, palette
from xlsub.report.figures.analysis import display_label

LAYER = "layer"


def _keys(summary: pd.DataFrame) -> list[str]:
    return list(summary.columns[: list(summary.columns).index("mean")])


def _short(run_id: str) -> str:
    return run_id[:8]


def metrics_figure(summary: pd.DataFrame, run_ids: Sequence[str], key: str = "metric") -> CaptionedFigure:
    """One panel, one row per metric: mean ± std as an error bar, each run's value as a dot of its colour."""
    names = [str(n) for n in summary[key]]
    fig = Figure(figsize=(8.0, 1.4 + 0.32 * max(len(names), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names), dtype=float)
    colours = palette(list(run_ids))
    slots = len(run_ids) + len(run_ids) % 2  # an even number of slots: none at 0, where the mean is drawn
    offsets = np.linspace(-0.3, 0.3, slots)[: len(run_ids)] if slots > 1 else [0.25]
    for run, offset in zip(run_ids, offsets):
        ax.scatter(summary[run].to_numpy(dtype=float), y + offset, s=16, color=colours[run], label=f"run {_short(run)}", zorder=3)
    ax.errorbar(summary["mean"].to_numpy(dtype=float), y, xerr=summary["std"].fillna(0).to_numpy(dtype=float), fmt="D",
                color="black", markersize=4, capsize=3, label="mean ± std", zorder=4)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("value")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Headline metrics over {len(run_ids)} analyze runs")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    caption = (f"Every metric the {len(run_ids)} analyze runs share: the mean (black diamond) ± one standard deviation "
               "over runs (ddof=1), and each run's value (dots).")
    return CaptionedFigure(fig, caption, ())


def layer_figure(summary: pd.DataFrame, table_id: str, run_ids: Sequence[str]) -> CaptionedFigure | None:
    """For a table with the column axis `layer` (its last key): one line per row (language, subnetwork, ...)
    over the layers, the mean with a ± std band and each run's values as dots; with two row keys (`condition`,
    `language`) one panel per value of the first. None for any other table."""
    keys = _keys(summary)
    if not keys or keys[-1] != LAYER:
        return None
    rows = keys[:-1]
    panel_key, line_keys = (rows[0], rows[1:]) if len(rows) >= 2 else (None, rows)
    panels = list(dict.fromkeys(summary[panel_key])) if panel_key else [None]
    parts = [summary[summary[panel_key] == panel] if panel_key else summary for panel in panels]
    labels = list(dict.fromkeys(label for part in parts for label, _ in _lines(part, line_keys)))
    colours = palette(labels)
    fig = Figure(figsize=(4.6 * len(panels) + 2.2, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel, part in zip(axes, panels, parts):
        for label, line in _lines(part, line_keys):
            x = pd.to_numeric(line[LAYER]).to_numpy(dtype=float)
            order = np.argsort(x)
            x, mean, std = x[order], line["mean"].to_numpy(dtype=float)[order], line["std"].to_numpy(dtype=float)[order]
            colour = colours[label]
            ax.plot(x, mean, marker="o", markersize=3, color=colour, label=label)
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
            for run in run_ids:
                ax.scatter(x, line[run].to_numpy(dtype=float)[order], s=6, color=colour, alpha=0.5)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel_key:
            ax.set_title(f"{panel_key}: {display_label(panel)}")
    axes[0].set_ylabel(table_id)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title=" / ".join(line_keys) or None)
    fig.suptitle(f"{table_id}: mean over {len(run_ids)} analyze runs, ± std band, each run's values")
    caption = (f"{table_id} per layer over {len(run_ids)} analyze runs: the mean (line), ± one standard deviation over "
               "runs (band, ddof=1) and each run's value (dots).")
    return CaptionedFigure(fig, caption, (table_id,))


def _lines(part: pd.DataFrame, line_keys: Sequence[str]):
    """(label, rows) per line, in table order."""
    if not line_keys:
        yield "mean", part
        return
    for key, rows in part.groupby(list(line_keys), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        yield " / ".join(display_label(k) for k in key), rows


def comparison_figures(metrics: pd.DataFrame, tables: Mapping[str, pd.DataFrame], run_ids: Sequence[str],
                       metrics_id: str = "metrics", key: str = "metric") -> dict[str, CaptionedFigure]:
    """{figure id: CaptionedFigure}: `metrics_id` for the headline metrics, then one per-layer figure per
    table with a layer axis, under the table's id."""
    drawn = {}
    if len(metrics):
        drawn[metrics_id] = metrics_figure(metrics, run_ids, key)
    for table_id, summary in tables.items():
        figure = layer_figure(summary, table_id, run_ids)
        if figure is not None:
            drawn[table_id] = figure
    return drawn
