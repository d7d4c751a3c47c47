"""Overlap tests against chance, equal-size overlap and the noise ceiling, against independent computations:
every random mask pair of tiny shapes enumerated in exact fractions, scipy's Spearman, and a
permutation loop written out by hand."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from fractions import Fraction
from itertools import combinations, product

import numpy as np
import pytest
import scipy.stats
import torch

from xlsub.artifacts import SubnetworkId as S
from xlsub.errors import XlsubError
from xlsub.stats.overlap import (
    equal_size_jaccard,
    expected_random_jaccard,
    jaccard,
    jaccard_chance_band,
    jaccard_pvalue,
    jaccard_pvalue_table,
    overlap_null,
    pruned_overlap_pvalue,
    split_half_reliability,
    within_vs_across_jaccard,
)

# -- brute force: every mask of a tiny shape ---------------------------------------------------------


def all_masks(layers: int, heads: int) -> list[torch.Tensor]:
    return [torch.tensor(bits).reshape(layers, heads) for bits in product((0, 1), repeat=layers * heads)]


def fraction_jaccard(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return Fraction(int((a & b).sum()), union) if union else Fraction(1)


class Enumerated:
    """For every pair of per-layer kept counts of a tiny shape, the overlaps and Jaccards of all mask pairs
    with those counts: the random-mask null, by enumeration."""

    def __init__(self, layers: int, heads: int):
        self.masks = all_masks(layers, heads)
        by_counts = defaultdict(list)
        for m in self.masks:
            by_counts[tuple(m.sum(1).tolist())].append(m)
        self.by_counts = by_counts

    def null(self, a: torch.Tensor, b: torch.Tensor, complement: bool = False) -> list[tuple[int, Fraction]]:
        """(overlap, Jaccard) of every random pair shaped like (a, b); of their pruned heads if complement."""
        pairs = product(self.by_counts[tuple(a.sum(1).tolist())], self.by_counts[tuple(b.sum(1).tolist())])
        if complement:
            pairs = ((1 - x, 1 - y) for x, y in pairs)
        return [(int((x.bool() & y.bool()).sum()), fraction_jaccard(x, y)) for x, y in pairs]


def inverse_cdf(values, q: Fraction) -> Fraction:
    """The smallest v with #{values <= v} >= q n, exactly (numpy's 'inverted_cdf' without floats).

    values: a list, or a Counter {value: how many times}."""
    counts = values if isinstance(values, Counter) else Counter(values)
    n, cumulative = sum(counts.values()), 0
    for value in sorted(counts):
        cumulative += counts[value]
        if cumulative >= q * n:
            return value
    raise AssertionError("q > 1")


@pytest.fixture(scope="module", params=[(2, 3), (3, 2)], ids=["2x3", "3x2"])
def enumerated(request):
    return Enumerated(*request.param)


# -- exact null, p-values and chance band ------------------------------------------------------------


def test_overlap_null_is_the_enumerated_distribution(enumerated):
    checked = set()
    for a, b in product(enumerated.masks, repeat=2):
        key = (tuple(a.sum(1).tolist()), tuple(b.sum(1).tolist()))
        if key in checked:
            continue
        checked.add(key)
        null = enumerated.null(a, b)
        counts = np.bincount([o for o, _ in null])
        got = overlap_null(a, b)
        assert len(got) == sum(min(x, y) for x, y in zip(*key)) + 1
        np.testing.assert_array_equal(got[: len(counts)], [float(Fraction(int(c), len(null))) for c in counts])
        assert (got[len(counts):] == 0).all()
    layers, heads = enumerated.masks[0].shape
    assert len(checked) == (heads + 1) ** (2 * layers)  # every pair of per-layer counts was seen


def test_jaccard_pvalue_band_and_expectation_match_enumeration(enumerated):
    """Every mask pair of the shape: p = P(J >= j_obs), the 2.5% / 97.5% quantiles and E[J], exactly."""
    cache = {}
    for a, b in product(enumerated.masks, repeat=2):
        key = (tuple(a.sum(1).tolist()), tuple(b.sum(1).tolist()))
        if key not in cache:
            jaccards = [j for _, j in enumerated.null(a, b)]
            pruned = [j for _, j in enumerated.null(a, b, complement=True)]
            band = tuple(float(inverse_cdf(jaccards, q)) for q in (Fraction(1, 40), Fraction(39, 40)))
            cache[key] = jaccards, pruned, band, sum(jaccards) / len(jaccards)
            assert jaccard_chance_band(a, b) == band
            assert expected_random_jaccard(a, b) == pytest.approx(float(cache[key][3]), rel=1e-12)
        jaccards, pruned, _, _ = cache[key]
        observed = fraction_jaccard(a, b)
        assert jaccard_pvalue(a, b) == float(Fraction(sum(j >= observed for j in jaccards), len(jaccards)))
        observed = fraction_jaccard(1 - a, 1 - b)
        assert pruned_overlap_pvalue(a, b) == float(Fraction(sum(j >= observed for j in pruned), len(pruned)))


def test_chance_band_at_an_exact_quantile_boundary():
    """Keeping (1, 3) and (3, 3) of 2 x 6 heads, P(O = 0) is exactly 1/40 and P(O <= 3) exactly 39/40: the
    inverse CDF must take the value where the CDF reaches q, not the next one. All 48,000 pairs, as sets."""
    def subsets(counts):
        return [frozenset((layer, h) for layer, hs in enumerate(pick) for h in hs)
                for pick in product(*(combinations(range(6), k) for k in counts))]

    sizes = Counter((len(x & y), len(x | y)) for x in subsets((1, 3)) for y in subsets((3, 3)))
    jaccards = Counter()
    for (inter, union), count in sizes.items():
        jaccards[Fraction(inter, union)] += count
    n = sum(jaccards.values())
    assert n == 48_000 and Fraction(jaccards[0], n) == Fraction(1, 40)
    a = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    b = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    band = tuple(float(inverse_cdf(jaccards, q)) for q in (Fraction(1, 40), Fraction(39, 40)))
    assert jaccard_chance_band(a, b) == band == (0.0, 3 / 7)
    observed = fraction_jaccard(a, b)
    assert jaccard_pvalue(a, b) == float(Fraction(sum(c for j, c in jaccards.items() if j >= observed), n))


def test_pruned_pvalue_equals_kept_pvalue():
    """|~A & ~B| = N - K_a - K_b + |A & B|: the pruned overlap's tail is the kept overlap's."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        a = (torch.rand(4, 5, generator=generator) < 0.5).long()
        b = (torch.rand(4, 5, generator=generator) < 0.6).long()
        assert pruned_overlap_pvalue(a, b) == pytest.approx(jaccard_pvalue(a, b), rel=1e-12)


