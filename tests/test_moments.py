"""The exact permutation mean and variance of CKA's and the Mantel test's cross term (`xlsub.similarity.moments`):
against every permutation of small cases (all pairings, and within groups of every size from 1 up), and CKA's
null sd (`cka_null_sd`) against the spread of many sampled permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from xlsub.similarity import moments
from xlsub.similarity.cka import cka
from xlsub.similarity.permutation import cka_null_mean, cka_null_sd, permutations, permuted_cka
from xlsub.stats.inference import centred_upper, matrix_dots, upper_norm

GROUPINGS = [None, [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 2, 2, 2],
             [3, 1, 3, 1, 3, 1, 2], [5, 5, 5, 5, 9, 9, 9, 9]]


def within_group_permutations(codes: list[int]):
    """Every permutation of range(n) that keeps each index within its group."""
    members = [[i for i, c in enumerate(codes) if c == g] for g in sorted(set(codes))]
    for images in itertools.product(*(itertools.permutations(m) for m in members)):
        p = list(range(len(codes)))
        for group, image in zip(members, images):
            for i, j in zip(group, image):
                p[i] = j
        yield torch.tensor(p)


def enumerated(k: torch.Tensor, l: torch.Tensor, lam: float, codes: list[int]) -> tuple[float, float]:
    """The mean and variance of sum_ij K_ij L_p(i)p(j) + lam sum_i K_ii L_p(i)p(i) over every allowed p."""
    values = []
    for p in within_group_permutations(codes):
        lp = l[p][:, p]
        values.append(float((k * lp).sum() + lam * (k.diagonal() * lp.diagonal()).sum()))
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.var(unbiased=False))


def symmetric(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a + a.mT


@pytest.mark.parametrize("groups", GROUPINGS)
def test_mean_and_variance_equal_every_permutations(groups):
    g = torch.Generator().manual_seed(len(groups or []) + 3)
    n = len(groups) if groups else 7
    codes = groups or [0] * n
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64) + x[:, :1]
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.mT, yc @ yc.mT
    labels = None if groups is None else torch.tensor(groups)
    for lam in (0.0, -n / (n - 2)):  # linear; the unbiased HSIC's diagonal term
        mean, var = enumerated(k, l, lam, codes)
        for a, b in ((moments.feature_summary(xc, labels), moments.feature_summary(yc, labels)),
                     (moments.gram_summary(k, labels), moments.gram_summary(l, labels))):
            assert float(moments.mean(a, b, lam)) == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert float(moments.variance(a, b, lam)) == pytest.approx(var, rel=1e-10)
    # any symmetric matrices, diagonal and row sums not zero (a Mantel test's rank matrices have a zero diagonal)
    a, b = symmetric(n, g), symmetric(n, g)
    a, b = (a * 2).round() / 2, (b * 2).round() / 2  # half-integers, as rank matrices: exact in float32 too
    for lam in (0.0, 0.7):
        mean, var = enumerated(a, b, lam, codes)
        sa, sb = moments.gram_summary(a, labels), moments.gram_summary(b, labels)
        assert float(moments.mean(sa, sb, lam)) == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert float(moments.variance(sa, sb, lam)) == pytest.approx(var, rel=1e-10)
        single = moments.gram_summary(b.float(), labels)  # read in float64 tile by tile: the same summary
        assert float(moments.mean(sa, single, lam)) == float(moments.mean(sa, sb, lam))
        assert float(moments.variance(sa, single, lam)) == float(moments.variance(sa, sb, lam))
    a.fill_diagonal_(0)
    b.fill_diagonal_(0)
    mean, var = enumerated(a, b, 0.0, codes)
    assert float(moments.variance(moments.gram_summary(a, labels), moments.gram_summary(b, labels))) == pytest.approx(var, rel=1e-10)


@pytest.mark.parametrize("columns", [64, 4])
def test_feature_and_gram_summaries_agree_at_a_larger_size(columns, monkeypatch):
    """The feature and Gram routes to every summary agree; with 4 scatter columns a step, d = 6 is one full and one
    partial block, each with its square part and the rows below it (the feature route's symmetric halves)."""
    monkeypatch.setattr(moments, "_SCATTER_COLUMNS", columns)
    g = torch.Generator().manual_seed(1)
    n, d = 90, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    xc = x - x.mean(0)
    groups = torch.randint(0, 12, (n,), generator=g)
    groups[:3] = 40  # a group of three, and below a singleton
    groups[3] = 41
    features, gram = moments.feature_summary(xc, groups), moments.gram_summary(xc @ xc.mT, groups)
    for name in ("sizes", "gram", "sums", "rows", "total", "standard", "rest", "between", "top"):
        torch.testing.assert_close(getattr(features, name), getattr(gram, name), rtol=1e-9, atol=1e-9 * float(xc.square().sum()) ** 2)
    # top: each group's block of K = XX' double-centred, its largest eigenvalue by numpy (groups below d = 6 rows, the
    # three and the singleton, from their m x m Gram; the others from their d x d scatter)
    k = (xc @ xc.mT).numpy()
    for g, label in enumerate(torch.unique(groups).tolist()):
        rows = (groups == label).nonzero().reshape(-1).numpy()
        block = k[np.ix_(rows, rows)]
        block = block - block.mean(0, keepdims=True) - block.mean(1, keepdims=True) + block.mean()
        assert float(features.top[g]) == pytest.approx(float(np.abs(np.linalg.eigvalsh(block)).max()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
@pytest.mark.parametrize("grouped", [False, True])
def test_cka_null_sd_is_the_spread_of_sampled_permutations(kind, grouped):
    """4,000 sampled permutations estimate the sd within about 2.2% (1 / sqrt(2 x 4000) for a near-normal
    null, x2 for the margin); the mean agrees with `cka_null_mean` within 4 standard errors."""
    g = torch.Generator().manual_seed(2)
    n, d = 240, 12
    length = torch.randint(0, 8, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * length[:, None]
    y = 0.5 * x @ torch.randn(d, d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64)
    y = y + 0.3 * length[:, None]
    groups = length if grouped else None
    null = permuted_cka(x, y, permutations(n, 4000, 5, groups), kind)
    sd = float(cka_null_sd(x, y, kind, groups))
    assert sd == pytest.approx(float(null.std()), rel=0.045)
    assert abs(float(null.mean()) - float(cka_null_mean(x, y, kind, groups))) < 4 * sd / 4000 ** 0.5
    assert float(cka(x, y, kind)) > float(cka_null_mean(x, y, kind, groups)) + 5 * sd  # the observed pairing: far above


def test_cka_null_sd_over_layers_and_degenerate_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 50, 5, generator=g, dtype=torch.float64)
    sd = cka_null_sd(x, y, "debiased")
    assert sd.shape == (3,)
    torch.testing.assert_close(sd[1], cka_null_sd(x[1], y[1], "debiased"), rtol=0, atol=0)
    y[2] = 1.0  # constant over the examples: no CKA, no null
    assert cka_null_sd(x, y, "linear")[2].isnan() and cka_null_sd(x, y, "linear")[:2].isfinite().all()


@pytest.mark.parametrize("groups", [None, [0, 0, 0, 1, 1, 1, 1], [3, 1, 3, 1, 3, 1, 2]])
def test_mantel_moments_equal_every_permutations_r(groups):
    """The Mantel r's exact mean and sd (`mantel_moments`, as `mantel_test` and the power analysis take them)
    against r over every allowed re-pairing of two languages' centred rank matrices."""
    g = torch.Generator().manual_seed(11)
    n = 7
    codes = groups or [0] * n
    labels = None if groups is None else torch.tensor(groups)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ys = [x + s * torch.randn(n, 3, generator=g, dtype=torch.float64) for s in (0.5, 2.0)]
    a = centred_upper(torch.cdist(x, x), "spearman")
    bs = torch.stack([centred_upper(torch.cdist(y, y), "spearman") for y in ys])
    norms = upper_norm(a) * upper_norm(bs)
    mean, sd, weight = moments.mantel_moments(a, bs, norms, labels)
    for j, b in enumerate(bs):
        r = torch.tensor([float(matrix_dots(a, b[p][:, p]) / norms[j]) for p in within_group_permutations(codes)], dtype=torch.float64)
        assert float(mean[j]) == pytest.approx(float(r.mean()), rel=1e-10, abs=1e-12)
        assert float(sd[j]) == pytest.approx(float(r.std(unbiased=False)), rel=1e-10)
        summaries = moments.gram_summary(a, labels), moments.gram_summary(b, labels)
        assert float(weight[j]) == pytest.approx(float(moments.largest_weight(*summaries) / norms[j]), rel=1e-12)


@pytest.mark.parametrize("rows", [127, 128, 700])
def test_largest_eigenvalue_by_lanczos_is_the_whole_spectrums(rows):
    """`_top` from `_LANCZOS_MIN` rows on (Lanczos) is the largest |eigenvalue| of the whole spectrum to 1e-12 and the
    same on every call: for a scatter with a decaying spectrum, an isotropic one (close top eigenvalues), an indefinite
    block with its largest magnitude negative (a rank matrix's), a double-centred Gram block (ones in its null space),
    a zero block (where ARPACK fails: the whole spectrum) and a rank-one block."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(3 * rows, rows, generator=g, dtype=torch.float64)
    decaying = (x * (torch.arange(rows) + 1.0) ** -0.35).mT @ (x * (torch.arange(rows) + 1.0) ** -0.35)
    isotropic = x.mT @ x
    indefinite = torch.randn(rows, rows, generator=g, dtype=torch.float64)
    indefinite = indefinite + indefinite.mT - 40 * torch.outer(torch.ones(rows), torch.ones(rows)) / rows
    indefinite -= 3 * rows ** 0.5 * torch.eye(rows, dtype=torch.float64)  # its most negative eigenvalue the largest in magnitude
    gram = x[:rows] @ x[:rows].mT
    centred = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    zero, rank_one = torch.zeros(rows, rows, dtype=torch.float64), torch.outer(x[0], x[0])  # ARPACK fails on a zero block
    for block in (decaying, isotropic, indefinite, centred, zero, rank_one):
        spectrum = torch.linalg.eigvalsh(block)
        assert moments._top(block).item() == pytest.approx(spectrum.abs().max().item(), rel=1e-12, abs=0)
        assert torch.equal(moments._top(block), moments._top(block))
    assert torch.linalg.eigvalsh(indefinite)[0].abs() > torch.linalg.eigvalsh(indefinite)[-1].abs()
