"""Permutation nulls, length control, jackknife, retrieval, RSA, planted controls and kNN-graph spectra,
each against an independent computation: brute-force loops, exact enumeration of all permutations, numpy
and scipy, and hand-computed cases."""

from __future__ import annotations

import math
from itertools import permutations as all_orders

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import pdist, squareform

from xlsub.errors import XlsubError
from xlsub.similarity import permutation
from xlsub.similarity.cka import cka, prepare, shuffled_pairs_cka
from xlsub.similarity.controls import length_only_representations, planted_representations, random_rotation
from xlsub.similarity.isomorphism import knn_eigen_similarity, knn_laplacian_spectrum
from xlsub.similarity.jackknife import (
    cka_jackknife_interval,
    jackknife_blocks,
    leave_block_out_above_chance,
    leave_block_out_cka,
    leave_block_out_self,
)
from xlsub.similarity.permutation import cka_null_mean, cka_permutation_test, length_bins, permutations, permuted_cka, residualize
from xlsub.similarity.retrieval import nearest_translation, retrieval_permutation_test, retrieval_top1, retrieval_top1_per_layer
from xlsub.similarity.rsa import centred_ranks, centred_ranks_each, leave_block_out_rsa, mantel_test, rdm, rsa, rsa_jackknife_interval
from xlsub.stats.inference import average_ranks

KINDS = ["linear", "debiased", "rbf"]


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def related(n: int = 40, d1: int = 6, d2: int = 6, layers: int | None = None, seed: int = 0, noise: float = 1.0):
    """X and Y sharing three latent directions, plus noise and an offset (so centring matters)."""
    lead = () if layers is None else (layers,)
    z = gaussian(*lead, n, 3, seed=seed)
    x = z @ gaussian(3, d1, seed=seed + 1) + noise * gaussian(*lead, n, d1, seed=seed + 2) + 2.0
    y = z @ gaussian(3, d2, seed=seed + 3) + noise * gaussian(*lead, n, d2, seed=seed + 4) - 1.0
    return x, y


def brute_force_permutations(n: int, n_perm: int, seed: int, groups=None) -> list[torch.Tensor]:
    """One permutation at a time from the same generator; in each group, members in the order of their keys."""
    generator = torch.Generator().manual_seed(seed)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    out = []
    for _ in range(n_perm):
        keys = torch.rand(n, generator=generator, dtype=torch.float64)
        perm = torch.arange(n)
        for label in np.unique(groups):
            members = torch.as_tensor(np.flatnonzero(groups == label))
            perm[members] = members[torch.argsort(keys[members])]
        out.append(perm)
    return out


def upper(m) -> np.ndarray:
    m = np.asarray(m)
    return m[np.triu_indices(len(m), k=1)]


# -- permutations ------------------------------------------------------------------------------------------

def test_permutations_match_a_one_at_a_time_draw_and_respect_groups():
    groups = [3, 1, 3, 3, 7, 1, 7, 3, 1, 1]
    perms = permutations(10, 50, seed=4, groups=groups)
    assert perms.shape == (50, 10) and perms.dtype == torch.long
    assert all(torch.equal(a, b) for a, b in zip(perms, brute_force_permutations(10, 50, 4, groups)))
    labels = torch.tensor(groups)
    assert bool((labels[perms] == labels).all())  # every example goes to one of its own group
    assert bool((perms.sort(1).values == torch.arange(10)).all())
    plain = permutations(10, 50, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(plain, brute_force_permutations(10, 50, 4)))
    assert not torch.equal(plain, permutations(10, 50, seed=5))


def test_permutations_are_uniform():
    """n=4: each of the 24 permutations about 1/24 of 24,000 draws (chi-square goodness of fit)."""
    perms = permutations(4, 24_000, seed=0)
    codes = (perms * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


# -- the CKA permutation engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, engine", [("linear", "feature"), ("linear", "gram"), ("debiased", "feature"),
                                          ("debiased", "gram"), ("rbf", "gram"), ("debiased", "auto")])
def test_permuted_cka_equals_recomputing_cka_per_permutation(kind, engine):
    x, y = related(n=30, d1=7, d2=5, layers=2)
    perms = permutations(30, 25, seed=1)
    fast = permuted_cka(x, y, perms, kind, engine=engine)
    assert fast.shape == (2, 25) and fast.dtype == torch.float64
    brute = torch.stack([torch.stack([cka(x[layer], y[layer][p], kind) for p in perms]) for layer in range(2)])
    torch.testing.assert_close(fast, brute, rtol=0, atol=1e-12)


