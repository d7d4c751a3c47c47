"""Inference at the unit a claim is about: tests, intervals and p-values over languages (or any few units).

A claim about languages ("the subnetworks are language-specific") is judged on one number per language,
typically a paired difference d_r = effect_r - control_r, with what varies inside a language (seeds,
random-mask draws, test chunks) already averaged into d_r.

- `sign_flip_test`: Fisher's (1935) sign-flip test of the mean of d: under H0 each d_r is symmetric about
  0, so its sign is a fair coin. All 2^n sign vectors when there are at most `EXACT_LIMIT` of them
  (`sign_flip_exact`, p = share with a mean at least as extreme, the identity included, so p >= 2^-n),
  else Monte Carlo (`sign_flip_mc`, p = (k + 1) / (N + 1), Davison & Hinkley 1997, 4.2).
- `sign_flip_interval`: the interval of the mean from inverting the two one-sided sign-flip tests at
  (1 - level) / 2 each (Hartigan 1969: its ends are order statistics of the subset means). With n units it
  exists only when 2^-n <= (1 - level) / 2 (n >= 6 at 95%); otherwise an end is infinite.
- `t_interval`: Student's t interval of the mean, for comparison.
- `leave_one_out`: whether a decision survives dropping any single unit.
- `unit_level`: all of the above for one paired difference per unit, as a verdict states it.
- `monte_carlo_p`: (k + 1) / (N + 1) from a sampled null, ties counted as extreme.
- `benjamini_hochberg`: adjusted p-values across several tests (pairs, languages).
- `average_ranks`, `matrix_correlation`, `mantel_test`: ranks with ties averaged, the correlation of two
  dissimilarity matrices' upper triangles, and its Mantel test (Mantel 1967) by relabelling one matrix:
  exact over all k! relabellings when affordable (`relabel_exact`), else Monte Carlo (`relabel_mc`, or
  `restricted_perm_mc` within groups). Language distances and RSA both use it.
- `jackknife_interval`: the delete-a-block jackknife t interval from leave-one-block-out estimates.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

from xlsub.stats.workers import side_by_side

EXACT_LIMIT = 100_000  # enumerate the sign vectors up to this many (n <= 16)
ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass(frozen=True)
class TestResult:
    """A test's statistic, its p-value, the smallest p its null can give (`p >= p_floor`), the null's name
    (`sign_flip_exact`, `sign_flip_mc`) and the number of units."""

    __test__ = False  # not a pytest test class

    statistic: float
    p: float
    p_floor: float
    test: str
    n_units: int


def _values(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    return v


def _signs(n: int, n_perm: int, seed: int, max_exact: int) -> tuple[np.ndarray, bool]:
    """[configurations, n] sign vectors: all 2^n (row 0 all +1) when 2^n <= max_exact, else n_perm random ones."""
    if 2**n <= max_exact:
        codes = np.arange(2**n)[:, None] >> np.arange(n)[None, :]
        return 1.0 - 2.0 * (codes & 1), True
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n)), False


def _extreme(null: np.ndarray, observed: float, alternative: str, scale: float) -> np.ndarray:
    """Which null statistics are at least as extreme as the observed one (ties included, up to rounding)."""
    tol = 1e-12 * scale
    if alternative == "greater":
        return null >= observed - tol
    if alternative == "less":
        return null <= observed + tol
    return np.abs(null) >= abs(observed) - tol


def _sign_flip_p(v: np.ndarray, signs: np.ndarray, exact: bool, alternative: str) -> float:
    null = signs @ v / len(v)
    scale = max(float(np.abs(v).max()), 1e-300)
    k = int(_extreme(null, float(v.mean()), alternative, scale).sum())
    return k / len(signs) if exact else (k + 1) / (len(signs) + 1)


def sign_flip_test(values: Sequence[float], alternative: str = "greater", n_perm: int = 10_000, seed: int = 0,
                   max_exact: int = EXACT_LIMIT) -> TestResult:
    """Sign-flip (randomisation) test of mean(values) against 0 (Fisher 1935; Good 2005, 3.6).

    Statistic: the mean. `alternative`: "greater" (mean > 0), "less" or "two-sided" (|mean|). Exact over all
    2^n sign vectors when 2^n <= `max_exact` (p_floor 2^-n one-sided, 2^(1-n) two-sided); otherwise `n_perm`
    random sign vectors from `seed`, p = (k + 1) / (N + 1), p_floor 1 / (N + 1). Ties count as extreme.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    v = _values(values)
    signs, exact = _signs(len(v), n_perm, seed, max_exact)
    p = _sign_flip_p(v, signs, exact, alternative)
    if exact:
        floor = (2.0 if alternative == "two-sided" else 1.0) / len(signs)
        return TestResult(float(v.mean()), p, floor, "sign_flip_exact", len(v))
    return TestResult(float(v.mean()), p, 1.0 / (n_perm + 1), "sign_flip_mc", len(v))


def _lower_end(v: np.ndarray, signs: np.ndarray, exact: bool, alpha: float) -> float:
    """The smallest shift d whose one-sided ("greater") sign-flip test of v - d does not reject at alpha,
    by bisection: that test's p rises with d (it jumps at subset means of v)."""
    accepted = float(v.mean())  # v - mean has mean 0: p >= 1/2
    rejected = float(v.min()) - 1.0 - float(v.max() - v.min())  # every v - d > 0: p at its floor
    if _sign_flip_p(v - rejected, signs, exact, "greater") > alpha:
        return -math.inf
    scale = max(float(np.abs(v).max()), float(v.max() - v.min()), 1e-300)
    for _ in range(200):
        if accepted - rejected <= 1e-13 * scale:
            break
        middle = 0.5 * (accepted + rejected)
        if _sign_flip_p(v - middle, signs, exact, "greater") > alpha:
            accepted = middle
        else:
            rejected = middle
    return accepted


