"""What every entry point shares: typed arguments, languages, distributed rank."""

from __future__ import annotations

import logging
import os
import sys
from typing import TypeVar

from transformers import HfArgumentParser

T = TypeVar("T")


class _OneLineParser(HfArgumentParser):
    """argparse, but a bad flag is one line naming the parameter, not a page of usage."""

    def error(self, message: str):
        print(f"xlsub {self.prog}: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--name value` flags into the dataclass `cls` (help text comes from its field metadata)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file drowns the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    (args,) = _OneLineParser(cls).parse_args_into_dataclasses(args=argv)
    return args


def parse_languages(value: str) -> list[str] | None:
    """`all` -> None (every language of the corpus); `en,de` -> ['en', 'de']."""
    if value.strip().lower() in ("", "all"):
        return None
    return [code.strip() for code in value.split(",") if code.strip()]


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0: the one process that talks to MLflow."""
    return int(os.environ.get("RANK", "0")) == 0


def load_finetuned(run, device: str):
    """The model, tokenizer, languages and LM data of a finished finetune run, rebuilt from its parameters.

    The data are chunked exactly as the finetune run chunked them (same corpus,
    languages, seed and sizes), so test perplexities are comparable with its
    `ppl_after.<lang>`.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from xlsub import data, tracking
    from xlsub.corpus import load_corpus

    p = run.data.params
    langs = run.data.tags["xlsub.languages"].split(",")
    path = tracking.download(run.info.run_id, "model", param="finetune_run_id")
    model = AutoModelForMaskedLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    def number(name: str) -> int:
        return int(float(p[name]))  # `mlflow run` logs -P values as typed: 64 or 64.0

    corpus = load_corpus(p["corpus"], langs, seed=number("seed"))
    lm = data.build_lm_data(corpus.texts, langs, tokenizer, number("max_seq_len"), number("examples_per_lang"),
                            number("test_examples_per_lang"), number("seed"))
    return model, tokenizer, langs, lm, corpus
