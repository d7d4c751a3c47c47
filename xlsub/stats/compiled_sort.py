"""Compiled loops (numba) for `xlsub.stats.inference.value_order` on the CPU: the packed sort keys of RSA's rank
matrices made, sorted and unpacked in a few passes over memory.

A key is a value's fixed-point position in [min, max] (k bits) above its index (the low bits). numpy makes the keys
in five passes (subtract, scale, truncate, shift, or) and sorts them by comparisons; here one pass makes them and
counts their digits, and a least-significant-digit radix sort on the k key bits (`DIGIT` bits a pass, each pass
stable) orders them. The keys enter in index order, so keys equal in their k bits stay in index order, and
the result is the ascending order of the packed keys: numpy's sort of them, element for element. One more pass splits
the sorted keys into the order (their low bits) and the fixed-point positions, and counts the neighbours that share
one.

The keys are made, unpacked, the centred ranks written and the triangle mirrored into both halves of the matrix in
parts side by side, one thread a part (`xlsub.stats.workers.side_by_side`: `pack_part`, `unpack_part`, `ranks_at`,
`fill_rows`, `mirror_tiles`); the sort's scatters run on one thread. At 12.5M keys (a 5,000-sentence RDM): the
sort 0.14 s on one core of an AVX2 EPYC in 5 passes of 8 bits, against 0.44 s for numpy's sort split between two
(`benchmarks/jackknife.py`).
"""

from __future__ import annotations

import numba
import numpy as np

from xlsub.stats.workers import side_by_side

# bits sorted a pass: 11 (2,048 buckets) sorts the 39 key bits of a 5,000-sentence RDM in 4 passes instead of 8 bits' 5.
# Measured on 2 vCPUs of a Xeon with AVX-512 and AMX: 12.5M keys sorted in 0.32 s (8 bits, digits counted beforehand)
# against 0.24 s (11 bits, counting included); seven languages' rank matrices 4.81 -> 4.36 s (`benchmarks/jackknife.py`,
# where numpy's AVX-512 sort of the keys took 3.70 s)
DIGIT = 11
TILE = 64  # `mirror_tiles`: rows and columns of a tile mirrored at a time


def _bounds(m: int, parts: int) -> np.ndarray:
    """The edges of up to `parts` contiguous parts of range(m), int64 [parts + 1]."""
    return np.linspace(0, m, max(1, min(parts, m)) + 1).astype(np.int64)


@numba.njit(nogil=True, cache=True)
def pack_part(values: np.ndarray, low: float, scale: float, index_bits: int, key_bits: int, out: np.ndarray, start: int,
              stop: int, counts: np.ndarray, digit: int) -> None:
    """out[i] = int64((values[i] - low) * scale) << index_bits | i for start <= i < stop, as numpy computes it (the same
    float64 operations, truncated); counts[p, b] += how many of them have digit b in pass p (bits `digit` p to
    `digit` (p + 1) - 1 of the key; counts [passes, 2^digit])."""
    mask = (np.int64(1) << digit) - 1
    for i in range(start, stop):
        key = np.int64((values[i] - low) * scale)
        out[i] = (key << index_bits) | i
        for p in range(counts.shape[0]):
            counts[p, (key >> (p * digit)) & mask] += 1


@numba.njit(nogil=True, cache=True)
def radix_sort(keys: np.ndarray, spare: np.ndarray, counts: np.ndarray, index_bits: int, digit: int) -> bool:
    """Sort `keys` (from `pack_part`, in index order) by their key bits, `digit` of them a pass, one stable pass per row
    of `counts` (overwritten), moving them between `keys` and `spare`; returns whether the result ended in `spare`. One
    thread: the scatters are bound by memory, and a pass split between two threads (each half's digits counted as the
    pass before writes them) measured 0.22-0.23 s against 0.24 s for one at 11 bits and 12.5M keys."""
    mask = (np.int64(1) << digit) - 1
    source, target = keys, spare
    for p in range(counts.shape[0]):
        offsets = counts[p]
        total = 0
        for b in range(len(offsets)):
            c = offsets[b]
            offsets[b] = total
            total += c
        shift = index_bits + p * digit
        for i in range(len(source)):
            key = source[i]
            b = (key >> shift) & mask
            target[offsets[b]] = key
            offsets[b] += 1
        source, target = target, source
    return counts.shape[0] % 2 == 1


