"""prune's and neurons' `precision` on this CPU: the importance pass (`head_importance`, gradients to the head gates
only) of XLM-R base's layers (`tiny-base-shape`, random init, XLM-R's 250,002-entry vocabulary) in fp32 and under
`torch.autocast` in bf16, alternated on the same batches; prints the chunks/s of each, their ratio, the two
perplexities and the Spearman correlation of the two importance vectors.

bf16 is fast where the CPU multiplies bfloat16 in hardware (AMX, AVX512-BF16: `xlsub.devices.native_16bit_products`);
elsewhere torch would emulate it, far slower, and the stages refuse it: the script says so and stops. The CPU's
extensions are printed with the result. No target: fp32 stays the default.

    python benchmarks/precision.py [--seq 128] [--chunks 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402
import scale  # noqa: E402

from xlsub.devices import autocast, native_16bit_products  # noqa: E402
from xlsub.models import loading as models  # noqa: E402
from xlsub.models.heads import head_importance, mask_shape  # noqa: E402
from xlsub.models.mlm import masked_forward  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128, help="tokens a chunk")
    parser.add_argument("--chunks", type=int, default=16, help="chunks an importance pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    cpu = scale.cpu_model()
    if not native_16bit_products(torch.bfloat16):  # prune and neurons refuse bf16 here
        print(f"CPU: {cpu['name']}: no bfloat16 products in hardware (or held below them): precision=bf16 is refused here, nothing to compare")
        return
    tokenizer = gpu.synthetic_tokenizer(8000)
    model = gpu.build_model(models.BASE_SHAPE, tokenizer, args.seq, models.XLMR_VOCAB_SIZE).eval()
    ids = torch.tensor(gpu.random_chunks(args.chunks, args.seq, len(gpu.SPECIALS), 8000, seed=2))
    scored = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.15
    batches = [{"input_ids": torch.where(scored, 4, ids)[i:i + args.batch], "attention_mask": torch.ones_like(ids[i:i + args.batch]),
                "labels": torch.where(scored, ids, -100)[i:i + args.batch]} for i in range(0, args.chunks, args.batch)]
    mask = torch.ones(mask_shape(model))
    seconds, results = {"fp32": [], "bf16": []}, {}
    with masked_forward(model):
        for precision in seconds:  # warm-up: kernels, allocator
            with autocast("cpu", precision):
                head_importance(model, batches[:1], mask)
        for _ in range(args.rounds):
            for precision in seconds:
                with autocast("cpu", precision):
                    start = time.perf_counter()
                    results[precision] = head_importance(model, batches, mask, normalize_layers=False, normalize_global=False)
                    seconds[precision].append(time.perf_counter() - start)
    fast = {p: args.chunks / min(s) for p, s in seconds.items()}
    print(f"CPU: {cpu['name']} ({', '.join(cpu['features']) or 'none of ' + ', '.join(scale.CPU_FEATURES)}); {torch.get_num_threads()} threads")
    print(f"importance pass, {models.BASE_SHAPE}, {args.chunks} chunks of {args.seq} tokens, batch {args.batch}:")
    for precision, rate in fast.items():
        print(f"  {precision}: {rate:6.2f} chunks/s, perplexity {results[precision].perplexity:.4f}")
    rho = scipy.stats.spearmanr(results["fp32"].importance.flatten().double(), results["bf16"].importance.flatten().double()).statistic
    print(f"bf16 / fp32: {fast['bf16'] / fast['fp32']:.2f}x; perplexities differ by "
          f"{abs(results['bf16'].perplexity / results['fp32'].perplexity - 1):.4%}; Spearman r of the importances {float(rho):.4f}")


if __name__ == "__main__":
    main()
