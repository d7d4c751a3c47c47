"""The analyze stage's intervals, tests and verdicts on hand-made inputs, against direct computations."""

from __future__ import annotations

import json
import math
from html import escape
from itertools import combinations, product

import numpy as np
import pytest
import torch

from tests.test_analysis import analyzed
from xlsub.artifacts import SubnetworkId
from xlsub.models.mlm import ChunkLosses
from xlsub.report.analysis import AnalysisInputs
from xlsub.report.html import write_report
from xlsub.report.tables import _swap_seed, label_swap_test, perplexity_interval_tables
from xlsub.report.verdicts import QUESTIONS
from xlsub.stats.inference import benjamini_hochberg, bootstrap_indices
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
    assert metrics["specificity_gap_lo"] > metrics["specificity_gap_random_hi"]
    table = tables["specificity_gap"]
    assert list(table.index) == LANGS
    np.testing.assert_allclose(table["d"], table["gap"] - table["random_gap"], rtol=1e-12)
    # every swap of subnetwork and control lowers the gap: the label-swap p sits at its floor 1 / (1 + 200)
    np.testing.assert_allclose(table["p_value"], 1 / 201) and np.testing.assert_allclose(table["p_bh"], 1 / 201)
    # 3 languages: the exact sign-flip test over languages cannot go below 1/8, and has no 95% interval
    assert metrics["specificity_excess_p"] == 1 / 8
    assert math.isnan(metrics["specificity_excess_lo"]) and math.isnan(metrics["specificity_excess_hi"])
    assert "specificity_gap_p" not in metrics


