"""Language-level inference against independent computations: sign flips enumerated by hand, Hartigan's
subset means, scipy's t and BH, and simulations of coverage and calibration."""

from __future__ import annotations

import itertools
import math
from itertools import combinations, permutations, product

import numpy as np
import pytest
import scipy.stats
import torch

from xlsub.similarity.permutation import permutations as similarity_permutations
from xlsub.stats.inference import (
    average_ranks,
    benjamini_hochberg,
    jackknife_interval,
    leave_one_out,
    mantel_test,
    matrix_correlation,
    monte_carlo_p,
    sign_flip_interval,
    sign_flip_test,
    t_interval,
    unit_level,
)


def hand_p(values, alternative):
    """Share of all sign vectors whose mean is at least as extreme as the observed one (identity included)."""
    observed = np.mean(values)
    count = total = 0
    for signs in product((1, -1), repeat=len(values)):
        mean = sum(s * v for s, v in zip(signs, values)) / len(values)
        total += 1
        if alternative == "greater":
            count += mean >= observed - 1e-12
        elif alternative == "less":
            count += mean <= observed + 1e-12
        else:
            count += abs(mean) >= abs(observed) - 1e-12
    return count / total


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_exact_p_is_the_share_of_hand_enumerated_sign_flips(n, alternative):
    values = np.random.default_rng(n).normal(0.3, 1.0, n)
    result = sign_flip_test(values, alternative)
    assert result.test == "sign_flip_exact" and result.n_units == n
    assert result.p == pytest.approx(hand_p(values, alternative), abs=1e-15)
    assert result.p >= result.p_floor and result.statistic == pytest.approx(values.mean())


def test_ties_count_as_extreme_and_the_floor_is_reached():
    # all values positive: only the identity reaches the observed mean, p = 1/2^n = the floor
    result = sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert result.p == result.p_floor == 1 / 256
    # a zero value: flipping it ties with the identity, so two of the 2^n count
    assert sign_flip_test([0.0, 1, 2, 3]).p == 2 / 16
    assert sign_flip_test([0.0, 0.0, 0.0]).p == 1.0  # every flip ties
    assert sign_flip_test([1.0, 2, 3], "two-sided").p_floor == 2 / 8


def test_the_issue_numbers_one_excess_per_language():
    """8 languages, all but one with a positive excess: exact p = #{subsets whose flip keeps the sum >=} / 256."""
    d = np.array([0.52, 0.41, 0.33, 0.47, 0.29, 0.38, -0.05, 0.19])
    expected = sum(1 for signs in product((1, -1), repeat=8) if np.dot(signs, d) >= d.sum() - 1e-12) / 256
    assert sign_flip_test(d).p == pytest.approx(expected)
    assert expected == 2 / 256  # only the identity and flipping -0.05


def test_monte_carlo_path_agrees_with_the_exact_one():
    d = np.random.default_rng(5).normal(0.4, 1.0, 8)
    exact = sign_flip_test(d)
    mc = sign_flip_test(d, n_perm=20_000, seed=1, max_exact=100)
    assert mc.test == "sign_flip_mc" and mc.p_floor == 1 / 20_001 and mc.p >= mc.p_floor
    assert abs(mc.p - exact.p) < 4 * math.sqrt(exact.p * (1 - exact.p) / 20_000) + 1 / 20_001
    # (k + 1) / (N + 1): all-positive values reach only the identity, which a random draw rarely is
    floor = sign_flip_test(np.arange(1.0, 21.0), n_perm=999, seed=0)
    assert floor.test == "sign_flip_mc" and floor.p == pytest.approx(1 / 1000) and floor.p == floor.p_floor


@pytest.mark.parametrize("seed", range(6))
def test_p_never_below_its_floor(seed):
    rng = np.random.default_rng(seed)
    for n in (2, 5, 8, 17):
        for alternative in ("greater", "less", "two-sided"):
            result = sign_flip_test(rng.normal(rng.normal(), 1, n), alternative, n_perm=200, seed=seed)
            assert result.p_floor <= result.p <= 1


