"""`report.html` for an analyze run: every figure with its caption and numbers, the metrics and the lineage.

`write_report` is the one writer of an analyze run's artifacts: `figures/<figure id>.png`,
`tables/<table id>.csv` and `report.html`. The page is self-contained (inline CSS, no scripts, no
external resources) and refers to the figures by paths relative to itself (`figures/mask_jaccard.png`),
because it is logged next to them in the run's artifacts. All text is escaped.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from xlsub import stages
from xlsub.artifacts import REPORT, figure_path, table_path, write_table, write_verdicts
from xlsub.report.analysis import AnalysisResult
from xlsub.report.figures import save_figure
from xlsub.report.verdicts import format_p

# Tables larger than this are linked, not inlined.
MAX_INLINE_ROWS = 40
MAX_INLINE_COLUMNS = 16

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
figure { margin: 1rem 0 0.6rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.95rem; color: #444; margin-top: 0.3rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem 0; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; }
th { background: #f5f5f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-size: 0.85rem; color: #555; padding-bottom: 0.2rem; }
details { margin: 0.3rem 0 1rem 0; }
summary { cursor: pointer; color: #333; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9em; }
nav ul { columns: 2; }
.note { color: #666; font-size: 0.9rem; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _anchor(name: str) -> str:
    return "fig-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _relative(path) -> str:
    """A figure or table path as the page refers to it; absolute paths and URLs would break once logged."""
    text = (path if isinstance(path, str) else Path(path).as_posix()).replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
        raise ValueError(f"report paths must be relative to report.html, got {path!r}")
    return text


def _http_url(url) -> str | None:
    return url if isinstance(url, str) and re.match(r"^https?://", url, re.IGNORECASE) else None


def format_number(value) -> str:
    """Numbers as a reader wants them in a table: 1,234 / 123.4 / 0.853 / 1.2e-05; NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(value)


