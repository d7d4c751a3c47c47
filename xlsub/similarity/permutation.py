"""Permutation nulls for representation similarity (issue 12), the CKA permutation engine, and length control.

Representations are x, y [n, d] (or [..., n, d], e.g. one slice per layer) where row i of x and row i of
y encode translations of one sentence. Everything here is a plain function over tensors, computed in
float64; none touches files or MLflow.

- Permutation nulls (`cka_permutation_test`): CKA of x with y's rows re-paired by random permutations,
  optionally only within groups (`length_bins`: length-matched permutations). p = (1 + #{null >= observed})
  / (1 + n_perm) (Phipson & Smyth 2010). `cka_null_mean` is the exact permutation mean in closed form.
  `permutations` and `PermutationResult` serve the other permutation tests too (`xlsub.similarity.retrieval`,
  `xlsub.similarity.rsa`).
- Length control: `residualize` regresses each feature on covariates (token count) before CKA.
- The tail bound (`tail_bound_decided`, `cka_permutation_test(tail_risk=...)`): at the study's n a parallel
  CKA lies hundreds of null standard deviations above its permutation mean, and all 1,000 permutations only
  confirm p at its floor. From the exact mean and standard deviation (`cka_null_mean`, `cka_null_sd`:
  closed forms, `xlsub.similarity.moments`), a one-term chi-square tail (the heaviest a quadratic-form null
  has for its variance) says when the permutations cannot reach the observed value except with a stated
  small probability; those cells get the floor without computing any, and every other cell runs the full
  test. (Without the exact sd, e.g. `sequential_null` for another statistic, a pilot of `TAIL_PILOT`
  permutations estimates it.)

The permutation engine. Re-pairing keeps each representation's own statistics and changes only the
cross term of HSIC: for linear kernels of centred X, Y and y permuted by p, ||Y_p'X||_F^2, and for the
unbiased HSIC_1 also r_x . r_(y,p) (the 1'K~L~1 term; 1'K~1 1'L~1 does not depend on the pairing; see
`xlsub.similarity.cka.debiased_hsic`). The "feature" engine computes ||Y_p'X||_F^2 for a block of permutations with
one matrix product [Y_p1 | Y_p2 | ...]' X (O(n d1 d2) per permutation); the "gram" engine permutes the
centred n x n Gram matrix, sum_ij K_ij L_p(i)p(j) (O(n^2) per permutation, but a random gather). "auto"
picks gram only where n^2 is small against n d1 d2 (and for RBF kernels, which have no feature space). With
float32 products on the CPU the gram engine's K and L are float32 and their permuted sums a compiled loop's
(`xlsub.stats.inference.permuted_cross`, summed in float64): "auto" takes it for a block of permutations long enough
to pay for the two Gram matrices (`_gram32_pays`; at n = 5,000, d = 768 from 39 permutations: 0.44 s for the Gram
matrices, then 20.8 ms a permutation against the feature engine's 31.6 ms, 2 threads).
Measured with `benchmarks/permutation.py` (1 thread, debiased, ms per permutation):

    n, d        naive cka() loop   feature float64   feature float32 products   gram
    1077, 128         2.2               0.92                 0.39                4.9
    5000, 768       366               133                   70                    -

The feature engine does one of the naive loop's three n d^2 products per permutation, so in float64 it
is ~2.5x faster and with float32 products ~5x; the permutation test uses float32 products for its null.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from xlsub.errors import XlsubError
from xlsub.similarity import moments
from xlsub.similarity.cka import (
    FLOAT32_BLOCK,
    check_options,
    check_pair,
    debiased_hsic,
    frob,
    prepare,
    prepared_cka,
    ratio,
)
from xlsub.stats.inference import nanstd, on_cpu, permuted_cross

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
# float32 products on the CPU: the gram engine with float32 K, L and the compiled permuted sums (`_gram32_pays`) where
# P (d1 d2 - _GRAM32_RATIO n) > n (d1 + d2) for P permutations: a permutation costs n d1 d2 multiply-adds in the
# feature engine and n^2 gathered products here, each about _GRAM32_RATIO times a multiply-add of a float32 GEMM, and
# the two Gram matrices n^2 (d1 + d2). Measured at n = 5,000, d = 768, 2 threads: 11 ps a multiply-add (the feature
# engine's 31.6 ms a permutation, the Gram matrices' 0.44 s), 0.83 ns a product (20.8 ms a permutation).
_GRAM32_RATIO = 78
# ... and at most this many examples: K and L are 8 n^2 bytes (400 MB at n = 7,000)
_GRAM32_MAX_N = 7000
# With float32 products for the null, null values within this relative distance of the observed value are
# recomputed in float64, so that a tie (e.g. a permutation that leaves the pairing unchanged) counts as one.
FLOAT32_RECHECK = 1e-5
# A null value counts as >= the observed one within 100 float64 eps of it (scipy.stats.permutation_test's
# convention): the same number computed by two summation orders must tie.
TIE_RTOL = 100 * torch.finfo(torch.float64).eps
# The tail bound (`cka_permutation_test(tail_risk=...)`): permutations of the pilot that estimates the null's
# standard deviation, and the confidence of that estimate's upper bound (chi-square, one-sided).
TAIL_PILOT = 50
TAIL_SD_RISK = 0.005
# Early stopping of clearly null cells (Besag & Clifford 1991, `sequential_null`): a cell stops at its
# STOP_EXCEEDANCES-th null value at or above the observed one when that comes within the first
# STOP_EXCEEDANCES / STOP_P permutations (100), with p = STOP_EXCEEDANCES / L >= STOP_P; every other cell
# runs all permutations.
STOP_EXCEEDANCES = 10
STOP_P = 0.1


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
    form where one is implemented (CKA: `cka_null_mean`), else None. `tail_bound` [...] (bool, or None where
    the test had no tail bound): where True, no permutation (or only a pilot's) was computed (`null` is NaN),
    p is its floor 1 / (1 + n_perm) by `tail_bound_decided`, and `null_mean` is the exact mean.
    `stopped` [...] (bool, or None without early stopping): where True the cell stopped early as clearly null
    (`sequential_null`), p = h / L, `null` NaN after L, `null_mean` the exact mean.
    """

    observed: torch.Tensor
    null_mean: torch.Tensor
    null_std: torch.Tensor
    p_value: torch.Tensor
    n_perm: int
    null: torch.Tensor
    exact_null_mean: torch.Tensor | None = None
    tail_bound: torch.Tensor | None = None
    stopped: torch.Tensor | None = None

    @property
    def above_chance(self) -> torch.Tensor:
        """observed - null_mean: for CKA, the issue's "CKA above chance"."""
        return self.observed - self.null_mean