def test_pvalue_hand_made_and_degenerate():
    # one layer of 4 heads, both keep 2: overlap 2 iff B picks A's pair, 1 of C(4, 2) = 6
    a = torch.tensor([[1, 1, 0, 0]])
    assert jaccard_pvalue(a, a) == pytest.approx(1 / 6)
    assert jaccard_pvalue(a, 1 - a) == 1.0  # overlap 0 is the least possible
    assert pruned_overlap_pvalue(a, a) == pytest.approx(1 / 6)
    empty = torch.zeros(2, 3)
    assert jaccard_pvalue(empty, empty) == 1.0  # J = 1 in every draw
    assert jaccard_chance_band(empty, empty) == (1.0, 1.0)
    assert pruned_overlap_pvalue(torch.ones(2, 3), torch.ones(2, 3)) == 1.0
    np.testing.assert_array_equal(overlap_null(empty, torch.ones(2, 3)), [1.0])
    with pytest.raises(XlsubError, match="same model"):
        jaccard_pvalue(a, torch.ones(2, 4))


def test_overlap_null_of_a_model_sized_mask():
    """12 x 12 heads: a distribution whose mean is sum_l k_a(l) k_b(l) / H, the hypergeometric means."""
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(12, 12, generator=generator) < 0.4).long()
    b = (torch.rand(12, 12, generator=generator) < 0.7).long()
    null = overlap_null(a, b)
    assert null.sum() == pytest.approx(1.0, abs=1e-12)
    assert (null >= 0).all()
    mean = float((a.sum(1) * b.sum(1)).sum()) / 12
    assert (np.arange(len(null)) * null).sum() == pytest.approx(mean, rel=1e-12)
    assert jaccard_pvalue(a, a.clone()) < 1e-10  # a mask against itself is far in the tail


# -- the table over language pairs -------------------------------------------------------------------


