"""Linear CKA between all pairs of languages per layer: feature-space form (`cka_matrix`) vs the Gram form.

The study's analysis: 8 languages, 13 hidden layers (embeddings + 12), 5000 parallel sentences, d = 768,
CKA for the 28 language pairs in every layer. Four ways to get it:

- feature: `xlsub.similarity.cka.cka_matrix`, ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), each language centred once,
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

Then the CKA libraries a user would pick instead, on the same data, per pair of representations (one
layer of two languages, float32 as encode stores them), at the demo's size (n=1077, d=128) and the study's
(n=5000, d=768): for each estimator xlsub offers, the time per pair of xlsub's function and of each library's,
their ratio and the largest absolute difference of the values. The libraries are benchmark-only extras
(`pip install -e '.[bench]'`); one that is not installed is skipped with one line.

- ckatorch (`cka_base`): the Gram form, always in float64. linear; debiased (`unbiased=True`, Kornblith's
  unbiased centring); rbf, whose bandwidth is sqrt(median of the squared distances over the whole n x n
  matrix, zero diagonal included, lower middle), where xlsub takes the median distance over the pairs
  i < j: the values differ by that, so a second check runs ckatorch's kernel and centring with xlsub's
  bandwidth. Also `cka_batch` (HSIC_1 of Nguyen et al.; with the whole sample as one batch it is the
  debiased CKA), which multiplies n x n matrices: O(n^3).
- pytorch-cka (`cka_from_features`): debiased only (unbiased HSIC of Gram matrices), in the dtype of its
  inputs, so it is timed on float64 copies and, as a user would call it on stored encodings, on float32
  (compared with xlsub's `precision="float32"`). Its model-hook API (`CKA`, `compute_cka`) sums the HSIC
  terms into float32 tensors whatever the inputs, so only `cka_from_features` can give float64 values.

Times are per pair: each implementation runs once per pair, the implementations interleaved, after one
warm-up call on a small input; printed are the best and the median over the pairs (the best is the least
disturbed by other work on the machine; ratios use it). A last row per estimator times xlsub's
`cka_matrix` over 8 languages (one layer) divided by its 28 pairs: what a pair costs when, as in the
study, each language is prepared once for all its pairs.

    python benchmarks/cka.py                 # the study's sizes, then the libraries; ~4 minutes on 2 cores
    python benchmarks/cka.py --n 1000 --gram-pairs 28 --gram-layers 13   # small: the Gram form in full
    python benchmarks/cka.py --libraries only   # only the libraries (--libraries no: without them)
    python benchmarks/cka.py --threads 1        # on a loaded machine (see --help)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# This file is cka.py: with its folder on the path, pytorch-cka's `import cka` would import this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from tests.reference import linear_cka_gram  # noqa: E402
from xlsub.similarity.cka import centre_gram, cka_matrix, debiased_linear_cka, linear_cka, rbf_cka  # noqa: E402

LATENT = 64
# (n, d, pairs timed): the demo's size and the study's
LIBRARY_SIZES = ((1077, 128, 12), (5000, 768, 3))
LIBRARIES = {"ckatorch": "ckatorch", "pytorch-cka": "cka"}  # PyPI name: import name


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
                centred[i] = centre_gram(x @ x.T)
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
    parser.add_argument("--libraries", choices=["yes", "no", "only"], default="yes",
                        help="also time the CKA libraries (ckatorch, pytorch-cka) per pair, or only them")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a loaded machine use 1: with 2, a parallel op "
                             "waits for a descheduled thread, and the libraries' long calls are hit more often "
                             "than xlsub's short ones")
    parser.add_argument("--worker", choices=["feature", "feature32", "gram", "gram_cached"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gram_pairs = min(args.gram_pairs, args.langs * (args.langs - 1) // 2)
    args.gram_layers = min(args.gram_layers, args.layers)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.libraries != "only":
        compare_forms(args)
    if args.libraries != "no":
        compare_libraries()


def compare_forms(args: argparse.Namespace) -> None:
    """xlsub's feature-space all-pairs CKA against the Gram forms (the module docstring's first part)."""
    argv = [f"--n={args.n}", f"--d={args.d}", f"--layers={args.layers}", f"--langs={args.langs}",
            f"--gram-pairs={args.gram_pairs}", f"--gram-layers={args.gram_layers}"]
    if args.threads:
        argv.append(f"--threads={args.threads}")
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


# -- the CKA libraries a user would pick instead, per pair of representations ---------------------------

def _ckatorch_rbf_matched(ckatorch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ckatorch's RBF kernel, centring and ratio (as in its `cka_base`) with xlsub's bandwidth.

    ckatorch's sigma^2 is threshold^2 x the median of its n x n squared distances; the threshold is set per
    input so that sigma is the median distance over the pairs i < j (numpy's median, not xlsub's), which
    removes the one difference in definition between the two.
    """
    grams = []
    for z in (x.double(), y.double()):
        dot = z @ z.T
        sq = -2 * dot + dot.diag()[:, None] + dot.diag()[None, :]  # as ckatorch.rbf_kernel
        upper = np.triu_indices(len(z), 1)
        sigma = float(np.median(np.sqrt(np.clip(sq.numpy()[upper], 0, None))))
        threshold = sigma / math.sqrt(float(torch.median(sq)))
        grams.append(ckatorch.center_gram_matrix(ckatorch.rbf_kernel(z, threshold)))
    kx, ky = grams
    return kx.ravel().dot(ky.ravel()) / (torch.linalg.norm(kx) * torch.linalg.norm(ky))


