"""Would a moment-matched decision do for the power analysis? Planted draws decided by the normal tail of their
exact permutation null (z = (statistic - mean) / sd with the exact length-restricted mean and sd of
`xlsub.similarity.moments`, p = 1 - Phi(z)) against the same draws' p-values from a large permutation null.

The power analysis (`xlsub.similarity.power`) plants the reference's own vectors in partners at a signal-to-noise
ratio; at each level this script draws such partners and, for CKA (debiased, `cka_permutation_test`) or RSA (the
Spearman Mantel test), prints each draw's z, both p-values and whether the decisions at 0.05 agree, then the share
that agree and the mean ratio p_normal / p_permutation where 0.01 < p_permutation < 0.2. Issue 25 asks for the same
decision in at least 99% of draws before permutations may be replaced; benchmarks/README.md records the results.

    # the demo's encodings (an encode run's artifacts and a tokenizer folder from the same study)
    python benchmarks/moment_decision.py --measure cka --encodings <encode run>/artifacts --tokenizer <folder> \\
        --levels 3e-4,6e-4,1e-3,1.8e-3 --draws 50 --permutations 1999
    # synthetic: n sentences, d dimensions, a few dominant directions and a length direction
    python benchmarks/moment_decision.py --measure rsa --synthetic 200,16 --levels 3e-3,1e-2,3e-2,0.1 --draws 25 --permutations 4999
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xlsub import artifacts  # noqa: E402
from xlsub.similarity import moments  # noqa: E402
from xlsub.similarity.controls import planted_representations  # noqa: E402
from xlsub.similarity.permutation import cka_null_moments_many, cka_permutation_test, permutations  # noqa: E402
from xlsub.similarity.power import spearman_matrix  # noqa: E402
from xlsub.similarity.rsa import rdm  # noqa: E402
from xlsub.stats.inference import mantel_test, matrix_dots, upper_norm  # noqa: E402


def demo_inputs(encodings: Path, tokenizer: Path, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's last layer of `reference` and its sentences' token counts (<s>, </s> included)."""
    from transformers import AutoTokenizer

    texts = json.loads((encodings / artifacts.SENTENCES).read_text())["texts"][reference]
    lengths = torch.tensor([len(ids) + 2 for ids in AutoTokenizer.from_pretrained(tokenizer)(texts, add_special_tokens=False)["input_ids"]])
    return artifacts.read_encodings(encodings / artifacts.ENCODINGS_DIR)[artifacts.FULL_MODEL][reference][-1].double(), lengths


def synthetic_inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three dominant directions, a sentence-length direction and noise; token counts from a gamma distribution."""
    torch.manual_seed(seed)  # the gamma sampler takes no generator
    lengths = torch.distributions.Gamma(4.0, 0.25).sample((n,)).round().clamp(3, 60).long()
    g = torch.Generator().manual_seed(seed)
    centred = (lengths.double() - lengths.double().mean())[:, None] / 20
    base = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(3, d, generator=g, dtype=torch.float64) \
        + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + centred * torch.randn(d, generator=g, dtype=torch.float64)
    return base, lengths


def normal_and_permutation_p(measure: str, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, n_perm: int, seed: int,
                             reference: torch.Tensor | None) -> tuple[float, float, float]:
    """(z, p from the normal tail of the exact moments, p from n_perm length-restricted permutations)."""
    if measure == "cka":
        result = cka_permutation_test(x, y, n_perm, seed, "debiased", groups=groups)
        mean, sd, _ = (float(v) for v in cka_null_moments_many(x, y[None], "debiased", groups))
        observed = float(result.observed)
    else:
        b = spearman_matrix(rdm(y))
        norms = upper_norm(reference) * upper_norm(b)
        mean, sd, _ = (float(v) for v in moments.mantel_moments(reference, b[None], norms[None], groups))
        result = mantel_test(reference, b, permutations(len(x), n_perm, seed, groups), groups, centred=True)
        observed = float(matrix_dots(reference, b) / norms)
    z = (observed - mean) / sd
    return z, float(torch.special.ndtr(torch.tensor(-z))), float(result.p_value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=("cka", "rsa"), default="cka")
    parser.add_argument("--encodings", type=Path, help="an encode run's artifacts folder (encodings/, sentences.json)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder of the same study (with --encodings)")
    parser.add_argument("--reference", default="en")
    parser.add_argument("--synthetic", help="n,d of synthetic inputs instead of --encodings")
    parser.add_argument("--levels", default="3e-4,6e-4,1e-3,1.8e-3", help="signal-to-noise ratios, comma-separated")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--permutations", type=int, default=1999)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.synthetic:
        n, d = (int(v) for v in args.synthetic.split(","))
        base, groups = synthetic_inputs(n, d)
    elif args.encodings and args.tokenizer:
        base, groups = demo_inputs(args.encodings, args.tokenizer, args.reference)
    else:
        parser.error("pass --encodings and --tokenizer, or --synthetic n,d")
    x = planted_representations(base, ["reference"], math.inf, 0, rotate=False)["reference"]
    reference = spearman_matrix(rdm(x)) if args.measure == "rsa" else None
    print(f"{args.measure}: n {base.shape[0]}, d {base.shape[1]}, {len(groups.unique())} length groups, {args.permutations} permutations",
          flush=True)
    agree, ratios, total = 0, [], 0
    for snr in (float(v) for v in args.levels.split(",")):
        for j in range(args.draws):
            start = time.perf_counter()
            y = planted_representations(base, ["planted"], snr, 7000 + j, rotate=False)["planted"]
            z, p_normal, p_perm = normal_and_permutation_p(args.measure, x, y, groups, args.permutations, 1 + j, reference)
            same = (p_normal < args.alpha) == (p_perm < args.alpha)
            agree, total = agree + same, total + 1
            if 0.01 < p_perm < 0.2:
                ratios.append(p_normal / p_perm)
            print(f"snr {snr:.2e} draw {j}: z {z:.2f} p_permutation {p_perm:.4f} p_normal {p_normal:.4f}"
                  f"{'' if same else '  DIFFERENT DECISION'} ({time.perf_counter() - start:.1f} s)", flush=True)
    mean_ratio = sum(ratios) / len(ratios) if ratios else math.nan
    print(f"same decision at {args.alpha}: {agree} of {total} ({agree / total:.1%}); mean p_normal / p_permutation where "
          f"0.01 < p < 0.2: {mean_ratio:.3f} ({len(ratios)} draws)")


if __name__ == "__main__":
    main()