def test_jaccard_pvalue_table_first_seed_and_bh():
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for lang, p in [("zh", 0.3), ("en", 0.6), ("de", 0.5)]:
        for seed in (2, 0):  # seeds out of order: the table must take the smallest
            masks[S(lang, seed)] = (torch.rand(4, 6, generator=generator) < p + 0.1 * seed).long()
    table = jaccard_pvalue_table(masks, ["en", "de", "zh"])
    assert list(table.columns) == ["language_a", "language_b", "jaccard", "expected", "p_value", "p_bh",
                                   "pruned_jaccard", "pruned_p_value", "pruned_p_bh"]
    assert list(zip(table.language_a, table.language_b)) == [("en", "de"), ("en", "zh"), ("de", "zh")]
    for row in table.itertuples():
        x, y = masks[S(row.language_a, 0)], masks[S(row.language_b, 0)]
        assert row.jaccard == jaccard(x, y)
        assert row.expected == expected_random_jaccard(x, y)
        assert row.p_value == jaccard_pvalue(x, y)
        assert row.pruned_jaccard == float(fraction_jaccard(1 - x, 1 - y))
        assert row.pruned_p_value == pruned_overlap_pvalue(x, y)
    np.testing.assert_allclose(table.p_bh, scipy.stats.false_discovery_control(table.p_value), rtol=1e-14)
    np.testing.assert_allclose(table.pruned_p_bh, scipy.stats.false_discovery_control(table.pruned_p_value), rtol=1e-14)
    assert jaccard_pvalue_table({S("en", 0): masks[S("en", 0)]}, ["en"]).empty


# -- equal-size overlap along trajectories -----------------------------------------------------------


def trajectory(layers: int, heads: int, seed: int, per_step: int = 1) -> list[torch.Tensor]:
    """All heads on, then `per_step` heads off per step in a random order, down to none."""
    order = torch.randperm(layers * heads, generator=torch.Generator().manual_seed(seed))
    steps, mask = [torch.ones(layers * heads, dtype=torch.long)], torch.ones(layers * heads, dtype=torch.long)
    for start in range(0, layers * heads, per_step):
        mask = mask.clone()
        mask[order[start:start + per_step]] = 0
        steps.append(mask)
    return [m.reshape(layers, heads) for m in steps]


def test_equal_size_jaccard_matches_enumeration():
    enumerated = Enumerated(2, 3)
    trajectories = {S("en", 0): trajectory(2, 3, 0), S("de", 0): trajectory(2, 3, 1),
                    S("zh", 0): trajectory(2, 3, 2), S("zh", 1): trajectory(2, 3, 3)}
    trajectories[S("de", 0)] = trajectories[S("de", 0)][:4]  # de stops after 3 heads off
    table = equal_size_jaccard(trajectories, ["en", "de", "zh"])
    assert list(table.columns) == ["frac_pruned", "heads_kept", "language_a", "language_b",
                                   "jaccard", "expected", "chance_lo", "chance_hi", "p_value"]
    # 1..5 of 6 heads off lie in [0.1, 0.9]; de reaches only 3 of them
    assert table.frac_pruned.tolist() == [k / 6 for k in (1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5)]
    assert table.heads_kept.tolist() == [6 - round(f * 6) for f in table.frac_pruned]
    assert list(zip(table.language_a, table.language_b))[:3] == [("en", "de"), ("en", "zh"), ("de", "zh")]
    for row in table.itertuples():
        step = 6 - row.heads_kept
        x, y = trajectories[S(row.language_a, 0)][step], trajectories[S(row.language_b, 0)][step]
        jaccards = [j for _, j in enumerated.null(x, y)]
        observed = fraction_jaccard(x, y)
        assert row.jaccard == float(observed)
        assert row.expected == pytest.approx(float(sum(jaccards) / len(jaccards)), rel=1e-12)
        assert row.chance_lo == float(inverse_cdf(jaccards, Fraction(1, 40)))
        assert row.chance_hi == float(inverse_cdf(jaccards, Fraction(39, 40)))
        assert row.p_value == float(Fraction(sum(j >= observed for j in jaccards), len(jaccards)))


def test_equal_size_jaccard_bounds_are_inclusive():
    trajectories = {S(lang, 0): trajectory(2, 5, seed) for seed, lang in enumerate(["en", "de"])}
    table = equal_size_jaccard(trajectories, ["en", "de"])
    assert table.heads_kept.tolist() == list(range(9, 0, -1))  # 10% .. 90% of 10 heads removed, both ends in
    table = equal_size_jaccard(trajectories, ["en", "de"], low=0.3, high=0.5)
    assert table.heads_kept.tolist() == [7, 6, 5]