def library_methods() -> tuple[dict[str, list[tuple[str, Callable]]], dict[str, Callable]]:
    """{estimator: [(label, f(x, y) -> CKA)]}, xlsub first, with the libraries that are installed; and the
    checks that are not timed. Prints one line for each library that is not installed."""
    found = {}
    for name, module in LIBRARIES.items():
        try:
            found[name] = importlib.import_module(module)
        except ImportError:
            print(f"{name}: not installed, skipped (pip install -e '.[bench]')")
    methods = {
        "linear": [("xlsub linear_cka", linear_cka)],
        "debiased": [("xlsub debiased_linear_cka", debiased_linear_cka)],
        "rbf": [("xlsub rbf_cka", rbf_cka)],
        "debiased, float32": [("xlsub debiased_linear_cka(precision=float32)",
                               lambda x, y: debiased_linear_cka(x, y, precision="float32"))],
    }
    checks = {}
    if "ckatorch" in found:
        ckatorch, tag = found["ckatorch"], f"ckatorch {version('ckatorch')}"
        methods["linear"].append((f"{tag} cka_base", lambda x, y: ckatorch.cka_base(x, y, "linear")))
        methods["debiased"].append((f"{tag} cka_base(unbiased=True)",
                                    lambda x, y: ckatorch.cka_base(x, y, "linear", unbiased=True)))
        methods["debiased"].append((f"{tag} cka_batch, one batch", lambda x, y: ckatorch.cka_batch(x[None], y[None])))
        methods["rbf"].append((f"{tag} cka_base(kernel=rbf)", lambda x, y: ckatorch.cka_base(x, y, "rbf")))
        checks["rbf"] = (f"{tag}, xlsub's bandwidth", lambda x, y: _ckatorch_rbf_matched(ckatorch, x, y))
    if "pytorch-cka" in found:
        pytorch_cka, tag = found["pytorch-cka"], f"pytorch-cka {version('pytorch-cka')}"
        methods["debiased"].append((f"{tag} cka_from_features, float64",
                                    lambda x, y: pytorch_cka.cka_from_features(x.double(), y.double())))
        methods["debiased, float32"].append((f"{tag} cka_from_features, float32 inputs",
                                             pytorch_cka.cka_from_features))
    return methods, checks