def test_no_gap_gives_no_evidence():
    tables, metrics = perplexity_interval_tables(chunk_losses(specific=False), LANGS, replicates=200, seed=0)
    assert metrics["specificity_gap"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["specificity_excess_p"] > 0.05
    assert (tables["specificity_gap"]["p_value"] > 0.05).all()


# -- the specificity excess at the level of languages -----------------------------------------------------

LANGS8 = ["en", "de", "zh", "ru", "es", "ar", "hi", "fr"]


def language_losses(effects: dict, seeds=(0,), draws=2, n_chunks=30, seed=0) -> dict:
    """Full model at ppl ~ e^3; subnetwork `own` costs 0.05 nats on its own language and 0.05 + effects[own]
    on the others, plus chunk noise; random masks cost 0.2 everywhere plus chunk noise."""
    g = torch.Generator().manual_seed(seed)
    langs = list(effects)
    out = {}
    for l in langs:
        tokens = torch.randint(5, 12, (n_chunks,), generator=g)
        out[("full", -1, l)] = ChunkLosses(tokens.double() * (3.0 + 0.3 * torch.randn(n_chunks, generator=g, dtype=torch.float64)), tokens)
    for s in seeds:
        for own in langs:
            for l in langs:
                base = out[("full", -1, l)]
                extra = 0.05 + (effects[own] if l != own else 0.0)
                noise = 0.1 * torch.randn(n_chunks, generator=g, dtype=torch.float64)
                out[(f"{own}-s{s}", -1, l)] = ChunkLosses(base.nll + (extra + noise) * base.tokens.double(), base.tokens)
                for d in range(draws):
                    noise = 0.1 * torch.randn(n_chunks, generator=g, dtype=torch.float64)
                    out[(f"{own}-s{s}", d, l)] = ChunkLosses(base.nll + (0.2 + noise) * base.tokens.double(), base.tokens)
    return out


def direct_excess(losses: dict, langs, seeds) -> dict:
    """d per language with plain numpy: mean over seeds of (mean relative ppl on the others - on its own),
    the subnetwork's minus that of the random masks (mean of the draws' perplexities)."""
    def ppl(c):
        return math.exp(np.sum(c.nll.numpy()) / np.sum(c.tokens.numpy()))

    d = {}
    for own in langs:
        rel, rel_random = {}, {}
        for l in langs:
            full = ppl(losses[("full", -1, l)])
            rel[l] = np.mean([ppl(losses[(f"{own}-s{s}", -1, l)]) for s in seeds]) / full
            rel_random[l] = np.mean([np.mean([ppl(c) for (m, k, e), c in losses.items() if m == f"{own}-s{s}" and e == l and k >= 0])
                                     for s in seeds]) / full
        gap = np.mean([rel[l] for l in langs if l != own]) - rel[own]
        gap_random = np.mean([rel_random[l] for l in langs if l != own]) - rel_random[own]
        d[own] = gap - gap_random
    return d


def test_the_language_level_excess_against_hand_enumerated_sign_flips():
    effects = dict(zip(LANGS8, [0.3, 0.25, 0.1, -0.02, 0.2, 0.15, 0.05, 0.12]))
    losses = language_losses(effects, seeds=(0, 1))
    tables, metrics = perplexity_interval_tables(losses, LANGS8, replicates=100, seed=0)
    d = direct_excess(losses, LANGS8, (0, 1))
    values = np.array([d[l] for l in LANGS8])
    np.testing.assert_allclose(tables["specificity_gap"].loc[LANGS8, "d"], values, rtol=1e-10)
    assert metrics["specificity_excess"] == pytest.approx(values.mean(), rel=1e-10)
    assert metrics["specificity_excess.ru"] == pytest.approx(d["ru"], rel=1e-10)
    flips = [np.dot(signs, values) for signs in product((1, -1), repeat=8)]
    assert metrics["specificity_excess_p"] == pytest.approx(np.mean([f >= values.sum() - 1e-12 for f in flips]))
    # the 95% interval: the 6th smallest and 6th largest of the 255 subset means (Hartigan 1969), as
    # (1 + 5) / 256 <= 0.025 < (1 + 6) / 256
    means = sorted(np.mean(subset) for r in range(1, 9) for subset in combinations(values, r))
    assert metrics["specificity_excess_lo"] == pytest.approx(means[5], rel=1e-8)
    assert metrics["specificity_excess_hi"] == pytest.approx(means[-6], rel=1e-8)


def swap_loop(losses: dict, language: str, langs, n_swaps: int, seed: int) -> tuple[float, float]:
    """`label_swap_test` as plain loops over replicates and chunks, drawing the same swaps."""
    g = torch.Generator().manual_seed(seed)
    models = sorted({m for (m, k, l) in losses if m != "full" and m.startswith(language + "-")})
    swaps = {(m, l): (torch.rand(n_swaps, len(losses[(m, -1, l)].nll), generator=g) < 0.5).numpy() for m in models for l in langs}
    statistics = []
    for b in range(n_swaps + 1):
        rel, rel_control = {l: [] for l in langs}, {l: [] for l in langs}
        for m in models:
            for l in langs:
                sub = losses[(m, -1, l)]
                draws = [c for (mm, k, e), c in sorted(losses.items(), key=lambda item: item[0][1]) if mm == m and e == l and k >= 0]
                full = losses[("full", -1, l)]
                a_nll = a_tok = c_nll = c_tok = 0.0
                for i in range(len(sub.nll)):
                    x = (float(sub.nll[i]), float(sub.tokens[i]))
                    y = (np.mean([float(c.nll[i]) for c in draws]), np.mean([float(c.tokens[i]) for c in draws]))
                    if b > 0 and swaps[(m, l)][b - 1, i]:
                        x, y = y, x
                    a_nll, a_tok, c_nll, c_tok = a_nll + x[0], a_tok + x[1], c_nll + y[0], c_tok + y[1]
                log_full = float(full.nll.sum()) / float(full.tokens.sum())
                rel[l].append(math.exp(a_nll / a_tok - log_full))
                rel_control[l].append(math.exp(c_nll / c_tok - log_full))
        gap = np.mean([np.mean(rel[l]) for l in langs if l != language]) - np.mean(rel[language])
        gap_control = np.mean([np.mean(rel_control[l]) for l in langs if l != language]) - np.mean(rel_control[language])
        statistics.append(gap - gap_control)
    observed, null = statistics[0], np.array(statistics[1:])
    return observed, (1 + int((null >= observed - 1e-12).sum())) / (1 + n_swaps)


def test_the_label_swap_p_against_a_plain_loop():
    langs = ["en", "de", "zh"]
    losses = language_losses({"en": 0.02, "de": 0.0, "zh": 0.01}, seeds=(0, 1), n_chunks=12)
    for language in langs:
        observed, p = label_swap_test(losses, language, langs, 60, seed=5)
        expected = swap_loop(losses, language, langs, 60, seed=5)
        assert observed == pytest.approx(expected[0], rel=1e-10) and p == expected[1]
    tables, _ = perplexity_interval_tables(losses, langs, replicates=60, seed=2)
    for language in langs:
        assert tables["specificity_gap"].loc[language, "p_value"] == label_swap_test(losses, language, langs, 60, _swap_seed(2, language))[1]
    np.testing.assert_allclose(tables["specificity_gap"]["p_bh"], benjamini_hochberg(tables["specificity_gap"]["p_value"]))


def test_the_label_swap_test_is_calibrated_and_finds_a_planted_effect():
    """No true effect (subnetwork and its one random draw from the same distribution): rejections at
    alpha = 0.05 no more than alpha + 3 SE over 300 small sets; a planted excess is found in most."""
    sets, alpha, langs = 300, 0.05, ["en", "de"]
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / sets)

    def rejected(effect: float, seed: int) -> bool:
        g = torch.Generator().manual_seed(seed)
        losses = {}
        for l in langs:
            tokens = torch.randint(5, 12, (10,), generator=g)
            base = tokens.double() * (3.0 + 0.3 * torch.randn(10, generator=g, dtype=torch.float64))
            losses[("full", -1, l)] = ChunkLosses(base, tokens)
            for k in (-1, 0):  # the subnetwork and its random draw: the same law, plus the effect off its own language
                shift = effect if (k == -1 and l != "en") else 0.0
                noise = 0.2 + shift + 0.1 * torch.randn(10, generator=g, dtype=torch.float64)
                losses[("en-s0", k, l)] = ChunkLosses(base + noise * tokens.double(), tokens)
        return label_swap_test(losses, "en", langs, 99, seed)[1] < alpha

    null_rate = np.mean([rejected(0.0, s) for s in range(sets)])
    planted = np.mean([rejected(0.25, s) for s in range(100)])
    assert null_rate <= bound, null_rate
    assert planted >= 0.8, planted


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
    # a strong excess in every language, but 3 languages cannot carry a claim about languages
    assert specific.answer.startswith("no evidence at the level of languages") and "cannot give p below 0.125" in specific.answer
    assert "significant for 3 of 3" in specific.answer
    assert (specific.p, specific.inference.p_floor, specific.inference.n_units) == (0.125, 0.125, 3)
    # within-language Jaccard across seeds is well above the across-language one
    within = np.mean([jaccard(masks[SubnetworkId(l, a)], masks[SubnetworkId(l, b)]) for l in LANGS for a, b in ((0, 1), (0, 2), (1, 2))])
    assert different.value == pytest.approx(result.tables["head_agreement"]["difference"].mean()) and different.value > 0
    assert (different.lo, different.hi) == (-math.inf, math.inf)  # 3 languages: no 95% sign-flip interval
    assert different.answer.startswith("no evidence") and json.loads(json.dumps(different.as_dict()))["lo"] is None
    # stable in each language, yet 3 languages cannot carry the claim about languages either
    assert stable.value == pytest.approx(within) and stable.answer.startswith("no evidence at the level of languages")
    assert "above chance for 3 of 3" in stable.answer and stable.inference.test == "sign_flip_exact"
    assert stable.value == pytest.approx(result.tables["seed_stability"]["within"].mean())
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


