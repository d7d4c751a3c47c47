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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

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
