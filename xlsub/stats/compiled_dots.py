"""Compiled loops (numba) for sums of products of float32 matrices on the CPU, accumulated in float64.

`row_dots`, for `xlsub.stats.inference.matrix_dots`: one matrix against each of several (RSA's reference rank matrix
against every language's or planted draw's, and each against itself for its norm).

torch's tile-by-tile path widens both tiles to float64, multiplies them into a third and sums it: four passes over
memory per tile. Here each row of the first matrix meets the same row of every other matrix while it is in the cache,
each product is formed in float64 and summed at once, so each matrix is read once; the rows are split between the
threads. The sums are torch's up to float64 rounding: the values of exact rank matrices (multiples of 1/2 below
2^23) have exact float64 products, accumulated in another order. Measured side by side in `benchmarks/jackknife.py`.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def row_dots(a: np.ndarray, bs: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    """out[w] = sum_ij a[i, j] bs[w, i, j] over the rows start <= i < stop, in float64, for float32 a [k, k] and
    bs [m, k, k] (C-contiguous): callers split the rows between threads and add their parts."""
    k, m = a.shape[1], bs.shape[0]
    for w in range(m):
        out[w] = 0.0
    for i in range(start, stop):
        row = a[i]
        for w in range(m):
            other = bs[w, i]
            total = 0.0
            for j in range(k):
                total += np.float64(row[j]) * np.float64(other[j])
            out[w] += total


PERMUTATIONS_AT_ONCE = 8  # `permuted_dots`: gathered rows that meet each row of the Bs together


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def permuted_dots(a: np.ndarray, qs: np.ndarray, bs, start: int, stop: int, out: np.ndarray) -> None:
    """out[w, p] = sum over start <= i < stop and all j of a[q_i, q_j] bs[w][i, j] (q = qs[p]) in float64, for
    symmetric float32 a [k, k] and bs a `numba.typed.List` of m symmetric float32 [k, k] (all C-contiguous), qs int32
    [P, k]: the diagonal term and twice the strict upper triangle's. Callers split the rows between threads
    (`xlsub.stats.compiled_sort.row_parts`: parts of about equal entries) and add their parts. Each gathered row of a
    is first copied whole, in order (at k = 5,000 a is 100 MB, and a row read at random positions fetched its cache
    lines from memory one at a time): 23.4 -> 16.7 ms a permutation for one B at k = 5,000, 5.6 -> 4.8 ms a B for seven."""
    n_perm, k = qs.shape
    m = len(bs)
    at_once = PERMUTATIONS_AT_ONCE
    gathered = np.zeros((at_once, k), np.float32)
    row = np.empty(k, np.float32)
    diagonal = np.zeros(at_once, np.float64)
    for w in range(m):
        for p in range(n_perm):
            out[w, p] = 0.0
    for i in range(start, stop):
        for first in range(0, n_perm, at_once):
            last = min(n_perm, first + at_once)
            for p in range(first, last):
                q = qs[p]
                source = a[q[i]]
                for j in range(k):  # the row copied in order first: the gather below then reads the cache, not memory at random
                    row[j] = source[j]
                into = gathered[p - first]
                for j in range(i + 1, k):
                    into[j] = row[q[j]]
                diagonal[p - first] = row[q[i]]
            for p in range(last - first, at_once):  # a last group of fewer permutations: zero rows
                gathered[p, i + 1:] = 0.0
                diagonal[p] = 0.0
            # the rows' parts from i + 1 on as slices: indices from 0, which the compiler knows are not negative, so the
            # loop below is vectorized (indexing from i + 1 kept numba's negative-index wraparound in it: 2.4x slower)
            g0, g1, g2, g3 = gathered[0, i + 1:], gathered[1, i + 1:], gathered[2, i + 1:], gathered[3, i + 1:]
            g4, g5, g6, g7 = gathered[4, i + 1:], gathered[5, i + 1:], gathered[6, i + 1:], gathered[7, i + 1:]
            for w in range(m):
                other = bs[w][i, i + 1:]
                t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
                for j in range(len(other)):
                    b = np.float64(other[j])
                    t0 += np.float64(g0[j]) * b
                    t1 += np.float64(g1[j]) * b
                    t2 += np.float64(g2[j]) * b
                    t3 += np.float64(g3[j]) * b
                    t4 += np.float64(g4[j]) * b
                    t5 += np.float64(g5[j]) * b
                    t6 += np.float64(g6[j]) * b
                    t7 += np.float64(g7[j]) * b
                sums = (t0, t1, t2, t3, t4, t5, t6, t7)
                own = np.float64(bs[w][i, i])
                for p in range(first, last):
                    out[w, p] += diagonal[p - first] * own + 2.0 * sums[p - first]
