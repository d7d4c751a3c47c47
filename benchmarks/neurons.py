"""The neurons stage's activation counting at XLM-R base's layer shapes: what the hooks cost over a plain
forward pass, and whether memory stays flat as the text grows.

`ActivationCounter` adds, per layer and batch, `((act > 0) & real).sum(tokens)` into an int64 [neurons]
tensor: nothing per token is kept, so peak memory should not grow with the number of tokens counted,
and the time over a plain forward of the transformer body should be a small share (the issue's bound:
at most 25%). Both are measured side by side in one process on `tiny-base-shape` (random init, 12
layers x 3,072 neurons), the forward passes interleaved so that machine load hits both alike.

    python benchmarks/neurons.py --quick     # 4 x 64 tokens a batch, 2 and 8 batches (minutes on 2 cores)
    python benchmarks/neurons.py             # 8 x 512 tokens a batch, 4 and 16 batches (a GPU, or an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.models import loading as models  # noqa: E402
from xlsub.models.mlm import encoder_of  # noqa: E402
from xlsub.models.neurons import ActivationCounter  # noqa: E402

GiB = 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # KiB on Linux


def batches(n: int, batch: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length * 3 // 4:] = 0  # some padding, as real batches have
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    batch, length, counts = (4, 64, (2, 8)) if args.quick else (8, 512, (4, 16))
    torch.set_num_threads(torch.get_num_threads())
    tokenizer = transformers.XLMRobertaTokenizer(vocab=[(f"<{i}>", 0.0) for i in range(5)] + [(f"p{i}", -1.0) for i in range(8000)])
    transformers.set_seed(0)
    model = models.scratch_model(models.BASE_SHAPE, tokenizer, length).eval()
    body = encoder_of(model)
    data = batches(max(counts), batch, length, len(tokenizer), 0)

    def plain(n):
        with torch.no_grad():
            for b in data[:n]:
                body(**b)

    def counted(n):
        with ActivationCounter(model) as counter:
            for b in data[:n]:
                counter.count(b)
        return counter.stats()

    plain(1)
    counted(1)  # warm-up
    rows = []
    for n in counts:
        times = {"plain": [], "counted": []}
        for _ in range(args.repeats):  # interleaved: load changes hit both
            for name, run in (("plain", plain), ("counted", counted)):
                start = time.perf_counter()
                run(n)
                times[name].append(time.perf_counter() - start)
        before = peak_rss_gib()
        stats = counted(n)
        rows.append((n, statistics.median(times["plain"]), statistics.median(times["counted"]), peak_rss_gib(), before, stats.tokens))
    print(f"tiny-base-shape (12 layers x 3,072 neurons), batches of {batch} x {length} tokens, median of {args.repeats}, {torch.get_num_threads()} threads")
    print("batches  real tokens  plain s  counted s  overhead  peak RSS GiB")
    for n, t_plain, t_counted, peak, _, tokens in rows:
        print(f"{n:7d}  {tokens:11d}  {t_plain:7.2f}  {t_counted:9.2f}  {t_counted / t_plain - 1:8.1%}  {peak:12.2f}")
    (n0, *_), (n1, *_) = rows[0], rows[-1]
    print(f"overhead of the hooks: {rows[-1][2] / rows[-1][1] - 1:.1%} at {n1} batches (bound: 25%)")
    print(f"peak RSS after {n1 // n0}x the tokens: {rows[-1][3]:.2f} GiB against {rows[0][3]:.2f} GiB "
          f"(flat when counts are not kept per token)")


if __name__ == "__main__":
    main()