def table_html(table: pd.DataFrame, name: str = "") -> str:
    """A DataFrame as an HTML table: index levels as leading header columns, numbers right-aligned."""
    names = None if _has_named_index(table) else ""
    flat = table.reset_index(names=names, allow_duplicates=True)
    index_columns = table.index.nlevels
    what = []
    if table.columns.name:
        what.append(f"columns: {table.columns.name}")
    parts = ["<table>"]
    if name or what:
        parts.append(f"<caption>{_e(name)}{' — ' if name and what else ''}{_e('; '.join(what))}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in flat.columns) + "</tr></thead><tbody>")
    for row in flat.itertuples(index=False):
        cells = []
        for i, value in enumerate(row):
            if i < index_columns:
                cells.append(f"<th>{_e(format_number(value) if isinstance(value, numbers.Number) else value)}</th>")
            elif isinstance(value, numbers.Number) or value is None:
                cells.append(f'<td class="num">{_e(format_number(value))}</td>')
            else:
                cells.append(f"<td>{_e(value)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _has_named_index(table: pd.DataFrame) -> bool:
    return any(n is not None for n in table.index.names)


def _table_block(name: str, table: pd.DataFrame, table_paths: Mapping[str, str]) -> str:
    path = table_paths.get(name)
    link = f' (<a href="{_e(_relative(path))}">{_e(name)}</a>)' if path else ""
    if table.shape[0] > MAX_INLINE_ROWS or table.shape[1] > MAX_INLINE_COLUMNS:
        target = f'<a href="{_e(_relative(path))}">{_e(name)}</a>' if path else f"<code>{_e(name)}</code>"
        return (f'<p class="note">Table {target}: {table.shape[0]} rows × {table.shape[1]} columns, '
                "too large to show here.</p>")
    return (f"<details open><summary>Numbers: <code>{_e(name)}</code>{link}</summary>"
            f"{table_html(table)}</details>")


def _lineage_html(lineage: Mapping[str, str], run_links: Mapping[str, str] | None) -> str:
    run_links = run_links or {}
    order = stages.lineage_order()
    ordered = [s for s in order if s in lineage] + [s for s in lineage if s not in order]
    rows = []
    for stage in ordered:
        run_id = lineage[stage]
        url = _http_url(run_links.get(stage)) or _http_url(run_links.get(run_id))
        cell = f'<a href="{_e(url)}"><code>{_e(run_id)}</code></a>' if url else f"<code>{_e(run_id)}</code>"
        rows.append(f"<tr><th>{_e(stage)}</th><td>{cell}</td></tr>")
    return "<table><thead><tr><th>stage</th><th>run ID</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"


def _metrics_html(metrics: Mapping[str, float]) -> str:
    rows = "".join(f'<tr><th><code>{_e(k)}</code></th><td class="num">{_e(format_number(v))}</td></tr>'
                   for k, v in metrics.items())
    return f"<table><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"


def _verdicts_html(verdicts) -> str:
    """One line per question: the answer (worded by the numbers), then value, interval, control and p."""
    rows = []
    for v in verdicts:
        robust = {True: "yes", False: "no", None: "not computed"}[v.inference.robust_to_leave_one_out]
        numbers = (f"value {format_number(v.value)}, 95% interval [{format_number(v.lo)}, {format_number(v.hi)}]; "
                   f"control ({v.control}): {format_number(v.control_value)}; {format_p(v.p, v.p_floor)} "
                   f"({v.inference.test} over {v.inference.unit}, {v.inference.n_units} units); "
                   f"same answer without any one unit: {robust}")
        rows.append(f'<li class="verdict"><strong>{_e(v.question)}</strong> {_e(v.answer)}.'
                    f'<br><span class="note">{_e(numbers)}</span></li>')
    return f'<ul class="verdicts">{"".join(rows)}</ul>'


def render_report(result: AnalysisResult, figure_paths: Mapping[str, str], table_paths: Mapping[str, str],
                  lineage: Mapping[str, str], run_links: Mapping[str, str] | None = None,
                  title: str = "xlsub analysis") -> str:
    """The analysis as one self-contained HTML page (UTF-8 text).

    `figure_paths` and `table_paths` map the figure and table ids in `result` to paths relative to
    report.html (`figures/mask_jaccard.png`, `tables/mask_jaccard.csv`); `lineage` maps a stage (finetune,
    prune, encode, analyze) to its run ID;
    `run_links` maps a stage or a run ID to an http(s) URL of the run (other schemes are not linked).
    The page opens with the verdicts (one line per question), then every figure with its caption and its
    tables (inline, or linked when large), then the tables no figure owns.
    """
    body = [f"<h1>{_e(title)}</h1>"]
    if result.verdicts:
        body.append("<h2>Answers</h2>" + _verdicts_html(result.verdicts))
    body.append("<h2>Lineage</h2>" + _lineage_html(lineage, run_links))
    if result.metrics:
        body.append("<h2>Summary metrics</h2>" + _metrics_html(result.metrics))
    if result.figures:
        items = "".join(f'<li><a href="#{_e(_anchor(n))}">{_e(n)}</a></li>' for n in result.figures)
        body.append(f"<h2>Figures</h2><nav><ul>{items}</ul></nav>")
    shown = set()
    for name in result.figures:
        caption = result.captions.get(name, "")
        block = [f'<section id="{_e(_anchor(name))}"><h3>{_e(name)}</h3>']
        if name in figure_paths:
            block.append(f'<figure><img src="{_e(_relative(figure_paths[name]))}" alt="{_e(caption or name)}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
        else:
            block.append(f'<p class="note">(figure not saved)</p><p>{_e(caption)}</p>')
        for table_name in result.figure_tables.get(name, []):
            if table_name in result.tables:
                block.append(_table_block(table_name, result.tables[table_name], table_paths))
                shown.add(table_name)
        block.append("</section>")
        body.append("".join(block))
    rest = [n for n in result.tables if n not in shown]
    if rest:
        body.append("<h2>Other tables</h2>" + "".join(_table_block(n, result.tables[n], table_paths) for n in rest))
    if result.notes:
        body.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in result.notes) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{_e(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(result: AnalysisResult, folder: str | Path, lineage: Mapping[str, str],
                 run_links: Mapping[str, str] | None = None, title: str = "xlsub analysis",
                 dpi: int = 110) -> dict[str, pd.DataFrame]:
    """Write the analysis into `folder` as the analyze run logs it: every figure as `figures/<figure id>.png`
    (`save_figure`, which releases it: write a result once), every table as `tables/<table id>.csv`
    (`write_table`) and `report.html` referring to both by relative paths.

    `lineage`, `run_links` and `title` as in `render_report`. Returns the tables written, by table id, for
    the caller to log in long form as well (`xlsub.report.tables.long_table`, `artifacts.table_path(id, ".json")`).
    """
    folder = Path(folder)
    figure_paths, table_paths = {}, {}
    for figure_id, figure in result.figures.items():
        figure_paths[figure_id] = figure_path(figure_id)
        save_figure(figure, folder / figure_paths[figure_id], dpi)
    for table_id, table in result.tables.items():
        write_table(folder, table_id, table)
        table_paths[table_id] = table_path(table_id)
    page = render_report(result, figure_paths, table_paths, lineage, run_links, title)
    (folder / REPORT).write_text(page, encoding="utf-8")
    if result.verdicts:
        write_verdicts(folder, result.verdicts)
    return dict(result.tables)
