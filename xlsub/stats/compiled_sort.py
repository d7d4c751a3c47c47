"""Compiled loops (numba) for `xlsub.stats.inference.value_order` on the CPU: the packed sort keys of RSA's rank
matrices made, sorted and unpacked in a few passes over memory.

A key is a value's fixed-point position in [min, max] (k bits) above its index (the low bits). numpy makes the keys
in five passes (subtract, scale, truncate, shift, or) and sorts them by comparisons; here one pass makes them and
counts them by their top bits (their bucket), a second scatters them into their buckets in index order, and each
bucket is sorted by the rest of its key bits in the core's cache (`radix_sorted`). Packed keys are distinct, so the
result is the ascending order of the packed keys: numpy's sort of them, element for element, and keys equal in their k
bits stay in index order. One more pass splits the sorted keys into the order (their low bits) and the fixed-point
positions, and counts the neighbours that share one.

The keys are made, scattered, sorted by bucket, unpacked, the centred ranks written and the triangle mirrored into both
halves of the matrix in parts side by side, one thread a part (`xlsub.stats.workers.side_by_side`: `pack_part`,
`scatter_part`, `sort_buckets`, `unpack_part`, `ranks_at`, `fill_rows`, `mirror_tiles`). At 12.5M keys (a
5,000-sentence RDM): made and sorted in 0.10 s on 2 vCPUs of a Xeon held to AVX2, against 0.27 s for a
least-significant-digit radix sort of the whole array (4 passes of 11 bits, each a scatter over memory;
`benchmarks/jackknife.py`).
"""

from __future__ import annotations

import numba
import numpy as np

from xlsub.stats.workers import side_by_side

# The sort: the keys first scattered by their top `TOP` key bits into 2,048 buckets (one pass over memory, split between
# the threads), then each bucket sorted on its own by its remaining key bits, `DIGIT` bits a stable pass (a bucket of a
# 5,000-sentence RDM holds about 6,000 keys, 48 KB, so these passes run in the core's cache; buckets of at most `SMALL`
# keys by insertion), the buckets shared between the threads. Measured on 2 vCPUs of a Xeon with AVX-512 and AMX, held to
# AVX2 (`scale.py --isa avx2`'s settings): 12.5M keys made and sorted in 0.10 s against 0.27 s for the earlier
# least-significant-digit sort of the whole array in 4 passes of 11 bits (each pass a scatter over memory, 58 ms).
TOP = 11
DIGIT = 10
SMALL = 32
TILE = 64  # `mirror_tiles`: rows and columns of a tile mirrored at a time


def _bounds(m: int, parts: int) -> np.ndarray:
    """The edges of up to `parts` contiguous parts of range(m), int64 [parts + 1]."""
    return np.linspace(0, m, max(1, min(parts, m)) + 1).astype(np.int64)


@numba.njit(nogil=True, cache=True)
def pack_part(values: np.ndarray, low: float, scale: float, index_bits: int, out: np.ndarray, start: int, stop: int,
              counts: np.ndarray, shift: int) -> None:
    """out[i] = int64((values[i] - low) * scale) << index_bits | i for start <= i < stop, as numpy computes it (the same
    float64 operations, truncated); counts[b] += how many of them have key >> shift == b (their bucket)."""
    for i in range(start, stop):
        key = np.int64((values[i] - low) * scale)
        out[i] = (key << index_bits) | i
        counts[key >> shift] += 1


@numba.njit(nogil=True, cache=True)
def scatter_part(keys: np.ndarray, out: np.ndarray, start: int, stop: int, offsets: np.ndarray, shift: int) -> None:
    """keys[start:stop] into their buckets (packed key >> shift) of `out`, each at offsets[bucket] (advanced), in order:
    a bucket holds its keys in index order."""
    for i in range(start, stop):
        key = keys[i]
        b = key >> shift
        out[offsets[b]] = key
        offsets[b] += 1


@numba.njit(nogil=True, cache=True)
def sort_buckets(source: np.ndarray, spare: np.ndarray, edges: np.ndarray, first: int, last: int, index_bits: int,
                 passes: int, digit: int, small: int) -> None:
    """Sort buckets first <= b < last (source[edges[b]:edges[b + 1]], their keys in index order) ascending by their key
    bits below the bucket's, `passes` stable passes of `digit` bits moving them between `source` and `spare`: the result
    in `spare` for an odd number of passes, else in `source`, where a bucket of at most `small` keys is sorted by
    insertion (packed keys are distinct: any sort of them is the one ascending order)."""
    mask = (np.int64(1) << digit) - 1
    counts = np.zeros(np.int64(1) << digit, dtype=np.int64)
    for b in range(first, last):
        start, stop = edges[b], edges[b + 1]
        if stop - start <= small:
            target = spare if passes % 2 == 1 else source
            for i in range(start, stop):
                key = source[i]
                j = i
                while j > start and target[j - 1] > key:
                    target[j] = target[j - 1]
                    j -= 1
                target[j] = key
            continue
        src, dst = source, spare
        for p in range(passes):
            shift = index_bits + p * digit
            counts[:] = 0
            for i in range(start, stop):
                counts[(src[i] >> shift) & mask] += 1
            total = start
            for c in range(len(counts)):
                k = counts[c]
                counts[c] = total
                total += k
            for i in range(start, stop):
                key = src[i]
                c = (key >> shift) & mask
                dst[counts[c]] = key
                counts[c] += 1
            src, dst = dst, src


def radix_sorted(values: np.ndarray, low: float, scale: float, index_bits: int, key_bits: int, packed: np.ndarray,
                 spare: np.ndarray, parts: int) -> np.ndarray:
    """The packed keys of `values` sorted ascending, in `packed` or `spare` (int64 [m], returned): made in `parts` parts
    side by side with their buckets counted (`pack_part`: the top `TOP` of the `key_bits` key bits), scattered into
    their buckets in the same parts (`scatter_part`, each part's keys after the earlier parts' in every bucket), each
    bucket sorted by the rest (`sort_buckets`), the buckets in `parts` runs of about equal keys side by side."""
    bounds, top = _bounds(len(values), parts), min(TOP, key_bits)
    low_bits = key_bits - top
    shift = index_bits + low_bits
    counts = np.zeros((len(bounds) - 1, 1 << top), dtype=np.int64)
    side_by_side(lambda t: pack_part(values, low, scale, index_bits, packed, bounds[t], bounds[t + 1], counts[t], low_bits),
                 range(len(bounds) - 1))
    edges = np.zeros((1 << top) + 1, dtype=np.int64)
    np.cumsum(counts.sum(0), out=edges[1:])
    offsets = edges[:-1] + np.cumsum(counts, 0) - counts  # [parts, buckets]: where each part's keys of a bucket begin
    side_by_side(lambda t: scatter_part(packed, spare, bounds[t], bounds[t + 1], offsets[t], shift), range(len(bounds) - 1))
    runs = [0, *np.searchsorted(edges, bounds[1:-1]).tolist(), 1 << top]  # buckets split where the keys are
    passes = (low_bits + DIGIT - 1) // DIGIT
    side_by_side(lambda t: sort_buckets(spare, packed, edges, runs[t], runs[t + 1], index_bits, passes, DIGIT, SMALL),
                 range(len(runs) - 1))
    return packed if passes % 2 == 1 else spare


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
