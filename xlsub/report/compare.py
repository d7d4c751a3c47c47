"""The compare stage: several analyze runs of the same languages as the mean, the spread and each run's value.

Every headline metric the runs share, and every cell of every table they share, becomes one row: the
cell's keys, `mean`, `std` (the sample standard deviation over runs, ddof=1), `n` (how many runs have a
number there; missing and NaN values are left out of mean and std) and each run's value in a column named
by its run ID. Tables come in the long form the analyze stage logs (`xlsub.report.tables.long_table`, read back
with `mlflow.load_table`):

- one number per row: the key columns (`language`, `layer`, ...) and `value`;
- one item per row with its measures as columns (`token_overlap`): the text columns are the keys, every
  other column is a measure, and the cell is (keys, `measure`).

These are plain functions over pandas frames; `entry_points/compare.py` reads the runs from MLflow and
`write_comparison` writes what the compare run logs: `metrics.csv`, `tables/<table id>.csv`,
`figures/<figure id>.png` and `report.html`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xlsub.artifacts import COMPARE_METRICS, REPORT, figure_path, table_path, write_table
from xlsub.errors import XlsubError
from xlsub.report.figures import save_figure
from xlsub.report.figures.compare import comparison_figures
from xlsub.report.html import CSS, MAX_INLINE_ROWS, table_html  # the analyze report's look

VALUE = "value"  # the number column of a long table
MEASURE = "measure"  # the key naming the measure of a table of measures
METRIC = "metric"  # the key of metrics.csv
PARAM = "analyze_run_ids"


# -- cells -------------------------------------------------------------------------------------------------

def _is_key(column: pd.Series) -> bool:
    """A column of a table of measures is a key when it holds text (a column of nothing but nulls is a measure)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return False
    present = column.dropna()
    return len(present) > 0 and not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present)


def cells(long: pd.DataFrame, name: str = "table") -> pd.Series:
    """One long table -> one float per cell, indexed by the cell's keys (a MultiIndex, also for one key).

    With a `value` column every other column is a key; otherwise the text columns are keys and the rest
    are measures, melted into the key `measure`. A cell that appears twice is refused.
    """
    if VALUE in long.columns:
        keys = [c for c in long.columns if c != VALUE]
        frame = long
    else:
        keys = [c for c in long.columns if _is_key(long[c])]
        measures = [c for c in long.columns if c not in keys]
        frame = long.melt(id_vars=keys, value_vars=measures, var_name=MEASURE, value_name=VALUE)
        keys = [*keys, MEASURE]
    if not keys:
        raise XlsubError(f"table {name}: no key columns ({', '.join(map(str, long.columns))}); it cannot be matched across runs")
    index = pd.MultiIndex.from_frame(frame[keys].astype(object))
    repeated = index[index.duplicated()]
    if len(repeated):
        raise XlsubError(f"table {name}: cell {tuple(repeated[0])} of ({', '.join(keys)}) appears twice; it cannot be matched across runs")
    return pd.Series(pd.to_numeric(frame[VALUE], errors="coerce").to_numpy(dtype=float), index=index, name=VALUE)


def summarise(values_by_run: Mapping[str, pd.DataFrame], name: str = "table") -> pd.DataFrame:
    """{run ID: long table} -> one row per cell: its keys, `mean`, `std`, `n` and one column per run.

    `std` is the sample standard deviation over the runs, sqrt(sum((x - mean)^2) / (n - 1)) (ddof=1; NaN
    for a cell only one run has).

    Cells are matched by their keys (in any row order); a cell missing from some runs is NaN in their
    columns and counts only where present. Rows follow the first run's order, then cells first seen later.
    Runs whose tables are keyed by different columns are refused (XlsubError naming the table).
    """
    if not values_by_run:
        raise ValueError("summarise needs at least one run")
    series = {run: cells(long, name) for run, long in values_by_run.items()}
    first_run, first = next(iter(series.items()))
    keys = list(first.index.names)
    index = first.index
    for run, values in series.items():
        if set(values.index.names) != set(keys):
            raise XlsubError(f"table {name}: keyed by ({', '.join(keys)}) in run {first_run} but by "
                             f"({', '.join(values.index.names)}) in run {run}; compare runs made by the same analyze code")
        values = values.reorder_levels(keys)
        series[run] = values
        index = index.append(values.index[~values.index.isin(index)])
    by_run = pd.DataFrame({run: values.reindex(index).to_numpy() for run, values in series.items()}, index=index)
    stats = pd.DataFrame({"mean": by_run.mean(axis=1), "std": by_run.std(axis=1, ddof=1),
                          "n": by_run.notna().sum(axis=1).astype(int)}, index=index)
    return pd.concat([stats, by_run], axis=1).reset_index()


