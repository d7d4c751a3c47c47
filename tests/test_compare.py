"""The compare stage's numbers against hand computations: cells matched across runs, mean, std (ddof=1), n,
languages refused, figures drawn from the summary, and the report escaped."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from xlsub import artifacts
from xlsub.errors import XlsubError
from xlsub.report.compare import (
    Comparison,
    cells,
    check_same_languages,
    compare,
    render_report,
    short_ids,
    summarise,
    summarise_metrics,
    write_comparison,
)
from xlsub.report.figures.compare import layer_figure, metrics_figure
from xlsub.tracking.lineage import run_url

A, B, C = "a" * 32, "b" * 32, "c" * 32


def cka(values_de, values_zh):
    """A cka_vs_reference table in long form: language x layer 0..2, as mlflow.load_table returns it."""
    return pd.DataFrame({"language": ["de"] * 3 + ["zh"] * 3, "layer": [0, 1, 2] * 2, "value": [*values_de, *values_zh]})


def overlap(token, pairs):
    """A table of measures (one row per language, a column per measure), like token_overlap."""
    return pd.DataFrame({"language": ["de", "zh"], "token_overlap": token, "pairs": pairs, "empty": [None, None]})


def test_cells_of_a_value_table_are_keyed_by_every_other_column():
    s = cells(cka([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))
    assert list(s.index.names) == ["language", "layer"]
    assert s[("zh", 1)] == 0.5 and len(s) == 6


def test_cells_of_a_table_of_measures_are_keyed_by_its_text_columns_and_the_measure():
    s = cells(overlap([0.5, 0.25], [3, 1]))
    assert list(s.index.names) == ["language", "measure"]
    assert s[("de", "token_overlap")] == 0.5 and s[("zh", "pairs")] == 1.0
    assert math.isnan(s[("de", "empty")])  # a column of nulls is a measure without values, not a key


def test_a_cell_given_twice_is_refused():
    twice = pd.DataFrame({"language": ["de", "de"], "value": [1.0, 2.0]})
    with pytest.raises(XlsubError, match=r"^table t: cell \('de',\) .* appears twice"):
        cells(twice, "t")


def test_summarise_gives_mean_std_n_and_each_runs_value_by_hand():
    # three runs in shuffled row order; the de/0 cell is 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3,
    # sum of squares 42/9, divided by n-1 = 2: variance 7/3
    a = cka([1.0, 0.0, 0.0], [0.5, 0.5, 0.5])
    b = cka([2.0, 0.0, 0.0], [0.5, 0.5, 0.5]).iloc[::-1]
    c = cka([4.0, 0.0, 0.0], [0.5, 0.5, np.nan])
    out = summarise({A: a, B: b, C: c})
    assert list(out.columns) == ["language", "layer", "mean", "std", "n", A, B, C]
    assert list(zip(out["language"], out["layer"])) == [("de", 0), ("de", 1), ("de", 2), ("zh", 0), ("zh", 1), ("zh", 2)]
    row = out.iloc[0]
    assert row["mean"] == pytest.approx(7 / 3) and row["std"] == pytest.approx(math.sqrt(7 / 3)) and row["n"] == 3
    assert (row[A], row[B], row[C]) == (1.0, 2.0, 4.0)
    assert out.iloc[1]["std"] == 0.0
    last = out.iloc[5]  # NaN in run C: left out of mean and std, counted out of n
    assert last["n"] == 2 and last["mean"] == 0.5 and last["std"] == 0.0 and math.isnan(last[C])


def test_summarise_matches_cells_missing_from_some_runs():
    a = cka([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    b = pd.concat([cka([3.0, 2.0, 1.0], [0.0, 0.0, 0.0]).iloc[:3],  # no zh rows
                   pd.DataFrame({"language": ["ur"], "layer": [0], "value": [9.0]})])
    out = summarise({A: a, B: b}).set_index(["language", "layer"])
    assert out.loc[("de", 0), "mean"] == 2.0 and out.loc[("de", 0), "std"] == pytest.approx(math.sqrt(2))
    assert out.loc[("zh", 2), "n"] == 1 and out.loc[("zh", 2), "mean"] == 6.0 and math.isnan(out.loc[("zh", 2), "std"])
    assert out.loc[("ur", 0), "n"] == 1 and math.isnan(out.loc[("ur", 0), A])
    assert list(out.index)[-1] == ("ur", 0)  # cells first seen in a later run come last


def test_summarise_of_tables_of_measures_and_other_key_orders():
    out = summarise({A: overlap([0.5, 0.25], [3, 1]), B: overlap([0.7, 0.35], [3, 2])})
    row = out.set_index(["language", "measure"]).loc[("zh", "token_overlap")]
    assert row["mean"] == pytest.approx(0.3) and row["std"] == pytest.approx(0.1 / math.sqrt(2))
    swapped = cka([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])[["layer", "language", "value"]]
    again = summarise({A: cka([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), B: swapped})
    assert (again["std"] == 0).all() and (again["n"] == 2).all()


def test_summarise_refuses_tables_keyed_differently():
    other = pd.DataFrame({"subnetwork": ["de-s0"], "layer": [0], "value": [1.0]})
    with pytest.raises(XlsubError, match=f"^table cka_vs_reference: keyed by \\(language, layer\\) in run {A} but by \\(subnetwork, layer\\) in run {B}"):
        summarise({A: cka([1.0] * 3, [1.0] * 3), B: other}, "cka_vs_reference")


def test_metrics_are_summarised_where_every_run_has_them():
    out = summarise_metrics({A: {"mean_jaccard": 0.2, "mean_cka_last_layer": 0.5, "only_a": 1.0},
                             B: {"mean_jaccard": 0.4, "mean_cka_last_layer": 0.9}})
    assert list(out["metric"]) == ["mean_cka_last_layer", "mean_jaccard"]
    jaccard = out.set_index("metric").loc["mean_jaccard"]
    assert jaccard["mean"] == pytest.approx(0.3) and jaccard["std"] == pytest.approx(0.2 / math.sqrt(2))


def test_languages_must_be_the_same_set():
    assert check_same_languages({A: ["en", "de"], B: ["de", "en"]}) == ["en", "de"]
    with pytest.raises(XlsubError) as err:
        check_same_languages({A: ["en", "de"], B: ["en", "de"], C: ["en", "zh"]})
    assert str(err.value) == (f"analyze_run_ids: the runs analysed different languages ({A}, {B}: en,de; {C}: en,zh); "
                              "compare analyze runs of the same languages")


def comparison():
    metrics = {A: {"mean_jaccard": 0.2, "mean_cka_last_layer": 0.5}, B: {"mean_jaccard": 0.4, "mean_cka_last_layer": 0.5},
               C: {"mean_jaccard": 0.6, "mean_cka_last_layer": 0.5}}
    tables = {A: {"cka_vs_reference": cka([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), "token_overlap": overlap([0.5, 0.2], [1, 1]), "extra": cka([0] * 3, [0] * 3)},
              B: {"cka_vs_reference": cka([0.3, 0.2, 0.1], [0.4, 0.5, 0.6]), "token_overlap": overlap([0.6, 0.2], [1, 1])},
              C: {"cka_vs_reference": cka([0.2, 0.2, 0.2], [0.4, 0.5, 0.6]), "token_overlap": overlap([0.7, 0.2], [1, 1])}}
    languages = {A: ["en", "de", "zh"], B: ["en", "de", "zh"], C: ["zh", "de", "en"]}
    return compare(metrics, tables, languages)


def test_compare_gathers_shared_metrics_and_tables_and_says_what_it_left_out():
    result = comparison()
    assert result.run_ids == [A, B, C] and result.languages == ["en", "de", "zh"]
    assert set(result.tables) == {"cka_vs_reference", "token_overlap"}
    assert result.notes == [f"extra: only in 1 of 3 runs ({A}), not compared"]
    logged = result.logged_metrics()
    assert logged["mean_jaccard_mean"] == pytest.approx(0.4) and logged["mean_jaccard_std"] == pytest.approx(0.2)
    assert logged["mean_cka_last_layer_std"] == 0.0 and set(logged) == {f"{m}_{s}" for m in ("mean_jaccard", "mean_cka_last_layer") for s in ("mean", "std")}
    with pytest.raises(XlsubError, match="^analyze_run_ids: got 1 run"):
        compare({A: {}}, {A: {}}, {A: ["en"]})


def test_metrics_figure_shows_the_mean_std_and_each_run():
    result = comparison()
    fig = metrics_figure(result.metrics, result.run_ids).figure
    ax = fig.axes[0]
    points = [c.get_offsets()[:, 0] for c in ax.collections if c.get_label().startswith("run ")]
    assert [list(p) for p in points] == [[0.5, 0.2], [0.5, 0.4], [0.5, 0.6]]  # metrics sorted: cka, then jaccard
    bars = next(c for c in ax.containers)  # the error bar: mean +- std
    assert list(bars.lines[0].get_xdata()) == pytest.approx([0.5, 0.4])
    segments = bars.lines[2][0].get_segments()
    assert [s[:, 0].tolist() for s in segments] == [pytest.approx([0.5, 0.5]), pytest.approx([0.2, 0.6])]


def test_layer_figure_draws_the_mean_and_a_std_band_per_language():
    result = comparison()
    summary = result.tables["cka_vs_reference"]
    fig = layer_figure(summary, "cka_vs_reference", result.run_ids).figure
    ax = fig.axes[0]
    de = next(line for line in ax.lines if line.get_label() == "German")
    assert list(de.get_xdata()) == [0, 1, 2] and list(de.get_ydata()) == pytest.approx([0.2, 0.2, 0.2])
    band = next(c for c in ax.collections if isinstance(c, PolyCollection))
    ys = band.get_paths()[0].vertices[:, 1]
    assert max(ys) == pytest.approx(0.3) and min(ys) == pytest.approx(0.1)  # de at layer 0: 0.1, 0.3, 0.2 -> std 0.1
    assert layer_figure(result.tables["token_overlap"], "token_overlap", result.run_ids) is None


def test_layer_figure_has_a_panel_per_condition():
    long = pd.concat([cka([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]).assign(condition=c) for c in ("parallel", "shuffled")])
    long = long[["condition", "language", "layer", "value"]]
    summary = summarise({A: long, B: long})
    fig = layer_figure(summary, "cka_controls", [A, B]).figure
    assert [ax.get_title() for ax in fig.axes[:2]] == ["condition: parallel", "condition: shuffled"]


def test_written_files_and_report(tmp_path):
    result = comparison()
    runs = {A: {"run name": "<script>alert(1)</script>", "cka": "linear"}, B: {"run name": "b"}, C: {}}
    links = {A: "http://mlflow.example:5000/#/experiments/1/runs/" + A, B: "javascript:alert(1)"}
    written = write_comparison(tmp_path, result, runs, links, compare_run_id="d" * 32)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "metrics.csv", "tables/cka_vs_reference.csv", "tables/token_overlap.csv", "figures/metrics.png",
        "figures/cka_vs_reference.png", "report.html"}
    back = artifacts.read_table(tmp_path / "tables" / "cka_vs_reference.csv", index_levels=2)
    assert list(back.columns) == ["mean", "std", "n", A, B, C]
    assert back.loc[("de", 0), "mean"] == pytest.approx(0.2) and back.loc[("de", 0), "std"] == pytest.approx(0.1)
    metrics = pd.read_csv(tmp_path / "metrics.csv", index_col=0)
    assert metrics.loc["mean_jaccard", "mean"] == pytest.approx(0.4) and metrics.loc["mean_jaccard", B] == 0.4
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert f'href="{links[A]}"' in page and "javascript:" not in page
    assert 'src="figures/metrics.png"' in page and 'src="figures/cka_vs_reference.png"' in page
    assert all(run in page for run in (A, B, C)) and "extra: only in 1 of 3 runs" in page


def test_render_report_without_links_and_run_urls():
    result = Comparison([A, B], ["en"], summarise_metrics({A: {"m": 1.0}, B: {"m": 3.0}}))
    page = render_report(result, {}, {}, {})
    assert "<a " not in page and "2.000" in page  # the mean, formatted as the analyze report formats numbers
    assert run_url("sqlite:///x.db", "1", A) is None
    assert run_url("http://host:5000/", "1", A) == f"http://host:5000/#/experiments/1/runs/{A}"
    assert short_ids([A, B]) == {A: "a" * 8, B: "b" * 8}
    assert short_ids(["abcdefgh1", "abcdefgh2"]) == {"abcdefgh1": "abcdefgh1", "abcdefgh2": "abcdefgh2"}