def test_equal_size_jaccard_refuses_different_step_sizes():
    trajectories = {S("en", 0): trajectory(2, 6, 0, per_step=2), S("de", 0): trajectory(2, 6, 1, per_step=3)}
    with pytest.raises(XlsubError, match="trajectories: .* heads off after step 1"):
        equal_size_jaccard(trajectories, ["en", "de"])
    with pytest.raises(XlsubError, match="trajectories: head masks of shapes"):
        equal_size_jaccard({S("en", 0): trajectory(2, 6, 0), S("de", 0): trajectory(3, 4, 1)}, ["en", "de"])


# -- noise ceiling: within- against across-language overlap ------------------------------------------


def brute_force_within_vs_across(masks, n_perm, seed):
    """The permutation test written out: exact Jaccards in fractions, labels permuted through an index."""
    ids = sorted(masks, key=lambda sid: (sid.language, sid.seed))
    labels = [sid.language for sid in ids]

    def statistic(labels):
        within, across = [], []
        for i, j in combinations(range(len(ids)), 2):
            (within if labels[i] == labels[j] else across).append(fraction_jaccard(masks[ids[i]], masks[ids[j]]))
        return sum(within) / len(within), sum(across) / len(across)

    within, across = statistic(labels)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_perm):
        w, a = statistic([labels[k] for k in rng.permutation(len(ids))])
        exceed += w - a >= within - across
    return float(within), float(across), (1 + exceed) / (1 + n_perm)


@pytest.mark.parametrize("structured", [True, False], ids=["language-specific", "random"])
def test_within_vs_across_matches_brute_force(structured):
    generator = torch.Generator().manual_seed(5)
    masks = {}
    for lang_index, lang in enumerate(["en", "de", "zh"]):
        base = (torch.rand(3, 4, generator=generator) < 0.5).long()
        for seed in range(3 if lang != "de" else 2):
            noise = (torch.rand(3, 4, generator=generator) < 0.15).long()
            masks[S(lang, seed)] = (base ^ noise) if structured else (torch.rand(3, 4, generator=generator) < 0.5).long()
    expected = brute_force_within_vs_across(masks, 200, seed=3)
    within, across, p = within_vs_across_jaccard(masks, n_perm=200, seed=3)
    assert within == pytest.approx(expected[0], rel=1e-12)
    assert across == pytest.approx(expected[1], rel=1e-12)
    assert p == expected[2]
    if structured:
        assert within > across and p < 0.05
    # the mapping's order does not matter
    assert within_vs_across_jaccard(dict(reversed(list(masks.items()))), n_perm=200, seed=3)[2] == p


def test_within_vs_across_degenerate():
    a, b = torch.tensor([[1, 0, 1]]), torch.tensor([[1, 1, 0]])
    within, across, p = within_vs_across_jaccard({S("en", 0): a, S("de", 0): b}, n_perm=10)
    assert math.isnan(within) and across == pytest.approx(1 / 3) and math.isnan(p)
    within, across, p = within_vs_across_jaccard({S("en", 0): a, S("en", 1): b}, n_perm=10)
    assert within == pytest.approx(1 / 3) and math.isnan(across) and math.isnan(p)
    with pytest.raises(XlsubError, match="n_perm"):
        within_vs_across_jaccard({S("en", 0): a}, n_perm=0)


# -- split-half reliability --------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1], ids=["no-ties", "ties"])
def test_split_half_reliability_matches_spearmanr(decimals):
    generator = torch.Generator().manual_seed(7)
    a = torch.rand(12, 12, generator=generator)
    b = a + 0.5 * torch.rand(12, 12, generator=generator)
    if decimals is not None:
        a, b = a.round(decimals=decimals), b.round(decimals=decimals)
    rho = scipy.stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    assert split_half_reliability(a, b) == pytest.approx(rho, rel=1e-12)


def test_split_half_reliability_hand_made():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert split_half_reliability(a, a ** 3) == pytest.approx(1.0)  # any increasing map
    assert split_half_reliability(a, -a) == pytest.approx(-1.0)
    assert math.isnan(split_half_reliability(a, torch.ones(2, 2)))
    with pytest.raises(XlsubError, match="importance"):
        split_half_reliability(a, torch.ones(4))