def hartigan_interval(values, level):
    """Ends from the sorted means of the 2^n - 1 non-empty subsets: the lower end is the k-th smallest with
    k the fewest subsets below it that lift the one-sided p above (1 - level) / 2 (Hartigan 1969)."""
    n = len(values)
    means = sorted(np.mean(c) for r in range(1, n + 1) for c in combinations(values, r))
    alpha = (1 - level) / 2
    k = next(k for k in range(len(means) + 1) if (1 + k) / 2**n > alpha)
    return (means[k - 1], means[len(means) - k]) if k else (-math.inf, math.inf)


@pytest.mark.parametrize("level", [0.95, 0.9, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_the_inverted_interval_ends_at_subset_means(seed, level):
    values = np.random.default_rng(seed).gamma(2.0, 1.0, 8)
    lo, hi = sign_flip_interval(values, level)
    expected = hartigan_interval(values, level)
    assert lo == pytest.approx(expected[0], rel=1e-9) and hi == pytest.approx(expected[1], rel=1e-9)
    # just inside each end neither one-sided test rejects; just outside one does
    alpha = (1 - level) / 2
    assert sign_flip_test(values - lo * (1 + 1e-6)).p > alpha >= sign_flip_test(values - (lo - 1e-6)).p
    assert sign_flip_test(values - hi * (1 - 1e-6), "less").p > alpha >= sign_flip_test(values - (hi + 1e-6), "less").p


def test_too_few_units_give_an_unbounded_interval():
    assert sign_flip_interval([0.3, 0.5, 0.4]) == (-math.inf, math.inf)  # 1/8 > 0.025
    assert all(math.isfinite(x) for x in sign_flip_interval([0.3, 0.5, 0.4, 0.1, 0.2, 0.6]))  # 1/64 <= 0.025
    assert sign_flip_interval([2.0] * 8) == pytest.approx((2.0, 2.0))


def test_t_interval_is_scipys():
    values = np.array([0.3, 0.1, 0.7, 0.4, 0.2])
    expected = scipy.stats.t.interval(0.95, 4, loc=values.mean(), scale=scipy.stats.sem(values))
    assert t_interval(values) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(x) for x in t_interval([1.0]))


def coverage(draw, mean, interval, sets=400):
    return np.mean([lo <= mean <= hi for lo, hi in (interval(draw()) for _ in range(sets))])


@pytest.mark.parametrize("name", ["normal", "gamma"])
def test_coverage_of_the_95_percent_intervals_with_8_languages(name):
    """400 data sets of 8 values with a known mean: the share of intervals holding it is 0.95 up to
    simulation error (2.5 SE = 0.027) and the test's discreteness (exact sign-flip level 1 - 12/256)."""
    rng = np.random.default_rng(0 if name == "normal" else 1)
    draw, mean = ((lambda: rng.normal(1.0, 2.0, 8)), 1.0) if name == "normal" else ((lambda: rng.gamma(4.0, 1.0, 8)), 4.0)
    flips = coverage(draw, mean, sign_flip_interval)
    t = coverage(draw, mean, t_interval)
    assert 0.92 <= flips <= 0.985, flips
    assert 0.92 <= t <= 0.985, t


def test_calibration_and_power_of_the_sign_flip_test():
    """No true effect (values symmetric about 0, normal and heavy-tailed): rejection at alpha = 0.05 no more
    than alpha + 3 SE over 300 sets of 8; a shift of 1.5 SD is found in most sets."""
    rng = np.random.default_rng(2)
    sets, alpha = 300, 0.05
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / sets)
    normal = np.mean([sign_flip_test(rng.normal(0, 1, 8)).p < alpha for _ in range(sets)])
    heavy = np.mean([sign_flip_test(rng.standard_t(2, 8)).p < alpha for _ in range(sets)])
    shifted = np.mean([sign_flip_test(rng.normal(1.5, 1, 8)).p < alpha for _ in range(sets)])
    assert normal <= bound and heavy <= bound, (normal, heavy)
    assert shifted >= 0.8, shifted