def permutation_result(observed: torch.Tensor, null: torch.Tensor, exact_null_mean=None) -> PermutationResult:
    """`observed` [...] against its sampled `null` [..., n_perm]: p = (1 + #{null >= observed}) / (1 + n_perm),
    with a null value within `TIE_RTOL` of the observed one counted as a tie, and NaN where observed is NaN."""
    n_perm = null.shape[-1]
    ties = TIE_RTOL * observed.abs()
    exceed = (null >= (observed - ties)[..., None]).sum(-1)
    p_value = torch.where(observed.isnan(), math.nan, (1.0 + exceed.double()) / (1.0 + n_perm))
    std = null.std(-1) if n_perm > 1 else torch.full_like(observed, math.nan)
    return PermutationResult(observed, null.mean(-1), std, p_value, n_perm, null, exact_null_mean)


# -- the CKA permutation engine ----------------------------------------------------------------------------

def permuted_gram_cross(k: torch.Tensor, l: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """sum_ij K_ij L_p(i)p(j) = tr(K P L P') for each permutation p (rows of perms), [P], float64.

    float32 K and L (half the memory traffic of the two gathers, which bound the time) are multiplied
    in float32 and summed in float64."""
    flat, perms = k.reshape(-1), perms.to(k.device)
    rows, both = torch.empty_like(l), torch.empty_like(l)  # reused: see `_feature_cross`
    products = torch.empty_like(flat) if flat.dtype != torch.float64 else None
    out = torch.empty(len(perms), dtype=torch.float64, device=k.device)
    for i, p in enumerate(perms):
        torch.index_select(torch.index_select(l, 0, p, out=rows), 1, p, out=both)
        if products is None:
            out[i] = torch.dot(flat, both.reshape(-1))
        else:
            out[i] = torch.mul(flat, both.reshape(-1), out=products).sum(dtype=torch.float64)
    return out


def _feature_cross(xc: torch.Tensor, yc: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """||Y_p' X||_F^2 for each permutation p, [P], for centred xc [n, d1], yc [n, d2] (float64 or float32), from
    `permuted_products`."""
    out = torch.empty(len(perms), dtype=torch.float64, device=xc.device)
    for start, products in permuted_products(xc, yc, perms):
        out[start:start + len(products)] = frob(products).square()
    return out


def permuted_products(xc: torch.Tensor, zc: torch.Tensor, perms: torch.Tensor):
    """Z_p'X for each permutation p of `perms` [P, n], centred xc [n, d1], zc [n, d2] (both float64 or both
    float32): yields (start, float64 [b, d2, d1]) for consecutive blocks of b permutations, about `_BLOCK_BYTES`
    of gathered rows and products each.

    A block of b permutations is one product [Z_p1 | ... | Z_pb]' X ([b d2, d1]): z's rows gathered into an
    [n, b, d2] array, so the product sees one tall matrix and each permutation's d2 x d1 result is contiguous.
    float32 operands: float32 products over at most `xlsub.similarity.cka.FLOAT32_BLOCK` examples, summed in
    float64, as `xlsub.similarity.cka.blocked_product`. The gather and product buffers are allocated once and
    reused (a fresh multi-megabyte buffer per block costs more in page faults than the gather), so a block's
    products hold until the next block is asked for: a caller that keeps them copies them.
    """
    n, d1 = xc.shape
    d2, perms = zc.shape[1], perms.to(zc.device)
    per_perm = n * d2 * zc.element_size() + d1 * d2 * (8 + zc.element_size())
    block = max(1, min(len(perms), _BLOCK_BYTES // per_perm))
    gathered = torch.empty(n * block, d2, dtype=zc.dtype, device=zc.device)
    product = torch.empty(block * d2, d1, dtype=torch.float64, device=zc.device)
    partial = None if zc.dtype == torch.float64 else torch.empty(block * d2, d1, dtype=zc.dtype, device=zc.device)
    for start in range(0, len(perms), block):
        chunk = perms[start:start + block]
        b = len(chunk)
        g = torch.index_select(zc, 0, chunk.T.reshape(-1), out=gathered[:n * b]).view(n, b * d2)
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
        yield start, product[:b * d2].view(b, d2, d1)


def _pick_engine(engine: str, kind: str, n: int, d1: int, d2: int, n_perm: int | None = None) -> str:
    """The engine for these sizes. `n_perm`: the permutations of one call where its gram engine would run float32 Gram
    matrices through the compiled sums (float32 products on the CPU, not rbf); None: the float64 gram engine."""
    if engine not in ENGINES:
        raise XlsubError(f"permutation engine: unknown engine '{engine}'; use auto, feature or gram")
    if kind == "rbf":
        if engine == "feature":
            raise XlsubError("permutation engine: rbf CKA has no feature-space form; use engine=auto or gram")
        return "gram"
    if engine == "auto":
        if n_perm is not None and _gram32_pays(n, d1, d2, n_perm):
            return "gram"
        return "gram" if n <= _GRAM_MAX_N and n * _GRAM_RATIO < d1 * d2 else "feature"
    return engine


def _gram32_pays(n: int, d1: int, d2: int, n_perm: int) -> bool:
    """Whether `n_perm` permutations cost less by float32 Gram matrices and compiled sums than by the feature engine
    (`_GRAM32_RATIO`, `_GRAM32_MAX_N`)."""
    return n <= _GRAM32_MAX_N and n_perm * (d1 * d2 - _GRAM32_RATIO * n) > n * (d1 + d2)


def permuted_cka(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor, kind: str = "debiased", *,
                 engine: str = "auto", precision: str = "float64", sigma_frac: float = 1.0,
                 selves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CKA of x with y re-paired by each permutation: out[..., k] = cka(x, y[..., perms[k], :]), [..., P].

    Each representation is centred and reduced once (`xlsub.similarity.cka.prepare`); per permutation only the cross
    term is recomputed, by the feature engine (||Y_p'X||_F^2 in blocks of permutations) or the gram engine
    (tr(K P L P') on centred n x n Gram matrices); see the module docstring. rbf kernels use the gram
    engine. The same permutations serve every leading index (layer). `precision="float32"`: float32
    products accumulated in float64 (linear and debiased with the feature engine), as in `xlsub.similarity.cka.cka`; on
    the CPU, with the gram engine, float32 Gram matrices whose permuted products are summed in float64 ("auto" takes it
    where the permutations pay for the two Gram matrices, `_gram32_pays`).
    `selves` (linear, debiased): x's and y's self terms [...] (`prepare`'s "self"), already computed: not again.
    """
    check_pair(x, y, kind, precision)
    perms = torch.as_tensor(perms, dtype=torch.long).reshape(-1, x.shape[-2])
    lead, (n, d1), d2 = x.shape[:-2], x.shape[-2:], y.shape[-1]
    compiled = precision == "float32" and kind != "rbf" and on_cpu(x) and on_cpu(y)  # float32 Gram matrices, compiled sums
    engine = _pick_engine(engine, kind, n, d1, d2, len(perms) if compiled else None)
    if engine == "gram" and not compiled:
        precision = "float64"  # torch's gathers, not the arithmetic, are what the gram engine spends its time on
    xs, ys = x.reshape(-1, n, d1), y.reshape(-1, n, d2)
    out = torch.empty(xs.shape[0], len(perms), dtype=torch.float64, device=x.device)
    known = [None, None] if selves is None or kind == "rbf" else [one.reshape(-1) for one in selves]
    for index in tqdm(range(xs.shape[0]), desc="permutations", leave=False, disable=None):
        a = prepare(xs[index], kind, sigma_frac, precision, None if known[0] is None else known[0][index])
        b = prepare(ys[index], kind, sigma_frac, precision, None if known[1] is None else known[1][index])
        out[index] = prepared_null(a, b, perms, kind, engine)
    return out.reshape(*lead, len(perms))


def null_engine(kind: str, n: int, d1: int, d2: int, engine: str = "auto", precision: str = "float64") -> tuple[str, str]:
    """The engine `permuted_cka` uses for these sizes and the precision it prepares the representations in."""
    engine = _pick_engine(engine, kind, n, d1, d2)
    return engine, "float64" if engine == "gram" else precision


def prepared_null(a: dict, b: dict, perms: torch.Tensor, kind: str, engine: str) -> torch.Tensor:
    """`permuted_cka` of two representations already `prepare`d (in the precision `null_engine` gives), [P]: a
    caller testing one pair on several blocks of permutations prepares it once."""
    perms = perms.to(a["self"].device)
    if kind == "rbf":
        cross = permuted_gram_cross(a["kc"], b["kc"], perms)
    else:
        if engine == "gram" and a["xc"].dtype == torch.float32:  # float32 Gram matrices, their permuted sums in float64
            xc, yc = a["xc"], b["xc"]
            xty_sq = permuted_cross(xc @ xc.mT, [yc @ yc.mT], perms)[0]
        elif engine == "gram":
            xc, yc = a["xc"].double(), b["xc"].double()
            xty_sq = permuted_gram_cross(xc @ xc.mT, yc @ yc.mT, perms)
        else:
            xty_sq = _feature_cross(a["xc"], b["xc"], perms)
        if kind == "linear":
            cross = xty_sq
        else:  # the unbiased HSIC's other pairing-dependent term: r_x . r_(y,p)
            cross = debiased_hsic(xty_sq, a["rows"], b["rows"][perms], a["total"], b["total"], perms.shape[-1])
    return ratio(cross, a["self"], b["self"])


def cka_null_mean(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", groups=None, states: tuple[dict, dict] | None = None) -> torch.Tensor:
    """The exact mean of CKA over all re-pairings of y (within `groups` when given), in closed form, [...].

    The self terms do not depend on the pairing, so E[CKA] = E[cross] / sqrt(self_x self_y). With K, L the
    (centred) kernels, E[tr(K P L P')] over uniform permutations within groups g of size n_g is
        sum_g tr_g(K) tr_g(L) / n_g                                   (i = j)
      + sum_g (S_gg(K) - tr_g(K)) (S_gg(L) - tr_g(L)) / (n_g (n_g - 1))   (i != j, same group)
      + sum_{g != h} S_gh(K) S_gh(L) / (n_g n_h)                       (different groups),
    S_gh the sum of a block, tr_g the sum of its diagonal. For linear kernels S_gh(K) = s_g . s_h with s_g the
    sum of x over group g, so this is O(n d + G^2 d); rbf sums its n x n kernel by blocks. Without groups
    (one group) it is tr(K) tr(L) / (n - 1) for linear CKA, and exactly 0 for the unbiased HSIC (a
    U-statistic of products of distinct pairs). `states`: x's and y's `prepare` (float64), already computed.
    """
    check_options(kind)
    n = x.shape[-2]
    codes, sizes = moments.group_codes(groups, n, x.device)  # one group without `groups`

    def group_sum(values: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(values.shape)
        shape[dim] = len(sizes)
        return values.new_zeros(shape).index_add_(dim, codes, values)

    a, b = states or (prepare(x, kind), prepare(y, kind))
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


def cka_null_sd(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", groups=None) -> torch.Tensor:
    """The exact standard deviation of CKA over all re-pairings of y (within `groups` when given), [...].

    CKA = cross / sqrt(self_x self_y), and the cross term's pairing-dependent part is
    sum_ij K_ij L_p(i)p(j) + lam sum_i K_ii L_p(i)p(i) (lam = -n / (n - 2) for the unbiased HSIC, whose r_x . r_(y,p)
    term is that multiple of the diagonal one; 0 for linear and rbf), whose variance
    `xlsub.similarity.moments.variance` gives in closed form: from features for linear kernels (O(n d^2 + G^2 d^2),
    no n x n matrix), from the centred kernel for rbf. NaN where the CKA is."""
    return cka_null_spread(x, y, kind, groups)[0]


def cka_null_spread(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cka_null_sd` and, on the same CKA scale, an upper bound on the largest weight of the null's quadratic
    part (`xlsub.similarity.moments.largest_weight`), each [...]: what `tail_bound_decided` needs."""
    check_options(kind)
    values = torch.stack([pair_null_moments(a, b, kind, x.shape[-2]) for a, b in zip(null_sides(x, kind, groups), null_sides(y, kind, groups))])
    return values[:, 1].reshape(x.shape[:-2]), values[:, 2].reshape(x.shape[:-2])


@dataclass(frozen=True)
class NullSide:
    """What the exact null moments need of one representation [n, d] at one set of groups: its HSIC(K, K)
    (`self`), its sum of squared centred norms (`total`, the unbiased HSIC's constant term) and its
    `xlsub.similarity.moments.Summary`. Small (no n x d copy): a reference tested against every language keeps
    one per layer (`null_sides`)."""

    self: torch.Tensor
    total: torch.Tensor | None
    summary: moments.Summary


def null_sides(x: torch.Tensor, kind: str = "debiased", groups=None, state: dict | None = None,
               selves: torch.Tensor | None = None) -> list[NullSide]:
    """`NullSide` of each leading index of x [..., n, d], flattened. `state`: `prepare(x, kind)` of every leading
    index at once (float64), where the caller has it; else each index is prepared here, with its self term from
    `selves` [...] (linear, debiased: `self_hsic(x)`, already computed) where given."""
    check_options(kind)
    if state is None:
        flat = x.reshape(-1, *x.shape[-2:])
        known = [None] * len(flat) if selves is None or kind == "rbf" else selves.reshape(-1)
        return [null_side(prepare(one, kind, self_=own), kind, groups) for one, own in zip(flat, known)]
    lead = state["self"].shape
    flat = {key: value.reshape(-1, *value.shape[len(lead):]) for key, value in state.items()}
    return [null_side({key: value[index] for key, value in flat.items()}, kind, groups) for index in range(lead.numel())]


def null_side(state: dict, kind: str, groups=None) -> NullSide:
    """`NullSide` of one representation already `prepare`d in float64."""
    summary = moments.gram_summary(state["kc"], groups) if kind == "rbf" else moments.feature_summary(state["xc"], groups)
    return NullSide(state["self"], state.get("total"), summary)


def pair_null_moments(a: NullSide, b: NullSide, kind: str, n: int) -> torch.Tensor:
    """CKA's exact null mean, sd and largest-weight bound (`cka_null_mean`, `cka_null_spread`) from two sides, [3]."""
    lam = -n / (n - 2) if kind == "debiased" else 0.0
    cross = moments.mean(a.summary, b.summary, lam)
    if kind == "debiased":  # the constant term of `xlsub.similarity.cka.debiased_hsic`
        cross = cross + a.total * b.total / ((n - 1) * (n - 2))
    spread = moments.variance(a.summary, b.summary, lam).sqrt(), moments.largest_weight(a.summary, b.summary)
    return torch.stack([ratio(value, a.self, b.self) for value in (cross, *spread)])


def cka_null_moments_many(x: torch.Tensor, ys: torch.Tensor, kind: str = "debiased", groups=None) -> tuple[torch.Tensor, ...]:
    """`cka_null_mean`, `cka_null_sd` and `cka_null_spread`'s weight of one x [n, d1] against each of ys [m, n, d2],
    x's statistics computed once: (mean, sd, weight), each [m]."""
    reference = null_sides(x, kind, groups)[0]
    out = [pair_null_moments(reference, null_sides(y, kind, groups)[0], kind, x.shape[-2]) for y in ys]
    return tuple(torch.stack(out).mT) if out else (torch.empty(0, dtype=torch.float64, device=x.device),) * 3


def tail_bound_decided(observed: torch.Tensor, exact_mean: torch.Tensor | None, pilot: torch.Tensor, n_perm: int,
                       risk: float, sd_risk: float = TAIL_SD_RISK, exact_sd: torch.Tensor | None = None,
                       exact_weight: torch.Tensor | None = None, exceedances: int = 1) -> torch.Tensor:
    """Where `n_perm` permutations would give no null value reaching `observed`, except with probability about
    `risk` or less: bool [...], from the exact permutation mean and a pilot [..., m] of the same null.

    A CKA (or Mantel) null is a quadratic form in the permutation, sum_ab w_ab (u_a' P v_b)^2 with u_a' P v_b
    near normal; for a given variance its upper tail is heaviest when one term dominates (one direction, e.g.
    sentence length, carries most of both kernels): a chi-square with one degree of freedom, skewness 2.8. So
    the standardised null (T - mean) / sd is taken to have at most the upper tail of (chi2_1 - 1) / sqrt(2),
    and the chance that any of n_perm permutations reaches z = (observed - mean) / sd is bounded by
    n_perm P(chi2_1 > 1 + sqrt(2) z) (a union bound); decided where that is <= risk (z >= 14 for 1,000
    permutations at 0.005) and no pilot value reaches the observed one. There the full test's count is 0, so
    its p is the floor 1 / (1 + n_perm). The mean is exact (`cka_null_mean`); the sd is the pilot's raised to
    its one-sided (1 - sd_risk) chi-square upper confidence bound, sqrt((m - 1) / chi2_{sd_risk, m-1}) s
    (x1.34 for m = 50 at 0.005). Not distribution-free (Cantelli's bound would need z >= 447, which real,
    length-dominated encodings never reach): `tests/test_tail_bound.py` checks the decision against the full
    null on length-dominated and isotropic cases.
    `exact_mean` None (no closed form): the pilot's mean raised to its one-sided (1 - sd_risk) t upper
    confidence bound, at another sd_risk.
    `exact_sd` (with `exact_mean`: `cka_null_sd`, `xlsub.similarity.moments.variance`): the null's exact standard
    deviation, used as it is, so `pilot` may have no permutations at all ([..., 0]).
    `exact_weight` (with `exact_sd`: `cka_null_spread`): an upper bound w on the largest weight of the null as a
    quadratic form in a Gaussian vector with the null's exact covariance (`xlsub.similarity.moments.largest_weight`).
    Such a form minus its mean is sub-gamma with variance sd^2 and scale 2w (Laurent & Massart 2000, lemma 1,
    with the non-central term, Birge 2001), so one permutation reaches mean + sqrt(2 x) sd + 2 w x with
    probability at most e^-x: a cell is also decided where observed - mean >= that at x = log(n_perm / risk)
    (z >= 4.9 + 24.4 w / sd for 1,000 permutations at 0.005). Where many directions share the null's variance
    (w much below sd) this decides cells the one-term bound leaves to the permutations.
    `exceedances` (with the exact moments): where fewer than this many of the n_perm permutations may reach the
    observed value except with probability `risk`, as a power analysis's detection needs (k <= 3 of 99 at 0.05:
    `exceedances` 4, each permutation then allowed q = 0.0069 instead of 0.005 / 99). A decided cell's count is
    below `exceedances`, not necessarily 0."""
    from scipy import optimize, stats

    m = pilot.shape[-1]
    if exact_sd is not None and exact_mean is not None:
        sd = exact_sd
    elif m < 3:
        return torch.zeros(observed.shape, dtype=torch.bool, device=observed.device)
    else:
        s = pilot.std(-1)
        sd = s * math.sqrt((m - 1) / float(stats.chi2.ppf(sd_risk, m - 1)))
        if exact_mean is None:
            exact_mean = pilot.mean(-1) + float(stats.t.ppf(1 - sd_risk, m - 1)) * s / math.sqrt(m)
    z = (observed - exact_mean) / sd
    reached = (pilot >= (observed - TIE_RTOL * observed.abs())[..., None]).any(-1)
    tail = torch.as_tensor(stats.chi2.sf((1 + math.sqrt(2) * z.clamp_min(0)).cpu().numpy(), 1), dtype=torch.float64, device=z.device).reshape(z.shape)
    # the most a permutation may reach the observed value with: risk / n_perm (a union bound) for any of them; for
    # `exceedances` of them, the q with P(Binomial(n_perm, q) >= exceedances) = risk
    per_perm = risk / n_perm if exceedances == 1 else optimize.brentq(lambda q: stats.binom.sf(exceedances - 1, n_perm, q) - risk, 0.0, 1.0)
    far = tail <= per_perm
    if exact_weight is not None and exact_sd is not None:
        x = math.log(1 / per_perm)
        far = far | (observed - exact_mean >= math.sqrt(2 * x) * sd + 2 * exact_weight * x)
    return (z > 0) & far & ~reached & sd.isfinite() & observed.isfinite()


@dataclass
class SequentialNull:
    """What `sequential_null` computed, per cell (flattened leading index): `null` [m, n_perm] (NaN after the
    permutations a cell used), `p_value` [m], `used` [m] (permutations computed), `tail_bound` [m] (decided
    by the tail bound after the pilot) and `stopped` [m] (stopped early as clearly null)."""

    null: torch.Tensor
    p_value: torch.Tensor
    used: torch.Tensor
    tail_bound: torch.Tensor
    stopped: torch.Tensor


def sequential_null(compute, observed: torch.Tensor, n_perm: int, exceeds, *, pilot: int = TAIL_PILOT,
                    tail_risk: float | None = None, exact_mean: torch.Tensor | None = None,
                    exact_sd: torch.Tensor | None = None, exact_weight: torch.Tensor | None = None,
                    stop_after: int | None = None, stop_p: float = STOP_P) -> SequentialNull:
    """A permutation null computed in stages, sparing the cells whose answer is settled early.

    `compute(cells, start, stop)`: the null values [len(cells), stop - start] of permutations start..stop-1
    (the same permutations for every cell) for the cells (indices into the flat `observed` [m]);
    `exceeds(null, observed)`: bool, where a null value counts as at least as extreme (ties included).
    Stages: the first `pilot` permutations for every cell, then up to `stop_after` / `stop_p`, then the rest.
    - After the pilot, with `tail_risk`, cells the tail bound decides (`tail_bound_decided`) get p = 1 / (1 +
      n_perm) and no more permutations.
    - With `stop_after` = h (Besag & Clifford 1991), a cell whose h-th exceedance comes at permutation L <= h
      / stop_p stops there with p = h / L (>= stop_p). That p is valid (P(p <= u) <= u), and below stop_p
      every decision is the full test's or more conservative: a stopped cell is never significant at a level
      under stop_p. Clearly null cells (p around 0.5) stop after about 2h permutations instead of n_perm.
    - With `exact_sd` (and `exact_mean`, and `exact_weight` where known), the tail bound needs no pilot: it decides before any permutation
      (`used` 0), and the stages are 2 `stop_after`, `pilot`, `stop_after` / `stop_p`, n_perm, so that clearly
      null cells stop after about 2h permutations.
    Every other cell runs all n_perm permutations: p = (1 + #exceeding) / (1 + n_perm), the full test's."""
    m, on = observed.numel(), {"device": observed.device}
    null = torch.full((m, n_perm), math.nan, dtype=torch.float64, **on)
    p = torch.full((m,), math.nan, dtype=torch.float64, **on)
    used = torch.full((m,), n_perm, dtype=torch.long, **on)
    tail = torch.zeros(m, dtype=torch.bool, **on)
    stopped = torch.zeros(m, dtype=torch.bool, **on)
    active = torch.ones(m, dtype=torch.bool, **on)
    horizon = min(n_perm, math.floor(stop_after / stop_p)) if stop_after else 0
    exact = tail_risk is not None and exact_sd is not None and exact_mean is not None
    first = 2 * stop_after if exact and stop_after else 0
    bounds = sorted({b for b in (first, min(pilot, n_perm), horizon, n_perm) if 0 < b <= n_perm})
    if exact:
        decided = tail_bound_decided(observed, exact_mean, null[:, :0], n_perm, tail_risk, exact_sd=exact_sd, exact_weight=exact_weight)
        tail[decided], used[decided], p[decided], active[decided] = True, 0, 1.0 / (1 + n_perm), False
    start = 0
    for stop in bounds:
        cells = active.nonzero().reshape(-1)
        if not len(cells):
            break
        null[cells, start:stop] = compute(cells, start, stop)
        if start == 0 and tail_risk is not None and not exact and stop < n_perm:
            decided = tail_bound_decided(observed[cells], None if exact_mean is None else exact_mean[cells], null[cells, :stop], n_perm, tail_risk)
            tail[cells[decided]] = True
            used[cells[decided]] = stop
            p[cells[decided]] = 1.0 / (1 + n_perm)
            active[cells[decided]] = False
        if stop_after and stop <= horizon and stop < n_perm:
            undecided = active.nonzero().reshape(-1)
            counts = exceeds(null[undecided, :stop], observed[undecided][:, None]).cumsum(-1)
            reached = counts[:, -1] >= stop_after
            at = (counts >= stop_after).int().argmax(-1) + 1  # L: the permutation of the h-th exceedance
            early = undecided[reached]
            stopped[early] = True
            used[early] = at[reached]
            p[early] = stop_after / at[reached].double()
            for cell, length in zip(early.tolist(), at[reached].tolist()):
                null[cell, length:] = math.nan
            active[early] = False
        start = stop
    rest = active.nonzero().reshape(-1)
    if len(rest):
        count = exceeds(null[rest], observed[rest][:, None]).sum(-1).double()
        p[rest] = (1 + count) / (1 + n_perm)
    p = torch.where(observed.isnan(), math.nan, p)
    return SequentialNull(null, p, used, tail, stopped)


def cka_permutation_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 1000, seed: int = 0,
                         kind: str = "debiased", groups=None, *, engine: str = "auto",
                         null_precision: str = "float32", sigma_frac: float = 1.0,
                         tail_risk: float | None = None, pilot: int = TAIL_PILOT,
                         stop_after: int | None = None, reference: list[NullSide] | None = None,
                         selves: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                         observed: torch.Tensor | None = None) -> PermutationResult:
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

    `tail_risk` (None: off): a leading index whose observed CKA the exact null mean and standard deviation
    (`cka_null_mean`, `cka_null_sd`) put so far in the tail that the n_perm permutations reach it with
    probability at most `tail_risk` (`tail_bound_decided`) gets p = 1 / (1 + n_perm), null_mean = the exact
    mean, null_std = the exact sd, without computing any permutation (`tail_bound` says where). Every other
    index runs all n_perm permutations (or stops early, below): its numbers are the full test's.

    `stop_after` (None: off): early stopping of clearly null indices (`sequential_null`: at the
    `stop_after`-th null value reaching the observed CKA within the first `stop_after` / `STOP_P`
    permutations, p = `stop_after` / L, null_mean the exact mean; `stopped` says where).

    `reference` (with `tail_risk`): `null_sides(x, kind, groups)`, where the caller tests one x against several
    y and computes x's side once. `selves` (linear, debiased): x's and y's self terms [...] (`self_hsic`; either may be
    None), already computed: not again. `observed`: the CKA of x and y [...] where the caller has it (the same pair
    tested at another null), not computed again.
    """
    check_options(kind)
    if null_precision not in ("float64", "float32"):
        raise XlsubError(f"null precision: unknown precision '{null_precision}'; use float64 or float32")
    if kind == "rbf":
        null_precision = "float64"  # the gram engine: no float32 products to speed up
    n = x.shape[-2]
    perms = functools.cache(lambda: permutations(n, n_perm, seed, groups))  # drawn when first needed: not where the tail bound decides all
    check_pair(x, y, kind)
    # each side prepared once (float64, every leading index): the observed CKA, the exact moments' summaries and the
    # self terms every later preparation of the null reuses (linear, debiased), instead of a d x d product each time
    given = (None, None) if selves is None or kind == "rbf" else tuple(None if one is None else one.reshape(x.shape[:-2]) for one in selves)
    known = torch.stack([side.self for side in reference]).reshape(x.shape[:-2]) if reference and kind != "rbf" \
        and len(reference) == x.shape[:-2].numel() else given[0]  # x's self terms, with its null sides
    states = prepare(x, kind, sigma_frac, self_=known), prepare(y, kind, sigma_frac, self_=given[1])
    if observed is None:
        observed = prepared_cka(*states, kind)
    elif observed.shape != x.shape[:-2]:
        raise ValueError(f"cka_permutation_test: observed has shape {tuple(observed.shape)}, not x's leading {tuple(x.shape[:-2])}")
    selves = None if kind == "rbf" else (states[0]["self"], states[1]["self"])
    if tail_risk is not None or stop_after:
        return _sequential_test(x, y, perms, n_perm, observed, kind, groups, engine, null_precision, sigma_frac, tail_risk, pilot, stop_after,
                                reference, states)
    del states
    null = _checked_null(x, y, perms(), observed, kind, engine, null_precision, sigma_frac, selves)
    return permutation_result(observed, null, cka_null_mean(x, y, kind, groups))


def cka_exceeds(null: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Where a CKA null value counts as reaching the observed one (within `TIE_RTOL`, a tie counts)."""
    return null >= observed - TIE_RTOL * observed.abs()


def _sequential_test(x, y, perms: Callable[[], torch.Tensor], n_perm: int, observed, kind, groups, engine, null_precision, sigma_frac,
                     tail_risk, pilot, stop_after, reference=None, states=None) -> PermutationResult:
    """`cka_permutation_test` through `sequential_null`: the tail bound from the exact mean and sd (no
    permutation) and early stopping of clearly null indices; null_mean is the exact mean where a cell did not
    run all permutations. `perms()`: the n_perm permutations, drawn at the first call. `states`: x's and y's
    `prepare` (float64, every leading index), already computed."""
    lead = observed.shape
    states = states or (prepare(x, kind, sigma_frac), prepare(y, kind, sigma_frac))
    if tail_risk is not None:  # the exact mean, sd and weight bound from each side's summary (x's given or computed once)
        sides_x = null_sides(x, kind, groups, states[0]) if reference is None else reference
        if len(sides_x) != observed.numel():
            raise ValueError(f"reference: {len(sides_x)} null sides for {observed.numel()} leading indices")
        exact, exact_sd, exact_weight = (values.reshape(lead) for values in torch.stack(
            [pair_null_moments(a, b, kind, x.shape[-2]) for a, b in zip(sides_x, null_sides(y, kind, groups, states[1]))]).mT)
    else:
        exact, exact_sd, exact_weight = cka_null_mean(x, y, kind, groups), None, None
    selves = None if kind == "rbf" else tuple(state["self"].reshape(-1) for state in states)
    del states  # the permutations prepare each cell again in the null's precision, from these self terms
    xs, ys = x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    flat_observed = observed.reshape(-1)

    def compute(cells, start, stop):
        return _checked_null(xs[cells], ys[cells], perms()[start:stop], flat_observed[cells], kind, engine, null_precision, sigma_frac,
                             None if selves is None else (selves[0][cells], selves[1][cells]))

    done = sequential_null(compute, flat_observed, n_perm, cka_exceeds, pilot=pilot, tail_risk=tail_risk,
                           exact_mean=exact.reshape(-1), exact_sd=None if exact_sd is None else exact_sd.reshape(-1),
                           exact_weight=None if exact_weight is None else exact_weight.reshape(-1), stop_after=stop_after)
    partial = (done.used < n_perm).reshape(lead)
    null = done.null.reshape(*lead, n_perm)
    mean = torch.where(partial, exact, null.mean(-1))
    partial_sd = nanstd(null) if exact_sd is None else exact_sd
    std = torch.where(partial, partial_sd, null.std(-1) if n_perm > 1 else math.nan)  # a full row: the full test's own numbers
    return PermutationResult(observed, mean, std, done.p_value.reshape(lead), n_perm, null, exact, done.tail_bound.reshape(lead),
                             done.stopped.reshape(lead))


def _checked_null(x, y, perms, observed, kind, engine, null_precision, sigma_frac, selves=None) -> torch.Tensor:
    """`permuted_cka` in `null_precision`, values within `FLOAT32_RECHECK` of `observed` recomputed in float64
    (`selves`: x's and y's self terms, as `permuted_cka` takes them)."""
    n_perm, perms = len(perms), perms.to(x.device)
    null = permuted_cka(x, y, perms, kind, engine=engine, precision=null_precision, sigma_frac=sigma_frac, selves=selves)
    if null_precision == "float32":
        near = (null - observed[..., None]).abs() <= FLOAT32_RECHECK * observed.abs()[..., None]
        for index in near.reshape(-1, n_perm).any(-1).nonzero().reshape(-1).tolist():
            lead = tuple(int(i) for i in np.unravel_index(index, observed.shape)) if observed.ndim else ()
            which = near[lead].nonzero().reshape(-1)
            null[lead][which] = permuted_cka(x[lead], y[lead], perms[which], kind, engine=engine,
                                             selves=None if selves is None else (selves[0][lead], selves[1][lead]))
    return null


# -- length control ----------------------------------------------------------------------------------------

def residualize(x: torch.Tensor, covariates) -> torch.Tensor:
    """Residuals of every column of x [..., n, d] after least squares on [1, covariates] (float64).

    `covariates`: [n] or [n, c] (e.g. token counts). x - Q Q'x with Q an orthonormal basis of the design
    matrix's column space (from its SVD, so a constant or collinear covariate is harmless): the
    residuals of ordinary least squares with an intercept, for every column at once. Used for the CKA of
    residuals, cka(residualize(x, lengths), residualize(y, lengths)).
    """
    n = x.shape[-2]
    z = torch.as_tensor(np.asarray(covariates, dtype=np.float64), device=x.device).reshape(n, -1)
    design = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=x.device), z], dim=1)
    u, s, _ = torch.linalg.svd(design, full_matrices=False)
    q = u[:, s > s[0] * max(design.shape) * torch.finfo(torch.float64).eps]
    x = x.to(torch.float64)
    return x - q @ (q.mT @ x)
