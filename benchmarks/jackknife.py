"""The RSA jackknife's leave-block-out values: the compiled walk (`xlsub.similarity.kept_ranks`) against the torch
path of kept-rank tables, side by side in one run, on the RSA table's inputs at the study's size; and the dots of the
reference's rank matrix with the languages' and their norms (`xlsub.stats.inference.matrix_dots`, the observed RSA
of `rsa_table` and of the power analysis's draws): the compiled loop (`xlsub.stats.compiled_dots`) against torch's
float64 tiles (forced by making `inference._compiled_dots` refuse); and the languages' rank matrices
(`centred_ranks_each`), each RDM written into one float64 scratch matrix for all languages against a fresh one per
language, and their keys sorted by the compiled radix sort (`xlsub.stats.compiled_sort`) against numpy's sort (one
thread; forced by raising `inference.RADIX_MIN`); and the radix sort's in-bucket digits, 8 bits a pass against
`DIGIT`'s (10), on one language's triangle (`inference.value_order`) and on the seven rank matrices; and the compiled
walk's inputs, each language's side made from its and the reference's rank matrices in one pass
(`rsa._language_side`) against the sort order and its gathers (forced by making `_language_side` decline).

One reference language against seven (n = 5,000 sentences, 20 blocks, the table's defaults), each from its
`centred_ranks` matrix, as `rsa_table` calls `rsa_jackknife_interval`: the languages share the cores, and each
path's sorts are read off the same rank matrices. The torch path is forced by setting `kept_ranks.MAX_BLOCKS` to 0.
Timings are the best of `--repeats` runs, interleaved; both paths' values are compared (float64 rounding only).

    python benchmarks/jackknife.py              # ~1.5 minutes on 2 idle cores
    python benchmarks/jackknife.py --n 2000     # smaller
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.similarity import kept_ranks  # noqa: E402
from xlsub.similarity import rsa as rsa_module  # noqa: E402
from xlsub.similarity.jackknife import jackknife_blocks  # noqa: E402
from xlsub.similarity.rsa import centred_ranks, centred_ranks_each, leave_block_out_rsa, rdm  # noqa: E402
from xlsub.stats import compiled_sort, inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences (default: the study's 5,000)")
    parser.add_argument("--languages", type=int, default=7, help="languages against the reference (default 7)")
    parser.add_argument("--blocks", type=int, default=20, help="jackknife blocks (default: the table's 20)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 64, generator=g, dtype=torch.float64)
    ys = x + 3 * torch.randn(args.languages, args.n, 64, generator=g, dtype=torch.float64)
    blocks = jackknife_blocks(args.n, args.blocks)
    reference = centred_ranks(x)
    limit = kept_ranks.MAX_BLOCKS
    best, values = {}, {}
    leave_block_out_rsa(x[:50], ys[:, :50], jackknife_blocks(50, args.blocks))  # compiled (or read from numba's cache) before timing
    for _ in range(args.repeats):
        for name, blocks_held in (("torch kept-rank tables", 0), ("compiled walk", limit)):
            kept_ranks.MAX_BLOCKS = blocks_held
            languages = centred_ranks_each(ys)  # emptied by the jackknife, as in rsa_table
            start = time.perf_counter()
            values[name] = leave_block_out_rsa(x, ys, blocks, ranks=(reference, languages))
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    kept_ranks.MAX_BLOCKS = limit
    side, sided = rsa_module._language_side, {}
    for _ in range(args.repeats):
        for name, maker in (("sides by the sort and its gathers", lambda *a: None), ("sides from the rank matrices", side)):
            rsa_module._language_side = maker
            languages = centred_ranks_each(ys)
            start = time.perf_counter()
            sided[name] = leave_block_out_rsa(x, ys, blocks, ranks=(reference, languages))
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    rsa_module._language_side = side
    stacked = torch.stack(centred_ranks_each(ys))  # float32 exact ranks, as the power analysis's chunk buffer
    narrow = reference.to(stacked.dtype)
    compiled = inference._compiled_dots
    inference.matrix_dots(narrow[:50, :50].contiguous(), stacked[:, :50, :50].contiguous())  # compiled before timing
    dots = {}
    for _ in range(args.repeats):
        for name, chooser in (("torch float64 tiles", lambda a, b: False), ("compiled loop", compiled)):
            inference._compiled_dots = chooser
            start = time.perf_counter()
            dots[name] = inference.matrix_dots(narrow, stacked) / (inference.upper_norm(narrow) * inference.upper_norm(stacked))
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    inference._compiled_dots = compiled
    ranked = {}
    for _ in range(args.repeats):
        for name, rank in (("a scratch per language", lambda: [centred_ranks(one[None])[0] for one in ys]),
                           ("one scratch", lambda: centred_ranks_each(ys))):
            start = time.perf_counter()
            ranked[name] = rank()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            del ranked[name][1:]  # one kept for the comparison: the other languages' 100 MB each freed
    radix = inference.RADIX_MIN
    sorted_by = {}
    for _ in range(args.repeats):
        for name, smallest in (("numpy's sort of the keys", 1 << 62), ("compiled radix sort", radix)):
            inference.RADIX_MIN = smallest
            start = time.perf_counter()
            sorted_by[name] = centred_ranks_each(ys)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            del sorted_by[name][1:]
    inference.RADIX_MIN = radix
    digit, triangle = compiled_sort.DIGIT, inference.upper_entries(rdm(ys[0], upper=True))
    by_digit, orders = {}, {}
    one, all_ = "one triangle's sort, {}-bit digits".format, "rank matrices, {}-bit digits".format
    for _ in range(args.repeats):
        for bits in (8, digit):
            compiled_sort.DIGIT = bits
            start = time.perf_counter()
            orders[bits] = inference.value_order(triangle)[0]
            best[one(bits)] = min(best.get(one(bits), float("inf")), time.perf_counter() - start)
            start = time.perf_counter()
            by_digit[bits] = centred_ranks_each(ys)
            best[all_(bits)] = min(best.get(all_(bits), float("inf")), time.perf_counter() - start)
            del by_digit[bits][1:]
    compiled_sort.DIGIT = digit
    print(f"n = {args.n}, {args.languages} languages, {args.blocks} blocks, {torch.get_num_threads()} threads")
    for name, seconds in best.items():
        print(f"  {name}: {seconds:.2f} s")
    old, new = values.values()
    print(f"  ratio (torch / compiled): {best['torch kept-rank tables'] / best['compiled walk']:.2f}x; "
          f"largest difference of the values {float((old - new).abs().max()):.1e}")
    old, new = sided.values()
    print(f"  the walk's language sides: ratio (sort and gathers / from the rank matrices) "
          f"{best['sides by the sort and its gathers'] / best['sides from the rank matrices']:.2f}x; equal: {torch.equal(old, new)}")
    old, new = dots.values()
    print(f"  observed RSA and norms: ratio (torch / compiled) {best['torch float64 tiles'] / best['compiled loop']:.2f}x; "
          f"largest difference {float((old - new).abs().max()):.1e}")
    old, new = (values[0] for values in ranked.values())
    print(f"  rank matrices: ratio (a scratch per language / one scratch) {best['a scratch per language'] / best['one scratch']:.2f}x; "
          f"equal: {torch.equal(old, new)}")
    old, new = (values[0] for values in sorted_by.values())
    ratio = best["numpy's sort of the keys"] / best["compiled radix sort"]
    print(f"  rank matrices' sort: ratio (numpy / compiled radix) {ratio:.2f}x; "
          f"equal: {torch.equal(old, new)}")
    print(f"  radix sort's in-bucket digits: one triangle ({len(triangle):,} values) ratio (8 bits / {digit} bits) "
          f"{best[one(8)] / best[one(digit)]:.2f}x, rank matrices {best[all_(8)] / best[all_(digit)]:.2f}x; "
          f"equal: {torch.equal(orders[8], orders[digit]) and torch.equal(by_digit[8][0], by_digit[digit][0])}")


if __name__ == "__main__":
    main()
