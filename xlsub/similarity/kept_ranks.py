"""Compiled loops (numba) for the RSA jackknife's leave-block-out ranks on the CPU, where neither triangle is tied.

`xlsub.similarity.rsa._sorted_rsa` needs, for every block b, the sum over the entries kept without b of x's rank
among the kept entries times y's. Walking y's sort, y's kept rank is a running count; x's kept rank at x-sorted
position p is p + 1 minus the entries removed by b ahead of p in x's sort. The torch path reads that from a table of
x's kept ranks, 8 blocks a row (400 MB at n = 5,000), by a random gather of a row per entry, and makes the running
counts in passes over every entry for each block.

Here x's removed entries are bits instead (`removed_words`): for every 64 x-sorted positions one word per block,
with the block's removed count ahead of the word, 47 MB for 20 blocks at n = 5,000 (each entry sets the bits of its
two blocks only). `kept_rank_cross` walks y's sort once for all blocks: per entry, the removed count ahead of p is
the word's count plus the population count of its bits below p, and the random reads of the words are prefetched a
few entries ahead; a walk may be split into parts of y's sort, side by side. `language_side` makes what a walk reads of a
language (each entry of its sort: its place in x's sort and its two blocks) in one pass over the two rank matrices,
without a sort order. The sums are those of the torch path up
to float64 rounding: each product is an exact integer (below 2^53), accumulated in float64 in another order. Measured
side by side (`benchmarks/jackknife.py`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# blocks a word table holds: 16 bytes per block and 64 sorted entries (200 MB at 64 blocks and n = 5,000, beside the
# torch path's 400 MB table of 8 blocks' kept ranks); more blocks take the torch path
MAX_BLOCKS = 64
# entries of y's sort whose words are prefetched ahead of the one being summed
AHEAD = 16


@intrinsic
def _prefetch(typingctx, array, index):
    """Prefetch array.flat[index] into the caches for reading (LLVM's llvm.prefetch; no effect on the result)."""
    signature = types.void(array, types.intp)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]))
        builder.call(function, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _popcount(typingctx, value):
    """The number of set bits of a uint64 (LLVM's llvm.ctpop: one instruction where the CPU has it)."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):
        function = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(function, args)

    return signature, codegen


@numba.njit(nogil=True, cache=True)
def removed_words(first: np.ndarray, second: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries each block removes, along x's sort: bits [words, count] uint64, bit p & 63 of word p >> 6 set
    where the entry at sorted position p has a sentence in the block (`first`, `second` [m]: its two sentences'
    blocks, in sorted order); ahead [words, count] int64: the block's removed entries before the word."""
    m = len(first)
    words = (m + 63) >> 6
    bits = np.zeros((words, count), np.uint64)
    for p in range(m):
        bit = np.uint64(1) << np.uint64(p & 63)
        bits[p >> 6, first[p]] |= bit
        bits[p >> 6, second[p]] |= bit
    ahead = np.zeros((words, count), np.int64)
    running = np.zeros(count, np.int64)
    for w in range(words):
        for b in range(count):
            ahead[w, b] = running[b]
            running[b] += np.int64(_popcount(bits[w, b]))
    return bits, ahead


@numba.njit(nogil=True, cache=True)
def kept_rank_cross(bits: np.ndarray, ahead: np.ndarray, position: np.ndarray, first: np.ndarray,
                    second: np.ndarray, start: int, stop: int) -> np.ndarray:
    """For every block b, the sum over the entries kept without b of x's kept rank times y's (ranks 1..K among
    the kept entries, untied), float64 [count], over the entries start <= e < stop of y's sort (a walk split into
    parts that add up: the removed counts before `start` are counted first). Walks y's sort: `position` [m] int: each
    entry's position in x's sort; `first`, `second` [m]: its sentences' blocks; `bits`, `ahead`: `removed_words` of
    x's sort."""
    count = bits.shape[1]
    m = len(position)
    removed_y = np.zeros(count, np.int64)  # entries removed by each block so far along y's sort
    for e in range(start):
        removed_y[first[e]] += 1
        if second[e] != first[e]:
            removed_y[second[e]] += 1
    rank_x = np.zeros(count, np.int64)
    totals = np.zeros(count, np.float64)
    flat_bits, flat_ahead = bits.reshape(-1), ahead.reshape(-1)
    for e in range(start, stop):
        if e + AHEAD < m:  # the words a later entry reads: random rows of a table larger than the caches
            row = np.intp(position[e + AHEAD] >> 6) * count
            for offset in range(0, count, 8):  # every cache line of the two rows (8 values a line)
                _prefetch(flat_bits, row + offset)
                _prefetch(flat_ahead, row + offset)
            _prefetch(flat_bits, row + count - 1)
            _prefetch(flat_ahead, row + count - 1)
        f, s = first[e], second[e]
        removed_y[f] += 1
        if s != f:
            removed_y[s] += 1
        p = np.int64(position[e])
        w = p >> 6
        below = (np.uint64(1) << np.uint64(p & 63)) - np.uint64(1)
        for b in range(count):  # every block, then the entry's own blocks taken out: no branch in the loop
            rank_x[b] = p + 1 - ahead[w, b] - np.int64(_popcount(bits[w, b] & below))
        for b in range(count):
            totals[b] += float(rank_x[b] * (e + 1 - removed_y[b]))
        totals[f] -= float(rank_x[f] * (e + 1 - removed_y[f]))
        if s != f:
            totals[s] -= float(rank_x[s] * (e + 1 - removed_y[s]))
    return totals


@numba.njit(nogil=True, cache=True)
def language_side_part(ranks_y: np.ndarray, ranks_x: np.ndarray, centre: float, labels: np.ndarray, position: np.ndarray,
                       first: np.ndarray, second: np.ndarray, top: int, bottom: int) -> bool:
    """Rows top <= i < bottom of `language_side`: for each entry (i, j), i < j, of the triangle, at its place in y's sort
    (its rank in `ranks_y` - 1) its place in x's sort (`position`, from `ranks_x`) and its sentences' blocks (`first`,
    `second`: labels[i], labels[j]). False where a rank of y is not an integer in 1..m (ties were averaged); repeated
    ranks are not looked for here (the parts run at once)."""
    k, m = ranks_y.shape[0], len(position)
    shift = centre - 1.0
    for i in range(top, bottom):
        block = labels[i]
        for j in range(i + 1, k):
            place = np.float64(ranks_y[i, j]) + shift
            at = np.int64(place)
            if at != place or at < 0 or at >= m:
                return False
            position[at] = np.int32(np.float64(ranks_x[i, j]) + shift)
            first[at] = block
            second[at] = labels[j]
    return True