def sign_flip_interval(values: Sequence[float], level: float = 0.95, n_perm: int = 10_000, seed: int = 0,
                       max_exact: int = EXACT_LIMIT) -> tuple[float, float]:
    """The `level` interval of the mean from inverting two one-sided sign-flip tests (Hartigan 1969).

    The set of shifts d for which neither one-sided test of values - d ("greater", "less") rejects at
    (1 - level) / 2, found by bisection on the same sign vectors as `sign_flip_test` (exact or Monte Carlo).
    Valid when each value is symmetric about the mean. An end is -inf / +inf when no shift can be
    rejected: 2^-n > (1 - level) / 2, i.e. fewer than 6 units at 95%.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    v = _values(values)
    signs, exact = _signs(len(v), n_perm, seed, max_exact)
    alpha = (1 - level) / 2
    return _lower_end(v, signs, exact, alpha), -_lower_end(-v, signs, exact, alpha)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean: mean +- t_{n-1, (1+level)/2} s / sqrt(n); NaN for fewer than 2 values."""
    v = _values(values)
    if len(v) < 2:
        return math.nan, math.nan
    half = float(scipy.stats.t.ppf((1 + level) / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()) - half, float(v.mean()) + half


def leave_one_out(values: Sequence[float], decide: Callable[[np.ndarray], bool]) -> bool:
    """Whether `decide(values without unit i)` equals `decide(values)` for every unit i. False with fewer
    than two units (nothing is left to decide on)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return False
    decision = bool(decide(v))
    return all(bool(decide(np.delete(v, i))) == decision for i in range(len(v)))


@dataclass(frozen=True)
class UnitLevel:
    """A claim about units judged on their paired differences: the mean difference `value`, its interval
    (`sign_flip_interval`; an end is infinite where the units are too few), the one-sided sign-flip `p`
    (mean > 0) with its `p_floor` and `test`, `n_units`, and whether the decision (p < alpha and lo > 0)
    survives dropping any one unit."""

    value: float
    lo: float
    hi: float
    p: float
    p_floor: float
    test: str
    n_units: int
    robust_to_leave_one_out: bool


def unit_level(differences: Sequence[float], alpha: float = 0.05, level: float = 0.95, n_perm: int = 10_000,
               seed: int = 0) -> UnitLevel:
    """`sign_flip_test` ("greater"), `sign_flip_interval` and `leave_one_out` of one paired difference per
    unit (e.g. per language: subnetwork's gap minus its random masks' gap)."""
    v = _values(differences)

    def decide(x: np.ndarray) -> bool:
        return sign_flip_test(x, "greater", n_perm, seed).p < alpha and sign_flip_interval(x, level, n_perm, seed)[0] > 0

    test = sign_flip_test(v, "greater", n_perm, seed)
    lo, hi = sign_flip_interval(v, level, n_perm, seed)
    return UnitLevel(float(v.mean()), lo, hi, test.p, test.p_floor, test.test, len(v), leave_one_out(v, decide))


def monte_carlo_p(null: Sequence[float], observed: float, alternative: str = "greater") -> float:
    """(k + 1) / (N + 1), k the null statistics at least as extreme as `observed` (ties included): a valid
    p-value from N draws of the null (Davison & Hinkley 1997, 4.2)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    null = np.asarray(null, dtype=np.float64)
    scale = max(float(np.abs(null).max(initial=0.0)), abs(float(observed)), 1e-300)
    return (int(_extreme(null, float(observed), alternative, scale).sum()) + 1) / (len(null) + 1)


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg (1995) adjusted p-values, in the input order.

    With the m p-values sorted, p_(1) <= ... <= p_(m): q_(i) = min_{j >= i} min(1, m p_(j) / j) (step-up,
    so the adjusted values keep the p-values' order). Rejecting q <= alpha controls the false discovery
    rate at alpha for independent (or positively dependent) tests.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("pvalues must lie in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    result = np.empty(m)
    result[order] = adjusted
    return result


# -- ranks, the Mantel test and the block jackknife -------------------------------------------------------

def average_ranks(values) -> torch.Tensor:
    """Ranks 1..m along the last axis, ties given the mean of the ranks they span (scipy.stats.rankdata
    'average'), float64. Any leading axes are ranked independently; numpy input is read with torch.as_tensor
    (call `.numpy()` on the result for numpy code)."""
    values = torch.as_tensor(values)
    order = torch.argsort(values, dim=-1, stable=True)
    ordered = values.gather(-1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run = torch.cumsum(new, dim=-1) - 1  # which tie-run each sorted position belongs to
    position = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64).expand(ordered.shape)
    total = torch.zeros(ordered.shape, dtype=torch.float64).scatter_add_(-1, run, position)
    count = torch.zeros(ordered.shape, dtype=torch.float64).scatter_add_(-1, run, torch.ones_like(position))
    mean = total.gather(-1, run) / count.gather(-1, run)
    return torch.empty_like(mean).scatter_(-1, order, mean)


MANTEL_METHODS = ("spearman", "pearson")
# A null statistic within this much (times max(1, |observed|)) of the observed one is a tie: relabellings
# that map the matrix onto itself give the observed r again, summed in another order.
MANTEL_TIE = 1e-9
# Bytes of gathered entries per block of permutations in `permuted_cross` (small k), and of its row tiles (the
# gathered rows of every permutation and the same rows of every matrix; 4-128 MB measured alike at k = 5,000)
_MANTEL_BLOCK_BYTES = 2**26
_MANTEL_TILE_BYTES = 2**25
# Up to this many rows, `permuted_cross` gathers the upper-triangle pairs of a block of permutations in one
# indexing op (a python loop per permutation would dominate: 8! relabellings of 8 languages); above it, two
# index_selects per permutation and one product per block (RSA over hundreds of sentences).
_PAIR_GATHER_MAX_K = 64


@dataclass(frozen=True)
class MantelResult:
    """A Mantel test per leading index: `observed` r and `p_value` [...], the `null` r of every relabelling
    used [..., n_perm], `n_perm` (k! when exact), `p_floor` (the smallest p the null can give: 1 / k! exact,
    1 / (n_perm + 1) Monte Carlo) and `test` (`relabel_exact`, `relabel_mc`, `restricted_perm_mc`)."""

    __test__ = False  # not a pytest test class

    observed: torch.Tensor
    p_value: torch.Tensor
    null: torch.Tensor
    n_perm: int
    p_floor: float
    test: str
    # where True, p is the floor by a tail bound (`xlsub.similarity.rsa.mantel_test`) and `null` is NaN after the
    # first `pilot` permutations (none with the exact moments)
    tail_bound: torch.Tensor | None = None
    pilot: int = 0
    # where True, the cell stopped early as clearly null (`xlsub.similarity.permutation.sequential_null`): `null`
    # NaN after the permutations it used, p = h / L
    stopped: torch.Tensor | None = None
    # the exact permutation mean and sd of r (`xlsub.similarity.moments`), where computed: null_mean and null_std
    # of the cells that did not run every permutation (tail bound, stopped early)
    exact_null_mean: torch.Tensor | None = None
    exact_null_sd: torch.Tensor | None = None

    def _partial(self) -> torch.Tensor | None:
        if self.exact_null_mean is None:
            return None
        partial = torch.zeros(self.observed.shape, dtype=torch.bool, device=self.observed.device)
        for mask in (self.tail_bound, self.stopped):
            if mask is not None:
                partial = partial | mask
        return partial

    @property
    def null_mean(self) -> torch.Tensor:
        """The mean of the null values computed (all of them, or a cell's first ones where it stopped early), or
        the exact mean where a cell did not run every permutation and it is known."""
        sampled = self.null.nanmean(-1)
        partial = self._partial()
        return sampled if partial is None else torch.where(partial, self.exact_null_mean, sampled)

    @property
    def null_std(self) -> torch.Tensor:
        if self.n_perm <= 1:
            return torch.full_like(self.observed, math.nan)
        partial = self._partial()
        sampled = nanstd(self.null)
        return sampled if partial is None or self.exact_null_sd is None else torch.where(partial, self.exact_null_sd, sampled)


def nanstd(values: torch.Tensor) -> torch.Tensor:
    """The sample standard deviation (ddof=1) over the last axis with NaN entries left out; NaN below 2 values."""
    finite = values.isfinite()
    k = finite.sum(-1)
    squares = torch.where(finite, (values - values.nanmean(-1, keepdim=True)).square(), 0.0).sum(-1)
    return torch.where(k > 1, (squares / (k - 1).clamp_min(1)).sqrt(), math.nan)


def centred_upper(d, method: str) -> torch.Tensor:
    """The upper triangle (i < j) of dissimilarity matrices d [..., k, k], ranked (`average_ranks`) for
    Spearman, centred on its mean, written back as a symmetric matrix with zero diagonal, float64."""
    if method not in MANTEL_METHODS:
        raise ValueError(f"method must be one of {MANTEL_METHODS}, got {method!r}")
    d = torch.as_tensor(d).double()
    k = d.shape[-1]
    if method == "spearman" and d.dim() == 2 and (fast := _fast_centred_ranks(d)) is not None:
        return fast
    i, j = torch.triu_indices(k, k, offset=1)
    values = d[..., i, j]
    values = average_ranks(values) if method == "spearman" else values
    values = values - values.mean(-1, keepdim=True)
    out = torch.zeros_like(d)
    out[..., i, j] = values
    return out + out.mT


def _fast_centred_ranks(d: torch.Tensor) -> torch.Tensor | None:
    """`centred_upper(d, "spearman")` of one k x k matrix of finite values, bit for bit, in about a third of its
    time at k = 5,000 (`centred_ranks_`, on a copy). None where `value_order` has no fast path."""
    return centred_ranks_(d.clone(), fallback=False)


def upper_entries(d: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of d [..., n, n], row by row (`torch.triu_indices` order), [..., n (n - 1) / 2]:
    one slice per row, without the two int64 index arrays of advanced indexing (200 MB at n = 5,000) and in half
    the time of a boolean mask (0.07 s instead of 0.15 at n = 5,000). One matrix on the CPU: copied row by row by a
    compiled loop, the rows in parts side by side (`xlsub.stats.compiled_sort.upper_triangle`; no list of 5,000 views
    to concatenate)."""
    n = d.shape[-1]
    if n < 2:
        return d.new_empty(*d.shape[:-2], 0)
    if d.dim() == 2 and on_cpu(d) and d.dtype in _NUMPY_TYPES and not d.requires_grad:
        from xlsub.stats import compiled_sort

        out = torch.empty(n * (n - 1) // 2, dtype=d.dtype)
        compiled_sort.upper_triangle(d.numpy(), out.numpy(), torch.get_num_threads())
        return out
    return torch.cat([d[..., i, i + 1:] for i in range(n - 1)], -1)


# dtypes `upper_entries` copies by its compiled loop (numpy's own)
_NUMPY_TYPES = (torch.float64, torch.float32, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def centred_ranks_(d: torch.Tensor, fallback: bool = True) -> torch.Tensor | None:
    """`centred_upper(d, "spearman")` of one k x k float64 matrix written over d itself (a caller's temporary
    RDM), bit for bit: one sort of packed keys (`value_order`, its buffers in d's own storage once the triangle
    is copied out: at k = 5,000 each fresh 100 MB buffer costs more in page faults than the arithmetic in it),
    the ranks 1..m written once into the extracted triangle (tie runs, rare in continuous dissimilarities, given
    the mean of their ranks as `average_ranks` does: a half-integer, exact), and the triangle moved back by a
    mask, to both halves; on the CPU the ranks are centred as they are written and the triangle moved back by
    compiled loops in parts side by side (`xlsub.stats.compiled_sort.centred_ranks_into`, `fill_symmetric`). Where
    `value_order` has no fast path: `centred_upper`'s result copied into d, or None with fallback=False (d unchanged)."""
    values = upper_entries(d)
    m = len(values)
    scratch = d.view(-1)[:2 * m].view(2, m) if d.is_contiguous() else None
    found = value_order(values, scratch)
    if found is None:
        return d.copy_(centred_upper(d, "spearman")) if fallback else None
    order, runs = found
    if on_cpu(d) and d.is_contiguous():  # compiled: the centred ranks into the triangle, the triangle into both halves
        from xlsub.stats import compiled_sort

        centre = (m + 1) / 2  # the mean of 1..m, also with tie runs averaged (exact: the sum is an integer below 2^53)
        compiled_sort.centred_ranks_into(order.numpy(), centre, values.numpy(), torch.get_num_threads())
        for start, stop in runs.tolist():
            values[order[start:stop]] = (start + 1 + stop) / 2 - centre
        compiled_sort.fill_symmetric(values.numpy(), d.numpy(), torch.get_num_threads())
        return d
    ranks = (torch.empty_like(values) if scratch is None else scratch[1]).copy_(_arange(m, d.device)).add_(1.0)  # 1..m; value_order is done with scratch[1]
    ranks = values.index_copy_(0, order, ranks)
    for start, stop in runs.tolist():
        ranks[order[start:stop]] = (start + 1 + stop) / 2
    ranks -= ranks.mean()
    upper = torch.ones(d.shape, dtype=torch.bool, device=d.device).triu_(1)
    d.masked_scatter_(upper, ranks)
    d.mT.masked_scatter_(upper, ranks)
    d.diagonal().zero_()
    return d


_ARANGE: list[torch.Tensor] = [torch.arange(0)]


def _arange(m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """0..m-1 (int64), on the CPU kept for the next call of the same or a smaller size: ranking 250 RDMs of 12.5M
    entries would otherwise fault in a fresh 100 MB index twice each."""
    if torch.device(device).type != "cpu":
        return torch.arange(m, device=device)
    if len(_ARANGE[0]) < m:
        _ARANGE[0] = torch.arange(m)
    return _ARANGE[0][:m]


def untied_order(values: torch.Tensor) -> torch.Tensor | None:
    """The ascending order of a 1-D float tensor, or None where two of its values are equal (ties) or it has
    non-finite values. Without ties the order is unique, so it is `torch.argsort`'s."""
    found = value_order(values)
    return None if found is None or len(found[1]) else found[0]


RADIX_MIN = 1 << 16  # `value_order`: from this many values the compiled radix sort (`xlsub.stats.compiled_sort`)


def value_order(values: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(order, runs) of a 1-D tensor of finite floats: an ascending order (equal values in any order) and the
    runs of equal values, int64 [r, 2] (start, stop) of sorted positions; None for non-finite values or more
    than 2^31 values (callers then sort the floats).

    One sort of int64 keys: each value's fixed-point position in [min, max] (k bits, a non-decreasing function of
    the value) above its index (the low bits), so the sorted keys carry the order. From `RADIX_MIN` values the keys
    are made, sorted (scattered into buckets by their top bits, each bucket radix-sorted in cache) and unpacked by
    compiled loops (`xlsub.stats.compiled_sort`: 12.5M keys made and sorted in 0.10 s on 2 vCPUs of a Xeon held to AVX2;
    seven 5,000-sentence rank matrices 3.16 s against 4.92 s with numpy's sort of the keys, `benchmarks/jackknife.py`);
    fewer are sorted by numpy, the same order. Values sharing a fixed-point key (a few hundred of
    12.5M) are then ordered by value within their run, and only they can be equal.
    `scratch` (float64 [2, m], not `values`' memory): the buffers to work in; the order is then a view of
    scratch[0], valid until the caller writes there. Values on a GPU: `sorted_order` (torch's sort, fast there)."""
    if not on_cpu(values):
        return sorted_order(values)
    m = len(values)
    index_bits = max(1, (m - 1).bit_length())
    key_bits = min(52, 63 - index_bits)  # exact integers in float64, and key << index_bits within int64
    v = values.detach().contiguous().numpy()
    no_runs = torch.empty(0, 2, dtype=torch.long)
    if m < 2:
        return torch.arange(m), no_runs
    # Python floats: from float32 values numpy 2 would keep the scale below in float32 (NEP 50), and its rounding up
    # would carry the largest keys past their bits into the sign (the order wrong for float32 rank matrices)
    lo, hi = float(v.min()), float(v.max())
    if key_bits < 32 or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    if hi == lo:
        return torch.arange(m), torch.tensor([[0, m]])
    work = np.empty((2, m)) if scratch is None else scratch.numpy()
    keys, packed = work[0], work[1].view(np.int64)
    scale = float(2**key_bits - 2) / (hi - lo)
    if m >= RADIX_MIN:  # the order into scratch[0], the fixed-point keys into scratch[1]
        from xlsub.stats import compiled_sort

        threads = torch.get_num_threads()
        ordered = compiled_sort.radix_sorted(v, lo, scale, index_bits, key_bits, packed, keys.view(np.int64), threads)
        order = keys.view(np.int64)
        if not compiled_sort.unpack(ordered, index_bits, order, packed, threads):
            return torch.from_numpy(order), no_runs
    else:
        np.subtract(v, lo, out=keys, dtype=np.float64)  # float32 values too: float64 arithmetic, as the compiled keys
        keys *= scale
        np.copyto(packed, keys, casting="unsafe")  # truncation: the fixed-point key
        packed <<= index_bits
        packed |= _arange(m).numpy()
        packed.sort()
        order = np.bitwise_and(packed, (1 << index_bits) - 1, out=keys.view(np.int64))  # into scratch[0]; the keys stay in scratch[1]
        packed >>= index_bits
    same = packed[1:] == packed[:-1]  # sorted position p shares its key with p + 1
    if not same.any():
        return torch.from_numpy(order), no_runs
    pairs = np.flatnonzero(same)
    at = np.union1d(pairs, pairs + 1)  # every sorted position in a run of equal keys, ascending
    starts = np.ones(len(at), dtype=bool)
    starts[1:] = ~((at[1:] == at[:-1] + 1) & same[at[1:] - 1])
    run = np.cumsum(starts)
    members = order[at]
    members = members[np.lexsort((v[members], run))]  # by value within each run; the runs keep their positions
    order[at] = members
    value = v[members]
    tied = at[:-1][(value[1:] == value[:-1]) & (run[1:] == run[:-1])]  # sorted position p equals p + 1
    if not len(tied):
        return torch.from_numpy(order), no_runs
    first = np.ones(len(tied), dtype=bool)
    first[1:] = tied[1:] != tied[:-1] + 1
    last = np.ones(len(tied), dtype=bool)
    last[:-1] = tied[1:] != tied[:-1] + 1
    return torch.from_numpy(order), torch.from_numpy(np.stack([tied[first], tied[last] + 2], 1))


def on_cpu(values: torch.Tensor) -> bool:
    """Whether these values are on the CPU, where numpy and compiled loops may read them: `value_order` sorts them with
    numpy rather than torch, and `matrix_dots` sums their products in a compiled loop."""
    return values.device.type == "cpu"


def sorted_order(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`value_order` by torch's stable sort of the floats, on their device: the order, and the runs of equal
    neighbours in it (the same runs as `value_order`'s); None for non-finite values."""
    m = len(values)
    if not bool(values.isfinite().all()):
        return None
    ordered, order = torch.sort(values, stable=True)
    edges = torch.zeros(m + 1, dtype=torch.int8, device=values.device)
    edges[1:m] = ordered[1:] == ordered[:-1]  # edges[p + 1]: sorted position p equals p + 1
    steps = edges[1:] - edges[:-1]
    return order, torch.stack([(steps == 1).nonzero().reshape(-1), (steps == -1).nonzero().reshape(-1) + 1], 1)


def upper_norm(m: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each matrix in m [..., k, k] (of `centred_upper`, the root of its sum of squares),
    float64; float32 matrices (exact ranks stored at half the size) summed in float64 a tile of rows at a time.
    A list of [k, k] matrices: [len]."""
    if not isinstance(m, torch.Tensor):
        return torch.stack([upper_norm(one) for one in m]) if len(m) else torch.zeros(0, dtype=torch.float64)
    if m.dtype == torch.float64:
        return torch.linalg.vector_norm(m, dim=(-2, -1))
    if m.dim() == 3:  # each matrix against itself (by the compiled loop where it applies)
        return torch.stack([matrix_dots(one, one) for one in m]).sqrt() if len(m) else torch.zeros(0, dtype=torch.float64, device=m.device)
    return matrix_dots(m, m).sqrt()


def _compiled_dots(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `matrix_dots` takes the compiled loop (`xlsub.stats.compiled_dots`): one float32 [k, k] matrix against
    float32 [k, k] or [m, k, k], contiguous, on the CPU."""
    return (a.dim() == 2 and b.dim() in (2, 3) and a.dtype == b.dtype == torch.float32 and on_cpu(a) and on_cpu(b)
            and a.shape == b.shape[-2:] and a.is_contiguous() and b.is_contiguous() and a.shape[-1] > 0)


def matrix_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_ij A_ij B_ij of matrices a, b [..., k, k] (leading axes broadcast), float64 [...], accumulated in
    float64 a tile of rows at a time: no [..., k, k] temporary (one reference against seven 5,000-sentence
    languages would make a 1.4 GB one), and float32 operands converted tile by tile; one float32 matrix against
    float32 ones on the CPU by a compiled loop that reads each once (`xlsub.stats.compiled_dots`, the same sums up to
    float64 rounding). b may be a list of [k, k] matrices against one a: [len]."""
    if not isinstance(b, torch.Tensor):
        return torch.stack([matrix_dots(a, one) for one in b]) if len(b) else torch.zeros(0, dtype=torch.float64, device=a.device)
    if _compiled_dots(a, b):  # one float32 matrix against one or several, on the CPU: each read once
        from xlsub.stats.compiled_dots import row_dots

        many, k = b.reshape(-1, *b.shape[-2:]).numpy(), a.shape[-1]
        parts = [(part[0], part[-1] + 1) for part in torch.arange(k).tensor_split(min(k, torch.get_num_threads())) if len(part)]
        sums = np.zeros((len(parts), len(many)))
        side_by_side(lambda p: row_dots(a.numpy(), many, int(parts[p][0]), int(parts[p][1]), sums[p]), range(len(parts)))
        return torch.from_numpy(sums.sum(0)).reshape(b.shape[:-2])
    k = a.shape[-1]
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    total = torch.zeros(lead, dtype=torch.float64, device=a.device)
    rows = max(1, _MANTEL_TILE_BYTES // (8 * k * max(1, lead.numel())))
    for start in range(0, k, rows):
        tile = slice(start, start + rows)
        total += (a[..., tile, :].double() * b[..., tile, :].double()).sum((-2, -1))
    return total


def matrix_correlation(x, y, method: str = "spearman") -> torch.Tensor:
    """Spearman (average ranks) or Pearson correlation of the upper triangles (i < j) of dissimilarity
    matrices x, y [..., k, k] (leading axes broadcast), [...] float64; NaN where a triangle is constant.
    The Mantel statistic (Mantel 1967); RSA's with 1 - cosine matrices (Kriegeskorte et al. 2008)."""
    a, b = centred_upper(x, method), centred_upper(y, method)
    return (a * b).sum((-2, -1)) / (upper_norm(a) * upper_norm(b))


def _pair_index(inverse: torch.Tensor, k: int) -> torch.Tensor:
    """The flat indices q(i) k + q(j) of the upper-triangle pairs i < j for every row q of `inverse`, [P, pairs]."""
    i, j = torch.triu_indices(k, k, offset=1, device=inverse.device)
    return inverse.index_select(1, i) * k + inverse.index_select(1, j)


def permuted_cross_reads_upper(a: torch.Tensor) -> bool:
    """Whether `permuted_cross(a, bs, ...)` takes its compiled loop for float32, contiguous bs on a's device (a float32
    A on the CPU, above the pair gather's size), which reads only the diagonal and strict upper triangle of each B, so
    that a caller may leave their lower triangles unwritten. `permuted_cross` chooses its path by this test."""
    return a.dtype == torch.float32 and on_cpu(a) and a.is_contiguous() and a.shape[-1] > _PAIR_GATHER_MAX_K


def permuted_cross(a: torch.Tensor, bs, perms: torch.Tensor, pairs: torch.Tensor | None = None,
                   select: torch.Tensor | None = None) -> torch.Tensor:
    """sum_ij A_ij B_p(i)p(j) for every B in bs [m, k, k] or a list of m [k, k] (or the matrices `select` of
    them) and every permutation p, [m, P] float64 (A, B symmetric; A and bs float64, or float32: centred ranks in
    `xlsub.similarity.rsa.rank_dtype`, exact, or Gram matrices; a float32 A is gathered at half the memory traffic,
    each gathered value widened to float64, and the products of the float32 values are summed in float64).

    The same sum is sum_ij A_q(i)q(j) B_ij with q = p^-1, so A is gathered once per permutation and meets all
    m matrices: one k^2 gather per permutation however many matrices share the reference (one language against
    all the others). For small k the upper-triangle pairs of all permutations are gathered at once (`pairs`:
    their `_pair_index`, when already built). Above that, a tile of rows i at a time: the tile's gathered rows
    of every permutation [P, rows, k] meet the same rows of every B in one float64 product, so each B is read
    once for all P permutations (not once per permutation: at k = 5,000 a B is 200 MB) and the buffers stay a
    few MB whatever k and P. A float32 A against float32 Bs on the CPU: a compiled loop instead
    (`xlsub.stats.compiled_dots.permuted_dots`: the upper triangle, 8 permutations' gathered rows against each row of
    the Bs while it is in the cache, the rows split between the threads in parts of about equal work).
    """
    k, on = a.shape[-1], {"device": a.device}
    perms = perms.to(a.device)
    which = torch.arange(len(bs), **on) if select is None else torch.as_tensor(select, dtype=torch.long, **on)
    out = torch.zeros(len(which), len(perms), dtype=torch.float64, **on)
    if k <= _PAIR_GATHER_MAX_K:
        pairs = _pair_index(torch.argsort(perms, dim=1), k) if pairs is None else pairs.to(a.device)
        i, j = torch.triu_indices(k, k, offset=1, **on)
        flat_a, upper_b = a.reshape(-1).double(), torch.stack([bs[w][i, j].double() for w in which.tolist()])
        block = max(1, min(len(perms), _MANTEL_BLOCK_BYTES // (16 * max(1, len(i)))))
        for start in range(0, len(perms), block):
            chunk = pairs[start:start + block]
            out[:, start:start + len(chunk)] = 2.0 * (upper_b @ flat_a[chunk].mT)
        diagonal_b = torch.stack([bs[w].diagonal().double() for w in which.tolist()]) if len(which) else None
        if diagonal_b is not None and diagonal_b.any():  # sum_i A_ii B_p(i)p(i)
            out += diagonal_b[:, perms] @ a.diagonal().double()
        return out
    if not len(perms) or not len(which):
        return out
    inverse = torch.argsort(perms, dim=1)
    matrices = [bs[w] for w in which.tolist()]
    if permuted_cross_reads_upper(a) and all(b.dtype == torch.float32 and b.device == a.device and b.is_contiguous() for b in matrices):
        from numba.typed import List

        from xlsub.stats.compiled_dots import permuted_dots
        from xlsub.stats.compiled_sort import row_parts

        parts = row_parts(k, torch.get_num_threads())
        sums = np.zeros((len(parts), len(which), len(perms)))
        reference, qs, others = a.numpy(), inverse.to(torch.int32).numpy(), List()
        for b in matrices:  # read in place, however they are held (stacked or a list)
            others.append(b.numpy())
        side_by_side(lambda part: permuted_dots(reference, qs, others, *parts[part], sums[part]), range(len(parts)))
        return torch.from_numpy(sums.sum(0))
    del matrices
    everything = select is None or torch.equal(which, torch.arange(len(bs), **on))
    # else the tile's rows are picked, stacked or converted into `picked`
    in_place = everything and isinstance(bs, torch.Tensor) and bs.dtype == torch.float64
    chosen = which.tolist()

    def part(qs: torch.Tensor) -> torch.Tensor:  # the sums of the permutations qs (inverses), [len(which), len(qs)]
        sums = torch.zeros(len(which), len(qs), dtype=torch.float64, **on)
        rows = max(1, min(k, _MANTEL_TILE_BYTES // (8 * k * (len(qs) + len(which)))))
        gathered = torch.empty(len(qs), rows, k, dtype=torch.float64, **on)
        narrow = None if a.dtype == torch.float64 else torch.empty(rows, k, dtype=a.dtype, **on)
        picked = None if in_place else torch.empty(len(which), rows, k, dtype=torch.float64, **on)
        for start in range(0, k, rows):
            stop = min(k, start + rows)
            tile = gathered[:, :stop - start]
            for n, q in enumerate(qs):
                if narrow is None:
                    torch.index_select(a.index_select(0, q[start:stop]), 1, q, out=tile[n])
                else:
                    tile[n].copy_(torch.index_select(a.index_select(0, q[start:stop]), 1, q, out=narrow[:stop - start]))
            if in_place:
                b = bs[:, start:stop]
            else:
                b = picked[:, :stop - start]
                for row, w in enumerate(chosen):
                    b[row].copy_(bs[w][start:stop])
            sums.addmm_(b.reshape(len(which), -1), tile.reshape(len(qs), -1).mT)
        return sums

    # the permutations split between the cores, one torch thread each (`xlsub.stats.workers`: the gathers scale
    # better so than inside each index_select); a permutation's sum does not depend on the others in its part
    workers = max(1, min(torch.get_num_threads(), len(perms)))
    return torch.cat(side_by_side(part, inverse.tensor_split(workers)), 1)


@functools.lru_cache(maxsize=2)
def _all_permutations(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every permutation of range(k), [k!, k] int64, the identity first, and their `_pair_index`: built once
    per k and shared by the tests of one analysis (every distance against every matrix on the same languages)."""
    perms = torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long).reshape(-1, k)
    return perms, _pair_index(torch.argsort(perms, dim=1), k)


def mantel_test(x, y, sample=None, groups=None, method: str = "spearman", alternative: str = "greater",
                max_exact: int = EXACT_LIMIT, *, centred: bool = False) -> MantelResult:
    """Mantel (1967) test of `matrix_correlation(x, y, method)` for dissimilarity matrices x, y [..., k, k].

    Null: y's rows and columns relabelled jointly by a permutation (which pairs which is arbitrary under
    H0). A relabelling only reorders the pairs, so the ranks of the permuted triangle are the permuted ranks
    and each null r is a dot product of the centred matrices (`permuted_cross`), O(k^2). Every one of the
    k! relabellings when k! <= max(len(sample), max_exact) and there are no `groups` (`relabel_exact`:
    p = share at least as extreme, the identity included, p_floor 1 / k!; k <= 8 at `EXACT_LIMIT`); else
    the rows of `sample`, [N, k] random permutations the caller draws with
    `xlsub.similarity.permutation.permutations(k, N, seed, groups)` (`relabel_mc`, or `restricted_perm_mc`
    with `groups`, whose permutations must keep every row within its group, e.g. sentences of equal source
    length), p = (1 + count) / (1 + N) (Davison & Hinkley 1997, 4.2). The caller draws them because this
    module stays free of the similarity package: stages that only need sign flips import it.
    `alternative`: "greater" (r above chance), "less" or "two-sided" (|r|). Ties (within 1e-9) count as
    extreme; r and p are NaN where a triangle is constant. Leading axes broadcast; one x against several
    y [m, k, k] gathers x once per permutation for all m, with the same permutations for every index.
    `centred`: x and y are already `centred_upper(., method)` of the dissimilarity matrices (a caller that
    builds them one at a time, as RSA does for 5,000 sentences, holds one copy instead of two).
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if centred and isinstance(y, list):  # the languages' rank matrices, each its own tensor
        y = torch.stack(y)
    a, b = (torch.as_tensor(x).double(), torch.as_tensor(y).double()) if centred else (centred_upper(x, method), centred_upper(y, method))
    k = a.shape[-1]
    sample = None if sample is None else torch.as_tensor(np.asarray(sample), dtype=torch.long)
    if sample is not None and (sample.ndim != 2 or sample.shape[1] != k):
        raise ValueError(f"sample must be [N, {k}] permutations, got shape {tuple(sample.shape)}")
    exact = groups is None and math.factorial(k) <= max(0 if sample is None else len(sample), max_exact)
    if exact:
        perms, pairs = _all_permutations(k)
    elif sample is None:
        raise ValueError(f"{k}! relabellings are too many to enumerate: pass sample=permutations(k, n_perm, seed, groups)")
    else:
        perms, pairs = sample, None
        if groups is not None:
            codes = torch.as_tensor(np.asarray(groups)).reshape(-1)
            if len(codes) != k or not torch.equal(codes[perms], codes.expand_as(perms)):
                raise ValueError("sample: a permutation moves a row out of its group; draw it with the same groups")
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    flat_b = b.expand(*lead, k, k).reshape(-1, k, k)
    if a.shape[:-2].numel() == 1:  # one reference for every y: gathered once per permutation
        cross = permuted_cross(a.reshape(k, k), flat_b, perms, pairs)
    else:
        flat_a = a.expand(*lead, k, k).reshape(-1, k, k)
        cross = torch.cat([permuted_cross(one_a, one_b[None], perms, pairs) for one_a, one_b in zip(flat_a, flat_b)])
    norms = (upper_norm(a) * upper_norm(b)).expand(lead).reshape(-1, 1)
    null = (cross / norms).reshape(*lead, len(perms))
    observed = ((a * b).sum((-2, -1)) / (upper_norm(a) * upper_norm(b))).expand(lead)
    tie = MANTEL_TIE * observed.abs().clamp_min(1.0)[..., None]
    if alternative == "greater":
        extreme = null >= observed[..., None] - tie
    elif alternative == "less":
        extreme = null <= observed[..., None] + tie
    else:
        extreme = null.abs() >= observed.abs()[..., None] - tie
    count = extreme.sum(-1).double()
    used = len(perms)
    p = count / used if exact else (count + 1) / (used + 1)
    p = torch.where(observed.isnan(), math.nan, p)
    test = "relabel_exact" if exact else "relabel_mc" if groups is None else "restricted_perm_mc"
    return MantelResult(observed, p, null, used, 1.0 / used if exact else 1.0 / (used + 1), test)


def jackknife_interval(estimate, leave_out, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The delete-a-block jackknife interval (Efron & Tibshirani 1993, 11.5): estimate +- t_{B-1, (1+level)/2}
    SE with SE = sqrt((B-1)/B sum_b (theta_b - mean theta)^2), theta_b = `leave_out[..., b]` the estimate
    without block b, over the last axis of B blocks. Returns (lo, hi), each [...] float64."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    theta = torch.as_tensor(leave_out, dtype=torch.float64)
    blocks = theta.shape[-1]
    se = ((blocks - 1) / blocks * (theta - theta.mean(-1, keepdim=True)).square().sum(-1)).sqrt()
    half = float(scipy.stats.t.ppf((1 + level) / 2, blocks - 1)) * se
    estimate = torch.as_tensor(estimate, dtype=torch.float64)
    return estimate - half, estimate + half


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's (1927) score interval of a binomial proportion: successes out of n independent 0/1 trials.

    (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = successes / n, z the (1+level)/2 normal
    quantile. Unlike the Wald (and the percentile bootstrap of the mean, which tracks it) it stays inside
    [0, 1] and keeps its coverage near 0 and 1 (Brown, Cai & DasGupta 2001): at 0 successes it is
    [0, z^2 / (n + z^2)], not a point. NaN for n = 0.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n ({n}), got {successes}")
    z = float(scipy.stats.norm.ppf((1 + level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_indices(n: int, replicates: int, seed: int) -> torch.Tensor:
    """[replicates, n] unit indices drawn with replacement, `torch.randint` from a generator seeded with `seed`:
    the one resampling of every bootstrap in the project (test chunks, sentences)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (replicates, n), generator=generator)


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 quantiles of bootstrap replicates (torch's linear interpolation,
    numpy's default; Efron & Tibshirani 1993, 13.3)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    values = torch.as_tensor(values).double()
    alpha = (1 - level) / 2
    return float(torch.quantile(values, alpha)), float(torch.quantile(values, 1 - alpha))


def bootstrap_mean_interval(values: Sequence[float], replicates: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of independent units (sentences): replicate b is the mean of
    values[`bootstrap_indices`(n, replicates, seed)[b]]; `percentile_interval` of the replicates. For a
    statistic that is a mean over units, where duplicating a unit only reweights it. NaN for no values."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    if v.numel() == 0:
        return math.nan, math.nan
    return percentile_interval(v[bootstrap_indices(v.numel(), replicates, seed)].mean(1), level)
