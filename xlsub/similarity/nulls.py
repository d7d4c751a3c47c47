"""Representation similarity that survives its controls: permutation nulls, length control, intervals,
translation retrieval, RSA, planted controls and graph isomorphism (issue 12).

Representations are x, y [n, d] (or [..., n, d], e.g. one slice per layer) where row i of x and row i of
y encode translations of one sentence. Everything here is a plain function over tensors, computed in
float64; none touches files or MLflow.

- Permutation nulls (`cka_permutation_test`): CKA of x with y's rows re-paired by random permutations,
  optionally only within groups (`length_bins`: length-matched permutations). p = (1 + #{null >= observed})
  / (1 + n_perm) (Phipson & Smyth 2010). `cka_null_mean` is the exact permutation mean in closed form.
- Length control: `residualize` regresses each feature on covariates (token count) before CKA.
- Intervals (`cka_jackknife_interval`): delete-a-block jackknife. Resampling rows with replacement
  duplicates rows and inflates CKA, so no bootstrap.
- Translation retrieval (`retrieval_top1`, Libovicky et al. 2020) with its permutation null.
- RSA (`rdm`, `rsa`, `mantel_test`): Spearman correlation of 1 - cosine dissimilarity matrices, with a
  Mantel permutation test (Mantel 1967).
- Planted controls for power (`planted_representations`, `length_only_representations`,
  `detection_limit`).
- Eigenvector similarity of nearest-neighbour graphs (`knn_eigen_similarity`, Søgaard et al. 2018).

The permutation engine. Re-pairing keeps each representation's own statistics and changes only the
cross term of HSIC: for linear kernels of centred X, Y and y permuted by p, ||Y_p'X||_F^2, and for the
unbiased HSIC_1 also r_x . r_(y,p) (the 1'K~L~1 term; 1'K~1 1'L~1 does not depend on the pairing; see
`xlsub.similarity.cka.debiased_hsic`). The "feature" engine computes ||Y_p'X||_F^2 for a block of permutations with
one matrix product [Y_p1 | Y_p2 | ...]' X (O(n d1 d2) per permutation); the "gram" engine permutes the
centred n x n Gram matrix, sum_ij K_ij L_p(i)p(j) (O(n^2) per permutation, but a random gather). "auto"
picks gram only where n^2 is small against n d1 d2 (and for RBF kernels, which have no feature space).
Measured with `benchmarks/permutation.py` (1 thread, debiased, ms per permutation):

    n, d        naive cka() loop   feature float64   feature float32 products   gram
    1077, 128         2.2               0.92                 0.39                4.9
    5000, 768       366               133                   70                    -

The feature engine does one of the naive loop's three n d^2 products per permutation, so in float64 it
is ~2.5x faster and with float32 products ~5x; the permutation test uses float32 products for its null.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from xlsub.errors import XlsubError
from xlsub.similarity.cka import (
    FLOAT32_BLOCK,
    HSIC_RTOL,
    centre,
    check_options,
    check_pair,
    cka,
    debiased_hsic,
    frob,
    prepare,
    ratio,
    sq_frob,
)

ENGINES = ("auto", "feature", "gram")
# Bytes of gathered rows (and d1 x d2 products) per block of permutations in the feature engine.
_BLOCK_BYTES = 2**26
# "auto" uses the gram engine where n * _GRAM_RATIO < d1 * d2 and n <= _GRAM_MAX_N. Per permutation the
# gram engine gathers n^2 entries (~3-5 ns each, more once n x n leaves the cache), the feature engine
# multiplies n d1 d2 (~0.02-0.04 ns each in a float64 GEMM). Measured with 1 thread (debiased, ms per
# permutation, feature / gram): d=128: n=128 0.21 / 0.12, n=256 0.30 / 0.47; d=768: n=1024 19.6 / 8.7,
# n=2048 38.6 / 41.5.
_GRAM_RATIO = 100
_GRAM_MAX_N = 1536
# With float32 products for the null, null values within this relative distance of the observed value are
# recomputed in float64, so that a tie (e.g. a permutation that leaves the pairing unchanged) counts as one.
_FLOAT32_RECHECK = 1e-5
# A null value counts as >= the observed one within 100 float64 eps of it (scipy.stats.permutation_test's
# convention): the same number computed by two summation orders must tie.
_TIE_RTOL = 100 * torch.finfo(torch.float64).eps
# Rows of x per similarity block in retrieval (a block x n matrix of float64 at a time).
_ROW_BLOCK = 1024


# -- permutations ------------------------------------------------------------------------------------------

def _as_groups(groups, n: int) -> torch.Tensor | None:
    if groups is None:
        return None
    groups = torch.as_tensor(np.asarray(groups)).reshape(-1)
    if groups.numel() != n:
        raise ValueError(f"groups has {groups.numel()} labels for {n} examples")
    return torch.unique(groups, return_inverse=True)[1]  # labels 0..G-1


def permutations(n: int, n_perm: int, seed: int, groups=None) -> torch.Tensor:
    """`n_perm` uniformly random permutations of range(n), [n_perm, n] (int64), from torch.Generator(seed).

    With `groups` (one integer label per example), each permutation maps every example to one of the same
    group (uniformly among those): permutations within, e.g., sentence-length bins (`length_bins`).
    Drawn as the argsort of float64 uniforms (ties have probability ~n^2 / 2^54); permutation k is row k,
    so the same seed gives the same permutations to every test that uses it.
    """
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(n_perm, n, generator=generator, dtype=torch.float64)
    codes = _as_groups(groups, n)
    if codes is None:
        return torch.argsort(keys, dim=1)
    # sort by (group, key): each row lists every group's members in a random order, groups in label order
    order = torch.argsort(keys + 2.0 * codes, dim=1)
    slots = torch.argsort(codes, stable=True)  # the examples in the same group order
    perms = torch.empty_like(order)
    perms[:, slots] = order
    return perms


def length_bins(lengths, n_bins: int) -> torch.Tensor:
    """Quantile bins of sentence length: an int64 label 0..m-1 per sentence, m <= n_bins.

    Bin edges are the 1/n_bins, ..., (n_bins-1)/n_bins quantiles of `lengths` (numpy's linear
    interpolation); a sentence's bin is the number of edges <= its length, so equal lengths always share
    a bin, and bins left empty by ties are dropped (labels stay consecutive). The groups for
    length-matched permutations: shuffling within bins keeps the length of each pairing's partner.

    Coarse bins leave length varying within a bin, and a permutation test then still finds "shared
    structure" in an encoder that sees only length: for `length_only_representations` (n=1077, lengths
    3-39) 10 and 20 bins gave p = 0.005, while one group per distinct length (n_bins >= the number of
    distinct lengths, or groups=lengths) gave p = 0.57-0.70.
    """
    lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
    if n_bins < 1:
        raise XlsubError(f"length bins: n_bins must be at least 1, got {n_bins}; use 1 for no length matching")
    if lengths.size == 0:
        return torch.empty(0, dtype=torch.long)
    edges = np.quantile(lengths, np.arange(1, n_bins) / n_bins)
    codes = np.searchsorted(edges, lengths, side="right")
    return torch.as_tensor(np.unique(codes, return_inverse=True)[1].reshape(-1), dtype=torch.long)


@dataclass(frozen=True)
class PermutationResult:
    """A statistic against its permutation null, per leading index (layer) of the inputs.

    `observed`, `null_mean`, `null_std`, `p_value`: [...] float64 (0-dim for [n, d] inputs); `null`: the
    sampled null values [..., n_perm]. p = (1 + #{null >= observed}) / (1 + n_perm), one-sided (more
    similar than chance), never 0 (Phipson & Smyth 2010). `exact_null_mean`: the permutation mean in closed
    form where one is implemented (CKA: `cka_null_mean`), else None.
    """

    observed: torch.Tensor
    null_mean: torch.Tensor
    null_std: torch.Tensor
    p_value: torch.Tensor
    n_perm: int
    null: torch.Tensor
    exact_null_mean: torch.Tensor | None = None

    @property
    def above_chance(self) -> torch.Tensor:
        """observed - null_mean: for CKA, the issue's "CKA above chance"."""
        return self.observed - self.null_mean