def radix_sorted(values: np.ndarray, low: float, scale: float, index_bits: int, key_bits: int, packed: np.ndarray,
                 spare: np.ndarray, parts: int) -> np.ndarray:
    """The packed keys of `values` (`pack_part`, made in `parts` parts side by side) sorted ascending (`radix_sort`, `DIGIT`
    bits a pass), in `packed` or `spare` (int64 [m], returned)."""
    bounds, digit = _bounds(len(values), parts), DIGIT
    counts = np.zeros((len(bounds) - 1, (key_bits + digit - 1) // digit, 1 << digit), dtype=np.int64)
    side_by_side(lambda t: pack_part(values, low, scale, index_bits, key_bits, packed, bounds[t], bounds[t + 1], counts[t], digit),
                 range(len(bounds) - 1))
    return spare if radix_sort(packed, spare, counts.sum(0), index_bits, digit) else packed


@numba.njit(nogil=True, cache=True)
def unpack_part(ordered: np.ndarray, index_bits: int, order: np.ndarray, positions: np.ndarray, start: int, stop: int,
                previous: int) -> int:
    """Split sorted packed keys start <= i < stop into the order (their low bits) and the fixed-point positions (the
    rest); either output may be `ordered` itself (element by element). `previous`: the position before `start` (-1 at
    0). Returns how many of these keys share their position with the key before them."""
    mask = (np.int64(1) << index_bits) - 1
    same = 0
    for i in range(start, stop):
        key = ordered[i]
        position = key >> index_bits
        order[i] = key & mask
        positions[i] = position
        if position == previous:
            same += 1
        previous = position
    return same


def unpack(ordered: np.ndarray, index_bits: int, order: np.ndarray, positions: np.ndarray, parts: int) -> int:
    """`unpack_part` over all keys in `parts` parts side by side; how many neighbours share a position."""
    bounds = _bounds(len(ordered), parts)
    before = [-1] + [int(ordered[b - 1] >> index_bits) for b in bounds[1:-1]]  # read before the parts overwrite them
    return sum(side_by_side(lambda t: unpack_part(ordered, index_bits, order, positions, bounds[t], bounds[t + 1], before[t]),
                            range(len(bounds) - 1)))


@numba.njit(nogil=True, cache=True)
def ranks_at(order: np.ndarray, centre: float, out: np.ndarray, start: int, stop: int) -> None:
    """out[order[p]] = p + 1 - centre for start <= p < stop: the centred ranks of the sorted entries, in their own
    places (exact: integers and half-integers below 2^52)."""
    for p in range(start, stop):
        out[order[p]] = (p + 1.0) - centre


@numba.njit(nogil=True, cache=True)
def fill_rows(upper: np.ndarray, d: np.ndarray, first: int, last: int) -> None:
    """Rows first <= i < last of d [k, k]: zero on the diagonal, then row i's part of the strict upper triangle,
    which `upper` holds row by row."""
    k = d.shape[0]
    t = first * (k - 1) - first * (first - 1) // 2  # the entries of the rows above
    for i in range(first, last):
        d[i, i] = 0.0
        for j in range(i + 1, k):
            d[i, j] = upper[t]
            t += 1


@numba.njit(nogil=True, cache=True)
def mirror_tiles(d: np.ndarray, part: int, parts: int) -> None:
    """The lower triangle of d [k, k] from its upper one, TILE x TILE tiles at a time (read and written a cache line at a
    time), the tile rows whose number is `part` modulo `parts`: the parts write disjoint columns."""
    k = d.shape[0]
    for top in range(part * TILE, k, parts * TILE):
        for left in range(top, k, TILE):
            for i in range(top, min(top + TILE, k)):
                for j in range(max(left, i + 1), min(left + TILE, k)):
                    d[j, i] = d[i, j]


def centred_ranks_into(order: np.ndarray, centre: float, values: np.ndarray, parts: int) -> None:
    """values[order[p]] = p + 1 - centre for every p, in `parts` parts side by side (the positions are distinct)."""
    bounds = _bounds(len(order), parts)
    side_by_side(lambda t: ranks_at(order, centre, values, bounds[t], bounds[t + 1]), range(len(bounds) - 1))


def row_parts(k: int, parts: int) -> list[tuple[int, int]]:
    """Up to `parts` ranges of rows (first, last) of a k x k strict upper triangle holding about equal entries."""
    if k < 2:
        return [(0, k)]
    done = np.cumsum(np.arange(k - 1, -1, -1))  # entries up to and including each row
    cuts = sorted({0, k, *(min(k, int(np.searchsorted(done, done[-1] * t / parts)) + 1) for t in range(1, parts))})
    return list(zip(cuts[:-1], cuts[1:]))


@numba.njit(nogil=True, cache=True)
def copy_upper_rows(d: np.ndarray, out: np.ndarray, first: int, last: int) -> None:
    """Rows first <= i < last of d [k, k]'s strict upper triangle into `out`, row by row at their place in the whole
    triangle (`fill_rows` backwards)."""
    k = d.shape[0]
    t = first * (k - 1) - first * (first - 1) // 2  # the entries of the rows above
    for i in range(first, last):
        for j in range(i + 1, k):
            out[t] = d[i, j]
            t += 1


def upper_triangle(d: np.ndarray, out: np.ndarray, parts: int) -> None:
    """out [k (k - 1) / 2] <- the strict upper triangle of d [k, k] row by row, in `parts` parts of about equal entries
    side by side."""
    side_by_side(lambda rows: copy_upper_rows(d, out, *rows), row_parts(d.shape[0], parts))


def fill_symmetric(upper: np.ndarray, d: np.ndarray, parts: int) -> None:
    """d [k, k] <- the symmetric matrix with zero diagonal whose strict upper triangle, row by row, is `upper`: the rows
    written in order in `parts` parts of about equal entries, then the lower triangle mirrored tile by tile in parts."""
    side_by_side(lambda rows: fill_rows(upper, d, *rows), row_parts(d.shape[0], parts))
    side_by_side(lambda t: mirror_tiles(d, t, parts), range(parts))


@numba.njit(nogil=True, cache=True)
def untied_order_part(ranks: np.ndarray, centre: float, order: np.ndarray, first: int, last: int) -> bool:
    """Rows first <= i < last of `untied_order`: order[rank - 1] = the entry's index for their entries; False where a
    rank is not an integer in 1..m. Repeated ranks are not looked for here (the parts run at once)."""
    k, m = ranks.shape[0], len(order)
    t = first * (k - 1) - first * (first - 1) // 2  # the entries of the rows above
    for i in range(first, last):
        for j in range(i + 1, k):
            position = np.float64(ranks[i, j]) + (centre - 1.0)
            at = np.int64(position)
            if at != position or at < 0 or at >= m:
                return False
            order[at] = t
            t += 1
    return True


def untied_order(ranks: np.ndarray, centre: float, order: np.ndarray, parts: int) -> bool:
    """The sort order of the strict upper triangle (row by row) of a centred rank matrix [k, k] whose ranks are 1..m
    minus `centre` ((m + 1) / 2): order[rank - 1] = the entry's index, the rows in `parts` parts of about equal entries
    side by side. False (order incomplete) where a rank is not an integer in 1..m or repeats (ties were averaged, and
    the order is not unique): m entries at m valid places leave a place unwritten exactly when two share one."""
    order.fill(-1)
    valid = side_by_side(lambda rows: untied_order_part(ranks, centre, order, *rows), row_parts(ranks.shape[0], parts))
    return all(valid) and not bool((order < 0).any())
