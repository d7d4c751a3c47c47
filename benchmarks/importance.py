"""Reliability of head importance (Michel et al. 2019) against the amount of pruning data.

For each language and each `eval_examples` n, draws n of the language's training chunks as the prune
stage does (`random.Random(seed).sample`), splits them into two disjoint halves of n//2, and takes the
Spearman r of the importances from the two halves (`split_half_importance`: the prune stage's
`importance_split_half_r`). That r is the reliability of importance from n/2 chunks; the Spearman-Brown
prophecy r_n = 2r / (1 + r) estimates it for the n chunks the prune stage actually prunes with. Check:
the Spearman-Brown r at n should be close to the measured split-half r at 2n. Seconds are the two
half passes: as many chunks as one importance pass over all n, the cost of one pruning step of the prune
stage (and of its `importance_split_half_r`); the fastest over the seeds.

    python benchmarks/importance.py --quick                 # one language, n = 16, 64, 256, one seed
    python benchmarks/importance.py                         # en,de,hi; n = 16 ... 512; seeds 0,1,2
    python benchmarks/importance.py --model <finetune run's model/ folder> --examples-per-lang 2000
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # FinetuneArgs: the demo's finetune settings

from entry_points.finetune import FinetuneArgs  # noqa: E402
from xlsub.data import lm as data  # noqa: E402
from xlsub.data.corpus import load_corpus  # noqa: E402
from xlsub.models import loading as models
from xlsub.models.heads import head_importance  # noqa: E402
from xlsub.models.mlm import perplexity  # noqa: E402
from xlsub.models.pruning import split_half_importance  # noqa: E402
from xlsub.models.training import TrainSettings, lm_data_settings, load_finetuned, train_masked_lm  # noqa: E402

SIZES, QUICK_SIZES = (16, 32, 64, 128, 256, 512), (16, 64, 256)
BATCH = 32  # the prune stage's default batch_size


def spearman_brown(r: float) -> float:
    """Reliability of a measure twice as long as the one with reliability r (Spearman 1910, Brown 1910)."""
    return 2 * r / (1 + r)


def trained_model(settings: FinetuneArgs):
    """Finetune a tiny model as the finetune stage does (its settings, fewer steps); (model, tokenizer, lm, steps)."""
    transformers.set_seed(settings.seed)
    corpus = load_corpus(settings.corpus, settings.languages.split(","), seed=settings.seed)
    tokenizer = models.train_tokenizer(corpus.texts["train"]["text"])
    model = models.tiny_model(tokenizer, settings.max_seq_len)
    lm = data.build_lm_data(corpus.texts, corpus.languages, tokenizer, settings.max_seq_len, settings.examples_per_lang,
                            settings.test_examples_per_lang, settings.seed)
    train = TrainSettings(settings.epochs, settings.batch_size, settings.lr, settings.weight_decay, settings.seed, "cpu",
                          settings.fp16, settings.bf16, log_every=10**9, save_steps=settings.save_steps)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_masked_lm(model, tokenizer, lm.train, train, Path(tmp))
    return model.eval(), tokenizer, lm, int(metrics["train_steps"])


def measure(model, tokenizer, chunks: list, n: int, seed: int) -> tuple[float, float]:
    """(split-half r from two halves of n//2 of n drawn chunks, seconds of the two half passes)."""
    drawn = random.Random(seed).sample(chunks, n)
    mask_seed = data.EVAL_MASK_SEED + seed  # as prune_language: each half masked with the seed's collator
    halves = [data.masked_batches(part, tokenizer, BATCH, seed=mask_seed) for part in (drawn[: n // 2], drawn[n // 2 : 2 * (n // 2)])]
    start = time.perf_counter()
    r = split_half_importance(model, *halves)
    return r, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first language only, n = 16, 64, 256, one seed")
    parser.add_argument("--model", default="", help="a finetune run's model/ folder instead of training one")
    parser.add_argument("--languages", default="en,de,hi", help="the languages trained (with --model: the finetune run's tag xlsub.languages, in its order)")
    parser.add_argument("--finetune-seed", type=int, default=0, help="seed of training and of the data split (with --model: the run's seed)")
    parser.add_argument("--examples-per-lang", type=int, default=None,
                        help="training chunks per language (default 600 when training here; with --model give the run's, default 2000)")
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs when training here (the demo: 4)")
    parser.add_argument("--seeds", default="0,1,2", help="pruning seeds: each draws its own chunks")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="eval_examples values")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()  # also turns off the Trainer's progress bar

    languages = args.languages.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    measured = languages
    if args.quick:
        measured, seeds, sizes = languages[:1], seeds[:1], list(QUICK_SIZES)
    if args.model:
        settings = FinetuneArgs(languages=args.languages, seed=args.finetune_seed,
                                examples_per_lang=args.examples_per_lang or FinetuneArgs.examples_per_lang)
        lm_data = lm_data_settings(settings.corpus, settings.seed, settings.max_seq_len, settings.examples_per_lang, settings.test_examples_per_lang)
        model, tokenizer, lm, _ = load_finetuned(args.model, lm_data, languages, "cpu")
        print(f"model: {args.model}")
    else:
        settings = FinetuneArgs(languages=args.languages, seed=args.finetune_seed, epochs=args.epochs,
                                examples_per_lang=args.examples_per_lang or 600)
        start = time.perf_counter()
        model, tokenizer, lm, steps = trained_model(settings)
        print(f"model: tiny XLM-R trained here on {args.languages} (seed {settings.seed}, {settings.examples_per_lang} chunks/lang, "
              f"{settings.epochs:g} epoch, {steps} steps of {settings.batch_size}): {time.perf_counter() - start:.1f} s "
              "with tokenizer and data")
    print(f"{torch.get_num_threads()} threads; batch {BATCH}; seeds {','.join(map(str, seeds))}; "
          f"training chunks per language: {', '.join(f'{l} {len(lm.train_chunks[l])}' for l in languages)}")
    # how far the model is trained: test perplexity against the add-one unigram floor it must beat
    special = set(tokenizer.all_special_ids)
    test = {l: data.masked_batches(lm.test[l], tokenizer, BATCH) for l in measured}
    ppl = {l: (perplexity(model, test[l]), data.unigram_perplexity(lm.train_chunks[l], test[l], len(tokenizer), special)) for l in measured}
    print("test ppl (unigram floor): " + ", ".join(f"{l} {p:.0f} ({floor:.0f})" for l, (p, floor) in ppl.items()))
    if any(p > floor for p, floor in ppl.values()):
        print("  worse than the unigram floor: an undertrained model"
              + ("" if args.model else "; for a fully trained one, pass a finetune run's model/ with --model"))
    head_importance(model, data.masked_batches(lm.train_chunks[languages[0]][:BATCH], tokenizer, BATCH))  # warm-up

    rows = []
    # n capped by the chunks there are, as the prune stage caps it
    todo = [(lang, n) for lang in measured for n in sorted({min(n, len(lm.train_chunks[lang])) for n in sizes})]
    for lang, n in tqdm(todo, desc="split-half importance", unit="size", disable=None):
        results = [measure(model, tokenizer, lm.train_chunks[lang], n, seed) for seed in seeds]
        rows.append((lang, n, [r for r, _ in results], min(s for _, s in results)))

    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):5.2f} ± {statistics.stdev(values):4.2f}" if len(values) > 1 else f"{values[0]:5.2f}       "

    def stepped_up(rs: list[float]) -> str:  # a mean r <= 0 says "no reliability": the formula means nothing there
        r = statistics.mean(rs)
        return f"{spearman_brown(r):.2f}" if r > 0 else "-"

    print()
    print("split-half r: Spearman r of importances from two disjoint halves of n//2 chunks = reliability at n/2 chunks")
    print("Spearman-Brown r: 2r/(1+r) of the mean r = estimated reliability of the prune stage's importance from all n chunks")
    print(f"mean ± std over {len(seeds)} seed(s); s/pass: importance over n chunks (the two halves' passes, fastest seed)")
    print()
    print(f"{'lang':<5} {'eval_examples':>13}  {'split-half r (n/2)':>18}  {'Spearman-Brown r (n)':>20}  {'s/pass':>7}")
    for lang, n, rs, seconds in rows:
        print(f"{lang:<5} {n:>13}  {mean_std(rs):>18}  {stepped_up(rs):>20}  {seconds:7.2f}")
    print()
    by_key = {(lang, n): rs for lang, n, rs, _ in rows}
    checks = [f"{lang} n={n}: {stepped_up(rs)} vs {statistics.mean(by_key[lang, 2 * n]):.2f}"
              for (lang, n), rs in by_key.items() if (lang, 2 * n) in by_key]
    if checks:
        print("check, Spearman-Brown r at n vs split-half r measured at 2n (both: importance from n chunks):")
        print("  " + "; ".join(checks))


if __name__ == "__main__":
    main()
