"""Translation retrieval (`xlsub.similarity.retrieval.nearest_translation`): the compiled loops
(`xlsub.similarity.compiled_nearest`: the language's side prepared in one pass a row, without a float64 copy of its
rows; each screened row's candidates collected in two reads and compared by their float64 cosines), screening in
float32 and in the CPU's own choice (`retrieval._screen_dtype`: int8 where oneDNN's integer product is exact and
there is no bfloat16, as on AVX2-only CPUs), against the torch path (float32 screen; the side's float64 unit rows
made by torch operations; `topk` of 8, a pairwise float64 recheck of 2-7 candidates, a float32 product against
every sentence for 8 or more), side by side in one run, at the study's size
(n = 5,000 sentences, 13 layers, d = 768, as `retrieval_table` calls it for one language against the reference,
which is prepared once).

Two pairs of encodings: translations sharing a strong signal (most rows have one candidate, as the full model's) and
independent ones (a random model's: chance-level cosines, close together at the top of each row). The columns are
scaled by a decaying spectrum and the values rounded through float16, as `benchmarks/scale.py` makes them. The torch
path is forced by making `retrieval._compiled` refuse. Timings are the best of `--repeats` runs, interleaved; every
path's answers are compared with torch's (they must be equal).

    python benchmarks/retrieval.py              # ~1 minute on 2 idle cores
    python benchmarks/retrieval.py --n 2000     # smaller
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.similarity import retrieval  # noqa: E402


def encodings(n: int, layers: int, d: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spectrum = (torch.arange(d) + 1.0) ** -0.35
    shared = torch.randn(layers, n, d, generator=g)
    x = (signal * shared + torch.randn(layers, n, d, generator=g)).mul_(spectrum).half().float()
    y = (signal * shared + torch.randn(layers, n, d, generator=g)).mul_(spectrum).half().float()
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences (default: the study's 5,000)")
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    compiled = retrieval._compiled
    chosen = retrieval._screen_dtype(torch.device("cpu"))
    paths = {"torch": (False, torch.float32), "compiled float32": (True, torch.float32)}
    if chosen != torch.float32:
        paths[f"compiled {str(chosen).removeprefix('torch.')}"] = (True, chosen)
    retrieval.nearest_translation(torch.randn(50, 8), torch.randn(50, 8))  # compiled (or read from numba's cache) before timing
    for name, signal in (("translations", 1.0), ("independent", 0.0)):
        x, y = encodings(args.n, args.layers, args.hidden, signal, seed=1)
        best, found, reference = {}, {}, {}
        for _ in range(args.repeats):
            for path, (loop, dtype) in paths.items():
                retrieval._compiled = compiled if loop else (lambda x, dtype: False)
                reference[path] = reference.get(path) or retrieval.CosineSide(x, dtype)  # the reference prepared once, as retrieval_table does
                start = time.perf_counter()
                found[path] = retrieval.nearest_translation(y, reference[path])
                best[path] = min(best.get(path, float("inf")), time.perf_counter() - start)
        retrieval._compiled = compiled
        for path in paths:
            if not torch.equal(found["torch"], found[path]):
                raise SystemExit(f"{name}: {path}'s answers differ from torch's in {int((found['torch'] != found[path]).sum())} rows")
        print(f"{name} (top-1 {float(retrieval.top1(found['torch']).mean()):.4f} over {args.layers} layers, n={args.n}, d={args.hidden}): "
              + ", ".join(f"{path} {best[path]:.2f} s" for path in paths)
              + "; " + ", ".join(f"{path} {best['torch'] / best[path]:.2f}x torch's rate" for path in paths if path != "torch")
              + ", the same answers")


if __name__ == "__main__":
    main()
