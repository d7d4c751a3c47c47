"""A compiled loop (numba) for translation retrieval's screened rows on the CPU (`xlsub.similarity.retrieval`).

Each row of a screened block (bfloat16 or float32 cosines of one sentence against every sentence of the other
language) is read once to find its largest value and once more to collect its candidates: every column within the
row's margin of that value (`retrieval.screen_margins`, the same float64 operations). A single candidate answers the
row; several are compared by their float64 cosines, each a dot product of the two unit rows, whatever their number.
The torch path instead takes each row's 8 largest values (`topk`), rechecks rows with 2 to 7 candidates by a gather
and rows with 8 or more by a float32 product against every sentence, then float64 where close.

The float64 dots are summed in a fixed order (`_dot`, no reassociation by the compiler), so identical rows have
identical cosines and a tie with a copy is found as a tie. Measured side by side in `benchmarks/retrieval.py`.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum_k a[k] b[k] in float64, in eight interleaved partial sums added in a fixed order: the same rounding for
    the same operands wherever they lie in memory, four to eight times the speed of one running sum."""
    d = len(a)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    k = 0
    while k + 8 <= d:
        s0 += a[k] * b[k]
        s1 += a[k + 1] * b[k + 1]
        s2 += a[k + 2] * b[k + 2]
        s3 += a[k + 3] * b[k + 3]
        s4 += a[k + 4] * b[k + 4]
        s5 += a[k + 5] * b[k + 5]
        s6 += a[k + 6] * b[k + 6]
        s7 += a[k + 7] * b[k + 7]
        k += 8
    rest = 0.0
    while k < d:
        rest += a[k] * b[k]
        k += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) + rest


@numba.njit(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
def _largest(values: np.ndarray) -> float:
    """The largest of finite float32 values, in 16 running maxima (a maximum rounds nothing, so the order of the
    comparisons does not change it)."""
    lanes = np.full(16, -np.inf, np.float32)
    k = 0
    while k + 16 <= len(values):
        for t in range(16):
            lanes[t] = max(lanes[t], values[k + t])
        k += 16
    best = lanes.max()
    for j in range(k, len(values)):
        best = max(best, values[j])
    return best


@numba.njit(nogil=True, cache=True)
def _count_at_least(values: np.ndarray, floor: float) -> int:
    """How many values are >= floor (compared in float64), in a branch-free pass."""
    count = 0
    for j in range(len(values)):
        count += np.float64(values[j]) >= floor
    return count


@numba.njit(nogil=True, cache=True)
def _answer(values: np.ndarray, top: float, x_row: np.ndarray, y_unit: np.ndarray, x_rounding: float, y_rounding: float,
            u: float, accumulation: float, worst: float, output: bool, candidates: np.ndarray) -> int:
    """The float64 nearest column of one screened row `values` (float32 [n], its largest `top`), or -1 on a tie."""
    inputs = x_rounding + y_rounding + x_rounding * y_rounding + accumulation
    rounded = u * (abs(top) + 3 * worst) if output else 0.0
    floor = top - min(2 * (inputs * (1 + u) + rounded), 2 * worst)
    count = _count_at_least(values, floor)
    if count == 1:
        for j in range(len(values)):
            if np.float64(values[j]) >= floor:
                return j
    count = 0
    for j in range(len(values)):
        if np.float64(values[j]) >= floor:
            candidates[count] = j
            count += 1
    first, second, where = -np.inf, -np.inf, -1
    for c in candidates[:count]:
        dot = _dot(x_row, y_unit[c])
        if dot > first:
            first, second, where = dot, first, c
        elif dot > second:
            second = dot
    return where if first > second else -1


@numba.njit(nogil=True, cache=True)
def nearest_bfloat16(bits: np.ndarray, x_unit: np.ndarray, y_unit: np.ndarray, x_rounding: np.ndarray, y_rounding: float,
                     u: float, accumulation: float, worst: float, start: int, stop: int, out: np.ndarray) -> None:
    """out[i] for the rows start <= i < stop of a bfloat16 screen given as its bits (int16 [r, n]): bfloat16 is the
    upper half of a float32, so each value is its bits shifted up 16."""
    n = bits.shape[1]
    wide = np.empty(n, np.uint32)
    values = wide.view(np.float32)
    candidates = np.empty(n, np.int64)
    flip = np.int16(0x7FFF)
    largest = np.empty(1, np.uint32)
    for i in range(start, stop):
        row = bits[i]
        best = np.int16(-32768)
        for j in range(n):
            x = row[j]
            wide[j] = np.uint32(np.uint16(x)) << 16
            best = max(best, x ^ ((x >> 15) & flip))  # a finite bfloat16's order is this integer's (-0 below +0)
        largest[0] = np.uint32(np.uint16(best ^ ((best >> 15) & flip))) << 16  # the largest value's bits, read as a float32
        out[i] = _answer(values, np.float64(largest.view(np.float32)[0]), x_unit[i], y_unit, x_rounding[i], y_rounding, u, accumulation, worst, True, candidates)


@numba.njit(nogil=True, cache=True)
def nearest_float32(screened: np.ndarray, x_unit: np.ndarray, y_unit: np.ndarray, x_rounding: np.ndarray, y_rounding: float,
                    u: float, accumulation: float, worst: float, start: int, stop: int, out: np.ndarray) -> None:
    """out[i] for the rows start <= i < stop of a float32 screen (no output rounding in its margin)."""
    candidates = np.empty(screened.shape[1], np.int64)
    for i in range(start, stop):
        out[i] = _answer(screened[i], np.float64(_largest(screened[i])), x_unit[i], y_unit, x_rounding[i], y_rounding, u,
                         accumulation, worst, False, candidates)
