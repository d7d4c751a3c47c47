"""CKA's power curve (`xlsub.similarity.power.PlantedCkaTerms`): the permuted terms of one chunk of planted draws by
the Gram engine (the reference's Gram matrix gathered once per permutation against each draw's two Gram matrices,
`xlsub.stats.inference.permuted_cross`) against the feature engine (two float32 d x d products per draw and
permutation, `permuted_products`), side by side in one run, at the study's size: n = 5,000 sentences, d = 768, the
length-restricted null, 10 draws a chunk, 99 permutations (`power.CHUNK`, `power.N_PERM`).

The reference is the last layer of `benchmarks/scale.py`'s synthetic full model for its reference language (a shared
signal, a length direction and noise, columns scaled by a decaying spectrum, rounded through float16). Each engine
computes every permutation's terms of the chunk, as a level near the detection limit needs them. The two engines' null
CKA of every draw and permutation at a level near the study's detection limit are compared: they must agree within
the float64 recheck distance (`FLOAT32_RECHECK` of the observed CKA), as the feature engine's float32 null does with
the float64 one.

The same gather serves RSA's Mantel null (`permuted_cross` of the reference's float32 rank matrix against a chunk's 10
draws' rank matrices): the compiled loop against torch's tiled path (forced by making `inference.on_cpu` refuse), 20
permutations, on symmetric matrices of whole numbers (exact in float32, as centred ranks are), the sums compared.

    python benchmarks/power.py              # ~1 minute on 2 idle cores
    python benchmarks/power.py --n 2000     # smaller
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import SyntheticEncodings, sentence_tokens  # noqa: E402

from xlsub.report.similarity_tables import length_groups  # noqa: E402
from xlsub.similarity import power  # noqa: E402
from xlsub.similarity.permutation import FLOAT32_RECHECK  # noqa: E402
from xlsub.stats import inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences (default: the study's 5,000)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--snr", type=float, default=3.16e-4, help="the level whose null CKA the engines compare")
    args = parser.parse_args()
    languages = ["en", "de"]
    encodings = SyntheticEncodings(["full"], languages, args.n, 1, args.hidden, sentence_tokens(args.n, languages))
    base, groups = encodings["full"]["en"][-1].clone(), length_groups(encodings.lengths, "en")
    chunk = [power.draw_seed(0, j) for j in range(power.CHUNK)]
    power.planted_cka_terms(base[:50, :8], engine="gram").level(chunk[:1], 0.1)  # the compiled loop compiled (or read from numba's cache)
    seconds, nulls = {}, {}
    for engine in ("feature", "gram"):
        terms = power.planted_cka_terms(base, groups, engine=engine)
        start = time.perf_counter()
        observed, null = terms.level(chunk, args.snr)
        nulls[engine] = null(torch.arange(len(chunk)), torch.arange(power.N_PERM))  # every permutation's terms
        seconds[engine] = time.perf_counter() - start
        print(f"{engine:8s} {seconds[engine]:7.2f} s  ({terms.products} d x d products, {terms.grams} Gram-space terms)", flush=True)
    worst = float(((nulls["gram"] - nulls["feature"]).abs().amax(1) / (FLOAT32_RECHECK * observed.abs())).max())
    print(f"n {args.n}, d {args.hidden}, {len(chunk)} draws x {power.N_PERM} permutations: Gram engine {seconds['feature'] / seconds['gram']:.2f}x "
          f"the feature engine's speed; largest null CKA difference {worst:.3f} of the recheck distance")
    if worst > 1:
        raise SystemExit("the engines' null CKA differ by more than the recheck distance")
    mantel(args.n)


def mantel(n: int, draws: int = power.CHUNK, n_perm: int = 20) -> None:
    """RSA's Mantel null of one chunk: `permuted_cross`'s compiled loop against torch's tiled path."""
    g = torch.Generator().manual_seed(1)

    def ranks(m: int) -> torch.Tensor:  # symmetric, zero diagonal, whole numbers
        half = torch.randint(-1000, 1000, (m, n, n), generator=g).float()
        return (half + half.mT).mul_(1 - torch.eye(n))

    a, bs = ranks(1)[0], ranks(draws)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(n_perm)])
    small = torch.stack([torch.randperm(100, generator=g) for _ in range(2)])  # above the small-k path: the loop compiled before timing
    inference.permuted_cross(a[:100, :100].contiguous(), bs[:, :100, :100].contiguous(), small)
    seconds, sums = {}, {}
    for path in ("torch", "compiled"):
        on_cpu = inference.on_cpu
        if path == "torch":
            inference.on_cpu = lambda values: False
        try:
            start = time.perf_counter()
            sums[path] = inference.permuted_cross(a, bs, perms)
            seconds[path] = time.perf_counter() - start
        finally:
            inference.on_cpu = on_cpu
    same = torch.allclose(sums["compiled"], sums["torch"], rtol=1e-12, atol=0)
    print(f"Mantel null, {draws} matrices x {n_perm} permutations at n {n}: torch {seconds['torch']:.2f} s, compiled "
          f"{seconds['compiled']:.2f} s ({seconds['torch'] / seconds['compiled']:.2f}x), the same sums: {same}")
    if not same:
        raise SystemExit("the Mantel null's two paths differ")


if __name__ == "__main__":
    main()