def test_leave_one_out():
    def decide(v):
        return sign_flip_test(v).p < 0.05

    assert leave_one_out(np.arange(1.0, 9.0), decide)  # 1/128 after dropping any one
    assert not leave_one_out([1.0, 2, 3, 4, 5], decide)  # 1/32 -> 1/16 without one of them
    assert leave_one_out([1.0, -1, 1, -1], decide)  # no evidence with or without any one
    assert not leave_one_out([1.0], decide)


def test_unit_level_gathers_test_interval_and_robustness():
    d = np.random.default_rng(3).normal(0.5, 0.3, 8)
    result = unit_level(d)
    assert (result.value, result.p, result.p_floor, result.test, result.n_units) == (
        pytest.approx(d.mean()), sign_flip_test(d).p, 1 / 256, "sign_flip_exact", 8)
    assert (result.lo, result.hi) == sign_flip_interval(d)
    expected = all((sign_flip_test(np.delete(d, i)).p < 0.05 and sign_flip_interval(np.delete(d, i))[0] > 0)
                   == (result.p < 0.05 and result.lo > 0) for i in range(8))
    assert result.robust_to_leave_one_out == expected


def test_monte_carlo_p_counts_ties():
    assert monte_carlo_p([0.1, 0.5, 0.5, 0.9], 0.5) == 4 / 5
    assert monte_carlo_p([0.1, 0.2], 0.5) == 1 / 3
    assert monte_carlo_p([0.1, 0.2], 0.15, "less") == 2 / 3


# -- Benjamini-Hochberg ------------------------------------------------------------------------------


