"""CKA permutation nulls: xlsub's engine (`permuted_cka`) vs a naive loop that recomputes CKA per permutation.

The naive loop is what one writes first: `cka(x, y[p], kind)` for every permutation p, which centres both
representations and recomputes X'X, Y'Y and Y'X each time. The engine prepares each representation once
and per permutation recomputes only the pairing-dependent cross term, ||Y_p'X||_F^2 (and, for debiased CKA,
r_x . r_(y,p)), with one wide matrix product per block of permutations. Both use the same permutations;
agreement is the largest absolute difference of the null CKA values on the permutations both computed.

The naive loop is timed on a few permutations and EXTRAPOLATED linearly to the full count (its cost per
permutation is constant); the engines are timed on the full count at the demo size, and on 200
permutations at the study size (blocks of 1-2 permutations there, so also linear), then extrapolated.
Sizes: the demo's parallel set (n=1077, d=128) and the study's (n=5000, d=768), one layer, 1000
permutations (the issue's default for the full model). At the demo size it also times the float64 Gram-form
engine and the other nulls at their default counts; at both, the Gram-form engine with float32 Gram matrices and
compiled permuted sums (what "auto" takes with float32 products on the CPU where the permutations pay for the Gram
matrices).
Each timing is the best of `--repeats` runs, interleaved across methods: other processes on a shared
machine only add time, and they add it to every method alike.

    python benchmarks/permutation.py            # both sizes; ~3 minutes on 2 idle cores
    python benchmarks/permutation.py --threads 1   # on a loaded machine (see --help)
    python benchmarks/permutation.py --quick    # the demo size only, 200 permutations
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.similarity.cka import cka  # noqa: E402
from xlsub.similarity.permutation import _pick_engine, length_bins, permutations, permuted_cka  # noqa: E402
from xlsub.similarity.retrieval import retrieval_permutation_test  # noqa: E402
from xlsub.similarity.rsa import mantel_test  # noqa: E402

LATENT = 32


def languages(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two synthetic encodings [n, d] (float32, as encode stores them) sharing a latent "meaning", with noise.

    Weakly related on purpose (CKA ~0.3), so the null and the observed value are both far from 0 and 1.
    """
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, LATENT, generator=generator)
    x = shared @ torch.randn(LATENT, d, generator=generator) + 4 * torch.randn(n, d, generator=generator) + 1.0
    y = shared @ torch.randn(LATENT, d, generator=generator) + 4 * torch.randn(n, d, generator=generator) - 2.0
    return x, y


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def naive(x, y, perms, kind):
    return torch.stack([cka(x, y[p], kind) for p in perms])


def compare(n: int, d: int, n_perm: int, naive_perms: int, kinds: list[str], repeats: int, gram: bool,
            engine_perms: int | None = None) -> None:
    """Time the naive loop on `naive_perms` permutations and the engines on `engine_perms` (default: all)."""
    x, y = languages(n, d)
    perms = permutations(n, n_perm, seed=0)
    timed = perms[:engine_perms]
    gram_perms = perms[: max(naive_perms, n_perm // 5)]
    print(f"\nn={n}, d={d}, {n_perm} permutations, one layer; engine='auto' picks "
          f"{_pick_engine('auto', 'debiased', n, d, d)} in float64, {_pick_engine('auto', 'debiased', n, d, d, n_perm)} "
          f"with float32 products on the CPU")
    for kind in kinds:
        methods = {
            "naive loop (cka per perm.)": (perms[:naive_perms], lambda p: naive(x, y, p, kind)),
            "engine, float64": (timed, lambda p: permuted_cka(x, y, p, kind, engine="feature")),
            "engine, float32 products": (timed, lambda p: permuted_cka(x, y, p, kind, engine="feature",
                                                                      precision="float32")),
        }
        if gram:
            methods["gram engine, float64"] = (gram_perms, lambda p: permuted_cka(x, y, p, kind, engine="gram"))
        # float32 Gram matrices and the compiled permuted sums (the two Gram matrices are inside its time)
        methods["gram engine, float32"] = (timed, lambda p: permuted_cka(x, y, p, kind, engine="gram", precision="float32"))
        # interleaved repeats, best of each: load from other processes hits every method alike
        seconds = {label: math.inf for label in methods}
        nulls = {}
        for _ in range(repeats):
            for label, (subset, fn) in methods.items():
                nulls[label], elapsed = best_of(1, lambda: fn(subset))
                seconds[label] = min(seconds[label], elapsed)
        reference = nulls["naive loop (cka per perm.)"]
        naive_total = seconds["naive loop (cka per perm.)"] / naive_perms * n_perm
        null_mean = float(nulls["engine, float64"].mean())
        print(f"  {kind} CKA {float(cka(x, y, kind)):.3f}, null mean {null_mean:+.4f} "
              f"(over {len(timed)} permutations)")
        for label, (subset, _) in methods.items():
            total = seconds[label] / len(subset) * n_perm
            how = ("measured" if len(subset) == n_perm
                   else f"EXTRAPOLATED from {seconds[label]:.2f} s for {len(subset)} permutations")
            diff = float((nulls[label][:naive_perms] - reference).abs().max())
            line = f"    {label:<28} {total:8.2f} s  {how} ({total / n_perm * 1e3:.2f} ms each)"
            if label.startswith("naive"):
                print(line)
                continue
            print(f"{line}; max |engine - naive| {diff:.1e}")
            print(f"    ratio (naive / {label}): {naive_total / total:.2f}x (target >= 5x)")


def other_nulls(repeats: int) -> None:
    """The demo's other permutation tests at the issue's default counts, one layer."""
    n, d = 1077, 128
    x, y = languages(n, d)
    lengths = np.random.default_rng(0).integers(3, 40, n)
    bins = length_bins(lengths, 10)
    print(f"\nother nulls at n={n}, d={d}, one layer:")
    _, seconds = best_of(repeats, lambda: permuted_cka(x, y, permutations(n, 500, 0, bins), "debiased"))
    print(f"  length-matched CKA null, 500 permutations       {seconds:6.2f} s")
    _, seconds = best_of(repeats, lambda: mantel_test(x, y, n_perm=500, seed=0))
    print(f"  RSA Mantel test, 500 permutations               {seconds:6.2f} s")
    _, seconds = best_of(repeats, lambda: retrieval_permutation_test(x, y, n_perm=1000, seed=0))
    print(f"  retrieval top-1 null, 1000 permutations         {seconds:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo size only, 200 permutations")
    parser.add_argument("--perms", type=int, default=1000, help="permutations per null")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a loaded machine use 1: with 2, each of the "
                             "naive loop's many small parallel ops waits for a descheduled thread")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (timings are only comparable at a load below the CPU count)")
    if args.quick:
        compare(1077, 128, min(args.perms, 200), 20, ["debiased"], args.repeats, gram=True)
        return
    compare(1077, 128, args.perms, 50, ["debiased", "linear"], args.repeats, gram=True)
    compare(5000, 768, args.perms, 4, ["debiased"], args.repeats, gram=False, engine_perms=min(args.perms, 200))
    other_nulls(args.repeats)


if __name__ == "__main__":
    main()
