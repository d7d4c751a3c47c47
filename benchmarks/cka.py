"""Linear CKA between all pairs of languages per layer: feature-space form (`cka_matrix`) vs the Gram form.

The study's analysis: 8 languages, 13 hidden layers (embeddings + 12), 5000 parallel sentences, d = 768,
CKA for the 28 language pairs in every layer. Four ways to get it:

- feature: `xlsub.cka.cka_matrix`, ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), each language centred once,
  one d x d product per pair and layer: O(n d^2). float64 throughout (analyze's default).
- feature, float32 products: the same with `precision="float32"` (analyze's `cka_precision=float32`):
  centred in float64, d x d products in float32 over blocks of examples, accumulated in float64.
- gram: `tests.reference.linear_cka_gram` called per pair and layer, tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) with
  n x n Gram matrices: O(n^2 d), float64. Timed on a subset of pairs and layers, extrapolated linearly (the cost
  per pair and layer is the same for all) to all pairs and layers; printed as extrapolated.
- gram, cached: a stronger Gram baseline that forms each language's centred Gram matrix once per layer
  and then needs only an n x n inner product per pair. Timed on one layer, extrapolated to all layers.

Each method runs in its own subprocess. Peak memory is the growth of the process' resident set during
the computation, past the input tensors: the kernel's high-water mark (VmHWM) is reset after the inputs
are built (write 5 to /proc/self/clear_refs) and read after the computation, minus the resident set
before it. That sees torch's allocations (tracemalloc would not). Agreement is the largest absolute
difference between the methods on the pairs and layers both computed.

    python benchmarks/cka.py                 # the study's sizes; ~1.5 minutes on 2 cores
    python benchmarks/cka.py --n 1000 --gram-pairs 28 --gram-layers 13   # small: the Gram form in full
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import linear_cka_gram  # noqa: E402
from xlsub.cka import _centre_gram, cka_matrix  # noqa: E402

LATENT = 64


def language(index: int, layers: int, n: int, d: int) -> torch.Tensor:
    """Synthetic encodings [layers, n, d] (float32, as stored by encode) of language `index`.

    A latent shared by all languages (the "meaning" of the parallel sentences), mapped by a
    language-specific matrix, plus language-specific noise and offset, so CKA values are spread out
    (about 0.3-0.9) and no pair is trivially 0 or 1. Seeded per language, so every subprocess builds the
    same data for the languages it needs.
    """
    shared = torch.randn(layers, n, LATENT, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + index)
    mix = torch.randn(LATENT, d, generator=g) / LATENT**0.5
    offset = torch.randn(d, generator=g)
    noise = torch.randn(layers, n, d, generator=g) * (0.5 + 0.15 * index)  # last: layer l is the same for any `layers`
    return shared @ mix + noise + offset


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak growth of resident memory (bytes) inside the `with` block, from the kernel's high-water mark."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = (_status_kib("VmHWM") - self.start) * 1024


def worker(method: str, args: argparse.Namespace) -> dict:
    langs = range(args.langs)
    pairs = list(combinations(langs, 2))
    if method in ("feature", "feature32"):
        reps = {f"l{i}": language(i, args.layers, args.n, args.d) for i in langs}
        with PeakMemory() as memory:
            start = time.perf_counter()
            matrix = cka_matrix(reps, "linear", precision="float32" if method == "feature32" else "float64")
            seconds = time.perf_counter() - start
        values = {f"{i},{j},{layer}": float(matrix[layer, i, j]) for i, j in pairs for layer in range(args.layers)}
        return {"seconds": seconds, "peak_bytes": memory.peak, "units": len(pairs) * args.layers, "values": values}

    if method == "gram":
        subset = pairs[: args.gram_pairs]
        needed = sorted({i for pair in subset for i in pair})
        reps = {i: language(i, args.layers, args.n, args.d)[: args.gram_layers] for i in needed}
        values = {}
        with PeakMemory() as memory:
            start = time.perf_counter()
            for i, j in subset:
                for layer in range(args.gram_layers):  # one layer per call: a batched call holds L n x n matrices
                    values[f"{i},{j},{layer}"] = float(linear_cka_gram(reps[i][layer], reps[j][layer]))
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_bytes": memory.peak, "units": len(subset) * args.gram_layers,
                "values": values}

    if method == "gram_cached":
        reps = {i: language(i, 1, args.n, args.d)[0] for i in langs}  # layer 0 only
        values = {}
        with PeakMemory() as memory:
            start = time.perf_counter()
            centred = {}
            for i, x in reps.items():
                x = x.double()
                centred[i] = _centre_gram(x @ x.T)
            norms = {i: float(kc.square().sum().sqrt()) for i, kc in centred.items()}
            for i, j in pairs:
                values[f"{i},{j},0"] = float((centred[i] * centred[j]).sum()) / (norms[i] * norms[j])
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_bytes": memory.peak, "units": len(pairs), "values": values}
    raise ValueError(method)


def run_worker(method: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", method], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences")
    parser.add_argument("--d", type=int, default=768, help="hidden size")
    parser.add_argument("--layers", type=int, default=13, help="hidden layers incl. embeddings")
    parser.add_argument("--langs", type=int, default=8, help="languages")
    parser.add_argument("--gram-pairs", type=int, default=2, help="language pairs the Gram form is timed on")
    parser.add_argument("--gram-layers", type=int, default=4, help="layers the Gram form is timed on")
    parser.add_argument("--worker", choices=["feature", "feature32", "gram", "gram_cached"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gram_pairs = min(args.gram_pairs, args.langs * (args.langs - 1) // 2)
    args.gram_layers = min(args.gram_layers, args.layers)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    argv = [f"--n={args.n}", f"--d={args.d}", f"--layers={args.layers}", f"--langs={args.langs}",
            f"--gram-pairs={args.gram_pairs}", f"--gram-layers={args.gram_layers}"]
    pairs = args.langs * (args.langs - 1) // 2
    total_units = pairs * args.layers
    print(f"linear CKA, n={args.n}, d={args.d}, {args.layers} layers, {args.langs} languages = {pairs} pairs "
          f"({total_units} pair-layers), torch {torch.__version__}, {torch.get_num_threads()} threads")

    feature = run_worker("feature", argv)
    feature32 = run_worker("feature32", argv)
    gram = run_worker("gram", argv)
    cached = run_worker("gram_cached", argv)

    gram_total = gram["seconds"] / gram["units"] * total_units
    cached_total = cached["seconds"] * args.layers
    diff_gram = max(abs(feature["values"][key] - value) for key, value in gram["values"].items())
    diff_cached = max(abs(feature["values"][key] - value) for key, value in cached["values"].items())
    diff_32 = max(abs(feature["values"][key] - value) for key, value in feature32["values"].items())
    diff_32_gram = max(abs(feature32["values"][key] - value) for key, value in gram["values"].items())
    values = list(feature["values"].values())
    mib = 2**20
    print(f"CKA values over all pairs and layers: {min(values):.3f} .. {max(values):.3f}")
    print(f"feature (cka_matrix)      {feature['seconds']:8.2f} s  all {total_units} pair-layers, measured; "
          f"peak +{feature['peak_bytes'] / mib:,.0f} MiB")
    print(f"feature, float32 products {feature32['seconds']:8.2f} s  all {total_units} pair-layers, measured; "
          f"peak +{feature32['peak_bytes'] / mib:,.0f} MiB")
    how = "measured" if gram["units"] == total_units else "EXTRAPOLATED"
    print(f"gram, per pair            {gram_total:8.2f} s  {how} from {gram['seconds']:.2f} s for "
          f"{gram['units']} pair-layers ({args.gram_pairs} pairs x {args.gram_layers} layers); "
          f"peak +{gram['peak_bytes'] / mib:,.0f} MiB")
    print(f"gram, cached per language {cached_total:8.2f} s  EXTRAPOLATED from {cached['seconds']:.2f} s for "
          f"layer 0 ({pairs} pairs) x {args.layers} layers; peak +{cached['peak_bytes'] / mib:,.0f} MiB")
    n2 = args.n**2 * 8 / mib
    print(f"theory: one n x n float64 matrix is {n2:,.0f} MiB; gram per pair holds ~5 (K, L, HKH, HLH, "
          f"a product), cached holds {args.langs} + 1; feature holds d x d products ({args.d**2 * 8 / mib:.1f} MiB) "
          f"and float64 copies of every language for a chunk of layers "
          f"(here 1 layer: {args.langs * args.n * args.d * 8 / mib:,.0f} MiB)")
    feature_flops = (args.langs + pairs) * args.layers * 2 * args.n * args.d**2  # X'X per language, Y'X per pair
    gram_flops = total_units * 2 * 2 * args.n**2 * args.d  # K and L per pair
    cached_flops = args.langs * args.layers * 2 * args.n**2 * args.d
    print(f"matmul flops: feature {feature_flops / 1e12:.2f} T, gram per pair {gram_flops / 1e12:.2f} T "
          f"({gram_flops / feature_flops:.1f}x), gram cached {cached_flops / 1e12:.2f} T "
          f"({cached_flops / feature_flops:.1f}x); the Gram forms also make ~10 passes over n x n matrices")
    print(f"speed-up over gram per pair (target >= 20x): feature {gram_total / feature['seconds']:.1f}x, "
          f"feature with float32 products {gram_total / feature32['seconds']:.1f}x; over gram cached: "
          f"{cached_total / feature['seconds']:.1f}x and {cached_total / feature32['seconds']:.1f}x")
    print(f"agreement: max |feature - gram| = {diff_gram:.2e} over {gram['units']} pair-layers; "
          f"max |feature - gram cached| = {diff_cached:.2e} over {cached['units']}; "
          f"max |feature float32 products - feature| = {diff_32:.2e} over all {total_units}, "
          f"- gram = {diff_32_gram:.2e}")


if __name__ == "__main__":
    main()