def test_the_specificity_verdict_with_eight_languages_names_those_without_an_excess():
    effects = dict(zip(LANGS8, [0.3, 0.0, 0.25, 0.0, 0.3, 0.2, 0.25, 0.3]))  # de and ru: no excess
    losses = language_losses(effects, n_chunks=40, seed=1)
    result = analyzed(AnalysisInputs(languages=LANGS8, chunk_losses=losses), bootstrap=200, permutations=200, reference="en")
    (verdict,) = result.verdicts
    table = result.tables["specificity_gap"]
    assert verdict.answer.startswith("yes for 6 of 8 languages") and "de and ru show no excess over random masks" in verdict.answer
    assert verdict.value == pytest.approx(table["d"].mean()) and verdict.lo > 0
    assert verdict.control == "random masks with the same heads per layer"
    assert verdict.control_value == pytest.approx(table["random_gap"].mean())
    inference = verdict.inference
    assert (inference.n_units, inference.test, inference.p_floor) == (8, "sign_flip_exact", 1 / 256)
    assert inference.unit == "languages > seeds > random draws > chunks"
    assert verdict.p == result.metrics["specificity_excess_p"] <= 0.05
    row = verdict.as_dict()
    assert row["key"] == "specificity" and row["robust_to_leave_one_out"] in (True, False)
