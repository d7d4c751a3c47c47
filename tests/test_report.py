"""report.html: every figure by its relative path with its caption, the tables, metrics and lineage, all escaped."""

from __future__ import annotations

import html
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from tests.test_analysis import analyzed
from xlsub.artifacts import SubnetworkId, read_table
from xlsub.report.analysis import AnalysisInputs, AnalysisResult
from xlsub.report.figures.stages import head_mask_heatmap, matrix_heatmap, perplexity_bars
from xlsub.report.html import MAX_INLINE_ROWS, format_number, render_report, table_html, write_report
from xlsub.stats.overlap import AttentionParams

LINEAGE = {"finetune": "ft0123", "prune": "pr4567", "encode": "en89ab", "analyze": "an_cdef"}
LINKS = {"prune": "http://127.0.0.1:5000/#/experiments/1/runs/pr4567", "en89ab": "https://mlflow.example/runs/en89ab",
         "finetune": "javascript:alert(1)"}


class Page(HTMLParser):
    """What a browser would load and link: img sources, link targets, and the visible text."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.visible = "".join(parser.text)
    return parser


def small_analysis() -> AnalysisResult:
    g = torch.Generator().manual_seed(0)
    en = torch.randn(3, 12, 4, generator=g)
    masks = {SubnetworkId("en", 0): torch.tensor([[1, 1, 0], [1, 0, 1]]),
             SubnetworkId("de", 0): torch.tensor([[1, 0, 1], [1, 1, 1]])}
    cross = pd.DataFrame([[11.0, 30.0], [15.0, 22.0]], index=["en-s0", "de-s0"], columns=["en", "de"])
    inputs = AnalysisInputs(languages=["en", "de"], masks=masks, cross_ppl=cross, cross_ppl_random=2 * cross,
                            ppl_full={"en": 10.0, "de": 20.0},
                            encodings={"full": {"en": en, "de": en + 0.3 * torch.randn(3, 12, 4, generator=g)},
                                       "en-s0": {"en": en, "de": torch.randn(3, 12, 4, generator=g)}},
                            tokens={"en": [[1, 2]], "de": [[1, 3]]},
                            attention_params=AttentionParams.full_mha(hidden_size=6, head_dim=2, heads=3))
    return analyzed(inputs)


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return small_analysis()


def paths(result):
    return ({name: f"figures/{name}.png" for name in result.figures}, {name: f"tables/{name}.csv" for name in result.tables})


def test_every_figure_with_relative_src_and_caption(result):
    figure_paths, table_paths = paths(result)
    page = parse(render_report(result, figure_paths, table_paths, LINEAGE, LINKS, "Demo analysis"))
    sources = [img["src"] for img in page.images]
    assert sorted(sources) == sorted(figure_paths.values())
    assert all(not s.startswith(("/", "http")) for s in sources)
    for name, caption in result.captions.items():
        assert caption in page.visible  # unescaped by the parser: the caption reads as written
        assert any(img["alt"] == caption for img in page.images)


def test_tables_metrics_and_numbers(result):
    figure_paths, table_paths = paths(result)
    page = render_report(result, figure_paths, table_paths, LINEAGE, None, "t")
    parsed = parse(page)
    for name in result.tables:
        assert name in parsed.visible
        assert f"tables/{name}.csv" in parsed.links
    for key, value in result.metrics.items():
        assert key in parsed.visible and format_number(value) in parsed.visible
    # the relative perplexity of the en subnetwork on de, 30 / 20, as the table shows it
    assert "1.500" in parsed.visible


def test_lineage_ids_and_links(result):
    figure_paths, table_paths = paths(result)
    parsed = parse(render_report(result, figure_paths, table_paths, LINEAGE, LINKS, "t"))
    for run_id in LINEAGE.values():
        assert run_id in parsed.visible
    assert LINKS["prune"] in parsed.links  # by stage
    assert LINKS["en89ab"] in parsed.links  # by run ID
    assert not any(link.startswith("javascript") for link in parsed.links)  # only http(s) becomes a link
    # without links the IDs are still there, as text
    bare = parse(render_report(result, figure_paths, table_paths, LINEAGE, None, "t"))
    assert all(run_id in bare.visible for run_id in LINEAGE.values())
    assert not any(link.startswith("http") for link in bare.links)


def test_hostile_text_is_escaped(result):
    figure_paths, table_paths = paths(result)
    title = '<script>alert("x")</script> & "quotes"'
    lineage = {"prune": '"><img src=x onerror=alert(1)>'}
    page = render_report(result, figure_paths, table_paths, lineage, None, title)
    assert "<script>" not in page
    assert html.escape(title) in page
    parsed = parse(page)
    assert title in parsed.visible
    assert "script" not in parsed.tags
    assert [img["src"] for img in parsed.images] == list(figure_paths.values())  # no injected <img>


def test_self_contained(result):
    figure_paths, table_paths = paths(result)
    page = render_report(result, figure_paths, table_paths, LINEAGE, None, "t")
    parsed = parse(page)
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "script" not in parsed.tags and "link" not in parsed.tags and "<style>" in page
    with pytest.raises(ValueError, match="relative"):
        render_report(result, {n: f"/abs/{n}" for n in result.figures}, table_paths, LINEAGE, None, "t")


def test_large_tables_are_linked_not_inlined():
    big = pd.DataFrame(np.arange(2 * (MAX_INLINE_ROWS + 1)).reshape(-1, 2), columns=["a", "b"])
    res = AnalysisResult()
    res.add_figure("big", Figure(), "a big table", {"big": big})
    page = render_report(res, {"big": "figures/big.png"}, {"big": "tables/big.csv"}, {}, None, "t")
    parsed = parse(page)
    assert "tables/big.csv" in parsed.links and "too large" in parsed.visible
    assert str(2 * MAX_INLINE_ROWS + 1) not in parsed.visible  # the last cell is not rendered


def test_number_formatting():
    assert format_number(float("nan")) == "–"
    assert format_number(1234.56) == "1,235"
    assert format_number(123.456) == "123.5"
    assert format_number(0.85349) == "0.853"
    assert format_number(1.2e-5) == "1.20e-05"
    assert format_number(np.int64(3)) == "3"
    table = pd.DataFrame({"x": [0.5]}, index=pd.Index(["<b>"], name="language"))
    assert "&lt;b&gt;" in table_html(table) and "0.500" in table_html(table)


def test_write_report_files_exist_next_to_it(tmp_path):
    result = small_analysis()  # its own: writing releases the figures
    written = write_report(result, tmp_path, LINEAGE, LINKS, "Demo", dpi=40)
    report = tmp_path / "report.html"
    parsed = parse(report.read_text(encoding="utf-8"))
    assert sorted(img["src"] for img in parsed.images) == sorted(f"figures/{f}.png" for f in result.figures)
    for img in parsed.images:
        assert (tmp_path / img["src"]).read_bytes()[:4] == b"\x89PNG"
    assert written.keys() == result.tables.keys()
    for table_id, table in written.items():
        saved = read_table(tmp_path / "tables" / f"{table_id}.csv", table.index.nlevels)
        assert f"tables/{table_id}.csv" in parsed.links
        text = [c for c in table.columns if table[c].dtype == object or pd.api.types.is_string_dtype(table[c])]  # e.g. `null`
        numbers = [c for c in table.columns if c not in text]
        np.testing.assert_allclose(saved[numbers].to_numpy(float), table[numbers].to_numpy(float), rtol=1e-12, err_msg=table_id)
        assert saved[text].astype(str).equals(table[text].astype(str).set_axis(saved.index)), table_id
        assert [str(i) for i in saved.index] == [str(i) for i in table.index], table_id
    # the relative perplexity of the en subnetwork on de, 30 / 20, as written
    assert written["cross_ppl_relative"].loc["en", "de"] == pytest.approx(1.5)


def test_no_figure_is_left_in_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    plt.close("all")  # what other tests may have left
    result = small_analysis()
    stage = [perplexity_bars(pd.DataFrame({"lang": ["en"], "ppl_before": [9.0], "ppl_after": [3.0]})),
             head_mask_heatmap(torch.tensor([[1, 0]]), torch.tensor([[0.7, 0.2]]), "en-s0"),
             matrix_heatmap(pd.DataFrame([[1.0]], index=["en-s0"], columns=["en"]), "t", "ppl")]
    write_report(result, tmp_path, LINEAGE, dpi=30)
    assert plt.get_fignums() == []
    assert all(not fig.axes for fig in result.figures.values())  # released once saved
    assert all(fig.axes for fig in stage)  # the stage figures are ordinary objects, not pyplot's