def test_benjamini_hochberg_hand_made():
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4 p / rank = 0.04, 0.06, 0.0533, 0.2 -> step-up minimum from the top
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.2]), [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert benjamini_hochberg([]).shape == (0,)
    with pytest.raises(ValueError):
        benjamini_hochberg([0.5, 1.2])


@pytest.mark.parametrize("m", [1, 2, 7, 50])
def test_benjamini_hochberg_matches_scipy(m):
    rng = np.random.default_rng(m)
    p = np.concatenate([rng.uniform(size=m) ** 3, [0.5, 0.5, 1.0]])  # with ties and a 1
    rng.shuffle(p)
    np.testing.assert_allclose(benjamini_hochberg(p), scipy.stats.false_discovery_control(p), rtol=1e-14)


# -- ranks and the Mantel test -----------------------------------------------------------------------------


def test_average_ranks_equal_scipys_with_ties_along_the_last_axis():
    x = np.array([3.0, 1.0, 2.0, 1.0, 3.0, 3.0, 0.5])
    np.testing.assert_array_equal(average_ranks(x).numpy(), scipy.stats.rankdata(x))
    rows = np.round(np.random.default_rng(0).random((4, 30)) * 5)  # few distinct values: long tie runs
    np.testing.assert_array_equal(average_ranks(torch.from_numpy(rows)).numpy(), scipy.stats.rankdata(rows, axis=-1))


def dissimilarities(k: int, seed: int, ties: bool = False) -> np.ndarray:
    values = np.random.default_rng(seed).random((k, k))
    if ties:
        values = np.round(values * 3) / 3
    values = (values + values.T) / 2
    np.fill_diagonal(values, 0.0)
    return values


def upper_triangle(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def hand_mantel_p(x, y, alternative, method="spearman"):
    """Share of all k! relabellings of y whose correlation with x is at least as extreme (identity included)."""
    correlate = scipy.stats.spearmanr if method == "spearman" else scipy.stats.pearsonr
    observed = correlate(upper_triangle(x), upper_triangle(y)).statistic
    null = np.array([correlate(upper_triangle(x), upper_triangle(y[np.ix_(p, p)])).statistic
                     for p in (list(q) for q in permutations(range(len(x))))])
    if alternative == "greater":
        return observed, np.mean(null >= observed - 1e-12)
    if alternative == "less":
        return observed, np.mean(null <= observed + 1e-12)
    return observed, np.mean(np.abs(null) >= abs(observed) - 1e-12)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_exact_mantel_p_is_the_share_of_hand_enumerated_relabellings(alternative, ties, method):
    x, y = dissimilarities(5, 1, ties), dissimilarities(5, 2, ties) + 0.4 * dissimilarities(5, 1, ties)
    observed, p = hand_mantel_p(x, y, alternative, method)
    result = mantel_test(x, y, alternative=alternative, method=method)
    assert (result.test, result.n_perm, result.p_floor) == ("relabel_exact", 120, 1 / 120)
    assert float(result.observed) == pytest.approx(observed, abs=1e-12)
    assert float(result.p_value) == pytest.approx(p, abs=1e-12)
    assert float(matrix_correlation(x, y, method)) == pytest.approx(observed, abs=1e-12)


def test_exact_mantel_reaches_its_floor_only_with_the_identity():
    x = dissimilarities(6, 3)
    result = mantel_test(x, x ** 2)  # a monotone transform: r = 1, and only relabellings fixing every pair reach it
    assert float(result.observed) == pytest.approx(1.0)
    assert float(result.p_value) == pytest.approx(result.p_floor) == pytest.approx(1 / math.factorial(6))


def test_monte_carlo_mantel_agrees_with_the_exact_p_within_its_error():
    x, y = dissimilarities(7, 4), dissimilarities(7, 5)
    y = y + 0.15 * x  # a p away from 0 and 1
    exact = mantel_test(x, y, alternative="two-sided")
    sampled = mantel_test(x, y, similarity_permutations(7, 4000, 1), alternative="two-sided", max_exact=0)
    assert exact.test == "relabel_exact" and exact.n_perm == 5040
    assert sampled.test == "relabel_mc" and sampled.n_perm == 4000 and sampled.p_floor == 1 / 4001
    p = float(exact.p_value)
    assert 0.05 < p < 0.95
    assert abs(float(sampled.p_value) - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1 / 4001
    assert float(sampled.null_mean) == pytest.approx(float(exact.null_mean), abs=0.02)


def test_restricted_mantel_relabels_only_within_groups():
    k, groups = 12, np.repeat([0, 1, 2], 4)
    x = dissimilarities(k, 6)
    # y depends only on the pair's groups: a relabelling within groups leaves it unchanged, any other does not
    y = np.abs(groups[:, None] - groups[None, :]) + 0.1 * (groups[:, None] + groups[None, :]) + 0.0
    np.fill_diagonal(y, 0.0)
    restricted = mantel_test(x, y, similarity_permutations(k, 200, 2, groups), groups)
    assert restricted.test == "restricted_perm_mc" and restricted.p_floor == 1 / 201
    np.testing.assert_allclose(restricted.null.numpy(), float(restricted.observed), rtol=0, atol=1e-12)
    assert float(restricted.p_value) == 1.0
    assert float(mantel_test(x, y, similarity_permutations(k, 200, 2)).null.std()) > 0.05  # unrestricted relabellings do move it
    # and its null is the correlation under the same within-group permutations, one at a time
    y = dissimilarities(k, 7)
    perms = similarity_permutations(k, 50, 3, groups).numpy()
    result = mantel_test(x, y, perms, groups)
    assert all((groups[p] == groups).all() for p in perms)
    expected = [scipy.stats.spearmanr(upper_triangle(x), upper_triangle(y[np.ix_(p, p)])).statistic for p in perms]
    np.testing.assert_allclose(result.null.numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="out of its group"):
        mantel_test(x, y, similarity_permutations(k, 50, 3), groups)
    with pytest.raises(ValueError, match="too many to enumerate"):
        mantel_test(x, y)


def test_mantel_of_one_reference_against_stacked_matrices_equals_one_test_each():
    x = dissimilarities(20, 8)
    ys = np.stack([dissimilarities(20, s) + 0.2 * x for s in (9, 10, 11)])
    sample = similarity_permutations(20, 30, 4)
    shared = mantel_test(x, ys, sample)
    assert shared.null.shape == (3, 30) and shared.p_value.shape == (3,)
    for n, y in enumerate(ys):
        alone = mantel_test(x, y, sample)
        np.testing.assert_allclose(shared.null[n].numpy(), alone.null.numpy(), rtol=0, atol=1e-12)
        assert float(shared.p_value[n]) == float(alone.p_value)


def test_mantel_of_a_constant_matrix_is_nan():
    x = dissimilarities(6, 12)
    result = mantel_test(x, 1.0 - np.eye(6), alternative="two-sided")
    assert math.isnan(float(result.observed)) and math.isnan(float(result.p_value))


def test_jackknife_interval_is_the_grouped_jackknife_with_a_t_quantile():
    theta = np.array([0.31, 0.29, 0.35, 0.30, 0.27, 0.33])
    se = math.sqrt(5 / 6 * ((theta - theta.mean()) ** 2).sum())
    lo, hi = jackknife_interval(0.3, theta, level=0.9)
    half = scipy.stats.t.ppf(0.95, 5) * se
    assert (float(lo), float(hi)) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-14)


def test_untied_order_is_the_argsort_and_finds_ties_even_one_ulp_apart():
    """untied_order (packed fixed-point keys, one integer sort) equals torch.argsort where no two values are equal,
    including values one ulp apart that share a fixed-point key, and returns None for any tie; value_order lists
    the tie runs; the centred rank matrix's fast path built on it equals the general (argsort, tie-averaging)
    path bit for bit, with and without ties."""
    from xlsub.stats.inference import centred_upper, untied_order, value_order

    g = torch.Generator().manual_seed(3)
    for m in (0, 1, 2, 7, 5000):
        values = torch.randn(m, generator=g, dtype=torch.float64)
        assert torch.equal(untied_order(values), torch.argsort(values))
    base = torch.rand(20_000, generator=g, dtype=torch.float64)
    neighbours = torch.cat([base, torch.nextafter(base, torch.tensor(2.0, dtype=torch.float64))])
    neighbours = neighbours[torch.randperm(len(neighbours), generator=g)]
    assert torch.equal(untied_order(neighbours), torch.argsort(neighbours))
    assert untied_order(torch.tensor([0.5, 0.25, 0.5], dtype=torch.float64)) is None
    assert untied_order(torch.tensor([0.0, -0.0], dtype=torch.float64)) is None
    assert untied_order(torch.cat([neighbours, neighbours[:1]])) is None  # one tie among 40,001 values
    assert untied_order(torch.full((4,), 1.0, dtype=torch.float64)) is None
    order, runs = value_order(torch.tensor([3.0, 1.0, 2.0, 1.0, 3.0, 3.0, 0.5], dtype=torch.float64))
    assert order[0] == 6 and set(order[1:3].tolist()) == {1, 3} and order[3] == 2 and set(order[4:].tolist()) == {0, 4, 5}
    assert runs.tolist() == [[1, 3], [4, 7]]
    tied_pairs = torch.cat([neighbours, neighbours[:300]])  # 300 ties among near-neighbours sharing their keys
    order, runs = value_order(tied_pairs)
    assert torch.equal(tied_pairs[order], torch.sort(tied_pairs).values) and len(runs) == 300 and bool((runs[:, 1] - runs[:, 0] == 2).all())
    d = torch.rand(60, 60, generator=g, dtype=torch.float64)
    d = d + d.mT
    assert torch.equal(centred_upper(d, "spearman"), centred_upper(d[None], "spearman")[0])  # batched: the general path
    tied = torch.randint(0, 7, (60, 60), generator=g).double()
    tied = tied + tied.mT
    assert torch.equal(centred_upper(tied, "spearman"), centred_upper(tied[None], "spearman")[0])
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)  # the RDM written into a buffer and ranked there: the same bits
    from xlsub.similarity.retrieval import unit_rows
    from xlsub.similarity.rsa import rdm
    from xlsub.stats.inference import centred_ranks_
    assert torch.allclose(rdm(x), 1.0 - unit_rows(x, False) @ unit_rows(x, False).mT, rtol=0, atol=1e-14)
    buffer = torch.empty(50, 50, dtype=torch.float64)
    assert torch.equal(centred_ranks_(rdm(x, out=buffer)), centred_upper(rdm(x)[None], "spearman")[0]) and torch.equal(buffer, centred_upper(rdm(x), "spearman"))


@pytest.mark.parametrize("k", [2, 63, 150])
def test_compiled_rank_matrix_and_its_order_match_the_torch_path(k):
    """centred_ranks_' compiled path (ranks centred as written, the triangle mirrored in 64 x 64 tiles: 150 leaves
    partial tiles) equals the general path (triu indices, average_ranks) bit for bit, with and without ties, as does
    the torch path that a non-contiguous matrix takes; the jackknife's order read off a rank matrix (float64 or the
    float32 of rank_dtype) is the argsort of the triangle by both paths, and None for a tied one."""
    from xlsub.similarity.rsa import _untied_order
    from xlsub.stats.inference import centred_ranks_, centred_upper, upper_entries

    g = torch.Generator().manual_seed(k)
    threads = torch.get_num_threads()
    for tied in (False, True):
        d = torch.randint(0, 5, (k, k), generator=g).double() if tied else torch.rand(k, k, generator=g, dtype=torch.float64)
        d = d + d.mT
        want = centred_upper(d[None], "spearman")[0]
        for parts in (1, 2, 3):  # the compiled loops split between 1, 2 or 3 threads
            torch.set_num_threads(parts)
            try:
                assert torch.equal(centred_ranks_(d.clone()), want)
            finally:
                torch.set_num_threads(threads)
        assert torch.equal(centred_ranks_(d.clone().mT), want)  # symmetric, so the same matrix: the torch path
        for ranks, parts in itertools.product((want, want.float()), (1, 2, 3)):  # the compiled walk's rows in parts
            torch.set_num_threads(parts)
            try:
                order, by_torch = _untied_order(ranks.clone()), _untied_order(ranks.clone().mT)
            finally:
                torch.set_num_threads(threads)
            if tied and k > 2:
                assert order is None and by_torch is None
            else:
                assert torch.equal(order, torch.argsort(upper_entries(d))) and torch.equal(by_torch, order)
    odd_run = torch.zeros(4, 4, dtype=torch.float64)  # a run of three ties: ranks 2, 2, 2, 4, 5, 6, integers that repeat
    odd_run[0, 1:], odd_run[1, 2:], odd_run[2, 3] = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 3.0]), 4.0
    ranks = centred_ranks_(odd_run + odd_run.mT)
    for parts in (1, 2, 3):  # the repeated ranks in one part or in two
        torch.set_num_threads(parts)
        try:
            assert _untied_order(ranks) is None and _untied_order(ranks.clone().mT) is None
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("small", [0, 32, 1 << 30])
@pytest.mark.parametrize("digit", [9, 10])
@pytest.mark.parametrize("m", [3001, 300_000])
def test_value_orders_radix_sort_is_numpys_sort_of_the_keys(m, digit, small, monkeypatch):
    """The compiled path of value_order (pack_part, scatter_part, sort_buckets, unpack; at m = 3,001 the buckets' 40 low
    key bits in 5 passes of 9 bits or 4 of 10, at m = 300,000 their 33 in 4 of either, so the result ends in either
    buffer; every bucket sorted by passes (small 0), the small ones by insertion (32) or all by insertion; keys made,
    scattered, sorted and unpacked in 1, 2, 3 and 7 parts) gives numpy's path's order and runs element for element:
    continuous values, ties, a few distinct values, values far below the rest (one fixed-point key for many: one
    bucket holds almost all), negative ones; and its packed keys sort as numpy sorts them."""
    from xlsub.stats import compiled_sort, inference

    monkeypatch.setattr(compiled_sort, "DIGIT", digit)
    monkeypatch.setattr(compiled_sort, "SMALL", small)
    rng = np.random.default_rng(m)
    base = rng.standard_normal(m)
    cases = {"continuous": base, "tied": np.concatenate([base[:-7], base[:7]]), "few": rng.integers(0, 5, m).astype(np.float64),
             "crowded": np.concatenate([1e-300 * rng.random(m - 2), [0.5, 1.0]]), "negative": -np.abs(base) * 1e6}
    for name, values in cases.items():
        values = torch.from_numpy(values)
        monkeypatch.setattr(inference, "RADIX_MIN", 1 << 40)
        want_order, want_runs = inference.value_order(values)
        monkeypatch.setattr(inference, "RADIX_MIN", 64)
        scratch = torch.full((2, m), -1.0, dtype=torch.float64)
        order, runs = inference.value_order(values, scratch)
        assert torch.equal(order, want_order) and torch.equal(runs, want_runs), name
        assert order.data_ptr() == scratch[0].data_ptr()  # the order in scratch[0], as the callers expect
        assert torch.equal(values[order], torch.sort(values).values), name
        assert (len(runs) > 0) == (name in ("tied", "few")), name
        if not len(runs):
            assert torch.equal(order, torch.argsort(values)), name  # untied: the one ascending order
        narrow = values.float()  # float32 values (rank matrices in `rank_dtype`): float64's order of the same numbers
        for path in (1 << 40, 64):
            monkeypatch.setattr(inference, "RADIX_MIN", path)
            for got, want in zip(inference.value_order(narrow), inference.value_order(narrow.double())):
                assert torch.equal(got, want), (name, path)
    index_bits = (m - 1).bit_length()
    key_bits = min(52, 63 - index_bits)
    low_bits = key_bits - compiled_sort.TOP
    packed, spare = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
    v = base
    low, scale = v.min(), float(2**key_bits - 2) / (v.max() - v.min())
    counts = np.zeros(1 << compiled_sort.TOP, dtype=np.int64)
    compiled_sort.pack_part(v, low, scale, index_bits, packed, 0, m, counts, low_bits)
    keys = (((v - v.min()) * (float(2**key_bits - 2) / (v.max() - v.min()))).astype(np.int64) << index_bits) | np.arange(m)
    np.testing.assert_array_equal(packed, keys)  # numpy's keys, bit for bit
    np.testing.assert_array_equal(counts, np.bincount(keys >> (index_bits + low_bits), minlength=1 << compiled_sort.TOP))
    passes = (low_bits + digit - 1) // digit
    assert passes == {(3001, 9): 5, (3001, 10): 4, (300_000, 9): 4, (300_000, 10): 4}[m, digit]
    for parts in (1, 2, 3, 7):  # the keys made, scattered, sorted and unpacked in parts side by side
        result = compiled_sort.radix_sorted(v, low, scale, index_bits, key_bits, packed, spare, parts)
        np.testing.assert_array_equal(result, np.sort(keys))
        assert (result is packed) == (passes % 2 == 1)
        order, positions = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
        shared = compiled_sort.unpack(result.copy(), index_bits, order, positions, parts)
        np.testing.assert_array_equal(order, np.sort(keys) & ((1 << index_bits) - 1))
        np.testing.assert_array_equal(positions, np.sort(keys) >> index_bits)
        assert shared == int((positions[1:] == positions[:-1]).sum())


