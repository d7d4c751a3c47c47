"""The neuron analyses (`xlsub.report.neuron_tables`) against independent computations: perplexities and the
specificity difference d redone with plain math, the chance Jaccard by enumerating every random set of a tiny
shape in exact fractions, hypergeometric tails from scipy, sign-flip and Mantel p-values by enumerating every
sign vector and relabelling by hand; and the calibration of the two verdicts judged over languages."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations, permutations, product

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from xlsub.artifacts import SubnetworkId as S
from xlsub.models.mlm import ChunkLosses
from xlsub.report import neuron_tables as nt
from xlsub.report.verdicts import SPECIFICITY, Inference, Verdict, specificity
from xlsub.stats.inference import benjamini_hochberg
from xlsub.stats.overlap import expected_random_jaccard, jaccard, jaccard_pvalue, overlap_null

ALPHA = 0.05
LANGS = ["en", "de", "fr", "es", "ru", "zh", "ar", "hi"]


def bound(sets: int) -> float:
    """alpha + 3 binomial standard errors of a rejection rate over `sets` simulated data sets."""
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sets)


def mask_with_set(layers: int, neurons: int, positions) -> torch.Tensor:
    """A neuron mask (1 = kept) whose language neurons (0) are `positions`, (layer, neuron) pairs."""
    mask = torch.ones(layers, neurons)
    for layer, neuron in positions:
        mask[layer, neuron] = 0
    return mask


def random_mask(rng: np.random.Generator, counts, neurons: int) -> torch.Tensor:
    mask = torch.ones(len(counts), neurons)
    for layer, k in enumerate(counts):
        mask[layer, rng.choice(neurons, size=k, replace=False)] = 0
    return mask


def neuron_losses(effects: dict, seeds=(0,), draws=2, n_chunks=12, seed=0) -> dict:
    """Full model at ppl ~ e^3; a language's neurons off cost 0.1 nats everywhere plus effects[own] on its own
    language, with chunk noise; random neurons cost 0.1 everywhere with chunk noise."""
    g = torch.Generator().manual_seed(seed)
    langs = list(effects)
    out = {}
    for lang in langs:
        tokens = torch.randint(5, 12, (n_chunks,), generator=g)
        out[("full", -1, lang)] = ChunkLosses(tokens.double() * (3.0 + 0.3 * torch.randn(n_chunks, generator=g, dtype=torch.float64)), tokens)
    for s in seeds:
        for own in langs:
            for lang in langs:
                base = out[("full", -1, lang)]
                extra = 0.1 + (effects[own] if lang == own else 0.0)
                noise = 0.1 * torch.randn(n_chunks, generator=g, dtype=torch.float64)
                out[(f"{own}-s{s}", -1, lang)] = ChunkLosses(base.nll + (extra + noise) * base.tokens.double(), base.tokens)
                for d in range(draws):
                    noise = 0.1 * torch.randn(n_chunks, generator=g, dtype=torch.float64)
                    out[(f"{own}-s{s}", d, lang)] = ChunkLosses(base.nll + (0.1 + noise) * base.tokens.double(), base.tokens)
    return out


def ppl(c: ChunkLosses) -> float:
    return math.exp(sum(c.nll.tolist()) / sum(c.tokens.tolist()))


def brute_sign_flip_p(values) -> float:
    """One-sided exact sign-flip p of the mean, every sign vector listed."""
    values = list(values)
    observed = sum(values) / len(values)
    flips = [sum(s * v for s, v in zip(signs, values)) / len(values) for signs in product((1, -1), repeat=len(values))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


# -- the deactivation matrix and d ------------------------------------------------------------------------

def test_deactivation_matrix_is_perplexity_over_the_full_models_by_hand():
    full = {"en": ChunkLosses(torch.tensor([6.0, 9.0], dtype=torch.float64), torch.tensor([2, 3])),
            "de": ChunkLosses(torch.tensor([4.0, 4.0], dtype=torch.float64), torch.tensor([2, 2]))}
    losses = {("full", -1, lang): c for lang, c in full.items()}
    nll = {("en", "en"): [8.0, 12.0], ("en", "de"): [5.0, 4.0], ("de", "en"): [7.0, 9.0], ("de", "de"): [6.0, 6.0]}
    for (own, lang), values in nll.items():
        tokens = full[lang].tokens
        losses[(f"{own}-s0", -1, lang)] = ChunkLosses(torch.tensor(values, dtype=torch.float64), tokens)
        losses[(f"{own}-s0", 0, lang)] = ChunkLosses(torch.tensor(values, dtype=torch.float64) - 1, tokens)
        losses[(f"{own}-s0", 1, lang)] = (torch.tensor(values, dtype=torch.float64) - 2, tokens)  # as read_chunk_losses gives them
    tables = nt.deactivation_tables(losses, ["en", "de"], bootstrap=0, seed=0)
    table, control = tables["neuron_deactivation"], tables["neuron_deactivation_random"]
    assert list(table.index) == ["en-s0", "de-s0"] and list(table.columns) == ["en", "de"]
    # en: full ppl e^(15/5) = e^3; en's neurons off e^(20/5) = e^4
    assert table.loc["en-s0", "en"] == pytest.approx(math.exp(4 - 3))
    assert table.loc["de-s0", "de"] == pytest.approx(math.exp(12 / 4 - 2))
    # draws remove 2 and 4 nats over the chunks: mean of their perplexities
    assert control.loc["en-s0", "de"] == pytest.approx((math.exp(7 / 4) + math.exp(5 / 4)) / 2 / math.exp(2))
    assert "neuron_deactivation_lo" not in tables


def test_deactivation_intervals_bracket_the_point_and_by_language_averages_seeds():
    losses = neuron_losses(dict.fromkeys(LANGS[:3], 0.2), seeds=(0, 1))
    tables = nt.deactivation_tables(losses, LANGS[:3], bootstrap=200, seed=1)
    point, lo, hi = (tables[f"neuron_deactivation{s}"] for s in ("", "_lo", "_hi"))
    assert ((lo.to_numpy() <= point.to_numpy() + 1e-9) & (point.to_numpy() <= hi.to_numpy() + 1e-9)).all()
    assert (tables["neuron_deactivation_random_lo"].to_numpy() < tables["neuron_deactivation_random_hi"].to_numpy()).all()
    means = nt.by_language(point)
    assert means.loc["de", "fr"] == pytest.approx((point.loc["de-s0", "fr"] + point.loc["de-s1", "fr"]) / 2)


def reference_d(losses: dict, langs, seeds) -> dict[str, float]:
    """d per language with plain math: mean over seeds of [(log rel own - mean log rel others) of its neurons off
    minus the same of its random neurons, each cell the mean over draws of the draw's log rel]."""
    out = {}
    for own in langs:
        values = []
        for s in seeds:
            model = f"{own}-s{s}"
            rel = {lang: math.log(ppl(losses[(model, -1, lang)]) / ppl(losses[("full", -1, lang)])) for lang in langs}
            rnd = {lang: np.mean([math.log(ppl(c) / ppl(losses[("full", -1, lang)]))
                                  for (m, d, e), c in losses.items() if m == model and e == lang and d >= 0]) for lang in langs}
            gap = rel[own] - np.mean([rel[lang] for lang in langs if lang != own])
            gap_random = rnd[own] - np.mean([rnd[lang] for lang in langs if lang != own])
            values.append(gap - gap_random)
        out[own] = float(np.mean(values))
    return out


def test_specificity_d_matches_a_reference_and_the_verdict_is_judged_over_languages():
    langs = LANGS[:6]
    effects = dict(zip(langs, [0.3, 0.2, 0.05, 0.25, 0.15, 0.4]))
    losses = neuron_losses(effects, seeds=(0, 1), draws=3, seed=5)
    table, verdict = nt.specificity(losses, langs, 99, 0)
    expected = reference_d(losses, langs, (0, 1))
    assert list(table.index) == langs
    assert table["d"].to_dict() == pytest.approx(expected, abs=1e-12)
    assert (table["gap"] - table["random_gap"]).to_numpy() == pytest.approx(table["d"].to_numpy())
    assert table["p_bh"].to_numpy() == pytest.approx(benjamini_hochberg(table["p_value"].to_numpy()))
    assert verdict.key == "neuron_specificity" and verdict.value == pytest.approx(np.mean(list(expected.values())))
    assert verdict.p == pytest.approx(brute_sign_flip_p(expected.values()))
    assert verdict.inference.test == "sign_flip_exact" and verdict.inference.n_units == 6 and verdict.p_floor == 1 / 64
    assert verdict.answer.startswith("yes") and verdict.lo > 0


def test_the_label_swap_statistic_is_d_with_one_draw():
    """With a single random draw, the swap test's control chunk losses are the draw's own, so its observed
    statistic is d exactly."""
    losses = neuron_losses(dict(zip(LANGS[:3], [0.3, 0.0, 0.1])), seeds=(0, 2), draws=1, seed=3)
    expected = reference_d(losses, LANGS[:3], (0, 2))
    for lang in LANGS[:3]:
        observed, p = nt.label_swap_test(losses, lang, LANGS[:3], 49, 7)
        assert observed == pytest.approx(expected[lang], abs=1e-12)
        assert 1 / 50 <= p <= 1


def test_specificity_without_random_draws_cannot_tell():
    losses = {k: v for k, v in neuron_losses(dict.fromkeys(LANGS[:3], 0.1)).items() if k[1] < 0}
    table, verdict = nt.specificity(losses, LANGS[:3], 19, 0)
    assert table.empty and verdict.answer.startswith("cannot tell") and math.isnan(verdict.value)


# -- overlap against exact chance ---------------------------------------------------------------------------

def all_sets(counts, neurons: int):
    """Every set with `counts[l]` neurons in layer l, as bool [layers, neurons]."""
    per_layer = [list(combinations(range(neurons), k)) for k in counts]
    for choice in product(*per_layer):
        out = torch.zeros(len(counts), neurons, dtype=torch.bool)
        for layer, picked in enumerate(choice):
            out[layer, list(picked)] = True
        yield out


@pytest.mark.parametrize("counts_a, counts_b", [([1, 2], [2, 1]), ([0, 3], [1, 1]), ([2, 0], [0, 2]), ([0, 0], [0, 0])])
def test_expected_set_jaccard_by_enumeration(counts_a, counts_b):
    a = next(all_sets(counts_a, 4))
    b = next(all_sets(counts_b, 4))
    total, count = Fraction(0), 0
    for x in all_sets(counts_a, 4):
        for y in all_sets(counts_b, 4):
            union = int((x | y).sum())
            total += Fraction(1) if union == 0 else Fraction(int((x & y).sum()), union)
            count += 1
    assert nt.expected_set_jaccard(a, b) == pytest.approx(float(total / count), abs=1e-15)
    assert nt.expected_set_jaccard(a, b) == pytest.approx(expected_random_jaccard(a.int(), b.int()), abs=1e-12)


def test_the_float_overlap_law_is_the_exact_integer_one():
    """`set_overlap_law` (scipy's pmf, floats) against `xlsub.stats.overlap.overlap_null` (integers), at a small and
    an FFN-like width; its p against `jaccard_pvalue`."""
    rng = np.random.default_rng(3)
    for counts_a, counts_b, neurons in (([1, 3, 0], [2, 2, 4], 6), ([30, 5, 0, 12], [20, 9, 3, 40], 512)):
        a, b = (random_mask(rng, counts, neurons) == 0 for counts in (counts_a, counts_b))
        assert nt.set_overlap_law(a, b) == pytest.approx(overlap_null(a.int(), b.int()), abs=1e-14, rel=1e-10)
        j, expected, p = nt.set_jaccard(a, b)
        assert j == jaccard(a.int(), b.int()) and p == pytest.approx(jaccard_pvalue(a.int(), b.int()), rel=1e-10, abs=1e-15)
        assert expected == pytest.approx(expected_random_jaccard(a.int(), b.int()), rel=1e-10)


def test_jaccard_tables_use_the_first_seed_with_exact_p_and_bh():
    rng = np.random.default_rng(0)
    langs = ["en", "de", "fr", "es"]
    masks = {S(lang, s): random_mask(rng, [2, 1, 2], 6) for lang in langs for s in (1, 3)}
    masks[S("de", 1)] = masks[S("en", 1)].clone()  # identical first-seed sets
    tables = nt.jaccard_tables(masks, langs)
    matrix, chance, pvalues = tables["neuron_jaccard"], tables["neuron_jaccard_expected"], tables["neuron_jaccard_pvalue"]
    sets = {lang: masks[S(lang, 1)] == 0 for lang in langs}
    assert matrix.loc["en", "de"] == 1.0 and np.diag(matrix.to_numpy()).tolist() == [1.0] * 4
    assert matrix.loc["fr", "es"] == pytest.approx(float((sets["fr"] & sets["es"]).sum() / (sets["fr"] | sets["es"]).sum()))
    assert list(pvalues.index) == list(combinations(langs, 2))
    for (a, b), row in pvalues.iterrows():
        # every random pair with the same counts per layer: P(overlap >= observed)
        observed = int((sets[a] & sets[b]).sum())
        overlaps = [int((x & y).sum()) for x in all_sets([2, 1, 2], 6) for y in [sets[b]]]
        assert row["p_value"] == pytest.approx(np.mean([o >= observed for o in overlaps]), abs=1e-12)
        assert row["expected"] == pytest.approx(chance.loc[a, b])
    assert pvalues["p_bh"].to_numpy() == pytest.approx(benjamini_hochberg(pvalues["p_value"].to_numpy()))
    assert pvalues.loc[("en", "de"), "p_value"] < pvalues.loc[("en", "fr"), "p_value"] or matrix.loc["en", "fr"] == 1


def test_stability_tables_split_halves_and_seeds_by_hand():
    a = mask_with_set(2, 4, [(0, 0), (0, 1), (1, 2)])
    b = mask_with_set(2, 4, [(0, 0), (1, 2), (1, 3)])
    halves = {S("en", 0): {"a": a, "b": b}, S("en", 1): (b, a)}  # as the JSON gives them, or a pair
    masks = {S("en", 0): a, S("en", 1): b, S("de", 0): a}
    tables = nt.stability_tables(masks, halves, ["en", "de"])
    split = tables["neuron_split_half"].loc["en"]
    assert split["jaccard"] == pytest.approx(2 / 4)
    assert split["expected"] == pytest.approx(expected_random_jaccard((a == 0).int(), (b == 0).int()))
    assert split["excess"] == pytest.approx(split["jaccard"] - split["expected"])
    assert (split["neurons_a"], split["neurons_b"]) == (3, 3)
    seeds = tables["neuron_seed_stability"]
    assert list(seeds.index) == ["en"] and seeds.loc["en", "jaccard"] == pytest.approx(0.5) and seeds.loc["en", "pairs"] == 1


# -- layers ---------------------------------------------------------------------------------------------

def test_outer_layers():
    assert nt.outer_layers(12).nonzero().flatten().tolist() == [0, 1, 2, 9, 10, 11]
    assert nt.outer_layers(4).tolist() == [True, False, False, True]
    assert bool(nt.outer_layers(2).all())


@pytest.mark.parametrize("population, successes, draws, observed", [(20, 7, 5, 3), (30, 10, 12, 0), (12, 12, 4, 4), (9, 3, 5, 4)])
def test_hypergeometric_upper_tail_is_scipys(population, successes, draws, observed):
    assert nt.hypergeometric_upper(population, successes, draws, observed) == pytest.approx(
        scipy.stats.hypergeom.sf(observed - 1, population, successes, draws), abs=1e-12)


def test_layer_tables_and_verdict_by_hand():
    # 4 layers x 5 neurons; eligible: every neuron of layers 1 and 4 and two of layers 2 and 3 (14 of 20, 10 outer)
    eligible = torch.zeros(4, 5)
    eligible[[0, 3]] = 1
    eligible[1, :2] = eligible[2, :2] = 1
    masks = {S("en", 0): mask_with_set(4, 5, [(0, 0), (0, 1), (3, 0), (1, 0)]),   # 3 of 4 outer
             S("de", 0): mask_with_set(4, 5, [(0, 2), (2, 0)]),                    # 1 of 2
             S("fr", 0): mask_with_set(4, 5, [(3, 3), (3, 4), (0, 4), (2, 1), (1, 4)])}  # 3 of 5; (1, 4) not eligible
    tables = nt.layer_tables(masks, {"0": eligible}, ["en", "de", "fr"])
    layers, outer = tables["neuron_layers"], tables["neuron_outer_layers"]
    assert list(layers.columns) == [1, 2, 3, 4]
    assert layers.loc["en"].tolist() == pytest.approx([0.5, 0.25, 0, 0.25])
    assert layers.loc["pooled"].tolist() == pytest.approx([4 / 11, 2 / 11, 2 / 11, 3 / 11])
    assert layers.loc["eligible"].tolist() == pytest.approx([5 / 14, 2 / 14, 2 / 14, 5 / 14])
    assert outer["outer_share"].tolist() == pytest.approx([3 / 4, 1 / 2, 3 / 5])
    assert outer["d"].tolist() == pytest.approx([3 / 4 - 10 / 14, 1 / 2 - 10 / 14, 3 / 5 - 10 / 14])
    # fr: its 4 eligible neurons, 3 of them outer, as a random 4 of the 14 eligible (10 outer)
    assert outer.loc["fr", "p_value"] == pytest.approx(scipy.stats.hypergeom.sf(2, 14, 10, 4))
    verdict = nt.layers_verdict(outer, 4, 99, 0)
    assert verdict.key == "neuron_layers" and verdict.control_value == pytest.approx(10 / 14)
    assert verdict.value == pytest.approx(np.mean([3 / 4, 1 / 2, 3 / 5]))
    assert verdict.p == pytest.approx(brute_sign_flip_p(outer["d"]))
    assert verdict.answer.startswith("no evidence") and "cannot give p below" in verdict.answer
    assert nt.layers_verdict(outer, 2, 99, 0).answer.startswith("cannot tell")


# -- heads vs neurons ------------------------------------------------------------------------------------

def test_neurons_vs_heads_mantel_and_ppl_correlation_against_brute_force():
    rng = np.random.default_rng(4)
    langs = LANGS[:5]
    masks = {S(lang, 0): random_mask(rng, [3, 2, 3], 8) for lang in langs}
    masks |= {S(lang, 1): random_mask(rng, [3, 2, 3], 8) for lang in langs}  # a second seed is not used
    head_masks = {S(lang, 0): torch.as_tensor(rng.integers(0, 2, (3, 4)), dtype=torch.float32) for lang in langs}
    deactivation = pd.DataFrame(rng.uniform(1, 2, (10, 5)), index=[f"{lang}-s{s}" for lang in langs for s in (0, 1)], columns=langs)
    head_relative = pd.DataFrame(rng.uniform(1, 2, (5, 5)), index=langs, columns=langs)
    table, verdict = nt.neurons_vs_heads(masks, head_masks, langs, 99, 0, deactivation, head_relative)

    heads = np.array([[jaccard(head_masks[S(a, 0)], head_masks[S(b, 0)]) for b in langs] for a in langs])
    neurons = np.array([[jaccard((masks[S(a, 0)] == 0).int(), (masks[S(b, 0)] == 0).int()) for b in langs] for a in langs])

    def r(x, y):
        pairs = list(combinations(range(len(x)), 2))
        return scipy.stats.spearmanr([x[i, j] for i, j in pairs], [y[i, j] for i, j in pairs])[0]

    observed = r(heads, neurons)
    null = [r(heads, neurons[np.ix_(p, p)]) for p in permutations(range(5))]
    assert verdict.value == pytest.approx(observed)
    assert verdict.p == pytest.approx(np.mean([x >= observed - 1e-9 for x in null]))
    assert verdict.inference.test == "relabel_exact" and verdict.p_floor == pytest.approx(1 / 120)
    loo = [r(heads[np.ix_(keep, keep)], neurons[np.ix_(keep, keep)]) for keep in ([j for j in range(5) if j != i] for i in range(5))]
    se = math.sqrt(4 / 5 * sum((x - np.mean(loo)) ** 2 for x in loo))
    half = scipy.stats.t.ppf(0.975, 4) * se
    assert (verdict.lo, verdict.hi) == pytest.approx((max(-1, observed - half), min(1, observed + half)))

    means = deactivation.groupby(lambda row: row.split("-")[0], sort=False).mean()
    cells = [(a, b) for a in langs for b in langs if a != b]
    rho = scipy.stats.spearmanr([means.loc[a, b] for a, b in cells], [head_relative.loc[a, b] for a, b in cells])[0]
    assert table.loc["deactivation_vs_head_cross_ppl", "r"] == pytest.approx(rho)
    assert table.loc["deactivation_vs_head_cross_ppl", "n"] == 20
    assert f"Spearman {rho:.3g}" in verdict.answer


def test_neurons_vs_heads_needs_four_languages():
    rng = np.random.default_rng(0)
    masks = {S(lang, 0): random_mask(rng, [1, 1], 4) for lang in LANGS[:3]}
    heads = {S(lang, 0): torch.ones(2, 2) for lang in LANGS[:3]}
    table, verdict = nt.neurons_vs_heads(masks, heads, LANGS[:3], 9, 0)
    assert table.empty and verdict.answer.startswith("cannot tell")


# -- the whole analysis -------------------------------------------------------------------------------------

def test_neuron_analysis_gives_every_table_verdict_and_metric():
    rng = np.random.default_rng(1)
    langs = LANGS[:6]
    counts = [3, 1, 1, 3]
    masks = {S(lang, s): random_mask(rng, counts, 16) for lang in langs for s in (0, 1)}
    halves = {sid: {"a": random_mask(rng, counts, 16), "b": random_mask(rng, counts, 16)} for sid in masks}
    eligible = {s: torch.as_tensor(rng.integers(0, 2, (4, 16))) for s in (0, 1)}
    losses = neuron_losses(dict.fromkeys(langs, 0.3), seeds=(0, 1), seed=2)
    head_masks = {S(lang, 0): torch.as_tensor(rng.integers(0, 2, (4, 4)), dtype=torch.float32) for lang in langs}
    head_relative = pd.DataFrame(rng.uniform(1, 2, (6, 6)), index=langs, columns=langs)
    tables, verdicts, metrics, notes = nt.neuron_analysis(masks, halves, eligible, losses, langs, head_masks, head_relative,
                                                          permutations=49, bootstrap=50, seed=0)
    for name in ("neuron_deactivation", "neuron_deactivation_random", "neuron_jaccard", "neuron_layers", "neuron_specificity",
                 "neuron_split_half", "neuron_seed_stability", "neuron_outer_layers", "neurons_vs_heads", "neuron_deactivation_lo"):
        assert name in tables, name
    assert [v.key for v in verdicts] == ["neuron_specificity", "neuron_layers", "neurons_vs_heads"]
    head_verdict = specificity(0.1, 0.0, 0.2, 0.0, 0.5, Inference("languages", 6, "sign_flip_exact", 1 / 64))
    assert isinstance(verdicts[0], Verdict) and verdicts[0].as_dict().keys() == head_verdict.as_dict().keys()
    assert head_verdict.question == SPECIFICITY and verdicts[0].answer.startswith("yes")
    for v in verdicts:
        assert metrics[f"verdict.{v.key}.value"] == v.value and metrics[f"verdict.{v.key}.p"] == v.p
    assert metrics["neuron_specificity_excess"] == verdicts[0].value
    assert metrics["mean_neurons_off"] == sum(counts)
    assert metrics["mean_neuron_relative_ppl_diag"] > metrics["mean_neuron_relative_ppl_offdiag"]
    assert all(math.isfinite(x) for x in metrics.values()) and notes == []


def test_empty_neuron_sets_are_left_out_of_specificity_and_all_empty_cannot_tell():
    """A language whose set is empty had nothing switched off: its d would be 0 by construction, so the test
    leaves it out (and with every set empty says it cannot tell, instead of "no evidence")."""
    langs = LANGS[:6]
    losses = neuron_losses(dict.fromkeys(langs, 0.3), seed=2)
    masks = {S(lang, 0): mask_with_set(2, 8, [(0, i)]) for i, lang in enumerate(langs)}
    masks[S(langs[0], 0)] = torch.ones(2, 8)
    _, verdicts, _, notes = nt.neuron_analysis(masks, {}, {}, losses, langs, permutations=49, bootstrap=0, seed=0)
    expected = nt.specificity({k: v for k, v in losses.items() if k[0] != f"{langs[0]}-s0"}, langs, 49, 0)
    assert verdicts[0].value == expected[1].value and verdicts[0].inference.n_units == 5
    assert any(f"left out {langs[0]}-s0" in note for note in notes)
    everything = nt.specificity(losses, langs, 49, 0)[1]
    assert everything.inference.n_units == 6 and everything.value != verdicts[0].value
    _, verdicts, _, _ = nt.neuron_analysis({sid: torch.ones(2, 8) for sid in masks}, {}, {}, losses, langs, permutations=49, bootstrap=0, seed=0)
    assert verdicts[0].answer.startswith("cannot tell: every language's neuron set is empty") and math.isnan(verdicts[0].value)


def test_neuron_analysis_without_inputs_says_what_it_skipped():
    tables, verdicts, _, notes = nt.neuron_analysis({}, {}, {}, {}, ["en", "de"], permutations=9, bootstrap=0, seed=0)
    assert tables == {} and len(notes) == 4
    assert [v.key for v in verdicts] == list(nt.NEURON_KEYS.values())
    assert all(v.answer.startswith("cannot tell") and v.as_dict()["value"] is None for v in verdicts)


# -- calibration over languages ------------------------------------------------------------------------------

@pytest.mark.parametrize("mean_effect", [0.0, 0.3])
def test_the_neuron_specificity_verdict_is_calibrated_over_languages(mean_effect):
    """Every language's losses from one distribution: its own-language excess over random neurons is drawn
    N(mean_effect, 0.15^2) per language, so with mean 0 some languages show a clear excess and others a clear
    deficit, each significant within its language, yet over languages there is none."""
    rng = np.random.default_rng(11)
    sets = 120 if mean_effect == 0 else 20
    yes = within = 0
    for i in range(sets):
        effects = dict(zip(LANGS, rng.normal(mean_effect, 0.15, len(LANGS))))
        losses = neuron_losses(effects, n_chunks=12, seed=int(rng.integers(1 << 30)))
        table, verdict = nt.specificity(losses, LANGS, 39, i)
        yes += verdict.answer.startswith("yes")
        within += int((table["p_value"] < ALPHA).sum())
    if mean_effect == 0:
        assert yes / sets <= bound(sets), yes
        assert within / (sets * len(LANGS)) > 0.2, within  # within languages, chunk-level tests see many a language's own excess
    else:
        assert yes / sets >= 0.8, yes


@pytest.mark.parametrize("outer_weight", [1.0, 3.0])
def test_the_neuron_layers_verdict_is_calibrated_on_random_selections(outer_weight):
    """H0 (weight 1): a language's neurons are a random subset of the eligible neurons (each language a
    different size, the eligible neurons unevenly spread over layers); weight 3: an eligible neuron in an
    outer layer is three times as likely to be picked."""
    rng = np.random.default_rng(12)
    sets, yes = (150, 0) if outer_weight == 1 else (20, 0)
    outer = nt.outer_layers(8)
    for i in range(sets):
        eligible = torch.as_tensor(rng.random((8, 40)) < rng.uniform(0.2, 0.8, (8, 1)))
        positions = eligible.nonzero().tolist()
        weights = np.array([outer_weight if outer[layer] else 1.0 for layer, _ in positions])
        masks = {}
        for lang in LANGS:
            picked = rng.choice(len(positions), size=int(rng.integers(5, 20)), replace=False, p=weights / weights.sum())
            masks[S(lang, 0)] = mask_with_set(8, 40, [positions[j] for j in picked])
        table = nt.layer_tables(masks, {0: eligible}, LANGS)["neuron_outer_layers"]
        yes += nt.layers_verdict(table, 8, 99, i).answer.startswith("yes")
    if outer_weight == 1:
        assert yes / sets <= bound(sets), yes
    else:
        assert yes / sets >= 0.8, yes


def test_the_neuron_figures_show_their_tables():
    from xlsub.report.figures import palette
    from xlsub.report.figures.neurons import neuron_figures

    rng = np.random.default_rng(2)
    langs = LANGS[:4]
    masks = {S(lang, s): random_mask(rng, [2, 1, 2], 8) for lang in langs for s in (0, 1)}
    eligible = {0: torch.ones(3, 8), 1: torch.ones(3, 8)}
    tables, _, _, _ = nt.neuron_analysis(masks, {}, eligible, neuron_losses(dict.fromkeys(langs, 0.2), seeds=(0, 1)), langs,
                                         permutations=9, bootstrap=0, seed=0)
    drawn = neuron_figures(tables, palette(langs))
    assert set(drawn) == {"neuron_deactivation", "neuron_jaccard", "neuron_layers"}
    for figure, caption, ids in drawn.values():
        assert caption and all(i in tables for i in ids) and figure.axes
