"""CKA's power curve (`xlsub.similarity.power.PlantedCkaTerms`): the permuted terms of one chunk of planted draws by
the Gram engine (the reference's Gram matrix gathered once per permutation against each draw's two Gram matrices,
`xlsub.similarity.permutation.permuted_gram_dots`) against the feature engine (two float32 d x d products per draw and
permutation, `permuted_products`), side by side in one run, at the study's size: n = 5,000 sentences, d = 768, the
length-restricted null, 10 draws a chunk, 99 permutations (`power.CHUNK`, `power.N_PERM`).

The reference is the last layer of `benchmarks/scale.py`'s synthetic full model for its reference language (a shared
signal, a length direction and noise, columns scaled by a decaying spectrum, rounded through float16). Each engine
computes every permutation's terms of the chunk, as a level near the detection limit needs them. The two engines' null
CKA of every draw and permutation at a level near the study's detection limit are compared: they must agree within
the float64 recheck distance (`FLOAT32_RECHECK` of the observed CKA), as the feature engine's float32 null does with
the float64 one.

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


if __name__ == "__main__":
    main()