@pytest.mark.parametrize("k", [9, 150])
def test_permuted_cross_equals_the_sum_over_permuted_entries(k, monkeypatch, two_threads):
    """permuted_cross is sum_ij A_ij B_p(i)p(j) for every matrix and permutation, computed here entry by entry in
    numpy: all matrices, a selection of them (in the selection's order), row tiles that do not divide k (a tile
    budget of a few rows), the permutations split between two threads, and no permutations."""
    from xlsub.stats import inference

    monkeypatch.setattr(inference, "_MANTEL_TILE_BYTES", 8 * k * 7 * 4)  # 4 rows per tile for 3 permutations + 4 matrices
    g = torch.Generator().manual_seed(11)

    def symmetric(m):
        x = torch.randn(m, k, k, generator=g, dtype=torch.float64)
        x = x + x.mT
        return x - torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))

    a, bs = symmetric(1)[0], symmetric(4)
    perms = torch.stack([torch.randperm(k, generator=g) for _ in range(3)])
    na, nb = a.numpy(), bs.numpy()
    expected = np.array([[(na * one[np.ix_(p, p)]).sum() for p in perms.numpy()] for one in nb])
    np.testing.assert_allclose(inference.permuted_cross(a, bs, perms).numpy(), expected, rtol=1e-12, atol=1e-9)
    select = torch.tensor([3, 1])
    np.testing.assert_allclose(inference.permuted_cross(a, bs, perms, select=select).numpy(), expected[[3, 1]], rtol=1e-12, atol=1e-9)
    assert inference.permuted_cross(a, bs, perms[:0]).shape == (4, 0)
    # matrices stored in float32 (exact half-integers, as rank matrices are): the same sums, converted tile by tile
    halves = (bs * 4).round() / 2
    single = halves.float()
    assert torch.equal(single.double(), halves)
    for chosen in (None, select):
        torch.testing.assert_close(inference.permuted_cross(a, single, perms, select=chosen),
                                   inference.permuted_cross(a, halves, perms, select=chosen), rtol=0, atol=0)
        torch.testing.assert_close(inference.permuted_cross(a, list(single), perms, select=chosen),  # a list of matrices
                                   inference.permuted_cross(a, halves, perms, select=chosen), rtol=0, atol=0)
    # the reference in float32 too (exact half-integers): gathered narrow, widened tile by tile, the same sums
    exact_a = (a * 4).round() / 2
    for chosen in (None, select):
        torch.testing.assert_close(inference.permuted_cross(exact_a.float(), single, perms, select=chosen),
                                   inference.permuted_cross(exact_a, halves, perms, select=chosen), rtol=0, atol=0)
    # the sums of products and norms without a [m, k, k] temporary, float32 operands included
    torch.testing.assert_close(inference.matrix_dots(a, single), (a * halves).sum((-2, -1)), rtol=1e-13, atol=0)
    torch.testing.assert_close(inference.upper_norm(single), halves.square().sum((-2, -1)).sqrt(), rtol=1e-14, atol=0)
    # one float32 matrix against float32 ones: the compiled loop (rows split between threads), numpy's float64 sums
    narrow = exact_a.float()
    assert inference._compiled_dots(narrow, single) and inference._compiled_dots(narrow, single[0])
    want = np.einsum("ij,wij->w", exact_a.numpy(), halves.numpy())
    torch.testing.assert_close(inference.matrix_dots(narrow, single), torch.from_numpy(want), rtol=1e-14, atol=0)
    torch.testing.assert_close(inference.matrix_dots(narrow, single[2]), torch.from_numpy(want[2:3]).reshape(()), rtol=1e-14, atol=0)
    torch.testing.assert_close(inference.matrix_dots(narrow, list(single)), torch.from_numpy(want), rtol=1e-14, atol=0)
    torch.testing.assert_close(inference.upper_norm(narrow), torch.tensor(float(np.square(exact_a.numpy()).sum()) ** 0.5, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    from xlsub.stats.workers import one_thread

    with one_thread():  # one thread: the whole of the rows in one call
        torch.testing.assert_close(inference.matrix_dots(narrow, single), torch.from_numpy(want), rtol=1e-14, atol=0)


@pytest.mark.parametrize("k", [2, 3, 150])
def test_upper_entries_copies_the_triangle_row_by_row_as_indexing_does(k):
    """upper_entries' compiled copy (rows split between 1, 2 or 3 threads) equals the strict upper triangle taken by
    torch's triu indices, for each dtype it copies, for a strided view (an expanded label row) and for a batch (the
    torch path)."""
    from xlsub.stats.inference import upper_entries

    g = torch.Generator().manual_seed(k)
    i, j = torch.triu_indices(k, k, offset=1)
    threads = torch.get_num_threads()
    d = torch.randn(k, k, generator=g, dtype=torch.float64)
    for matrix in (d, d.float(), (d * 50).to(torch.int8), (d * 50).long(), d > 0, d.mT, torch.arange(k, dtype=torch.int8)[None].expand(k, k)):
        for parts in (1, 2, 3):
            torch.set_num_threads(parts)
            try:
                got = upper_entries(matrix)
            finally:
                torch.set_num_threads(threads)
            assert got.dtype == matrix.dtype and torch.equal(got, matrix[i, j])
    batch = torch.randn(2, k, k, generator=g, dtype=torch.float64)
    assert torch.equal(upper_entries(batch), batch[:, i, j])
    assert upper_entries(torch.ones(1, 1)).shape == (0,)
