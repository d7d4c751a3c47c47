"""Which pooling carries less sentence length: `mean` (<s> and </s> in the mean, as the study pooled) or
`mean_no_special`, measured on a finetuned model, its random-init control and the content-free encoder.

For each pooling, at the last layer, over the non-English languages of the parallel set against English:
debiased CKA of the finetuned model, of a randomly initialised model of the same configuration and of
the length-only encoder (`xlsub.similarity.controls.length_only_representations`, with or without special
tokens to match); CKA after regressing out token counts (finetuned model); translation retrieval top-1;
and how much of the sentence length a linear probe reads from the finetuned model's vectors (held-out
R^2 of log token count, fitted on one half of the sentences, tested on the other). The pooling that
leaves less length, at equal or better retrieval, is encode's default (README, "encode").

    python benchmarks/pooling.py --model <finetune run's model/ folder> [--max-sentences 2000]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsub.data.parallel import load_parallel  # noqa: E402
from xlsub.models.encoding import POOLINGS, encode, random_like  # noqa: E402
from xlsub.similarity.cka import cka  # noqa: E402
from xlsub.similarity.controls import length_only_representations  # noqa: E402
from xlsub.similarity.permutation import residualize  # noqa: E402
from xlsub.similarity.retrieval import retrieval_top1  # noqa: E402


def probe_r2(x: torch.Tensor, target: torch.Tensor) -> float:
    """Held-out R^2 of a least-squares linear probe (with intercept) from x [n, d] to target [n]:
    fitted on the even rows, scored on the odd ones."""
    x, target = x.double(), target.double()
    design = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), x], dim=1)
    fit, test = slice(0, None, 2), slice(1, None, 2)
    coef = torch.linalg.lstsq(design[fit], target[fit, None], driver="gelsd").solution
    residual = target[test] - (design[test] @ coef)[:, 0]
    return float(1 - residual.square().sum() / (target[test] - target[test].mean()).square().sum())


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a finetune run's model/ folder")
    parser.add_argument("--max-sentences", type=int, default=2000)
    parser.add_argument("--reference", default="en")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForMaskedLM.from_pretrained(args.model).eval()
    random_model = random_like(model, 0)
    corpus = load_parallel("embedded", None, args.max_sentences)
    langs = corpus.languages
    others = [l for l in langs if l != args.reference]
    special = set(tokenizer.all_special_ids)
    lengths = {l: torch.tensor([sum(t not in special for t in ids) for ids in tokenizer(corpus.texts[l])["input_ids"]])
               for l in langs}
    d = model.config.hidden_size
    print(f"{len(corpus.ids)} parallel sentences, {len(langs)} languages, reference {args.reference}, last layer; "
          "means over the other languages")
    print(f"{'pooling':16} {'CKA full':>9} {'CKA random':>11} {'CKA length-only':>16} {'CKA residual':>13} "
          f"{'retrieval':>10} {'length R2':>10}")
    for pooling in POOLINGS:
        full = {l: encode(model, tokenizer, corpus.texts[l], pooling=pooling, batch_size=64)[-1] for l in langs}
        rand = {l: encode(random_model, tokenizer, corpus.texts[l], pooling=pooling, batch_size=64)[-1] for l in langs}
        only = length_only_representations({l: lengths[l].tolist() for l in langs}, d, special=pooling == "mean")
        ref = args.reference

        def mean(values):
            return sum(values) / len(values)

        row = {
            "full": mean([float(cka(full[ref], full[l], "debiased")) for l in others]),
            "random": mean([float(cka(rand[ref], rand[l], "debiased")) for l in others]),
            "length-only": mean([float(cka(only[ref], only[l], "debiased")) for l in others]),
            "residual": mean([float(cka(residualize(full[ref], lengths[ref]), residualize(full[l], lengths[l]), "debiased"))
                              for l in others]),
            "retrieval": mean([retrieval_top1(full[l], full[ref]) for l in others]),
            "length R2": mean([probe_r2(full[l], lengths[l].clamp_min(1).log()) for l in langs]),
        }
        print(f"{pooling:16} {row['full']:9.3f} {row['random']:11.3f} {row['length-only']:16.3f} {row['residual']:13.3f} "
              f"{row['retrieval']:10.3f} {row['length R2']:10.3f}")


if __name__ == "__main__":
    main()
