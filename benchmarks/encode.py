"""Sentence encoding: the fast path (`encode`) vs the naive loop (`tests/reference.py`) on the same sentences.

The fast path tokenises everything once, sorts by length and pads each batch
to its own longest sentence; the naive loop tokenises sentence by sentence in
corpus order and pads every batch to the longest sentence of the whole input.
Both must give the same encodings (max abs difference < 1e-5); the ratio of
sentences per second is the speed-up (target: at least 3x).

    python benchmarks/encode.py
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the naive loop lives in tests/reference.py

from tests.reference import encode_naive  # noqa: E402
from xlsub.data.corpus import load_corpus  # noqa: E402
from xlsub.data.parallel import load_parallel  # noqa: E402
from xlsub.models.encoding import encode  # noqa: E402
from xlsub.models.loading import TINY_SHAPE, tiny_model, train_tokenizer  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--languages", default="en,de")
    parser.add_argument("--sentences", type=int, default=1000, help="per language")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512, help="position embeddings of the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    languages = args.languages.split(",")

    parallel = load_parallel("embedded", languages, max_sentences=args.sentences)
    sentences = [s for lang in languages for s in parallel.texts[lang]]
    train = load_corpus("embedded", languages).texts["train"]["text"]
    tokenizer, tokenizer_s = timed(train_tokenizer, train)
    transformers.set_seed(args.seed)
    model = tiny_model(tokenizer, args.max_seq_len).eval()  # random init: speed does not depend on the weights

    options = dict(batch_size=args.batch_size)
    encode(model, tokenizer, sentences[:args.batch_size], **options, pooling="mean")  # warm-up: allocator, thread pool
    encode_naive(model, tokenizer, sentences[:args.batch_size], **options)

    # Interleaved repeats, best of each: other processes on a shared machine only ever add time.
    fast_times, naive_times = [], []
    for _ in range(args.repeats):
        fast, seconds = timed(encode, model, tokenizer, sentences, **options, pooling="mean")
        fast_times.append(seconds)
        naive, seconds = timed(encode_naive, model, tokenizer, sentences, **options)
        naive_times.append(seconds)
    fast_s, naive_s = min(fast_times), min(naive_times)
    n = len(sentences)

    lengths = torch.tensor([len(ids) for ids in tokenizer(sentences, truncation=True)["input_ids"]])
    batches = lengths.sort(descending=True).values.split(args.batch_size)
    fast_positions = sum(len(b) * int(b[0]) for b in batches)
    naive_positions = n * int(lengths.max())
    diff = float((fast - naive).abs().max())

    print(f"model: tiny XLM-R hidden {TINY_SHAPE['hidden_size']}, {TINY_SHAPE['num_hidden_layers']} layers x "
          f"{TINY_SHAPE['num_attention_heads']} heads, vocab {len(tokenizer)} (tokenizer trained in {tokenizer_s:.1f} s), "
          f"random init; {torch.get_num_threads()} threads")
    print(f"sentences: {n} ({args.sentences} per language of {', '.join(languages)}, embedded parallel set); "
          f"tokens per sentence mean {lengths.float().mean():.1f}, max {int(lengths.max())}; batch {args.batch_size}")
    print(f"token positions computed: fast {fast_positions} ({lengths.sum() / fast_positions:.0%} real), "
          f"naive {naive_positions} ({lengths.sum() / naive_positions:.0%} real)")
    print(f"fast path (encode):         {fast_s:7.2f} s  {n / fast_s:8.1f} sentences/s  "
          f"(all runs {', '.join(f'{t:.2f}' for t in fast_times)})")
    print(f"naive loop (encode_naive):  {naive_s:7.2f} s  {n / naive_s:8.1f} sentences/s  "
          f"(all runs {', '.join(f'{t:.2f}' for t in naive_times)})")
    print(f"encodings: shape {list(fast.shape)}, max abs difference {diff:.2e} ({'ok' if diff < 1e-5 else 'TOO LARGE'})")
    print(f"ratio (fast / naive sentences/s): {naive_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