def summary_keys(summary: pd.DataFrame) -> list[str]:
    """The key columns of a `summarise` result: those before `mean`."""
    return list(summary.columns[: list(summary.columns).index("mean")])


def shared_names(names_by_run: Mapping[str, Iterable[str]]) -> list[str]:
    """The names every run has, sorted."""
    sets = [set(names) for names in names_by_run.values()]
    return sorted(set.intersection(*sets)) if sets else []


def summarise_metrics(metrics_by_run: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """{run ID: {metric: value}} -> `summarise` of the metrics every run has, one row per metric (sorted)."""
    names = shared_names(metrics_by_run)
    frames = {run: pd.DataFrame({METRIC: names, VALUE: [float(metrics[n]) for n in names]}, columns=[METRIC, VALUE])
              for run, metrics in metrics_by_run.items()}
    return summarise(frames, "metrics")


def check_same_languages(languages_by_run: Mapping[str, Sequence[str]], param: str = PARAM) -> list[str]:
    """The runs' common languages (in the first run's order); runs that analysed other languages are
    refused with one line naming each group of runs and its languages."""
    groups: dict[frozenset, list[str]] = {}
    for run, languages in languages_by_run.items():
        groups.setdefault(frozenset(languages), []).append(run)
    if len(groups) > 1:
        spelled = {}
        for languages in languages_by_run.values():
            spelled.setdefault(frozenset(languages), ",".join(languages))
        parts = "; ".join(f"{', '.join(runs)}: {spelled[langs]}" for langs, runs in groups.items())
        raise XlsubError(f"{param}: the runs analysed different languages ({parts}); compare analyze runs of the same languages")
    return list(next(iter(languages_by_run.values()), []))


# -- the comparison ----------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """The runs compared, their languages, the metric summary (`summarise_metrics`), one `summarise` per
    shared table by table id, and what was not compared."""

    run_ids: list[str]
    languages: list[str]
    metrics: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def logged_metrics(self) -> dict[str, float]:
        """`<metric>_mean` and `<metric>_std` of every shared metric, where finite (one run: no std)."""
        logged = {}
        for name, mean, std in zip(self.metrics[METRIC], self.metrics["mean"], self.metrics["std"]):
            for suffix, value in (("mean", mean), ("std", std)):
                if math.isfinite(value):
                    logged[f"{name}_{suffix}"] = float(value)
        return logged


def compare(metrics_by_run: Mapping[str, Mapping[str, float]], tables_by_run: Mapping[str, Mapping[str, pd.DataFrame]],
            languages_by_run: Mapping[str, Sequence[str]]) -> Comparison:
    """Mean, std and each run's value of every metric and table cell the runs share (runs keyed by ID, in
    the order given). Refuses fewer than two runs and runs of different languages; a shared table whose
    cells cannot be matched across runs, and tables only some runs have, are listed in `notes`."""
    run_ids = list(metrics_by_run)
    if len(run_ids) < 2:
        raise XlsubError(f"{PARAM}: got {len(run_ids)} run; pass at least two analyze run IDs, comma-separated")
    languages = check_same_languages({run: languages_by_run[run] for run in run_ids})
    result = Comparison(run_ids, languages, summarise_metrics({run: metrics_by_run[run] for run in run_ids}))
    names = {run: list(tables_by_run.get(run, {})) for run in run_ids}
    shared = shared_names(names)
    for table_id in shared:
        try:
            result.tables[table_id] = summarise({run: tables_by_run[run][table_id] for run in run_ids}, table_id)
        except XlsubError as err:
            result.notes.append(f"{table_id}: not compared ({err})")
    for table_id in sorted({t for ts in names.values() for t in ts} - set(shared)):
        having = [run for run in run_ids if table_id in names[run]]
        result.notes.append(f"{table_id}: only in {len(having)} of {len(run_ids)} runs ({', '.join(having)}), not compared")
    return result


# -- report ------------------------------------------------------------------------------------------------

def short_ids(run_ids: Sequence[str], width: int = 8) -> dict[str, str]:
    """Run IDs as the tables of the report show them: their first `width` characters, whole where those clash."""
    short = {run: run[:width] for run in run_ids}
    return short if len(set(short.values())) == len(short) else {run: run for run in run_ids}


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _run_cell(run_id: str, links: Mapping[str, str | None]) -> str:
    url = links.get(run_id)
    code = f"<code>{_e(run_id)}</code>"
    return f'<a href="{_e(url)}">{code}</a>' if url and str(url).startswith(("http://", "https://")) else code


def _figure_html(figure_id: str, figure: tuple[str, str], table_paths: Mapping[str, str]) -> str:
    path, caption = figure
    link = f' (<a href="{_e(table_paths[figure_id])}">numbers</a>)' if figure_id in table_paths else ""
    return (f'<h3>{_e(figure_id)}</h3><figure><img src="{_e(path)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}{link}</figcaption></figure>")


def _shown(summary: pd.DataFrame, run_ids: Sequence[str]) -> pd.DataFrame:
    """A summary as the report shows it: keys as the index, run columns under their short IDs."""
    return summary.set_index(summary_keys(summary)).rename(columns=short_ids(run_ids))


def render_report(comparison: Comparison, runs: Mapping[str, Mapping[str, str]], figures: Mapping[str, tuple[str, str]],
                  table_paths: Mapping[str, str], links: Mapping[str, str | None] | None = None,
                  compare_run_id: str | None = None) -> str:
    """The comparison as one self-contained HTML page: the runs (linked when `links` holds http(s) URLs by
    run ID), the languages, the metric summary, the figures (`figures`: figure id -> (path, caption),
    relative to report.html) and the tables (`table_paths`: table id -> relative path). All text is escaped."""
    links = links or {}
    run_ids = comparison.run_ids
    short = short_ids(run_ids)
    body = [f"<h1>xlsub compare: {len(run_ids)} analyze runs</h1>"]
    if compare_run_id:
        body.append(f"<p>Compare run {_run_cell(compare_run_id, links)}.</p>")
    body.append(f"<p>Languages: {_e(', '.join(comparison.languages))}. Every number below is the mean over the runs, "
                "its standard deviation (ddof=1) and each run's value; <code>n</code> counts the runs that have it.</p>")
    columns = list(dict.fromkeys(k for row in runs.values() for k in row))
    head = "".join(f"<th>{_e(c)}</th>" for c in ["run ID", "shown as", *columns])
    rows = "".join(f"<tr><td>{_run_cell(run, links)}</td><td><code>{_e(short[run])}</code></td>"
                   + "".join(f"<td>{_e(runs.get(run, {}).get(c, ''))}</td>" for c in columns) + "</tr>" for run in run_ids)
    body.append(f"<h2>Runs</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    body.append("<h2>Headline metrics</h2>")
    if COMPARE_METRICS in figures:
        body.append(_figure_html(COMPARE_METRICS, figures[COMPARE_METRICS], table_paths))
    body.append(table_html(_shown(comparison.metrics, run_ids)))
    per_layer = [f for f in figures if f != COMPARE_METRICS]
    if per_layer:
        body.append("<h2>Per layer</h2>" + "".join(_figure_html(f, figures[f], table_paths) for f in per_layer))
    if comparison.tables:
        body.append("<h2>Tables</h2>")
        for table_id, summary in comparison.tables.items():
            link = f'<a href="{_e(table_paths.get(table_id, ""))}"><code>{_e(table_id)}</code></a>'
            if len(summary) <= MAX_INLINE_ROWS:
                body.append(f"<details><summary>{link}: {len(summary)} cells</summary>{table_html(_shown(summary, run_ids))}</details>")
            else:
                body.append(f"<p>{link}: {len(summary)} cells, too many to show here.</p>")
    if comparison.notes:
        body.append("<h2>Not compared</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in comparison.notes) + "</ul>")
    title = f"xlsub compare: {len(run_ids)} analyze runs"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_comparison(folder: str | Path, comparison: Comparison, runs: Mapping[str, Mapping[str, str]],
                     links: Mapping[str, str | None] | None = None, compare_run_id: str | None = None,
                     dpi: int = 110) -> list[Path]:
    """Write what the compare run logs into `folder`: `metrics.csv`, `tables/<table id>.csv` (keys, mean,
    std, n, one column per run ID), `figures/<figure id>.png` (`xlsub.report.figures.compare`) and `report.html`.
    `runs`: what the report lists about each run, by run ID. Returns the paths written."""
    folder = Path(folder)
    written = [write_table(folder, COMPARE_METRICS, comparison.metrics.set_index(METRIC), subfolder=None)]
    table_paths = {}
    for table_id, summary in comparison.tables.items():
        written.append(write_table(folder, table_id, summary.set_index(summary_keys(summary))))
        table_paths[table_id] = table_path(table_id)
    table_paths[COMPARE_METRICS] = table_path(COMPARE_METRICS, folder=None)
    figures = {}
    drawn = comparison_figures(comparison.metrics, comparison.tables, comparison.run_ids, COMPARE_METRICS, METRIC)
    for figure_id, (figure, caption, _) in drawn.items():
        written.append(save_figure(figure, folder / figure_path(figure_id), dpi))
        figures[figure_id] = (figure_path(figure_id), caption)
    page = render_report(comparison, runs, figures, table_paths, links, compare_run_id)
    (folder / REPORT).write_text(page, encoding="utf-8")
    written.append(folder / REPORT)
    return written
