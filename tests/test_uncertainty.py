"""The analyze stage's intervals, tests and verdicts on hand-made inputs, against direct computations."""

from __future__ import annotations

import json
import math
from html import escape

import numpy as np
import pytest
import torch

from tests.test_analysis import analyzed
from xlsub.artifacts import SubnetworkId
from xlsub.models.mlm import ChunkLosses
from xlsub.report.analysis import AnalysisInputs
from xlsub.report.html import write_report
from xlsub.report.tables import perplexity_interval_tables
from xlsub.report.verdicts import QUESTIONS
from xlsub.stats.intervals import bootstrap_indices
from xlsub.stats.overlap import jaccard

LANGS = ["en", "de", "zh"]
N_CHUNKS = 40


def chunks(seed: int, log_ppl: float) -> ChunkLosses:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 12, (N_CHUNKS,), generator=g)
    return ChunkLosses(tokens.double() * (log_ppl + 0.3 * torch.randn(N_CHUNKS, generator=g, dtype=torch.float64)), tokens)


def chunk_losses(specific: bool, seeds=(0,), draws=2) -> dict:
    """Full model at ppl ~ e^3 everywhere; a subnetwork costs 0.05 nats on its own language and 0.4 (specific)
    or 0.05 on the others; random masks cost 0.2 everywhere. Chunks are the same texts for every model."""
    out = {("full", -1, l): chunks(10 + i, 3.0) for i, l in enumerate(LANGS)}
    for s in seeds:
        for own in LANGS:
            for i, l in enumerate(LANGS):
                base = out[("full", -1, l)]
                extra = 0.05 if l == own or not specific else 0.4
                out[(f"{own}-s{s}", -1, l)] = ChunkLosses(base.nll + extra * base.tokens.double(), base.tokens)
                for d in range(draws):
                    noise = chunks(100 * s + 10 * d + i, 0.0)
                    out[(f"{own}-s{s}", d, l)] = ChunkLosses(base.nll + 0.2 * base.tokens.double() + 0.05 * noise.nll, base.tokens)
    return out


def test_the_intervals_are_percentiles_of_a_paired_chunk_bootstrap_done_by_hand():
    losses = chunk_losses(specific=True, seeds=(0, 1))
    tables, metrics = perplexity_interval_tables(losses, LANGS, replicates=200, seed=3)
    idx = {l: bootstrap_indices(N_CHUNKS, 200, 3 + i) for i, l in enumerate(sorted(LANGS))}

    def ppl(c: ChunkLosses, rows) -> float:
        return math.exp(float(c.nll[rows].sum()) / float(c.tokens[rows].sum()))

    for own in LANGS:
        for l in LANGS:
            values = [np.mean([ppl(losses[(f"{own}-s{s}", -1, l)], idx[l][b]) for s in (0, 1)]) / ppl(losses[("full", -1, l)], idx[l][b])
                      for b in range(200)]
            lo, hi = np.quantile(values, [0.025, 0.975])
            assert tables["cross_ppl_relative_lo"].loc[own, l] == pytest.approx(lo, rel=1e-9)
            assert tables["cross_ppl_relative_hi"].loc[own, l] == pytest.approx(hi, rel=1e-9)
    # the point gap: e^0.4 off the diagonal, e^0.05 on it (relative perplexity = e^extra exactly)
    assert metrics["specificity_gap"] == pytest.approx(math.exp(0.4) - math.exp(0.05), rel=1e-9)
    assert metrics["specificity_gap_random"] == pytest.approx(0.0, abs=0.02)
    assert metrics["specificity_gap_lo"] > metrics["specificity_gap_random_hi"] and metrics["specificity_gap_p"] < 0.01
    assert list(tables["specificity_gap"].index) == LANGS


def test_no_gap_gives_no_evidence():
    _, metrics = perplexity_interval_tables(chunk_losses(specific=False), LANGS, replicates=200, seed=0)
    assert metrics["specificity_gap"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["specificity_gap_p"] > 0.05


def masks_for(seeds=(0, 1, 2)) -> dict:
    """Language-specific masks (4 layers x 8 heads): each language keeps its own heads, seeds perturb one head."""
    out = {}
    for li, lang in enumerate(LANGS):
        for s in seeds:
            mask = torch.zeros(4, 8)
            for layer in range(4):
                mask[layer, [(li * 3 + layer) % 8, (li * 3 + layer + 1) % 8, (li * 3 + layer + 2) % 8]] = 1
            mask[s % 4, (li * 3 + s) % 8] = 1 - mask[s % 4, (li * 3 + s) % 8]
            out[SubnetworkId(lang, s)] = mask
    return out


def test_analyze_opens_with_three_verdicts_and_writes_them(tmp_path):
    masks = masks_for()
    trajectories = {sid: [torch.ones(4, 8), *[m for m in (mask,)]] for sid, mask in masks.items()}
    inputs = AnalysisInputs(languages=LANGS, masks=masks, chunk_losses=chunk_losses(True, seeds=(0, 1, 2)), trajectories=trajectories)
    result = analyzed(inputs, bootstrap=200, permutations=200)
    assert [v.question for v in result.verdicts] == list(QUESTIONS[:3])  # no encodings: no representation verdicts
    different, specific, stable = result.verdicts
    assert specific.answer.startswith("yes")
    # within-language Jaccard across seeds is well above the across-language one
    within = np.mean([jaccard(masks[SubnetworkId(l, a)], masks[SubnetworkId(l, b)]) for l in LANGS for a, b in ((0, 1), (0, 2), (1, 2))])
    assert different.control_value == pytest.approx(within)
    assert stable.value == pytest.approx(within) and stable.answer.startswith("yes")
    assert {"mask_jaccard_pvalue", "specificity_gap", "cross_ppl_relative_lo", "cross_ppl_relative_hi"} <= set(result.tables)
    assert result.metrics["verdict.specificity.value"] == pytest.approx(specific.value)
    write_report(result, tmp_path, {"analyze": "x"}, dpi=30)
    written = json.loads((tmp_path / "verdicts.json").read_text())
    assert [v["question"] for v in written] == list(QUESTIONS[:3])
    html = (tmp_path / "report.html").read_text()
    assert html.index("Answers") < html.index("Lineage") and escape(QUESTIONS[1]) in html


def test_one_seed_cannot_tell_stability():
    masks = masks_for(seeds=(0,))
    result = analyzed(AnalysisInputs(languages=LANGS, masks=masks), permutations=50)
    questions = {v.question: v for v in result.verdicts}
    assert questions[QUESTIONS[2]].answer.startswith("cannot tell")
    assert questions[QUESTIONS[0]].answer.startswith("cannot tell")
