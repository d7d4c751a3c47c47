"""kNN-graph spectra of subsamples (`xlsub.similarity.isomorphism.knn_spectra`, as `isomorphism_table` calls it for one
model and language at the last layer): the compiled loops (`xlsub.similarity.compiled_knn`: each half's neighbours read
from the whole sample's Gram matrix, every half's row means by one product) against the torch path (each half's block
gathered, centred and scaled to cosines in place, `topk`), side by side in one run, at the study's size (n = 5,000
sentences, d = 768, 50 random halves).

The columns are scaled by a decaying spectrum and the values rounded through float16, as `benchmarks/scale.py` makes
them. The torch path is forced by making `isomorphism._compiled_gram` refuse. Timings are the best of `--repeats` runs,
interleaved, with torch's threads as analyze has them (the halves side by side); both paths' spectra are compared.

    python benchmarks/isomorphism.py              # ~30 s on 2 idle cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.similarity import isomorphism  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences (default: the study's 5,000)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--subsamples", type=int, default=50, help="halves (default: isomorphism_table's 50)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(args.n, args.hidden, generator=g) * (torch.arange(args.hidden) + 1.0) ** -0.35).half().float()
    subsets = isomorphism.subsamples(args.n, args.subsamples, 0)
    compiled = isomorphism._compiled_gram
    isomorphism.knn_spectra(x[:200], subsets[:2, :100] % 200, 10, 10)  # compiled (or read from numba's cache) before timing
    best, found = {}, {}
    for _ in range(args.repeats):
        for path in ("torch", "compiled"):
            isomorphism._compiled_gram = compiled if path == "compiled" else (lambda gram: False)
            start = time.perf_counter()
            found[path] = isomorphism.knn_spectra(x, subsets, 10, 10)
            best[path] = min(best.get(path, float("inf")), time.perf_counter() - start)
    isomorphism._compiled_gram = compiled
    same = all(torch.equal(a, b) for a, b in zip(found["torch"], found["compiled"]))
    largest = max(float((a - b).abs().max()) for a, b in zip(found["torch"], found["compiled"]))
    print(f"knn_spectra, n={args.n}, d={args.hidden}, {args.subsamples} halves, {torch.get_num_threads()} threads: "
          f"torch {best['torch']:.2f} s, compiled {best['compiled']:.2f} s, {best['torch'] / best['compiled']:.2f}x; "
          + ("the same spectra" if same else f"spectra differ by at most {largest:.2e} (neighbours tied to the last bit)"))


if __name__ == "__main__":
    main()
