"""A compiled loop (numba) for `xlsub.stats.inference.matrix_dots` of float32 matrices on the CPU: one matrix against
each of several (RSA's reference rank matrix against every language's or planted draw's, and each against itself for
its norm).

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