def _result(observed: torch.Tensor, null: torch.Tensor, exact_null_mean=None) -> PermutationResult:
    n_perm = null.shape[-1]
    ties = _TIE_RTOL * observed.abs()
    exceed = (null >= (observed - ties)[..., None]).sum(-1)
    p_value = torch.where(observed.isnan(), math.nan, (1.0 + exceed.double()) / (1.0 + n_perm))
    std = null.std(-1) if n_perm > 1 else torch.full_like(observed, math.nan)
    return PermutationResult(observed, null.mean(-1), std, p_value, n_perm, null, exact_null_mean)


# -- the CKA permutation engine ----------------------------------------------------------------------------

def _gram_cross(k: torch.Tensor, l: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """sum_ij K_ij L_p(i)p(j) = tr(K P L P') for each permutation p (rows of perms), [P], float64.

    float32 K and L (half the memory traffic of the two gathers, which bound the time) are multiplied
    in float32 and summed in float64."""
    flat = k.reshape(-1)
    rows, both = torch.empty_like(l), torch.empty_like(l)  # reused: see `_feature_cross`
    products = torch.empty_like(flat) if flat.dtype != torch.float64 else None
    out = torch.empty(len(perms), dtype=torch.float64)
    for i, p in enumerate(perms):
        torch.index_select(torch.index_select(l, 0, p, out=rows), 1, p, out=both)
        if products is None:
            out[i] = torch.dot(flat, both.reshape(-1))
        else:
            out[i] = torch.mul(flat, both.reshape(-1), out=products).sum(dtype=torch.float64)
    return out


def _feature_cross(xc: torch.Tensor, yc: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """||Y_p' X||_F^2 for each permutation p, [P], for centred xc [n, d1], yc [n, d2] (float64 or float32).

    A block of B permutations is one product [Y_p1 | ... | Y_pB]' X ([B d2, d1]): y's rows gathered into
    an [n, B, d2] array, so the product sees one tall matrix and each permutation's d2 x d1 result is
    contiguous for its norm. float32 operands: float32 products over at most `xlsub.similarity.cka.FLOAT32_BLOCK`
    examples, summed in float64, as `xlsub.similarity.cka._product`. The gather and product buffers are allocated
    once and reused: a fresh multi-megabyte buffer per block costs more in page faults than the gather.
    """
    n, d1 = xc.shape
    d2 = yc.shape[1]
    per_perm = n * d2 * yc.element_size() + d1 * d2 * (8 + yc.element_size())
    block = max(1, min(len(perms), _BLOCK_BYTES // per_perm))
    gathered = torch.empty(n * block, d2, dtype=yc.dtype)
    product = torch.empty(block * d2, d1, dtype=torch.float64)
    partial = None if yc.dtype == torch.float64 else torch.empty(block * d2, d1, dtype=yc.dtype)
    out = torch.empty(len(perms), dtype=torch.float64)
    for start in range(0, len(perms), block):
        chunk = perms[start:start + block]
        b = len(chunk)
        g = torch.index_select(yc, 0, chunk.T.reshape(-1), out=gathered[:n * b]).view(n, b * d2)
        if partial is None:
            torch.mm(g.mT, xc, out=product[:b * d2])
        else:
            for first in range(0, n, FLOAT32_BLOCK):
                rows = slice(first, first + FLOAT32_BLOCK)
                torch.mm(g[rows].mT, xc[rows], out=partial[:b * d2])
                if first == 0:
                    product[:b * d2].copy_(partial[:b * d2])
                else:
                    product[:b * d2].add_(partial[:b * d2])
        out[start:start + b] = frob(product[:b * d2].view(b, d2, d1)).square()
    return out


def _pick_engine(engine: str, kind: str, n: int, d1: int, d2: int) -> str:
    if engine not in ENGINES:
        raise XlsubError(f"permutation engine: unknown engine '{engine}'; use auto, feature or gram")
    if kind == "rbf":
        if engine == "feature":
            raise XlsubError("permutation engine: rbf CKA has no feature-space form; use engine=auto or gram")
        return "gram"
    if engine == "auto":
        return "gram" if n <= _GRAM_MAX_N and n * _GRAM_RATIO < d1 * d2 else "feature"
    return engine


def permuted_cka(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor, kind: str = "debiased", *,
                 engine: str = "auto", precision: str = "float64", sigma_frac: float = 1.0) -> torch.Tensor:
    """CKA of x with y re-paired by each permutation: out[..., k] = cka(x, y[..., perms[k], :]), [..., P].

    Each representation is centred and reduced once (`xlsub.similarity.cka.prepare`); per permutation only the cross
    term is recomputed, by the feature engine (||Y_p'X||_F^2 in blocks of permutations) or the gram engine
    (tr(K P L P') on centred n x n Gram matrices); see the module docstring. rbf kernels use the gram
    engine. The same permutations serve every leading index (layer). `precision="float32"`: float32
    products accumulated in float64 (linear and debiased with the feature engine), as in `xlsub.similarity.cka.cka`.
    """
    check_pair(x, y, kind, precision)
    perms = torch.as_tensor(perms, dtype=torch.long).reshape(-1, x.shape[-2])
    lead, (n, d1), d2 = x.shape[:-2], x.shape[-2:], y.shape[-1]
    engine = _pick_engine(engine, kind, n, d1, d2)
    if engine == "gram" and precision != "float64":
        precision = "float64"  # the gather, not the arithmetic, is what the gram engine spends its time on
    xs, ys = x.reshape(-1, n, d1), y.reshape(-1, n, d2)
    out = torch.empty(xs.shape[0], len(perms), dtype=torch.float64)
    for index in tqdm(range(xs.shape[0]), desc="permutations", leave=False, disable=None):
        a = prepare(xs[index], kind, sigma_frac, precision)
        b = prepare(ys[index], kind, sigma_frac, precision)
        if kind == "rbf":
            cross = _gram_cross(a["kc"], b["kc"], perms)
        else:
            if engine == "gram":
                xc, yc = a["xc"].double(), b["xc"].double()
                xty_sq = _gram_cross(xc @ xc.mT, yc @ yc.mT, perms)
            else:
                xty_sq = _feature_cross(a["xc"], b["xc"], perms)
            if kind == "linear":
                cross = xty_sq
            else:  # the unbiased HSIC's other pairing-dependent term: r_x . r_(y,p)
                cross = debiased_hsic(xty_sq, a["rows"], b["rows"][perms], a["total"], b["total"], n)
        out[index] = ratio(cross, a["self"], b["self"])
    return out.reshape(*lead, len(perms))


def cka_null_mean(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", groups=None) -> torch.Tensor:
    """The exact mean of CKA over all re-pairings of y (within `groups` when given), in closed form, [...].

    The self terms do not depend on the pairing, so E[CKA] = E[cross] / sqrt(self_x self_y). With K, L the
    (centred) kernels, E[tr(K P L P')] over uniform permutations within groups g of size n_g is
        sum_g tr_g(K) tr_g(L) / n_g                                   (i = j)
      + sum_g (S_gg(K) - tr_g(K)) (S_gg(L) - tr_g(L)) / (n_g (n_g - 1))   (i != j, same group)
      + sum_{g != h} S_gh(K) S_gh(L) / (n_g n_h)                       (different groups),
    S_gh the sum of a block, tr_g the sum of its diagonal. For linear kernels S_gh(K) = s_g . s_h with s_g the
    sum of x over group g, so this is O(n d + G^2 d); rbf sums its n x n kernel by blocks. Without groups
    (one group) it is tr(K) tr(L) / (n - 1) for linear CKA, and exactly 0 for the unbiased HSIC (a
    U-statistic of products of distinct pairs).
    """
    check_options(kind)
    n = x.shape[-2]
    codes = _as_groups(groups, n)
    codes = torch.zeros(n, dtype=torch.long) if codes is None else codes
    sizes = torch.bincount(codes).double()  # [G]

    def group_sum(values: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(values.shape)
        shape[dim] = len(sizes)
        return values.new_zeros(shape).index_add_(dim, codes, values)

    a, b = prepare(x, kind), prepare(y, kind)
    if kind == "rbf":
        k, l = a["kc"], b["kc"]
        diag_k, diag_l = k.diagonal(dim1=-2, dim2=-1), l.diagonal(dim1=-2, dim2=-1)
        block_k, block_l = (group_sum(group_sum(m, -1), -2) for m in (k, l))
    else:
        xc, yc = a["xc"], b["xc"]
        diag_k, diag_l = xc.square().sum(-1), yc.square().sum(-1)
        sx, sy = group_sum(xc, -2), group_sum(yc, -2)  # [..., G, d]
        block_k, block_l = sx @ sx.mT, sy @ sy.mT
    tr_k, tr_l = group_sum(diag_k, -1), group_sum(diag_l, -1)  # [..., G]
    same_k, same_l = block_k.diagonal(dim1=-2, dim2=-1), block_l.diagonal(dim1=-2, dim2=-1)
    pairs = sizes * (sizes - 1)
    within = torch.where(pairs > 0, (same_k - tr_k) * (same_l - tr_l) / pairs.clamp_min(1), 0.0)
    between = ((block_k * block_l / (sizes[:, None] * sizes[None, :])).sum((-2, -1))
               - (same_k * same_l / sizes.square()).sum(-1))
    diagonal = (tr_k * tr_l / sizes).sum(-1)
    expected = diagonal + within.sum(-1) + between
    if kind == "debiased":  # `xlsub.similarity.cka.debiased_hsic` with E[r_x . r_(y,p)] = sum_g tr_g(K) tr_g(L) / n_g
        expected = expected - n / (n - 2) * diagonal + a["total"] * b["total"] / ((n - 1) * (n - 2))
    return ratio(expected, a["self"], b["self"])


def cka_permutation_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 1000, seed: int = 0,
                         kind: str = "debiased", groups=None, *, engine: str = "auto",
                         null_precision: str = "float32", sigma_frac: float = 1.0) -> PermutationResult:
    """CKA of parallel x, y [..., n, d] against the CKA of `n_perm` random re-pairings of y's rows.

    The null hypothesis is that the pairing carries no information (any pairing is as good); with
    `groups` (e.g. `length_bins` of the source sentence), permutations stay within groups, so the null
    keeps what the group explains (sentence length) and the test asks for similarity beyond it. The
    permutations are `permutations(n, n_perm, seed, groups)`, shared by all leading indices (layers).
    `exact_null_mean` is `cka_null_mean`.

    The observed CKA is float64. The null uses float32 products accumulated in float64 by default
    (`null_precision`; linear and debiased with the feature engine), about twice as fast: its values move
    by ~1e-9 (`benchmarks/permutation.py`), a millionth of the null's own sampling error, and null values
    within 1e-5 (relative) of the observed CKA are recomputed in float64, so the p-value counts exactly
    the ties float64 would. `null_precision="float64"` computes everything in float64.
    """
    check_options(kind)
    if null_precision not in ("float64", "float32"):
        raise XlsubError(f"null precision: unknown precision '{null_precision}'; use float64 or float32")
    if kind == "rbf":
        null_precision = "float64"  # the gram engine: no float32 products to speed up
    n = x.shape[-2]
    perms = permutations(n, n_perm, seed, groups)
    observed = cka(x, y, kind, sigma_frac=sigma_frac)
    null = permuted_cka(x, y, perms, kind, engine=engine, precision=null_precision, sigma_frac=sigma_frac)
    if null_precision == "float32":
        near = (null - observed[..., None]).abs() <= _FLOAT32_RECHECK * observed.abs()[..., None]
        for index in near.reshape(-1, n_perm).any(-1).nonzero().reshape(-1).tolist():
            lead = tuple(int(i) for i in np.unravel_index(index, observed.shape)) if observed.ndim else ()
            which = near[lead].nonzero().reshape(-1)
            null[lead][which] = permuted_cka(x[lead], y[lead], perms[which], kind, engine=engine)
    return _result(observed, null, cka_null_mean(x, y, kind, groups))


# -- length control ----------------------------------------------------------------------------------------

def residualize(x: torch.Tensor, covariates) -> torch.Tensor:
    """Residuals of every column of x [..., n, d] after least squares on [1, covariates] (float64).

    `covariates`: [n] or [n, c] (e.g. token counts). x - Q Q'x with Q an orthonormal basis of the design
    matrix's column space (from its SVD, so a constant or collinear covariate is harmless): the
    residuals of ordinary least squares with an intercept, for every column at once. Used for the CKA of
    residuals, cka(residualize(x, lengths), residualize(y, lengths)).
    """
    n = x.shape[-2]
    z = torch.as_tensor(np.asarray(covariates, dtype=np.float64)).reshape(n, -1)
    design = torch.cat([torch.ones(n, 1, dtype=torch.float64), z], dim=1)
    u, s, _ = torch.linalg.svd(design, full_matrices=False)
    q = u[:, s > s[0] * max(design.shape) * torch.finfo(torch.float64).eps]
    x = x.to(torch.float64)
    return x - q @ (q.mT @ x)


# -- jackknife intervals -----------------------------------------------------------------------------------

class Interval(NamedTuple):
    """An estimate and the bounds of its confidence interval, each [...] float64."""

    estimate: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def jackknife_blocks(n: int, blocks: int, seed: int | None = None) -> torch.Tensor:
    """The block (0..blocks-1) of each of n examples: contiguous runs, or a seeded random split.

    Block sizes differ by at most one (the first n % blocks blocks have one more example). With a `seed`,
    the examples are assigned by a random permutation, so that blocks do not follow the corpus order.
    """
    if not 2 <= blocks <= n:
        raise XlsubError(f"jackknife: blocks must be between 2 and the number of sentences ({n}), got {blocks}")
    sizes = [n // blocks + (b < n % blocks) for b in range(blocks)]
    labels = torch.repeat_interleave(torch.arange(blocks), torch.tensor(sizes))
    if seed is None:
        return labels
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order] = labels
    return out


# The axis of the block index in each `_moments` sum: before A's two axes and the vectors' one.
_BLOCK_AXIS = {"A": -3, "su": -2, "sv": -2, "wu": -2, "wv": -2}


def _moments(u: torch.Tensor, v: torch.Tensor, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-block sums for the HSIC of u [..., n, du], v [..., n, dv] on any union of blocks (rows `blocks[b]`).

    A = sum u_i v_i' [..., B, du, dv], s_u = sum u_i, s_v [..., B, d], q_u = sum |u_i|^2, q_v,
    w_u = sum |v_i|^2 u_i, w_v = sum |u_i|^2 v_i [..., B, d], m = sum |u_i|^2 |v_i|^2, and the count n [B]:
    every term of biased and unbiased HSIC on a subset of rows is a function of these sums, which are
    additive over blocks.
    """
    rows = []
    for index in blocks:
        ub, vb = u[..., index, :], v[..., index, :]
        ru, rv = ub.square().sum(-1), vb.square().sum(-1)
        rows.append({
            "A": ub.mT @ vb, "su": ub.sum(-2), "sv": vb.sum(-2), "qu": ru.sum(-1), "qv": rv.sum(-1),
            "wu": (ub * rv[..., None]).sum(-2), "wv": (vb * ru[..., None]).sum(-2), "m": (ru * rv).sum(-1),
            "n": torch.tensor(float(len(index)), dtype=torch.float64),
        })
    return {key: torch.stack([r[key] for r in rows], dim=_BLOCK_AXIS.get(key, -1)) for key in rows[0]}


def _hsic_from_moments(t: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """HSIC (up to a factor that cancels in CKA) of the rows the sums `t` cover (Song et al. 2012, eq. 5).

    linear: ||A - s_u s_v' / n||_F^2, the cross-covariance of the rows re-centred on their own mean.
    debiased, on the raw kernel (HSIC_1 needs no centring): tr(K~L~) = ||A||^2 - m, 1'K~1 = |s_u|^2 - q_u,
    1'K~L~1 = s_u'A s_v - s_u.w_u - s_v.w_v + m.
    """
    n = t["n"]
    if kind == "linear":
        return sq_frob(t["A"] - t["su"][..., :, None] * t["sv"][..., None, :] / n[..., None, None])
    tr_kl = sq_frob(t["A"]) - t["m"]
    ones_k = t["su"].square().sum(-1) - t["qu"]
    ones_l = t["sv"].square().sum(-1) - t["qv"]
    ones_kl = (torch.einsum("...i,...ij,...j->...", t["su"], t["A"], t["sv"])
               - (t["su"] * t["wu"]).sum(-1) - (t["sv"] * t["wv"]).sum(-1) + t["m"])
    return tr_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_kl


def leave_block_out_cka(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor,
                        kind: str = "debiased") -> torch.Tensor:
    """CKA on all examples but block b, for every block b of `blocks` (labels 0..B-1 per example), [..., B].

    Linear and debiased: from per-block sums (`_moments`), total minus block, with x and y first centred
    on all examples (CKA is translation invariant; this keeps the raw sums small, so the re-centring on
    the kept rows does not cancel). One pass over the data, then O(d1 d2) per block. rbf (its bandwidth
    depends on the rows kept): recomputed per block.
    """
    check_options(kind)
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    count = int(blocks.max()) + 1
    if x.dim() > 2:
        # one layer at a time: the per-block d1 x d2 moments of all 13 layers at d=768 would take ~4 GB
        lead = x.shape[:-2]
        pairs = zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
        return torch.stack([leave_block_out_cka(a, b, blocks, kind) for a, b in pairs]).reshape(*lead, count)
    if kind == "rbf":
        return torch.stack([cka(x[..., blocks != b, :], y[..., blocks != b, :], kind) for b in range(count)], -1)
    members = [(blocks == b).nonzero().reshape(-1) for b in range(count)]
    if kind == "debiased" and len(blocks) - max(len(m) for m in members) < 4:
        raise ValueError("debiased CKA needs at least 4 examples left out of every block")
    xc, yc = centre(x)[0], centre(y)[0]
    hsic = {}
    for name, (u, v) in {"xy": (xc, yc), "xx": (xc, xc), "yy": (yc, yc)}.items():
        per_block = _moments(u, v, members)
        kept = {key: value.sum(_BLOCK_AXIS.get(key, -1), keepdim=True) - value  # total minus the block
                for key, value in per_block.items()}
        value = _hsic_from_moments(kept, kind)
        if name != "xy":
            # as in xlsub.similarity.cka.prepare: a self term that is zero up to rounding is zero (CKA NaN)
            scale = kept["qu"] - kept["su"].square().sum(-1) / kept["n"]  # sum of re-centred squared norms
            floor = HSIC_RTOL * scale.square() if kind == "debiased" else 0.0
            value = torch.where(value <= floor, 0.0, value)
        hsic[name] = value
    return ratio(hsic["xy"], hsic["xx"], hsic["yy"])


def cka_jackknife_interval(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", blocks: int = 20,
                           level: float = 0.95, seed: int | None = None) -> Interval:
    """Delete-a-block jackknife confidence interval for CKA: (estimate, lo, hi), each [...].

    The n examples are split into `blocks` blocks (`jackknife_blocks`: contiguous, or random with a
    `seed`); theta_b is the CKA without block b (`leave_block_out_cka`). SE = sqrt((B-1)/B sum_b (theta_b -
    mean theta)^2) (the grouped jackknife; Efron & Tibshirani 1993, 11.5), and the interval is estimate +-
    t_{B-1, (1+level)/2} SE, with estimate the CKA on all n examples (not bias-corrected). No example is
    ever duplicated, unlike a bootstrap, which inflates CKA.
    """
    if not 0 < level < 1:
        raise XlsubError(f"jackknife: level must be between 0 and 1 (e.g. 0.95), got {level}")
    labels = jackknife_blocks(x.shape[-2], blocks, seed)
    theta = leave_block_out_cka(x, y, labels, kind)
    se = ((blocks - 1) / blocks * (theta - theta.mean(-1, keepdim=True)).square().sum(-1)).sqrt()
    estimate = cka(x, y, kind)
    half = float(stats.t.ppf((1 + level) / 2, blocks - 1)) * se
    return Interval(estimate, estimate - half, estimate + half)


# -- translation retrieval ---------------------------------------------------------------------------------

def _unit_rows(x: torch.Tensor, centre: bool) -> torch.Tensor:
    """x in float64, centred over examples if asked, rows scaled to unit length (zero rows stay zero)."""
    x = x.to(torch.float64)
    if centre:
        x = x - x.mean(-2, keepdim=True)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def nearest_translation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each row i of x [..., n, d], the row of y [..., n, d] most cosine-similar to it, or -1 on a tie.

    Each language is centred on its own mean first (Libovicky et al. 2020). -1 where the largest
    similarity is shared by two rows of y (also where a centred row is zero: all its similarities are 0).
    Computed in blocks of rows of x, so memory is a block x n matrix, not n x n.
    """
    if x.shape != y.shape or x.shape[-2] < 2:
        raise ValueError(f"retrieval: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape "
                         "(one space, so cosines compare) and at least 2 examples")
    xn, yn = _unit_rows(x, True), _unit_rows(y, True)
    out = []
    for start in range(0, x.shape[-2], _ROW_BLOCK):
        top = (xn[..., start:start + _ROW_BLOCK, :] @ yn.mT).topk(2, dim=-1)
        unique = top.values[..., 0] > top.values[..., 1]
        out.append(torch.where(unique, top.indices[..., 0], -1))
    return torch.cat(out, dim=-1)


def retrieval_top1_per_layer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 translation retrieval accuracy per leading index: x, y [..., n, d] -> [...] (float64).

    The fraction of sentences i whose unique nearest neighbour (cosine, after centring each language on
    its mean) among all n rows of y is its translation y_i; a tie for the top counts as a miss. Chance is
    1/n.
    """
    nearest = nearest_translation(x, y)
    return (nearest == torch.arange(x.shape[-2])).double().mean(-1)


def retrieval_top1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 translation retrieval accuracy of x [n, d] against y [n, d] (see `retrieval_top1_per_layer`)."""
    if x.ndim != 2:
        raise ValueError(f"retrieval_top1 takes [n, d] inputs, got {tuple(x.shape)}; "
                         "use retrieval_top1_per_layer for [layers, n, d]")
    return float(retrieval_top1_per_layer(x, y))


def retrieval_permutation_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 1000, seed: int = 0,
                               groups=None) -> PermutationResult:
    """Top-1 retrieval of x [..., n, d] against the same for random re-pairings of y (within `groups`).

    Re-pairing moves no vector, so each x_i keeps its nearest y, m(i); under permutation p the hit count
    is #{i : p(i) = m(i)}, O(n) per permutation after one similarity pass. The permutations are
    `permutations(n, n_perm, seed, groups)`, as for CKA.
    """
    n = x.shape[-2]
    nearest = nearest_translation(x, y)  # [..., n]
    perms = permutations(n, n_perm, seed, groups)
    observed = (nearest == torch.arange(n)).double().mean(-1)
    null = (perms == nearest[..., None, :]).double().mean(-1)  # [..., n_perm]
    return _result(observed, null)


# -- RSA ---------------------------------------------------------------------------------------------------

def rdm(x: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Representational dissimilarity matrix 1 - cos(x_i, x_j), [..., n, n] float64 (Kriegeskorte et al. 2008).

    `centre`: subtract the mean over examples first. A zero row has cosine 0 (dissimilarity 1) to all.
    """
    xn = _unit_rows(x, centre)
    return 1.0 - xn @ xn.mT


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..m over the last axis, ties given their average rank (scipy.stats.rankdata 'average'), float64."""
    order = torch.argsort(values, dim=-1, stable=True)
    ordered = values.gather(-1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run = torch.cumsum(new, dim=-1) - 1  # which tie-run each sorted position belongs to
    position = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64).expand_as(ordered)
    total = torch.zeros_like(ordered, dtype=torch.float64).scatter_add_(-1, run, position)
    count = torch.zeros_like(ordered, dtype=torch.float64).scatter_add_(-1, run, torch.ones_like(position))
    mean = total.gather(-1, run) / count.gather(-1, run)
    return torch.empty_like(mean).scatter_(-1, order, mean)


def _centred_rank_matrix(x: torch.Tensor, centre: bool) -> torch.Tensor:
    """The ranks of the RDM's upper triangle, centred on their mean, as a symmetric matrix with zero diagonal."""
    d = rdm(x, centre)
    n = d.shape[-1]
    i, j = torch.triu_indices(n, n, offset=1)
    ranks = _ranks(d[..., i, j])
    ranks = ranks - ranks.mean(-1, keepdim=True)
    out = torch.zeros_like(d)
    out[..., i, j] = ranks
    return out + out.mT


def rsa(x: torch.Tensor, y: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Spearman correlation of the upper triangles (i < j) of rdm(x) and rdm(y), [...] float64.

    Representational similarity analysis (Kriegeskorte et al. 2008); ties get average ranks.
    """
    a, b = _centred_rank_matrix(x, centre), _centred_rank_matrix(y, centre)
    return (a * b).sum((-2, -1)) / (frob(a) * frob(b))


def mantel_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 500, seed: int = 0, groups=None,
                centre: bool = False) -> PermutationResult:
    """RSA of x, y [..., n, d] against re-pairings of y: y's RDM rows and columns permuted jointly (Mantel 1967).

    The upper triangle of a jointly permuted RDM holds the same values, so its ranks are the permuted
    ranks and their mean and norm do not change: each permutation is tr(A P B P') / (||A|| ||B||) on the
    centred rank matrices (zero diagonal), O(n^2). Permutations: `permutations(n, n_perm, seed, groups)`.
    """
    perms = permutations(x.shape[-2], n_perm, seed, groups)
    a, b = _centred_rank_matrix(x, centre), _centred_rank_matrix(y, centre)
    n = a.shape[-1]
    flat_a, flat_b = a.reshape(-1, n, n), b.reshape(-1, n, n)
    if n * (n - 1) // 2 < 2**24:  # centred ranks: multiples of 1/2 below 2^23, exact in float32
        flat_a, flat_b = flat_a.float(), flat_b.float()
    null = torch.stack([_gram_cross(ranks_x, ranks_y, perms) for ranks_x, ranks_y in zip(flat_a, flat_b)])
    norms = (frob(a) * frob(b)).reshape(-1, 1)
    observed = (a * b).sum((-2, -1)) / frob(a) / frob(b)
    return _result(observed, (null / norms).reshape(*a.shape[:-2], n_perm))


# -- planted controls --------------------------------------------------------------------------------------

def _language_generator(seed: int, lang: str) -> torch.Generator:
    """A generator per (seed, language), stable across runs and independent of the other languages listed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(lang.encode()))


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix: QR of a Gaussian matrix, signs fixed by R (Mezzadri 2007)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def planted_representations(base: torch.Tensor, languages: Sequence[str], snr: float, seed: int = 0, *,
                            rotate: bool = True) -> dict[str, torch.Tensor]:
    """A positive control: {lang: [n, d]} sharing the per-sentence signal `base` at signal-to-noise `snr`.

    `base` [n, d] (e.g. the English full-model vectors) is centred and scaled to unit mean square (its
    covariance keeps its shape); language l gets base R_l sqrt(snr / (1 + snr)) + E_l sqrt(1 / (1 + snr)),
    R_l a random rotation (identity with rotate=False) and E_l standard Gaussian noise, both seeded per
    language. Signal and noise have equal total variance at snr = 1; snr = inf gives the signal alone,
    snr = 0 pure noise.

    CKA, RSA and the kNN-graph spectra are invariant to rotations, so R_l changes nothing for them; but
    retrieval compares cosines across the two languages, so with rotate=True the languages share
    structure in unaligned coordinates and retrieval stays at chance at any SNR. For retrieval's
    detection limit use rotate=False (one shared space, as one encoder gives both languages).
    """
    if snr < 0:
        raise ValueError(f"planted_representations: snr must be >= 0, got {snr}")
    base = base.to(torch.float64)
    base = base - base.mean(0)
    rms = base.square().mean().sqrt()
    if rms == 0:
        raise ValueError("planted_representations: base is constant over the examples")
    base = base / rms
    signal_w = 1.0 if math.isinf(snr) else math.sqrt(snr / (1 + snr))
    noise_w = 0.0 if math.isinf(snr) else math.sqrt(1 / (1 + snr))
    out = {}
    for lang in languages:
        generator = _language_generator(seed, lang)
        rotation = random_rotation(base.shape[1], generator)
        noise = torch.randn(base.shape, generator=generator, dtype=torch.float64)
        out[lang] = signal_w * (base @ rotation if rotate else base) + noise_w * noise
    return out


def length_only_representations(lengths: Mapping[str, Sequence[int]], d: int, seed: int = 0, *,
                                special: bool = True, vocab: int = 8000) -> dict[str, torch.Tensor]:
    """A content-free encoder: {lang: [n, d]} that depends on each sentence only through its token count.

    Sentence i of language l with lengths[l][i] tokens is the mean over its positions of (token embedding
    + position embedding), as an embedding layer mean-pooled would give: tokens drawn uniformly from a
    vocabulary of `vocab` random embeddings of its own per language (disjoint vocabularies), position
    embeddings shared by all languages, and with `special`, shared <s> and </s> embeddings at the first
    and last positions (lengths exclude them). Only the lengths are correlated across languages, yet
    REFERENCES measured linear CKA 0.70 on parallel pairs for such an encoder: a negative control for
    "shared meaning".
    """
    languages = list(lengths)
    longest = max((int(max(v)) for v in lengths.values() if len(v)), default=0)
    shared = torch.Generator().manual_seed(seed)
    positions = torch.randn(longest + 2, d, generator=shared, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, d, dtype=torch.float64), positions.cumsum(0)])  # sum of the first k
    bos, eos = torch.randn(2, d, generator=shared, dtype=torch.float64)
    out = {}
    for lang in languages:
        counts = torch.as_tensor(np.asarray(lengths[lang]), dtype=torch.long)
        if counts.numel() and int(counts.min()) < (0 if special else 1):
            raise ValueError(f"length_only_representations: {lang} has a sentence of length "
                             f"{int(counts.min())}; lengths count tokens without <s>/</s> and must be >= "
                             f"{0 if special else 1}")
        generator = _language_generator(seed, lang)
        table = torch.randn(vocab, d, generator=generator, dtype=torch.float64)
        tokens = table[torch.randint(vocab, (int(counts.sum()),), generator=generator)]
        sentence = torch.repeat_interleave(torch.arange(len(counts)), counts)
        summed = torch.zeros(len(counts), d, dtype=torch.float64).index_add_(0, sentence, tokens)
        width = counts + 2 if special else counts  # positions 0 .. width-1
        summed += cumulative[width]
        if special:
            summed += bos + eos
        out[lang] = summed / width[:, None]
    return out


def detection_limit(p_value_at: Callable[[float], float], snrs: Sequence[float],
                    alpha: float = 0.05) -> tuple[float | None, dict[float, float]]:
    """The weakest signal a measure detects: the smallest SNR from which on every stronger SNR has p < alpha.

    `p_value_at(snr)` runs the measure's test on `planted_representations` at that SNR. Requiring every
    stronger SNR to be detected too keeps one lucky p-value at a weak signal from setting the limit.
    Returns (limit or None if even the strongest SNR is not detected, {snr: p}).
    """
    p_values = {float(snr): float(p_value_at(snr)) for snr in sorted(snrs)}
    limit = None
    for snr in sorted(p_values, reverse=True):
        if not p_values[snr] < alpha:
            break
        limit = snr
    return limit, p_values


# -- eigenvector similarity of nearest-neighbour graphs ----------------------------------------------------

def knn_laplacian_spectrum(x: torch.Tensor, k: int = 10, centre: bool = True) -> torch.Tensor:
    """Laplacian eigenvalues, largest first, of the symmetric k-nearest-neighbour graph of x [n, d] (float64).

    Neighbours by cosine similarity (after centring on the mean, as for retrieval, unless `centre` is
    False); i and j are joined when either is among the other's k nearest (unweighted); L = D - A.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise XlsubError(f"knn graph: k must be between 1 and the number of sentences - 1 ({n - 1}), got {k}")
    xn = _unit_rows(x, centre)
    sim = xn @ xn.T
    sim.fill_diagonal_(-math.inf)
    neighbours = sim.topk(k, dim=1).indices
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency.scatter_(1, neighbours, 1.0)
    adjacency = torch.maximum(adjacency, adjacency.T)
    laplacian = torch.diag(adjacency.sum(1)) - adjacency
    return torch.linalg.eigvalsh(laplacian).flip(0)


def _energy_k(spectrum: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest eigenvalues hold at least `energy` of their sum."""
    total = float(spectrum.sum())
    if total <= 0:
        return len(spectrum)
    return int((torch.cumsum(spectrum, 0) < energy * total).sum()) + 1


def knn_eigen_similarity(x: torch.Tensor, y: torch.Tensor, k: int = 10, top: int | None = None,
                         centre: bool = True) -> float:
    """Eigenvector similarity of the kNN graphs of x and y (Søgaard, Ruder & Vulić 2018, section 4.3).

    sum_{i <= k'} (lambda_i(x) - lambda_i(y))^2 over the largest Laplacian eigenvalues of the two graphs
    (`knn_laplacian_spectrum`), with k' the smaller of the two counts of largest eigenvalues that hold 90%
    of their spectrum's sum, as in the paper; `top` fixes k' instead. 0 for isomorphic graphs (e.g. the
    same points rotated or rescaled); larger = less isomorphic. Not a statistic of the pairing: it compares
    the two point clouds' shapes, so x and y need not be parallel or of the same size.
    """
    lx, ly = knn_laplacian_spectrum(x, k, centre), knn_laplacian_spectrum(y, k, centre)
    count = min(_energy_k(lx, 0.9), _energy_k(ly, 0.9)) if top is None else min(top, len(lx), len(ly))
    return float((lx[:count] - ly[:count]).square().sum())
