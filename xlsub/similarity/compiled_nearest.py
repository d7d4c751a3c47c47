"""Compiled loops (numba) for translation retrieval on the CPU (`xlsub.similarity.retrieval`): each side's rows
prepared in one pass, and the screened rows answered.

`side_bfloat16`, `side_float32`: a language's rows x [n, d] (float32 or float64) centred on their mean, scaled to unit
length (`scale` = 1 / norm, float64), rounded to the screening dtype (float64 -> float32 -> bfloat16, each to nearest
even) and each row's rounding error |screen - unit| measured, without a float64 copy of the rows: the candidates'
float64 cosines are formed from the rows themselves, (x_i - mean) scale_i . (y_c - mean_y) scale_c.

`side_int8`, `nearest_int8`: the int8 screen (AVX2-only CPUs, where bfloat16 products are slow and oneDNN's
integer product runs at 2.5x float32's rate): each unit row rotated by a fixed orthogonal map (`rotate`: signs,
an order that deals coordinates to blocks, a Walsh-Hadamard transform a block, so no coordinate dominates a row) and
rounded to 7 and 8 bits at a step of its own; a screened row's cosines are oneDNN's exact integer products times
both rows' steps, its margin twice the two roundings' measured error and their product (Cauchy-Schwarz: the
rotation keeps dot products). The int8 screen's margin is wide (a row of independent sentences has about a hundred
candidates at n = 5,000, d = 768), so a row with more than `STAGED` candidates screens them again by float32 dot
products of unit rows (`unit_float32`, `_dot32`) within twice float32's screen error, and only those go on to float64:
about a third of the cost of comparing them all in float64. The bfloat16 and float32 loops take the same stage when
given float32 rows; retrieval gives them none (bfloat16's rows have few candidates).

`nearest_bfloat16`, `nearest_float32`: each row of a screened block (bfloat16 or float32 cosines of one sentence
against every sentence of the other language) is read once to find its largest value and once more to collect its
candidates: every column within the row's margin of that value (`retrieval.screen_margins`, the same float64
operations). A single candidate answers the row; several are compared by their float64 cosines, whatever their
number. The torch path instead takes each row's 8 largest values (`topk`), rechecks rows with 2 to 7 candidates by a
gather and rows with 8 or more by a float32 product against every sentence, then float64 where close.

The float64 cosines are summed in a fixed order (`_cosine`, no reassociation by the compiler), so identical rows have
identical cosines and a tie with a copy is found as a tie. Measured side by side in `benchmarks/retrieval.py`.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _cosine(unit: np.ndarray, row: np.ndarray, mean: np.ndarray, scale: float) -> float:
    """sum_k unit[k] (row[k] - mean[k]) * scale in float64, in eight interleaved partial sums added in a fixed order:
    the same rounding for the same operands wherever they lie in memory, several times the speed of one running sum."""
    d = len(unit)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    k = 0
    while k + 8 <= d:
        s0 += unit[k] * (np.float64(row[k]) - mean[k])
        s1 += unit[k + 1] * (np.float64(row[k + 1]) - mean[k + 1])
        s2 += unit[k + 2] * (np.float64(row[k + 2]) - mean[k + 2])
        s3 += unit[k + 3] * (np.float64(row[k + 3]) - mean[k + 3])
        s4 += unit[k + 4] * (np.float64(row[k + 4]) - mean[k + 4])
        s5 += unit[k + 5] * (np.float64(row[k + 5]) - mean[k + 5])
        s6 += unit[k + 6] * (np.float64(row[k + 6]) - mean[k + 6])
        s7 += unit[k + 7] * (np.float64(row[k + 7]) - mean[k + 7])
        k += 8
    rest = 0.0
    while k < d:
        rest += unit[k] * (np.float64(row[k]) - mean[k])
        k += 1
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) + rest) * scale


@numba.njit(nogil=True, cache=True)
def column_mean(x: np.ndarray, out: np.ndarray) -> None:
    """out[k] = the mean of x[:, k], summed in float64 row by row."""
    for k in range(x.shape[1]):
        out[k] = 0.0
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            out[k] += np.float64(x[i, k])
    for k in range(x.shape[1]):
        out[k] /= x.shape[0]


@numba.njit(nogil=True, cache=True)
def _unit_row(row: np.ndarray, mean: np.ndarray, unit: np.ndarray) -> float:
    """unit <- (row - mean) / its norm (times 1 / max(norm, the smallest normal float64): a zero row stays zero);
    returns that scale."""
    total = 0.0
    for k in range(len(row)):
        unit[k] = np.float64(row[k]) - mean[k]
        total += unit[k] * unit[k]
    scale = 1.0 / max(np.sqrt(total), 2.2250738585072014e-308)
    for k in range(len(row)):
        unit[k] *= scale
    return scale


@numba.njit(nogil=True, cache=True)
def side_bfloat16(x: np.ndarray, mean: np.ndarray, start: int, stop: int, scale: np.ndarray, bits: np.ndarray,
                  rounding: np.ndarray) -> None:
    """For the rows start <= i < stop of x [n, d]: scale[i], the unit row rounded to bfloat16 (its bits into
    bits [n, d] int16) and rounding[i] = |bfloat16 row - unit row| (float64)."""
    d = x.shape[1]
    unit = np.empty(d)
    narrow = np.empty(d, np.float32)
    wide = narrow.view(np.uint32)
    for i in range(start, stop):
        scale[i] = _unit_row(x[i], mean, unit)
        for k in range(d):
            narrow[k] = np.float32(unit[k])
        total = 0.0
        for k in range(d):
            w = wide[k]
            upper = (w + np.uint32(0x7FFF) + ((w >> 16) & np.uint32(1))) >> 16  # to nearest, ties to even
            bits[i, k] = np.int16(np.uint16(upper))
            wide[k] = upper << 16
            error = np.float64(narrow[k]) - unit[k]
            total += error * error
        rounding[i] = np.sqrt(total)


@numba.njit(nogil=True, cache=True)
def side_float32(x: np.ndarray, mean: np.ndarray, start: int, stop: int, scale: np.ndarray, screen: np.ndarray,
                 rounding: np.ndarray) -> None:
    """`side_bfloat16` for a float32 screen [n, d]."""
    unit = np.empty(x.shape[1])
    for i in range(start, stop):
        scale[i] = _unit_row(x[i], mean, unit)
        total = 0.0
        for k in range(x.shape[1]):
            screen[i, k] = np.float32(unit[k])
            error = np.float64(screen[i, k]) - unit[k]
            total += error * error
        rounding[i] = np.sqrt(total)


@numba.njit(nogil=True, cache=True)
def _quantized(z: np.ndarray, levels: int, offset: int, out: np.ndarray) -> tuple[float, float]:
    """out <- z rounded to the grid step * {-levels, ..., levels} (step = max |z_k| / levels; 0 for a zero row), each
    integer plus `offset`; returns (step, |step q - z|) in float64."""
    largest = 0.0
    for k in range(len(z)):
        largest = max(largest, abs(z[k]))
    step = largest / levels
    total = 0.0
    for k in range(len(z)):
        q = min(max(np.round(z[k] / step), -levels), levels) if step > 0 else 0.0
        out[k] = q + offset
        error = q * step - z[k]
        total += error * error
    return step, np.sqrt(total)


@numba.njit(nogil=True, cache=True)
def side_int8(x: np.ndarray, mean: np.ndarray, start: int, stop: int, scale: np.ndarray, signs: np.ndarray, order: np.ndarray,
              block: int, low: np.ndarray, low_step: np.ndarray, low_rounding: np.ndarray, high: np.ndarray, high_step: np.ndarray,
              high_rounding: np.ndarray) -> None:
    """For the rows start <= i < stop of x [n, d]: scale[i] and the unit row rotated (`rotate`) and rounded to 7 bits
    (`low` [n, d] uint8, the integers -63..63 plus 64: the matrix product's unsigned side) and to 8 bits (`high` [n, d]
    int8, -127..127: its signed side), each with its step [n] and its rounding error in cosine units (|step q - z| /
    sqrt(block), float64 [n]: the rotation multiplies lengths by sqrt(block)); a rounding whose `low` or `high` has
    no rows is not made."""
    d = x.shape[1]
    unit = np.empty(d)
    z = np.empty(d)
    root = np.sqrt(np.float64(block))
    for i in range(start, stop):
        scale[i] = _unit_row(x[i], mean, unit)
        rotate(unit, signs, order, block, z)
        if len(low):
            low_step[i], error = _quantized(z, 63, 64, low[i])
            low_rounding[i] = error / root
        if len(high):
            high_step[i], error = _quantized(z, 127, 0, high[i])
            high_rounding[i] = error / root


@numba.njit(nogil=True, cache=True)
def rotate(unit: np.ndarray, signs: np.ndarray, order: np.ndarray, block: int, z: np.ndarray) -> None:
    """z <- H P S unit: the coordinates' signs flipped (S, signs +-1), reordered (P: z's k-th input is unit[order[k]],
    which spreads neighbouring coordinates over the blocks) and each block of `block` (a power of two) multiplied by
    the unnormalised Walsh-Hadamard matrix (H H' = block I, entries +-1: sums and differences, exact but for one
    float64 rounding each). Dot products are multiplied by `block` exactly in real arithmetic; a coordinate holding
    much of a row's length is spread over its block, so a step set by the row's largest value is fine for all."""
    for k in range(len(unit)):
        z[k] = unit[order[k]] * signs[order[k]]
    for first in range(0, len(z), block):
        half = 1
        while half < block:
            for j in range(first, first + block, 2 * half):
                for k in range(j, j + half):
                    a, b = z[k], z[k + half]
                    z[k], z[k + half] = a + b, a - b
            half *= 2


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
def _count_at_least(values: np.ndarray, floor: float, factor: float) -> int:
    """How many values times factor are >= floor (compared in float64), in a branch-free pass."""
    count = 0
    for j in range(len(values)):
        count += np.float64(values[j]) * factor >= floor
    return count


# Candidates a row may have before they are screened again in float32 (`_answer` with float32 unit rows of y): one
# float32 dot product of unit rows costs about a third of a float64 cosine formed from the rows themselves.
STAGED = 4


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _dot32(a: np.ndarray, b: np.ndarray) -> float:
    """sum_k a[k] b[k] accumulated in float32, in any order the compiler vectorises (float32's screen bound holds for
    every order of the sum, `retrieval.screen_error`)."""
    total = np.float32(0.0)
    for k in range(len(a)):
        total += a[k] * b[k]
    return total


@numba.njit(nogil=True, cache=True)
def unit_float32(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    """out[i] <- (x[i] - mean) * scale[i] rounded to float32, for the rows start <= i < stop (the unit rows of a side,
    as `_x_unit` forms them, for `_answer`'s float32 stage)."""
    for i in range(start, stop):
        for k in range(x.shape[1]):
            out[i, k] = np.float32((np.float64(x[i, k]) - mean[k]) * scale[i])


@numba.njit(nogil=True, cache=True)
def _answer(values: np.ndarray, top: float, x_unit: np.ndarray, y: np.ndarray, y_mean: np.ndarray, y_scale: np.ndarray,
            x_rounding: float, y_rounding: float, u: float, accumulation: float, worst: float, output: bool,
            candidates: np.ndarray, factor: float, y32: np.ndarray, margin32: float, x32: np.ndarray, scores: np.ndarray) -> int:
    """The float64 nearest column of one screened row: its screened cosines are `values` (float32 [n]) times `factor`
    (1, or the int8 screen's row step), the largest of them `top`; -1 on a tie.

    With more than `STAGED` candidates and the unit rows of y in float32 (`y32` [n, d]; none: [0, d]), the candidates
    are screened again by float32 dot products of unit rows (x's own, rounded into `x32`; the values into `scores`), each within
    e = `margin32` / 2 of its float64 cosine (`retrieval.screen_error(float32, d)`), and only those within `margin32`
    of the largest are compared in float64: a candidate whose float64 cosine v is the best, or tied with it, has
    float32 value >= v - e, and the largest float32 value is <= v + e."""
    inputs = x_rounding + y_rounding + x_rounding * y_rounding + accumulation
    rounded = u * (abs(top) + 3 * worst) if output else 0.0
    floor = top - min(2 * (inputs * (1 + u) + rounded), 2 * worst)
    count = _count_at_least(values, floor, factor)
    if count == 1:
        for j in range(len(values)):
            if np.float64(values[j]) * factor >= floor:
                return j
    count = 0
    for j in range(len(values)):
        if np.float64(values[j]) * factor >= floor:
            candidates[count] = j
            count += 1
    if count > STAGED and len(y32):
        for k in range(len(x_unit)):
            x32[k] = np.float32(x_unit[k])
        best = -np.inf
        for t in range(count):
            scores[t] = _dot32(x32, y32[candidates[t]])
            best = max(best, np.float64(scores[t]))
        kept = 0
        for t in range(count):  # compacted in place: the kept ones in their order
            if np.float64(scores[t]) >= best - margin32:
                candidates[kept] = candidates[t]
                kept += 1
        count = kept
    first, second, where = -np.inf, -np.inf, -1
    for c in candidates[:count]:
        dot = _cosine(x_unit, y[c], y_mean, y_scale[c])
        if dot > first:
            first, second, where = dot, first, c
        elif dot > second:
            second = dot
    return where if first > second else -1


@numba.njit(nogil=True, cache=True)
def _x_unit(row: np.ndarray, mean: np.ndarray, scale: float, unit: np.ndarray) -> np.ndarray:
    """unit <- (row - mean) * scale: `_unit_row`'s unit row again, from its scale."""
    for k in range(len(row)):
        unit[k] = (np.float64(row[k]) - mean[k]) * scale
    return unit


@numba.njit(nogil=True, cache=True)
def nearest_bfloat16(bits: np.ndarray, x: np.ndarray, x_mean: np.ndarray, x_scale: np.ndarray, y: np.ndarray, y_mean: np.ndarray,
                     y_scale: np.ndarray, y32: np.ndarray, x_rounding: np.ndarray, y_rounding: float, u: float, accumulation: float,
                     worst: float, margin32: float, start: int, stop: int, out: np.ndarray) -> None:
    """out[i] for the rows start <= i < stop of a bfloat16 screen given as its bits (int16 [r, n]; bfloat16 is the
    upper half of a float32, so each value is its bits shifted up 16) of rows x [r, d] against y [n, d] (each side's
    mean and scales from `side_bfloat16`); a row with more than `STAGED` candidates screens them again against y's
    float32 unit rows `y32` [n, d] within `margin32` (`_answer`; none: [0, d])."""
    n = bits.shape[1]
    wide = np.empty(n, np.uint32)
    values = wide.view(np.float32)
    candidates = np.empty(n, np.int64)
    unit = np.empty(x.shape[1])
    x32, scores = np.empty(x.shape[1], np.float32), np.empty(n, np.float32)
    flip = np.int16(0x7FFF)
    largest = np.empty(1, np.uint32)
    for i in range(start, stop):
        row = bits[i]
        best = np.int16(-32768)
        for j in range(n):
            value = row[j]
            wide[j] = np.uint32(np.uint16(value)) << 16
            best = max(best, value ^ ((value >> 15) & flip))  # a finite bfloat16's order is this integer's (-0 below +0)
        largest[0] = np.uint32(np.uint16(best ^ ((best >> 15) & flip))) << 16  # the largest value's bits, read as a float32
        out[i] = _answer(values, np.float64(largest.view(np.float32)[0]), _x_unit(x[i], x_mean, x_scale[i], unit), y, y_mean,
                         y_scale, x_rounding[i], y_rounding, u, accumulation, worst, True, candidates, 1.0, y32, margin32, x32, scores)


@numba.njit(nogil=True, cache=True)
def nearest_float32(screened: np.ndarray, x: np.ndarray, x_mean: np.ndarray, x_scale: np.ndarray, y: np.ndarray, y_mean: np.ndarray,
                    y_scale: np.ndarray, y32: np.ndarray, x_rounding: np.ndarray, y_rounding: float, u: float, accumulation: float,
                    worst: float, margin32: float, start: int, stop: int, out: np.ndarray) -> None:
    """`nearest_bfloat16` for a float32 screen (no output rounding in its margin; its caller gives no float32 stage, which
    would only repeat the screen)."""
    candidates = np.empty(screened.shape[1], np.int64)
    unit = np.empty(x.shape[1])
    x32, scores = np.empty(x.shape[1], np.float32), np.empty(screened.shape[1], np.float32)
    for i in range(start, stop):
        out[i] = _answer(screened[i], np.float64(_largest(screened[i])), _x_unit(x[i], x_mean, x_scale[i], unit), y, y_mean,
                         y_scale, x_rounding[i], y_rounding, u, accumulation, worst, False, candidates, 1.0, y32, margin32, x32, scores)


@numba.njit(nogil=True, cache=True)
def nearest_int8(screened: np.ndarray, x: np.ndarray, x_mean: np.ndarray, x_scale: np.ndarray, factor: np.ndarray, y: np.ndarray,
                 y_mean: np.ndarray, y_scale: np.ndarray, y32: np.ndarray, x_rounding: np.ndarray, y_rounding: float, accumulation: float,
                 worst: float, margin32: float, start: int, stop: int, out: np.ndarray) -> None:
    """`nearest_float32` for the int8 screen: row i's cosines are screened[i] (the integer products times the other
    side's steps, float32 [r, n]) times factor[i] (the row's own step / block, float64 >= 0); a row with more than
    `STAGED` candidates screens them again against y's float32 unit rows `y32` [n, d] within `margin32` (`_answer`)."""
    candidates = np.empty(screened.shape[1], np.int64)
    unit = np.empty(x.shape[1])
    x32, scores = np.empty(x.shape[1], np.float32), np.empty(screened.shape[1], np.float32)
    for i in range(start, stop):
        out[i] = _answer(screened[i], np.float64(_largest(screened[i])) * factor[i], _x_unit(x[i], x_mean, x_scale[i], unit), y, y_mean,
                         y_scale, x_rounding[i], y_rounding, 0.0, accumulation, worst, False, candidates, factor[i], y32, margin32, x32,
                         scores)