def test_seed_stability_test_against_a_loop_of_random_masks():
    """Per language and over languages, the Monte Carlo p-values redone by hand with the same generator."""
    from itertools import combinations

    import numpy as np

    from xlsub.artifacts import SubnetworkId
    from xlsub.stats.inference import benjamini_hochberg
    from xlsub.stats.overlap import expected_random_jaccard, jaccard, seed_stability_test

    g = torch.Generator().manual_seed(5)
    masks = {SubnetworkId(l, s): (torch.rand(2, 5, generator=g) < 0.5).float() for l in ("de", "en") for s in (0, 1, 2)}
    table, p = seed_stability_test(masks, 60, 7, ["en", "de"])
    assert list(table.index) == ["en", "de"]
    within = {l: np.mean([jaccard(masks[SubnetworkId(l, a)], masks[SubnetworkId(l, b)]) for a, b in combinations(range(3), 2)])
              for l in ("en", "de")}
    expected = {l: np.mean([expected_random_jaccard(masks[SubnetworkId(l, a)], masks[SubnetworkId(l, b)])
                            for a, b in combinations(range(3), 2)]) for l in ("en", "de")}
    for l in ("en", "de"):
        assert table.loc[l, "within"] == pytest.approx(within[l])
        assert table.loc[l, "excess"] == pytest.approx(within[l] - expected[l])
    rng = np.random.default_rng(7)
    null = []
    for _ in range(60):
        means = []
        for l in ("en", "de"):
            drawn = []
            for s in range(3):
                m = np.zeros((2, 5), dtype=bool)
                for layer in range(2):
                    m[layer, rng.choice(5, size=int(masks[SubnetworkId(l, s)][layer].sum()), replace=False)] = True
                drawn.append(m)
            means.append(np.mean([(a & b).sum() / (a | b).sum() if (a | b).sum() else 1.0 for a, b in combinations(drawn, 2)]))
        null.append(means)
    null = np.array(null)
    per_language = [(1 + (null[:, i] >= within[l] - 1e-12).sum()) / 61 for i, l in enumerate(("en", "de"))]
    assert table["p_value"].tolist() == pytest.approx(per_language)
    assert table["p_bh"].tolist() == pytest.approx(list(benjamini_hochberg(per_language)))
    assert p == pytest.approx((1 + (null.mean(1) >= np.mean(list(within.values())) - 1e-12).sum()) / 61)
    one_seed = {SubnetworkId("de", 0): masks[SubnetworkId("de", 0)]}
    empty, nothing = seed_stability_test(one_seed, 10, 0)
    assert empty.empty and math.isnan(nothing)


def test_head_agreement_by_language_is_chance_adjusted_and_permutes_languages():
    """Every seed's masks, J - E[J] per pair, within/across per language, and the label permutation p, against a
    plain loop over the pairs and the same generator."""
    import itertools

    import numpy as np

    from xlsub.artifacts import SubnetworkId
    from xlsub.stats.overlap import expected_random_jaccard, head_agreement_by_language, jaccard

    g = torch.Generator().manual_seed(5)
    ids = [SubnetworkId(lang, s) for lang in ("de", "en", "zh") for s in (0, 1)]
    masks = {sid: (torch.rand(3, 4, generator=g) < 0.6).float() for sid in ids}
    table, p = head_agreement_by_language(masks, 40, 7, ["de", "en", "zh"])
    excess = {(a, b): jaccard(masks[a], masks[b]) - expected_random_jaccard(masks[a], masks[b]) for a, b in itertools.combinations(ids, 2)}
    for lang in ("de", "en", "zh"):
        within = [v for (a, b), v in excess.items() if a.language == b.language == lang]
        across = [v for (a, b), v in excess.items() if (a.language == lang) != (b.language == lang)]
        assert table.loc[lang, "within"] == pytest.approx(np.mean(within))
        assert table.loc[lang, "across"] == pytest.approx(np.mean(across))
        assert table.loc[lang, "difference"] == pytest.approx(np.mean(within) - np.mean(across))
    labels = np.array([0, 0, 1, 1, 2, 2])
    pairs = list(itertools.combinations(range(6), 2))
    values = np.array([excess[(ids[i], ids[j])] for i, j in pairs])

    def stat(codes):
        same = np.array([codes[i] == codes[j] for i, j in pairs])
        return values[same].mean() - values[~same].mean()

    rng = np.random.default_rng(7)
    observed = stat(labels)
    exceed = sum(stat(rng.permutation(labels)) >= observed - 1e-12 for _ in range(40))
    assert p == pytest.approx((1 + exceed) / 41)
    one_seed = {SubnetworkId(sid.language, 0): m for sid, m in masks.items() if sid.seed == 0}
    table, p = head_agreement_by_language(one_seed, 10, 0)
    assert table["within"].isna().all() and math.isnan(p)
