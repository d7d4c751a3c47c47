"""From a corpus of texts to masked-LM examples: chunking, fixed eval masks, a unigram floor.

Each language's texts are tokenised, joined with `</s>` between texts and cut
into blocks of the model's context size (`<s> ... </s>`), as the study did with
Wikipedia articles. Training examples are the shuffled concatenation of every
language's blocks; test blocks stay per language so that perplexity is per
language.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from xlsub.errors import Range, XlsubError

MLM_PROBABILITY = 0.15
EVAL_MASK_SEED = 1234  # fixed, so every evaluation of a language scores the same masked tokens
MAX_SEQ_LEN = Range(3, meaning="a length with room for <s>, text and </s>")  # tokens per block


def chunk_ids(token_lists: Sequence[Sequence[int]], max_seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """Concatenate texts (each followed by `eos`) and cut into `<s> block </s>` of at most `max_seq_len`.

    The last, shorter block is kept: a small corpus should still give examples.
    """
    MAX_SEQ_LEN.check("max_seq_len", max_seq_len)
    stream: list[int] = []
    for ids in token_lists:
        if ids:
            stream.extend(ids)
            stream.append(eos)
    width = max_seq_len - 2
    return [[bos, *stream[i : i + width], eos] for i in range(0, len(stream), width)]


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


@dataclass
class LMData:
    """Tokenised masked-LM data: a shuffled training set and test blocks per language."""

    train: datasets.Dataset  # columns input_ids, lang
    test: dict[str, list[list[int]]]
    train_chunks: dict[str, list[list[int]]]


def build_lm_data(
    texts: datasets.DatasetDict,
    languages: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    examples_per_lang: int,
    test_examples_per_lang: int,
    seed: int,
) -> LMData:
    """Chunk each language's train and test texts; cap the counts; shuffle the training blocks."""
    rng = random.Random(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:  # BERT-style tokenizers
        bos, eos = tokenizer.cls_token_id, tokenizer.sep_token_id
    by_split: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        groups: dict[str, list[str]] = {lang: [] for lang in languages}
        for batch in texts[split].iter(batch_size=10_000):  # whole batches: a column's rows one by one cost ~30 us each
            for lang, text in zip(batch["lang"], batch["text"]):
                if lang in groups:
                    groups[lang].append(text)
        by_split[split] = groups
    train_chunks, test = {}, {}
    for lang in languages:
        chunks = chunk_ids(tokenize_texts(tokenizer, by_split["train"][lang]), max_seq_len, bos, eos)
        rng.shuffle(chunks)
        train_chunks[lang] = chunks[:examples_per_lang]
        test[lang] = chunk_ids(tokenize_texts(tokenizer, by_split["test"][lang]), max_seq_len, bos, eos)[
            :test_examples_per_lang
        ]
        if not train_chunks[lang] or not test[lang]:
            raise XlsubError(f"languages: '{lang}' has no {'train' if not train_chunks[lang] else 'test'} text in this corpus; add text or drop {lang}")
    rows = [(ids, lang) for lang in languages for ids in train_chunks[lang]]
    rng.shuffle(rows)
    train = datasets.Dataset.from_dict({"input_ids": [r[0] for r in rows], "lang": [r[1] for r in rows]})
    return LMData(train=train, test=test, train_chunks=train_chunks)


def mlm_collator(tokenizer: PreTrainedTokenizerBase, seed: int | None = None) -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY, seed=seed, return_tensors="pt")


def masked_batches(
    chunks: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int = EVAL_MASK_SEED
) -> list[dict[str, torch.Tensor]]:
    """Mask `chunks` once with a seeded collator: the same tokens are scored whatever model is evaluated."""
    collator = mlm_collator(tokenizer, seed=seed)
    return [
        dict(collator([{"input_ids": list(ids)} for ids in chunks[i : i + batch_size]]))
        for i in range(0, len(chunks), batch_size)
    ]


def unigram_perplexity(
    train_chunks: Sequence[Sequence[int]], batches: Sequence[dict[str, torch.Tensor]], vocab_size: int, special_ids: set[int]
) -> float:
    """Perplexity of an add-one unigram model of the train tokens, on the masked tokens of `batches`.

    The floor any masked LM must beat: it knows how frequent each piece is and nothing else.
    """
    counts = Counter(t for ids in train_chunks for t in ids if t not in special_ids)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for batch in batches:
        for label in batch["labels"][batch["labels"] != -100].tolist():
            nll -= math.log((counts.get(label, 0) + 1) / total)
            n += 1
    return math.exp(nll / n)
