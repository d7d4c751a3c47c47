"""The exact null moments' per-representation summary (`xlsub.similarity.moments.feature_summary`, the length-restricted
CKA null's mean, variance and tail weight) at the study's size: each length group's m x m Gram pp' formed once, for its
sum of squares and, double-centred, for its largest eigenvalue (the library), against forming pp' for the one and the
centred cc' for the other (the plain way), side by side in one run.

The groups are the study's length groups (`length_groups` of `benchmarks/scale.py`'s synthetic token counts, n = 5,000),
the vectors anisotropic Gaussian rows of d = 768. cka_pvalue_table computes one summary per model, layer and language
(288 at the study's size), the power analysis one per CKA draw. Timings are the best of `--repeats` runs, interleaved;
the two ways' summaries are compared.

    python benchmarks/null_moments.py            # ~1 minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402

from xlsub.report.similarity_tables import length_groups, sentence_lengths  # noqa: E402
from xlsub.similarity import moments  # noqa: E402


def plain_group_terms(p: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of squares from pp' (p'p for m >= d) and the largest eigenvalue from the centred cc' (c'c for m > d)."""
    m, d = p.shape
    within = (p @ p.mT).square().sum() if m < d else (p.mT @ p).square().sum()
    return within, moments._top(c @ c.mT if m <= d else c.mT @ c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="sentences (default: the study's 5,000)")
    parser.add_argument("--d", type=int, default=768, help="dimensions (default: XLM-R base's 768)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    inputs = scale.study_inputs(args.n, layers=1, d=8)  # only its token counts are used
    reference = inputs.languages[0]
    groups = length_groups(sentence_lengths(inputs.tokens), reference)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, args.d, dtype=torch.float64)
    xc = x - x.mean(0)
    library = moments._group_terms
    best, summaries = {}, {}
    for _ in range(args.repeats):
        for name, terms in (("plain: pp' and cc'", plain_group_terms), ("one Gram per group", library)):
            moments._group_terms = terms
            start = time.perf_counter()
            summaries[name] = moments.feature_summary(xc, groups)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    moments._group_terms = library
    plain, fast = summaries.values()
    print(f"n = {args.n}, d = {args.d}, {len(fast.sizes)} length groups (largest {int(fast.sizes.max())}), {torch.get_num_threads()} threads")
    for name, seconds in best.items():
        print(f"  {name}: {seconds * 1e3:.0f} ms a summary")
    worst = max(float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()) for a, b in ((fast.top, plain.top), (fast.rest, plain.rest)))
    print(f"  ratio (plain / one Gram): {best[next(iter(best))] / best['one Gram per group']:.2f}x; largest relative difference "
          f"of the eigenvalue bounds and the rest terms {worst:.1e}")


if __name__ == "__main__":
    main()