def test_permuted_cka_float32_products_agree_with_float64(monkeypatch):
    x, y = related(n=200, d1=16, d2=12)
    perms = permutations(200, 40, seed=2)
    exact = permuted_cka(x, y, perms, "debiased", engine="feature")
    fast = permuted_cka(x, y, perms, "debiased", engine="feature", precision="float32")
    difference = float((fast - exact).abs().max())
    assert 1e-13 < difference < 1e-6, difference
    # float32 products over blocks of 64 examples, summed in float64; and blocks of 7 permutations
    monkeypatch.setattr(permutation, "FLOAT32_BLOCK", 64)
    monkeypatch.setattr(permutation, "_BLOCK_BYTES", 7 * (200 * 12 * 4 + 16 * 12 * 12))
    blocked = permuted_cka(x, y, perms, "debiased", engine="feature", precision="float32")
    assert float((blocked - exact).abs().max()) < 1e-6 and not torch.equal(blocked, fast)
    monkeypatch.setattr(permutation, "_BLOCK_BYTES", 7 * (200 * 12 * 8 + 16 * 12 * 8))
    torch.testing.assert_close(permuted_cka(x, y, perms, "debiased", engine="feature"), exact, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_float32_gram_matrices_give_the_float64_null_and_auto_takes_them_for_long_blocks(kind, monkeypatch):
    """float32 products on the CPU with the gram engine: float32 K and L, their permuted sums compiled and summed in
    float64, against float64 CKA of every permuted pairing recomputed one at a time; "auto" takes them where the
    permutations pay for the two Gram matrices (`_gram32_pays`, which the cost ratio set low makes true here), the feature
    engine for a short block, and the float64 gram engine without float32 products."""
    x, y = related(n=150, d1=40, d2=30, layers=2, noise=3.0)
    perms = permutations(150, 21, seed=4)  # 21: the compiled loop's last group of eight is partial
    brute = torch.stack([torch.stack([cka(x[layer], y[layer][p], kind) for p in perms]) for layer in range(2)])
    gram = permuted_cka(x.float(), y.float(), perms, kind, engine="gram", precision="float32")
    difference = float((gram - brute).abs().max())
    assert 0 < difference < 1e-7, difference
    feature = permuted_cka(x.float(), y.float(), perms, kind, engine="feature", precision="float32")
    assert not torch.equal(gram, feature)
    monkeypatch.setattr(permutation, "_GRAM32_RATIO", 0)  # here: a permutation of n^2 products costs less than n d1 d2
    assert permutation._gram32_pays(150, 40, 30, 21) and not permutation._gram32_pays(150, 40, 30, 2)
    assert not permutation._gram32_pays(permutation._GRAM32_MAX_N + 1, 768, 768, 10**6)
    torch.testing.assert_close(permuted_cka(x.float(), y.float(), perms, kind, precision="float32"), gram, rtol=0, atol=0)
    torch.testing.assert_close(permuted_cka(x.float(), y.float(), perms[:2], kind, precision="float32"), feature[:, :2], rtol=0, atol=0)
    float64 = permuted_cka(x, y, perms, kind, engine="gram")  # no float32 products: the float64 gram engine
    torch.testing.assert_close(float64, brute, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_permutation_test_equals_a_brute_force_loop(kind):
    x, y = related(n=30, noise=5.0)  # weak: some null values exceed the observed CKA
    result = cka_permutation_test(x, y, n_perm=200, seed=7, kind=kind, null_precision="float64")
    observed = float(cka(x, y, kind))
    null = np.array([float(cka(x, y[p], kind)) for p in brute_force_permutations(30, 200, 7)])
    assert float(result.observed) == pytest.approx(observed, abs=1e-14)
    np.testing.assert_allclose(result.null.numpy(), null, rtol=0, atol=1e-12)
    exceed = int((null >= observed).sum())
    assert 0 < exceed < 200
    assert float(result.p_value) == (1 + exceed) / 201
    assert float(result.null_mean) == pytest.approx(null.mean(), abs=1e-12)
    assert float(result.null_std) == pytest.approx(null.std(ddof=1), abs=1e-12)
    assert float(result.above_chance) == pytest.approx(observed - null.mean(), abs=1e-12)
    assert result.n_perm == 200


def test_length_matched_permutation_test_equals_a_brute_force_loop():
    x, y = related(n=36, noise=2.0)
    groups = np.repeat([0, 1, 2, 3], 9)
    result = cka_permutation_test(x, y, n_perm=100, seed=3, kind="debiased", groups=groups,
                                  null_precision="float64")
    null = np.array([float(cka(x, y[p], "debiased")) for p in brute_force_permutations(36, 100, 3, groups)])
    np.testing.assert_allclose(result.null.numpy(), null, rtol=0, atol=1e-12)


def exact_null(x, y, kind, groups=None):
    """CKA for every one of the n! re-pairings (those within groups when given), by recomputation."""
    n = x.shape[0]
    orders = torch.tensor(list(all_orders(range(n))))
    if groups is not None:
        labels = torch.as_tensor(groups)
        orders = orders[(labels[orders] == labels).all(1)]
    return np.array([float(cka(x, y[p], kind)) for p in orders])


@pytest.mark.parametrize("kind", KINDS)
def test_p_value_and_null_mean_against_all_120_permutations(kind):
    """n=5: the exact permutation distribution by enumeration, against 20,000 sampled permutations."""
    x, y = related(n=5, d1=3, d2=3, noise=1.5, seed=3)
    null = exact_null(x, y, kind)
    observed = float(cka(x, y, kind))
    exact_p = float((null >= observed - 1e-12).mean())  # the identity is one of the 120
    assert 0.05 < exact_p < 0.95  # not a trivial case
    result = cka_permutation_test(x, y, n_perm=20_000, seed=0, kind=kind)
    assert float(result.p_value) == pytest.approx(exact_p, abs=0.015)  # 4.5 binomial standard errors
    assert float(result.null_std) == pytest.approx(null.std(), rel=0.03)
    assert float(cka_null_mean(x, y, kind)) == pytest.approx(null.mean(), abs=1e-12)
    assert float(result.exact_null_mean) == pytest.approx(null.mean(), abs=1e-12)
    assert float(result.null_mean) == pytest.approx(null.mean(), abs=0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_null_mean_within_groups_against_enumeration(kind):
    x, y = related(n=7, d1=4, d2=3, seed=5)
    groups = [2, 0, 2, 0, 1, 2, 5]  # sizes 3, 2, 1, 1
    null = exact_null(x, y, kind, groups)
    assert len(null) == 3 * 2 * 2 * 1 * 1 * 1
    assert float(cka_null_mean(x, y, kind, groups)) == pytest.approx(null.mean(), abs=1e-12)


def test_exact_null_mean_closed_forms():
    """Linear: tr(K) tr(L) / (n - 1) / (||X'X|| ||Y'Y||); debiased (a U-statistic): exactly 0."""
    x, y = related(n=50, d1=5, d2=4, layers=3)
    xc, yc = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
    norm = torch.linalg.matrix_norm
    expected = xc.square().sum((-2, -1)) * yc.square().sum((-2, -1)) / 49 / (norm(xc.mT @ xc) * norm(yc.mT @ yc))
    torch.testing.assert_close(cka_null_mean(x, y, "linear"), expected, rtol=1e-12, atol=0)
    assert float(cka_null_mean(x, y, "debiased").abs().max()) < 1e-15


def test_singleton_groups_leave_nothing_to_permute():
    """Every length bin of size one: every permutation is the identity, so p = 1, also with float32 products."""
    x, y = related(n=20)
    for precision in ["float64", "float32"]:
        result = cka_permutation_test(x, y, n_perm=30, seed=0, kind="debiased", groups=range(20),
                                      engine="feature", null_precision=precision)
        assert float(result.p_value) == 1.0
        assert float(result.above_chance) == pytest.approx(0.0, abs=1e-12)


def test_float32_recheck_counts_ties_per_layer():
    """y = x: every identity permutation ties the observed CKA of 1, and float32 products must not lose a tie."""
    x, _ = related(n=12, layers=2)
    groups = [0, 0] + list(range(1, 11))  # one swap possible: half the permutations are the identity
    exact = cka_permutation_test(x, x, n_perm=40, seed=0, groups=groups, engine="feature",
                                 null_precision="float64")
    fast = cka_permutation_test(x, x, n_perm=40, seed=0, groups=groups, engine="feature")
    assert torch.equal(fast.p_value, exact.p_value)
    identity = int((permutations(12, 40, 0, groups) == torch.arange(12)).all(1).sum())
    assert 0 < identity < 40 and exact.p_value.tolist() == [(1 + identity) / 41] * 2


def test_permutation_test_per_layer_and_strong_signal():
    x, y = related(n=60, layers=3, noise=0.3)
    result = cka_permutation_test(x, y, n_perm=99, seed=0)
    assert result.observed.shape == result.p_value.shape == (3,) and result.null.shape == (3, 99)
    assert result.p_value.tolist() == [0.01] * 3  # nothing in the null reaches it: 1 / (1 + 99)
    for layer in range(3):
        alone = cka_permutation_test(x[layer], y[layer], n_perm=99, seed=0)
        torch.testing.assert_close(alone.null, result.null[layer], rtol=0, atol=1e-13)
    exact = cka_permutation_test(x, y, n_perm=99, seed=0, null_precision="float64")
    assert float((exact.null - result.null).abs().max()) < 1e-6  # the default: float32 products


def test_user_errors_name_the_input():
    x, y = related(n=10)
    with pytest.raises(XlsubError, match="unknown engine 'fast'"):
        permuted_cka(x, y, permutations(10, 2, 0), engine="fast")
    with pytest.raises(XlsubError, match="rbf CKA has no feature-space form"):
        permuted_cka(x, y, permutations(10, 2, 0), "rbf", engine="feature")
    with pytest.raises(XlsubError, match="unknown kind 'cosine'"):
        cka_permutation_test(x, y, 2, 0, kind="cosine")
    with pytest.raises(XlsubError, match="n_bins must be at least 1"):
        length_bins([1, 2, 3], 0)


def test_constant_representation_gives_nan_p_value():
    x, y = related(n=20)
    result = cka_permutation_test(torch.ones_like(x), y, n_perm=10, seed=0)
    assert math.isnan(float(result.observed)) and math.isnan(float(result.p_value))


# -- length control ----------------------------------------------------------------------------------------

def test_length_bins_keep_ties_together_and_balance_distinct_values():
    lengths = [5, 1, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    bins = length_bins(lengths, 3)
    values = np.array(lengths)
    for length in np.unique(values):  # equal lengths share a bin
        assert len(set(bins[values == length].tolist())) == 1
    order = np.argsort(values, kind="stable")
    assert (np.diff(bins.numpy()[order]) >= 0).all()  # bins follow length
    assert sorted(set(bins.tolist())) == [0, 1, 2]
    assert torch.equal(length_bins(np.arange(100), 4), torch.arange(100) // 25)
    assert torch.equal(length_bins([4, 4, 4, 4], 3), torch.zeros(4, dtype=torch.long))  # one value: one bin


def test_residualize_equals_numpy_least_squares():
    x = gaussian(2, 30, 4, seed=1) + 3.0
    covariates = np.stack([np.arange(30.0) % 7, np.sqrt(np.arange(30.0))], axis=1)
    design = np.column_stack([np.ones(30), covariates])
    for layer in range(2):
        beta, *_ = np.linalg.lstsq(design, x[layer].numpy(), rcond=None)
        np.testing.assert_allclose(residualize(x, covariates)[layer].numpy(),
                                   x[layer].numpy() - design @ beta, atol=1e-12)
    # a collinear covariate (a copy, and a constant) spans nothing new
    collinear = np.column_stack([covariates, covariates[:, 0] * 2, np.full(30, 4.0)])
    torch.testing.assert_close(residualize(x, collinear), residualize(x, covariates), rtol=0, atol=1e-12)
    lengths = torch.arange(30)
    one = residualize(x[0], lengths)
    assert float(one.sum(0).abs().max()) < 1e-12 and float((lengths.double() @ one).abs().max()) < 1e-10


# -- jackknife ---------------------------------------------------------------------------------------------

def test_jackknife_blocks():
    contiguous = jackknife_blocks(23, 5)
    assert torch.bincount(contiguous).tolist() == [5, 5, 5, 4, 4]
    assert (contiguous.diff() >= 0).all()
    shuffled = jackknife_blocks(23, 5, seed=1)
    assert torch.bincount(shuffled).tolist() == [5, 5, 5, 4, 4] and not torch.equal(shuffled, contiguous)
    with pytest.raises(XlsubError, match="blocks must be between 2"):
        jackknife_blocks(10, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_leave_block_out_cka_equals_recomputation(kind):
    x, y = related(n=45, d1=6, d2=4, layers=2)
    x = x + 50.0  # a large offset: the re-centring on kept rows must not cancel
    blocks = jackknife_blocks(45, 6, seed=2)
    fast = leave_block_out_cka(x, y, blocks, kind)
    assert fast.shape == (2, 6)
    brute = torch.stack([cka(x[:, blocks != b], y[:, blocks != b], kind) for b in range(6)], -1)
    torch.testing.assert_close(fast, brute, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grouped", [False, True])
def test_leave_block_out_above_chance_equals_recomputation(kind, grouped):
    """CKA minus the exact null mean on the kept rows, the groups restricted to them; one group lies wholly in a
    block (absent from its subset), one is a singleton."""
    x, y = related(n=60, d1=6, d2=4, layers=1)
    x, y = x[0] + 50.0, y[0]
    blocks = jackknife_blocks(60, 6, seed=2)
    groups = torch.randint(0, 7, (60,), generator=torch.Generator().manual_seed(1))
    groups[blocks == 3] = 9
    groups[int((blocks == 4).nonzero()[0])] = 11
    fast = leave_block_out_above_chance(x, y, blocks, kind, groups if grouped else None)
    codes = groups if grouped else torch.zeros(60, dtype=torch.long)
    brute = torch.stack([cka(x[blocks != b], y[blocks != b], kind) - cka_null_mean(x[blocks != b], y[blocks != b], kind, codes[blocks != b])
                         for b in range(6)])
    torch.testing.assert_close(fast, brute, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_leave_block_out_self_terms_by_recomputation(kind):
    """Each block's left-out self term is prepare's HSIC(K, K) of the kept rows (and on all rows); CKA from shared self
    terms equals CKA computing its own, layer by layer; self terms of other blocks are refused."""
    x, y = related(n=45, d1=6, d2=4, layers=2)
    x = x + 50.0
    blocks = jackknife_blocks(45, 6, seed=2)
    selves = leave_block_out_self(x, blocks, kind)
    assert selves.kept.shape == (2, 6) and selves.whole.shape == (2,)
    brute = torch.stack([prepare(x[:, blocks != b], kind)["self"] for b in range(6)], -1)
    torch.testing.assert_close(selves.kept, brute, rtol=1e-11, atol=0)
    torch.testing.assert_close(selves.whole, prepare(x, kind)["self"], rtol=1e-11, atol=0)
    shared = leave_block_out_cka(x, y, blocks, kind, selves=(selves, leave_block_out_self(y, blocks, kind)))
    assert torch.equal(shared, leave_block_out_cka(x, y, blocks, kind))
    interval = cka_jackknife_interval(x, y, kind, 6, selves=(leave_block_out_self(x, jackknife_blocks(45, 6), kind),
                                                             leave_block_out_self(y, jackknife_blocks(45, 6), kind)))
    for got, want in zip(interval, cka_jackknife_interval(x, y, kind, 6)):
        assert torch.equal(got, want)
    other = leave_block_out_self(y[0], jackknife_blocks(45, 5), kind)
    with pytest.raises(ValueError, match="same 6 blocks"):
        leave_block_out_cka(x[0], y[0], blocks, kind, selves=(other, other))


def test_jackknife_interval_formula():
    x, y = related(n=60, noise=1.5)
    estimate, lo, hi = cka_jackknife_interval(x, y, "debiased", blocks=12, level=0.9)
    blocks = np.repeat(np.arange(12), 5)
    theta = np.array([float(cka(x[blocks != b], y[blocks != b], "debiased")) for b in range(12)])
    se = math.sqrt(11 / 12 * ((theta - theta.mean()) ** 2).sum())
    half = stats.t.ppf(0.95, 11) * se
    full = float(cka(x, y, "debiased"))
    assert float(estimate) == pytest.approx(full, abs=1e-14)
    assert float(lo) == pytest.approx(full - half, abs=1e-11)
    assert float(hi) == pytest.approx(full + half, abs=1e-11)
    assert 0 < float(lo) < full < float(hi)


# -- retrieval ---------------------------------------------------------------------------------------------

def test_retrieval_hand_made_cases():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # centred already
    y = torch.tensor([[2.0, 0.2], [-0.2, 2.0], [-2.0, -0.2], [0.2, -2.0]])  # each rotated ~6 degrees
    assert retrieval_top1(x, y) == 1.0
    assert retrieval_top1(x, y[[0, 1, 3, 2]]) == 0.5  # x_2 and x_3 find each other's translation
    assert retrieval_top1(x + 5.0, y - 3.0) == 1.0  # each language centred on its own mean
    # x_0 = (1, 0) is equally close to (1, 1) and (1, -1): a tie at the top is a miss
    tied = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert nearest_translation(x, tied).tolist() == [-1, -1, -1, -1]
    assert retrieval_top1(x, tied) == 0.0


def test_retrieval_per_layer_and_against_a_loop():
    x = gaussian(2, 50, 6, seed=0)
    y = x + torch.tensor([0.8, 1.2])[:, None, None] * gaussian(2, 50, 6, seed=1)  # one space, noisy translations
    per_layer = retrieval_top1_per_layer(x, y)
    for layer in range(2):
        sim = torch.nn.functional.normalize(x[layer] - x[layer].mean(0), dim=1) @ \
            torch.nn.functional.normalize(y[layer] - y[layer].mean(0), dim=1).T
        hits = (sim.argmax(1) == torch.arange(50)).double().mean()
        assert float(per_layer[layer]) == pytest.approx(float(hits))
    assert 0 < float(per_layer.min()) and float(per_layer.max()) < 1


def test_retrieval_permutation_test_equals_a_loop():
    x = gaussian(40, 6, seed=0)
    y = x + gaussian(40, 6, seed=1)
    result = retrieval_permutation_test(x, y, n_perm=60, seed=2, groups=np.arange(40) % 3)
    brute = [retrieval_top1(x, y[p]) for p in brute_force_permutations(40, 60, 2, np.arange(40) % 3)]
    np.testing.assert_allclose(result.null.numpy(), brute, rtol=0, atol=0)
    assert float(result.observed) == retrieval_top1(x, y)
    # chance: E[#{i: p(i) = m(i)}] = 1 per permutation for the unrestricted null, so the mean accuracy is 1/n
    wide = retrieval_permutation_test(x, y, n_perm=4000, seed=0)
    assert float(wide.null_mean) == pytest.approx(1 / 40, rel=0.1)


# -- RSA ---------------------------------------------------------------------------------------------------

def test_rdm_and_rsa_against_scipy():
    x, y = related(n=25, d1=5, d2=7, layers=2)
    np.testing.assert_allclose(rdm(x[0]).numpy(), squareform(pdist(x[0].numpy(), "cosine")), atol=1e-12)
    value = rsa(x, y)
    assert value.shape == (2,)
    for layer in range(2):
        expected = stats.spearmanr(upper(rdm(x[layer])), upper(rdm(y[layer]))).statistic
        assert float(value[layer]) == pytest.approx(expected, abs=1e-12)


def test_rdm_from_blocks_is_symmetric_and_matches_the_whole_product(monkeypatch):
    """rdm multiplies blocks of rows on and above the diagonal only and mirrors them: with blocks of 7 rows (that do
    not divide n = 30) it is exactly symmetric, within rounding of 1 - cos from one whole product and of scipy,
    batched as one at a time (within rounding: batched products take other kernels), and upper=True writes the same entries above the diagonal and leaves the rest alone."""
    from xlsub.similarity import rsa as module

    monkeypatch.setattr(module, "GRAM_BLOCK_ROWS", 7)
    x, _ = related(n=30, d1=5, d2=7, layers=2)
    d = rdm(x[0])
    assert torch.equal(d, d.mT)
    unit = x[0].double() / x[0].double().norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(d.numpy(), (1.0 - unit @ unit.mT).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(d.numpy(), squareform(pdist(x[0].numpy(), "cosine")), atol=1e-12)
    np.testing.assert_allclose(rdm(x)[1].numpy(), rdm(x[1]).numpy(), rtol=0, atol=1e-14)
    buffer = torch.full((30, 30), math.nan, dtype=torch.float64)
    rdm(x[0], out=buffer, upper=True)
    above = torch.ones(30, 30, dtype=torch.bool).triu_(1)
    assert torch.equal(buffer[above], d[above]) and bool(buffer[:7, :7].tril(-1).isfinite().all()) and bool(buffer[7:, :7].isnan().all())


def test_rsa_with_tied_dissimilarities():
    """Integer vectors repeat: many equal dissimilarities, so average ranks matter."""
    x = torch.tensor(np.random.default_rng(0).integers(0, 2, (20, 3)) + 0.0)
    y = torch.tensor(np.random.default_rng(1).integers(0, 2, (20, 3)) + 0.0) + x
    assert len(np.unique(upper(rdm(x)).round(12))) < 10
    expected = stats.spearmanr(upper(rdm(x)), upper(rdm(y))).statistic
    assert float(rsa(x, y)) == pytest.approx(expected, abs=1e-12)
    values = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(average_ranks(values).numpy(), stats.rankdata(values.numpy()))


def test_mantel_test_equals_a_brute_force_loop():
    x, y = related(n=20, noise=2.5)
    result = mantel_test(x, y, n_perm=80, seed=1)
    observed = stats.spearmanr(upper(rdm(x)), upper(rdm(y))).statistic
    null = np.array([stats.spearmanr(upper(rdm(x)), upper(rdm(y[p]))).statistic
                     for p in brute_force_permutations(20, 80, 1)])
    np.testing.assert_allclose(result.null.numpy(), null, rtol=0, atol=1e-12)
    assert float(result.observed) == pytest.approx(observed, abs=1e-12)
    assert float(result.p_value) == (1 + int((null >= observed - 1e-12).sum())) / 81


def test_mantel_null_at_n_300_equals_correlations_of_permuted_ranks():
    """At n=300 the centred ranks' products exceed float32's exact integers; the null stays within 1e-7 of numpy's."""
    x, y = related(n=300, noise=2.5)
    result = mantel_test(x, y, n_perm=20, seed=3)
    a, b = (torch.from_numpy(np.asarray(stats.rankdata(upper(rdm(v))), dtype=np.float64)) for v in (x, y))
    n = 300
    i, j = torch.triu_indices(n, n, offset=1)
    flat = {(int(u), int(v)): m for m, (u, v) in enumerate(zip(i, j))}
    for k, p in enumerate(permutations(n, 20, 3)):
        pi, pj = torch.minimum(p[i], p[j]), torch.maximum(p[i], p[j])  # y's pair (p(i), p(j)) in its upper triangle
        b_perm = b[[flat[(int(u), int(v))] for u, v in zip(pi, pj)]]
        expected = float(np.corrcoef(a.numpy(), b_perm.numpy())[0, 1])
        assert float(result.null[k]) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_mantel_one_reference_against_several_languages_equals_one_test_each():
    x, y = related(n=30, noise=2.0)
    others = torch.stack([y, gaussian(30, 6, seed=9), y + gaussian(30, 6, seed=10)])
    groups = np.arange(30) % 4
    shared = mantel_test(x, others, n_perm=25, seed=5, groups=groups)
    assert shared.null.shape == (3, 25)
    for k in range(3):
        alone = mantel_test(x, others[k], n_perm=25, seed=5, groups=groups)
        np.testing.assert_allclose(shared.null[k].numpy(), alone.null.numpy(), rtol=0, atol=1e-12)
        assert float(shared.p_value[k]) == float(alone.p_value)


def test_mantel_p_value_against_all_120_permutations():
    x, y = related(n=5, d1=3, d2=3, noise=1.5, seed=15)
    orders = list(all_orders(range(5)))
    null = np.array([float(rsa(x, y[list(p)])) for p in orders])
    observed = float(rsa(x, y))
    exact_p = float((null >= observed - 1e-12).mean())
    assert 0.05 < exact_p < 0.95
    result = mantel_test(x, y, n_perm=5000, seed=0)  # 5! <= 5000: every relabelling, not a sample
    assert (result.test, result.n_perm, result.p_floor) == ("relabel_exact", 120, 1 / 120)
    assert float(result.p_value) == pytest.approx(exact_p, abs=1e-12)
    sampled = mantel_test(related(n=9, d1=3, d2=3, seed=15)[0], related(n=9, d1=3, d2=3, seed=15)[1], n_perm=50, seed=0)
    assert (sampled.test, sampled.n_perm, sampled.p_floor) == ("relabel_mc", 50, 1 / 51)  # 9! > EXACT_LIMIT
    restricted = mantel_test(x, y, n_perm=50, seed=0, groups=[0, 0, 1, 1, 1])
    assert (restricted.test, restricted.n_perm) == ("restricted_perm_mc", 50)


def test_leave_block_out_rsa_and_its_interval_equal_a_brute_force_recompute():
    x, y = related(n=23, noise=2.0)
    ys = torch.stack([y, related(n=23, noise=1.0, seed=4)[1]])
    blocks = jackknife_blocks(23, 6)
    theta = leave_block_out_rsa(x, ys, blocks)
    assert theta.shape == (2, 6)
    for b in range(6):
        keep = np.flatnonzero(blocks.numpy() != b)
        for m in range(2):  # the block's sentences deleted from both RDMs, the rest re-ranked
            expected = stats.spearmanr(upper(rdm(x)[np.ix_(keep, keep)]), upper(rdm(ys[m])[np.ix_(keep, keep)])).statistic
            assert float(theta[m, b]) == pytest.approx(expected, abs=1e-12)
    estimate, lo, hi = rsa_jackknife_interval(x, ys, blocks=6, level=0.9)
    t = theta.numpy()
    half = stats.t.ppf(0.95, 5) * np.sqrt(5 / 6 * ((t - t.mean(1, keepdims=True)) ** 2).sum(1))
    full = np.array([stats.spearmanr(upper(rdm(x)), upper(rdm(v))).statistic for v in ys])
    np.testing.assert_allclose(estimate.numpy(), full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lo.numpy(), full - half, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi.numpy(), full + half, rtol=0, atol=1e-12)


def test_leave_block_out_rsa_with_tied_dissimilarities_equals_reranking_each_subset():
    """Vectors on a coarse grid give many equal cosines: the ranks read off the full sort must average the
    ties among the kept entries exactly as ranking the subset afresh does."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (30, 2), generator=g).double()
    y = torch.randint(0, 3, (30, 2), generator=g).double()
    blocks = jackknife_blocks(30, 5)
    theta = leave_block_out_rsa(x, y, blocks)
    for b in range(5):
        keep = np.flatnonzero(blocks.numpy() != b)
        a, c = upper(rdm(x)[np.ix_(keep, keep)]), upper(rdm(y)[np.ix_(keep, keep)])
        assert len(np.unique(a)) < len(a) / 10  # heavily tied
        assert float(theta[b]) == pytest.approx(stats.spearmanr(a, c).statistic, abs=1e-12)


def test_leave_block_out_rsa_from_the_callers_ranks_equals_sorting_afresh():
    """The untied path (ranks read off one sort, or off the Mantel test's rank matrices without sorting) against
    scipy on every subset; tied vectors fall back to averaging the tie runs, with or without the ranks."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    ys = x + torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    blocks = jackknife_blocks(40, 6)
    ranks = centred_ranks(x), centred_ranks(ys)
    from_ranks, fresh = leave_block_out_rsa(x, ys, blocks, ranks=ranks), leave_block_out_rsa(x, ys, blocks)
    for b in range(6):
        keep = np.flatnonzero(blocks.numpy() != b)
        for k in range(3):
            a, c = upper(rdm(x)[np.ix_(keep, keep)]), upper(rdm(ys[k])[np.ix_(keep, keep)])
            assert float(from_ranks[k, b]) == pytest.approx(stats.spearmanr(a, c).statistic, abs=1e-13)
    torch.testing.assert_close(from_ranks, fresh, rtol=0, atol=1e-14)
    with_ranks = rsa_jackknife_interval(x, ys, 6, ranks=ranks)
    for name in ("estimate", "lo", "hi"):
        torch.testing.assert_close(getattr(with_ranks, name), getattr(rsa_jackknife_interval(x, ys, 6), name), rtol=0, atol=1e-14)
    given = rsa_jackknife_interval(x, ys, 6, ranks=(centred_ranks(x), centred_ranks(ys)), estimate=with_ranks.estimate)  # a caller's RSA on all n
    assert given.estimate is with_ranks.estimate and torch.equal(given.lo, with_ranks.lo) and torch.equal(given.hi, with_ranks.hi)
    tied = torch.randint(0, 3, (30, 2), generator=g).double()
    tied_ys = torch.randint(0, 3, (2, 30, 2), generator=g).double()
    labels = jackknife_blocks(30, 5)
    torch.testing.assert_close(leave_block_out_rsa(tied, tied_ys, labels, ranks=(centred_ranks(tied), centred_ranks(tied_ys))),
                               leave_block_out_rsa(tied, tied_ys, labels), rtol=0, atol=0)


@pytest.mark.parametrize("n, count", [(40, 19), (130, 130)])
def test_leave_block_out_rsa_over_several_gathers_and_wide_block_labels_equals_scipy(n, count):
    """More blocks than one gather reads (`JACKKNIFE_GROUP`: 19 blocks in three groups, the last one short) and more
    than int8 block labels hold (130 blocks of one sentence: int16 labels): every leave-block-out value is scipy's
    Spearman of the kept entries, ranked afresh, for two languages."""
    from xlsub.similarity import rsa as module

    assert count > 2 * module.JACKKNIFE_GROUP
    g = torch.Generator().manual_seed(count)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    ys = x + 2 * torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    blocks = jackknife_blocks(n, count)
    theta = leave_block_out_rsa(x, ys, blocks)
    assert theta.shape == (2, count)
    dx, dys = rdm(x), [rdm(y) for y in ys]
    for b in range(count):
        keep = np.flatnonzero(blocks.numpy() != b)
        for k in range(2):
            expected = stats.spearmanr(upper(dx[np.ix_(keep, keep)]), upper(dys[k][np.ix_(keep, keep)])).statistic
            assert float(theta[k, b]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tied", ["reference", "languages", "both"])
def test_leave_block_out_rsa_with_ties_on_either_side_equals_scipy_on_every_subset(tied):
    """One reference against three languages where the ties are in the reference's dissimilarities, in the
    languages' (one of them untied) or in both: every leave-block-out value is scipy's Spearman of the kept
    entries, ranked afresh (a block of 7 for uneven blocks; sentences 0-3 identical, so one tie run is removed
    whole with their block)."""
    g = torch.Generator().manual_seed(12)
    grid = torch.randint(0, 3, (4, 31, 2), generator=g).double()
    smooth = torch.randn(4, 31, 2, generator=g, dtype=torch.float64)
    x = grid[0] if tied in ("reference", "both") else smooth[0]
    ys = torch.stack([grid[1], smooth[2], grid[3]]) if tied in ("languages", "both") else smooth[1:]
    x[:4] = x[0]
    blocks = jackknife_blocks(31, 5)
    theta = leave_block_out_rsa(x, ys, blocks)
    for b in range(int(blocks.max()) + 1):
        keep = np.flatnonzero(blocks.numpy() != b)
        for k in range(3):
            a, c = upper(rdm(x)[np.ix_(keep, keep)]), upper(rdm(ys[k])[np.ix_(keep, keep)])
            assert float(theta[k, b]) == pytest.approx(stats.spearmanr(a, c).statistic, abs=1e-12)


def _walk_inputs(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor) -> tuple:
    """`kept_ranks.kept_rank_cross`'s inputs for x's and y's untied dissimilarities: x's `removed_words`, each entry of
    y's sort's position in x's and its two sentences' blocks."""
    from xlsub.similarity import kept_ranks
    from xlsub.stats.inference import upper_entries

    k = len(blocks)
    first, second = upper_entries(blocks[:, None].expand(k, k)), upper_entries(blocks[None, :].expand(k, k))
    order_x, order_y = (torch.argsort(upper_entries(rdm(a))) for a in (x, y))
    position = torch.empty_like(order_x).index_copy_(0, order_x, torch.arange(len(order_x)))
    words = kept_ranks.removed_words(first[order_x].numpy(), second[order_x].numpy(), int(blocks.max()) + 1)
    return (*words, position[order_y].numpy(), first[order_y].numpy(), second[order_y].numpy())


@pytest.mark.parametrize("n, count", [(6, 3), (90, 20)])
def test_leave_block_out_rsa_compiled_walk_equals_the_torch_gathers_and_scipy(n, count, monkeypatch):
    """The compiled walk of untied languages (`xlsub.similarity.kept_ranks`, fewer entries than it prefetches ahead
    at n = 6) against the torch path of kept-rank tables (forced with `MAX_BLOCKS` 0) and scipy on every subset,
    for two untied languages and a tied one (which takes the torch path beside them); each walk runs in two halves of
    y's sort, and a walk split anywhere adds up to the whole walk."""
    from xlsub.similarity import kept_ranks

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ys = torch.stack([x + torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, 3), generator=g).double(),
                      x + 3 * torch.randn(n, 3, generator=g, dtype=torch.float64)])
    blocks = jackknife_blocks(n, count)
    walks = []
    walk = kept_ranks.kept_rank_cross
    monkeypatch.setattr(kept_ranks, "kept_rank_cross", lambda *args: walks.append((len(args[2]), *args[-2:])) or walk(*args))
    compiled = leave_block_out_rsa(x, ys, blocks)
    m = n * (n - 1) // 2
    assert sorted(walks) == [(m, 0, m // 2)] * 2 + [(m, m // 2, m)] * 2  # the two untied languages, in halves
    whole = walk(*_walk_inputs(x, ys[0], blocks), 0, m)
    for cut in (0, 1, m // 3, m - 1, m):
        parts = walk(*_walk_inputs(x, ys[0], blocks), 0, cut) + walk(*_walk_inputs(x, ys[0], blocks), cut, m)
        np.testing.assert_allclose(parts, whole, rtol=1e-14, atol=0)
    monkeypatch.setattr(kept_ranks, "MAX_BLOCKS", 0)
    torch.testing.assert_close(compiled, leave_block_out_rsa(x, ys, blocks), rtol=0, atol=1e-13)
    assert len(walks) == 4  # the torch path walks nothing
    dx = rdm(x)
    for b in range(count):
        keep = np.flatnonzero(blocks.numpy() != b)
        for k in range(3):
            expected = stats.spearmanr(upper(dx[np.ix_(keep, keep)]), upper(rdm(ys[k])[np.ix_(keep, keep)])).statistic
            assert float(compiled[k, b]) == pytest.approx(expected, abs=1e-12)


def test_language_side_from_two_rank_matrices_equals_the_sort_and_its_gathers():
    """`_language_side` (one compiled walk of the reference's and a language's `centred_ranks` matrices, rows in 1, 2 and 3
    parts) gives, for each entry of the language's sort, the same place in the reference's sort and the same two blocks
    as the sort order and its gathers (`_walk_inputs`); None for a tied language (the sort's path), for a matrix that is
    not square and contiguous, and for more blocks than the walk takes. `leave_block_out_rsa` from the ranks takes it
    for the untied languages and equals scipy on every subset."""
    from xlsub.similarity import kept_ranks
    from xlsub.similarity import rsa as module

    g = torch.Generator().manual_seed(5)
    n, count = 57, 7
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = x + torch.randn(n, 4, generator=g, dtype=torch.float64)
    tied = torch.randint(0, 3, (n, 4), generator=g).double()
    blocks = jackknife_blocks(n, count)
    labels = blocks.to(torch.int8)
    rx, ry = centred_ranks(x).float(), centred_ranks(y).float()
    *_, position, first, second = _walk_inputs(x, y, blocks)
    threads = torch.get_num_threads()
    try:
        for parts in (1, 2, 3):
            torch.set_num_threads(parts)
            side = module._language_side(ry, rx, labels)
            assert side is not None and not side[1].tied
            np.testing.assert_array_equal(side[0].numpy(), position)
            np.testing.assert_array_equal(side[1].first.numpy(), first)
            np.testing.assert_array_equal(side[1].second.numpy(), second)
            assert module._language_side(centred_ranks(tied).float(), rx, labels) is None
    finally:
        torch.set_num_threads(threads)
    assert module._language_side(ry.mT, rx, labels) is None and module._language_side(ry[1:, 1:], rx, labels) is None
    assert module._language_side(ry, rx, torch.full_like(labels, kept_ranks.MAX_BLOCKS)) is None
    made = []
    original = module._language_side
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_language_side", lambda *args: made.append(original(*args)) or made[-1])
        ys = torch.stack([y, tied])
        theta = leave_block_out_rsa(x, ys, blocks, ranks=(centred_ranks(x), centred_ranks(ys)))
    assert [side is not None for side in made] == [True, False]
    for b in range(count):
        keep = np.flatnonzero(blocks.numpy() != b)
        for k in range(2):
            expected = stats.spearmanr(upper(rdm(x)[np.ix_(keep, keep)]), upper(rdm(ys[k])[np.ix_(keep, keep)])).statistic
            assert float(theta[k, b]) == pytest.approx(expected, abs=1e-12)


def test_rsa_jackknife_interval_covers_the_population_rsa():
    """Sentences x = z A + noise, y = z B + noise with one fixed A, B: the population RSA is approximated by
    the mean RSA of 3 x 1000 sentences (its own error ~0.01, against intervals ~0.37 wide); 95% intervals from
    40 sentences cover it (0.94 of 120 sets when written; 0.85 is 4 binomial SDs below 0.95 at 100 sets)."""

    def sentences(n: int, seed: int):
        z = gaussian(n, 3, seed=seed)
        return (z @ gaussian(3, 5, seed=100) + 1.5 * gaussian(n, 5, seed=seed + 1),
                z @ gaussian(3, 4, seed=101) + 1.5 * gaussian(n, 4, seed=seed + 2))

    truth = np.mean([float(rsa(*sentences(1000, 10_000 + 3 * s))) for s in range(3)])
    sets = 100
    covered = sum(float(lo) <= truth <= float(hi) for _, lo, hi in (rsa_jackknife_interval(*sentences(40, 3 * s)) for s in range(sets)))
    assert 0.85 <= covered / sets <= 1.0


# -- planted controls --------------------------------------------------------------------------------------

def test_planted_control_measures_grow_with_snr():
    base = gaussian(200, 6, seed=0) @ gaussian(6, 32, seed=1) + 0.3 * gaussian(200, 32, seed=2)
    snrs = [0.03, 0.1, 0.3, 1.0, 3.0]
    ckas, rsas, retrievals = [], [], []
    for snr in snrs:
        reps = planted_representations(base, ["en", "de"], snr, seed=0, rotate=False)
        ckas.append(float(cka(reps["en"], reps["de"], "debiased")))
        rsas.append(float(rsa(reps["en"], reps["de"])))
        retrievals.append(retrieval_top1(reps["en"], reps["de"]))
    assert np.all(np.diff(ckas) > 0) and np.all(np.diff(rsas) > 0) and np.all(np.diff(retrievals) >= 0)
    assert ckas[0] < 0.05 < 0.7 < ckas[-1] and retrievals[-1] > 0.5
    signal = planted_representations(base, ["en", "de", "zh"], math.inf, seed=0)
    assert float(cka(signal["en"], signal["zh"], "linear")) == pytest.approx(1.0, abs=1e-12)  # rotations only
    assert float(signal["en"].square().mean()) == pytest.approx(1.0, abs=1e-12)  # standardised
    assert retrieval_top1(signal["en"], signal["de"]) < 0.05  # unaligned coordinates: retrieval is blind
    again = planted_representations(base, ["de"], 1.0, seed=0)["de"]  # per-language seeds
    torch.testing.assert_close(again, planted_representations(base, ["en", "de"], 1.0, seed=0)["de"])
    mixed = planted_representations(base, ["de"], 1.0, seed=0, rotate=False)["de"]
    scale = (base - base.mean(0)).square().mean().sqrt()
    noise = (mixed - math.sqrt(0.5) * (base - base.mean(0)) / scale) / math.sqrt(0.5)
    assert float(noise.square().mean()) == pytest.approx(1.0, abs=0.05)  # what is left is unit noise
    from xlsub.similarity.controls import _language_generator

    g = _language_generator(0, "de")
    torch.randn(32, 32, generator=g, dtype=torch.float64)  # the rotation's draws, skipped without rotate
    torch.testing.assert_close(noise, torch.randn(200, 32, generator=g, dtype=torch.float32).double(), rtol=0, atol=1e-12)  # drawn in float32


def test_length_only_control_looks_parallel_to_cka_but_not_to_retrieval():
    rng = np.random.default_rng(0)
    en = rng.integers(3, 40, 400)
    de = np.maximum(1, np.round(1.2 * en + rng.normal(0, 2, 400))).astype(int)
    reps = length_only_representations({"en": en, "de": de}, d=128, seed=0)
    x, y = reps["en"], reps["de"]
    parallel = float(cka(x, y, "linear"))
    assert parallel > 0.5  # REFERENCES: ~0.70 on the demo
    assert float(shuffled_pairs_cka(x, y, seed=0)) < 0.15
    assert retrieval_top1(x, y) < 0.03  # chance is 1/400; a length match is not a translation
    binned = cka_permutation_test(x, y, n_perm=50, seed=0, kind="linear", groups=length_bins(en, 10))
    assert abs(float(binned.null_mean) - parallel) < 0.1  # length-matched shuffles keep nearly all of it
    # ... but not all: within 10 bins lengths still vary, and the test rejects for a content-free encoder;
    # grouped by exact source length it does not
    assert float(binned.p_value) < 0.05
    exact = cka_permutation_test(x, y, n_perm=50, seed=0, kind="linear", groups=en)
    assert float(exact.p_value) > 0.2
    assert float(cka(residualize(x, en), residualize(y, en), "linear")) < parallel - 0.2
    # content-free: a sentence of length 0 is <s></s> and positions 0, 1, the same in every language
    empty = length_only_representations({"en": [0, 3], "de": [0, 5]}, d=8, seed=1)
    torch.testing.assert_close(empty["en"][0], empty["de"][0], rtol=0, atol=0)
    assert not torch.equal(empty["en"][1], empty["en"][0])
    one_word = length_only_representations({"en": [2, 5, 2, 5]}, d=8, seed=1, vocab=1)["en"]  # length alone
    torch.testing.assert_close(one_word[0], one_word[2], rtol=0, atol=1e-15)
    torch.testing.assert_close(one_word[1], one_word[3], rtol=0, atol=1e-15)
    # without <s>/</s>, a one-token sentence is its token plus position 0; with them, (<s> + t + </s>
    # + positions 0..2) / 3: the difference of 3x the second and the first is the same for every token
    plain = length_only_representations({"en": [1, 1]}, d=8, seed=2, special=False)["en"]
    special = length_only_representations({"en": [1, 1]}, d=8, seed=2)["en"]
    torch.testing.assert_close(3 * special[0] - plain[0], 3 * special[1] - plain[1], rtol=0, atol=1e-12)


def test_centred_ranks_of_draws_made_one_at_a_time_equal_the_stacked_ones():
    """An iterable of representations (the power analysis's planted draws, each made when reached) ranked into a
    caller's buffer, larger than the draws: the same matrices as the stacked draws', the buffer's first rows
    returned; without a buffer it is refused."""
    g = torch.Generator().manual_seed(21)
    ys = torch.randn(3, 30, 5, generator=g, dtype=torch.float64)
    made = []

    def draws():
        for y in ys:
            made.append(len(made))
            yield y.clone()

    buffer = torch.full((5, 30, 30), math.nan, dtype=torch.float32)
    ranked = centred_ranks(draws(), out=buffer)
    assert made == [0, 1, 2] and ranked.shape == (3, 30, 30) and ranked.data_ptr() == buffer.data_ptr()
    assert torch.equal(ranked, centred_ranks(ys)) and buffer[3:].isnan().all()
    with pytest.raises(ValueError, match="out"):
        centred_ranks(iter(ys))


def test_stacked_rank_matrices_are_float32_exactly_where_it_holds_them(monkeypatch, two_threads):
    """`centred_ranks` of stacked languages in float32 up to 5,793 sentences equals float64's rank for rank (ties
    included: half-integers), and stays float64 above; RSA's test and interval from either agree. Stacked and listed
    matrices are ranked two at a time (two torch threads): each equals its own ranking alone."""
    from xlsub.similarity import rsa as rsa_module

    assert rsa_module.rank_dtype(5793) == torch.float32 and rsa_module.rank_dtype(5794) == torch.float64
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    ys = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    ys[1, :, 1:] = 0.0  # rows of one value: tied dissimilarities
    single = centred_ranks(ys)
    assert single.dtype == torch.float32
    monkeypatch.setattr(rsa_module, "rank_dtype", lambda n: torch.float64)
    double = centred_ranks(ys)
    assert double.dtype == torch.float64 and (2 * double != (2 * double).round()).sum() == 0
    assert torch.equal(single.double(), double)
    assert all(torch.equal(double[i], centred_ranks(ys[i])) for i in range(3))
    a = centred_ranks(x)
    for b in (single, double):
        test = mantel_test(x, ys, 60, 0, tail_risk=0.005, stop_after=10, ranks=(a, b))
        interval = rsa_jackknife_interval(x, ys, 5, ranks=(a, b))
        torch.testing.assert_close(test.observed, rsa(x, ys), rtol=0, atol=1e-14)
        torch.testing.assert_close(interval.estimate, rsa(x, ys), rtol=0, atol=1e-14)
        torch.testing.assert_close(interval.lo, rsa_jackknife_interval(x, ys, 5).lo, rtol=0, atol=1e-13)
    torch.testing.assert_close(mantel_test(x, ys, 60, 0, ranks=(a, single)).p_value, mantel_test(x, ys, 60, 0, ranks=(a, double)).p_value,
                               rtol=0, atol=0)
    # each language's matrix a tensor of its own: the same test, and the interval frees them as it sorts them
    each = centred_ranks_each(ys)
    assert len(each) == 3 and all(torch.equal(one.double(), two) for one, two in zip(each, double))
    for staged in ({}, {"tail_risk": 0.005, "stop_after": 10}):
        listed, stacked = mantel_test(x, ys, 60, 0, ranks=(a, each), **staged), mantel_test(x, ys, 60, 0, ranks=(a, double), **staged)
        torch.testing.assert_close(listed.p_value, stacked.p_value, rtol=0, atol=0)
        torch.testing.assert_close(listed.observed, stacked.observed, rtol=0, atol=1e-15)
    interval = rsa_jackknife_interval(x, ys, 5, ranks=(a, each))
    assert each == []
    torch.testing.assert_close(interval.lo, rsa_jackknife_interval(x, ys, 5).lo, rtol=0, atol=1e-13)


def test_length_only_representations_against_a_loop_over_tokens():
    """Each sentence: (<s> + its tokens' embeddings + </s> + positions 0..len+1) / (len + 2), the table, the
    tokens and the shared embeddings drawn from the documented streams, summed one token at a time."""
    from xlsub.similarity.controls import _language_generator

    lengths = {"en": [0, 3, 1, 7], "de": [2, 2, 5]}
    d, vocab, seed = 6, 11, 3
    reps = length_only_representations(lengths, d, seed, vocab=vocab)
    shared = torch.Generator().manual_seed(seed)
    positions = torch.randn(9, d, generator=shared, dtype=torch.float64)
    bos, eos = torch.randn(2, d, generator=shared, dtype=torch.float64)
    for lang, counts in lengths.items():
        g = _language_generator(seed, lang)
        table = torch.randn(vocab, d, generator=g, dtype=torch.float32).double()  # drawn in float32
        tokens = iter(torch.randint(vocab, (sum(counts),), generator=g).tolist())
        for i, k in enumerate(counts):
            total = bos + eos + positions[:k + 2].sum(0)
            for _ in range(k):
                total = total + table[next(tokens)]
            torch.testing.assert_close(reps[lang][i], total / (k + 2), rtol=0, atol=1e-13)


# -- kNN-graph eigenvector similarity ----------------------------------------------------------------------

def polygon(m: int, radius: float = 1.0) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(m, dtype=torch.float64) / m
    return radius * torch.stack([angle.cos(), angle.sin()], 1)


def two_triangles() -> torch.Tensor:
    """Two tight clusters of 3 around +e1 and -e1 (centred): the 2-NN graph is two disjoint triangles."""
    angle = 2 * math.pi * torch.arange(3, dtype=torch.float64) / 3
    cluster = torch.stack([torch.ones(3, dtype=torch.float64), 0.1 * angle.cos(), 0.1 * angle.sin()], 1)
    return torch.cat([cluster, -cluster])


def test_knn_spectrum_of_a_cycle():
    """A regular hexagon's 2-NN graph is the cycle C_6, with Laplacian eigenvalues 2 - 2 cos(2 pi j / 6)."""
    spectrum = knn_laplacian_spectrum(polygon(6), k=2)
    expected = np.sort(2 - 2 * np.cos(2 * np.pi * np.arange(6) / 6))[::-1]
    np.testing.assert_allclose(spectrum.numpy(), expected, atol=1e-12)
    triangles = knn_laplacian_spectrum(two_triangles(), k=2)
    np.testing.assert_allclose(triangles.numpy(), [3, 3, 3, 3, 0, 0], atol=1e-12)


def test_knn_eigen_similarity_hand_computed():
    """C_6: 4, 3, 3, 1, 1, 0 (90% of 12 after 4); two triangles: 3, 3, 3, 3, 0, 0 (after 4).

    With the paper's 90% rule both need 4 eigenvalues, so the similarity is (4-3)^2 + (3-3)^2 + (3-3)^2 +
    (1-3)^2 = 5; the default, the 10 largest (all 6 here), adds (1-0)^2 + (0-0)^2: 6.
    """
    hexagon = torch.cat([polygon(6), torch.zeros(6, 1, dtype=torch.float64)], 1)
    assert knn_eigen_similarity(hexagon, two_triangles(), k=2, energy=0.9) == pytest.approx(5.0, abs=1e-10)
    assert knn_eigen_similarity(hexagon, two_triangles(), k=2) == pytest.approx(6.0, abs=1e-10)
    assert knn_eigen_similarity(hexagon, two_triangles(), k=2, top=1) == pytest.approx(1.0, abs=1e-10)


def test_knn_eigen_similarity_is_zero_for_the_same_shape():
    x, _ = related(n=60, d1=8)
    assert knn_eigen_similarity(x, x, k=5) == 0.0
    rotated = 3.0 * x @ random_rotation(8, torch.Generator().manual_seed(0)) + 1.0  # centring undoes the shift
    assert knn_eigen_similarity(x, rotated, k=5) == pytest.approx(0.0, abs=1e-18)
    assert knn_eigen_similarity(x, gaussian(60, 8, seed=9), k=5) > 1.0


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_permuted_cka_from_given_self_terms(kind):
    """The null from self terms already computed equals the null computing its own (a layer-batched product may round
    differently), and the given ones are used: four times x's self term halves every null value."""
    x, y = related(n=50, d1=6, d2=5, layers=2)
    perms = permutations(50, 7, seed=3)
    selves = prepare(x, kind)["self"], prepare(y, kind)["self"]
    for precision in ("float64", "float32"):
        own = permuted_cka(x, y, perms, kind, engine="feature", precision=precision)
        torch.testing.assert_close(permuted_cka(x, y, perms, kind, engine="feature", precision=precision, selves=selves), own,
                                   rtol=1e-12, atol=0)
    torch.testing.assert_close(permuted_cka(x, y, perms, kind, engine="feature", selves=(4 * selves[0], selves[1])),
                               permuted_cka(x, y, perms, kind, engine="feature") / 2, rtol=1e-12, atol=0)


def test_given_self_terms_give_the_permutation_test_and_null_sides_they_replace():
    """cka_permutation_test(selves=...) and null_sides(selves=...) with `self_hsic`'s terms give the numbers of the
    same calls that compute them, with either or both given."""
    from xlsub.similarity.cka import self_hsic
    from xlsub.similarity.permutation import cka_permutation_test, null_sides

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    y = x + torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    groups = torch.arange(40) % 4
    sx, sy = self_hsic(x, "debiased"), self_hsic(y, "debiased")
    for selves in ((sx, sy), (sx, None), (None, sy)):
        for options in ({}, {"tail_risk": 0.005, "stop_after": 10}):
            want = cka_permutation_test(x, y, 30, 0, "debiased", groups=groups, **options)
            got = cka_permutation_test(x, y, 30, 0, "debiased", groups=groups, selves=selves, **options)
            assert torch.allclose(got.observed, want.observed, rtol=1e-12) and torch.equal(got.p_value, want.p_value)
            assert torch.allclose(got.null_mean, want.null_mean, rtol=1e-12)
    for given, computed in zip(null_sides(x, "debiased", groups, selves=sx), null_sides(x, "debiased", groups)):
        assert torch.allclose(given.self, computed.self, rtol=1e-12)
        assert torch.allclose(given.summary.total, computed.summary.total, rtol=1e-12)


def test_a_given_observed_cka_is_used_and_checked():
    """cka_permutation_test(observed=...) with the CKA the same call computes gives its result; a wrong shape is refused."""
    from xlsub.similarity.cka import cka
    from xlsub.similarity.permutation import cka_permutation_test

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    y = x + torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    want = cka_permutation_test(x, y, 20, 0, "debiased", tail_risk=0.005, stop_after=10)
    got = cka_permutation_test(x, y, 20, 0, "debiased", tail_risk=0.005, stop_after=10, observed=cka(x, y, "debiased"))
    assert torch.allclose(got.observed, want.observed, rtol=1e-12) and torch.equal(got.p_value, want.p_value)
    with pytest.raises(ValueError, match="observed has shape"):
        cka_permutation_test(x, y, 20, 0, "debiased", observed=cka(x[:1], y[:1], "debiased"))


@pytest.mark.parametrize("tied", ["reference", "languages"])
def test_leave_block_out_rsa_gathers_fewer_blocks_at_a_time_where_a_language_is_tied(tied, monkeypatch):
    """The torch path reads `JACKKNIFE_GROUP` blocks per gather, and `TIED_GROUP` where a language is tied (its doubled
    ranks per block are then held whole beside the table); a tied reference alone does not narrow it. The values are
    the same as with the wide gathers."""
    from xlsub.similarity import rsa as module

    g = torch.Generator().manual_seed(4)
    grid = torch.randint(0, 3, (3, 31, 2), generator=g).double()
    smooth = torch.randn(3, 31, 2, generator=g, dtype=torch.float64)
    x, ys = (grid[0], smooth[1:]) if tied == "reference" else (smooth[0], grid[1:])
    blocks = jackknife_blocks(31, 10)
    widths, real = [], module._kept_rank_products
    monkeypatch.setattr(module, "_kept_rank_products", lambda table, *args: (widths.append(table.shape[1]), real(table, *args))[1])
    theta = leave_block_out_rsa(x, ys, blocks)
    want = [module.JACKKNIFE_GROUP, 10 - module.JACKKNIFE_GROUP] if tied == "reference" else [4, 4, 2]
    assert module.TIED_GROUP == 4 and set(widths) == set(want)  # each language's calls, one per gather
    monkeypatch.setattr(module, "TIED_GROUP", module.JACKKNIFE_GROUP)
    torch.testing.assert_close(leave_block_out_rsa(x, ys, blocks), theta, rtol=0, atol=1e-12)