def time_pairs(methods: dict[str, list[tuple[str, Callable]]], pairs: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> dict[str, tuple[list[float], list[float]]]:
    """{label: (seconds per pair, values)}, every implementation once per pair, interleaved over the pairs."""
    out = {label: ([], []) for group in methods.values() for label, _ in group}
    for x, y in pairs:
        for group in methods.values():
            for label, f in group:
                start = time.perf_counter()
                value = float(f(x, y).reshape(-1)[0])
                out[label][0].append(time.perf_counter() - start)
                out[label][1].append(value)
    return out


def compare_libraries() -> None:
    """Time per pair and agreement of xlsub and the CKA libraries, per estimator (module docstring)."""
    print(f"\nCKA libraries, per pair (one layer of two languages, float32 inputs), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(timings are only comparable at a load below the CPU count)")
    methods, checks = library_methods()
    if all(len(group) == 1 for group in methods.values()):
        return
    tiny = language(0, 1, 64, 16)[0], language(1, 1, 64, 16)[0]
    time_pairs(methods, [tiny])  # warm-up: first calls, lazy initialisation

    ratios = {}
    for n, d, count in LIBRARY_SIZES:
        langs = range(8)
        reps = {i: language(i, 1, n, d)[0] for i in langs}
        all_pairs = list(combinations(langs, 2))
        pairs = [(reps[i], reps[j]) for i, j in all_pairs[:count]]
        print(f"n={n}, d={d}: {count} pairs; s per pair best / median; ratio = time / xlsub's (best); "
              f"max |value - xlsub float64| over the pairs")
        results = time_pairs(methods, pairs)
        matrices = {}
        for kind in ("linear", "debiased", "rbf"):  # all 28 pairs at once: each language prepared once
            start = time.perf_counter()
            matrix = cka_matrix({i: reps[i][None] for i in langs}, kind)[0]
            matrices[kind] = ((time.perf_counter() - start) / len(all_pairs),
                              [float(matrix[i, j]) for i, j in all_pairs[:count]])
        for estimator, group in methods.items():
            xlsub_label = group[0][0]
            xlsub_time = min(results[xlsub_label][0])
            reference = results[methods[estimator.split(",")[0]][0][0]][1]  # xlsub in float64
            for label, _ in group:
                seconds, values = results[label]
                ratio = min(seconds) / xlsub_time
                diff = max(abs(a - b) for a, b in zip(values, reference))
                print(f"  {estimator:18s} {label:52s} {min(seconds):8.4f} / {statistics.median(seconds):8.4f} s  "
                      f"{ratio:6.1f}x  diff {diff:.1e}")
                if label != xlsub_label and ratio < ratios.get((estimator, n), (math.inf,))[0]:
                    ratios[estimator, n] = ratio, label.split()[0]
            if estimator in matrices:
                seconds, values = matrices[estimator]
                diff = max(abs(a - b) for a, b in zip(values, reference))
                print(f"  {estimator:18s} {'xlsub cka_matrix, 8 languages: time / 28 pairs':52s} {seconds:8.4f}"
                      f"{'':13s}  {seconds / xlsub_time:6.1f}x  diff {diff:.1e}")
            if estimator in checks:
                label, f = checks[estimator]
                diff = max(abs(float(f(x, y)) - b) for (x, y), b in zip(pairs, reference))
                print(f"  {estimator:18s} {label:52s} {'(not timed)':21s}  {'':7s}  diff {diff:.1e}")
    sizes = " / ".join(f"n={n}" for n, _, _ in LIBRARY_SIZES)
    print(f"fastest library's time / xlsub's per estimator ({sizes}):")
    for estimator in methods:
        closest = [ratios[estimator, n] for n, _, _ in LIBRARY_SIZES if (estimator, n) in ratios]
        if closest:
            verdict = "xlsub ahead" if all(ratio > 1 for ratio, _ in closest) else "xlsub NOT ahead"
            print(f"  {estimator:18s} " + " / ".join(f"{ratio:.1f}x ({name})" for ratio, name in closest)
                  + f": {verdict}")


if __name__ == "__main__":
    main()
