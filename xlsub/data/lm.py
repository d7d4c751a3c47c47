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


def chunk_ids(token_lists: Sequence[Sequence[int]], max_seq_len: int, bos: int | None, eos: int) -> list[list[int]]:
    """Concatenate texts (each followed by `eos`) and cut into `<s> block </s>` of at most `max_seq_len`.

    A tokenizer without a start token (`bos` None: Qwen's, GPT-2's treat EOS as the separator) gives
    `block </s>`. The last, shorter block is kept: a small corpus should still give examples.
    """
    MAX_SEQ_LEN.check("max_seq_len", max_seq_len)
    stream: list[int] = []
    for ids in token_lists:
        if ids:
            stream.extend(ids)
            stream.append(eos)
    start = [] if bos is None else [bos]
    width = max_seq_len - 1 - len(start)
    return [[*start, *stream[i : i + width], eos] for i in range(0, len(stream), width)]


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def boundary_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """The (start, end) token ids of a chunk: `<s>`/`</s>`, BERT's `[CLS]`/`[SEP]`, or for a tokenizer
    with an end token and no start token (Qwen, GPT-2's when it has no BOS), (None, EOS)."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.bos_token_id, tokenizer.eos_token_id
    if tokenizer.sep_token_id is not None:  # BERT-style tokenizers
        return tokenizer.cls_token_id, tokenizer.sep_token_id
    raise XlsubError("model: its tokenizer has neither an end-of-text (EOS) nor a [SEP] token to separate texts; "
                     "use a tokenizer that defines eos_token")


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
    bos, eos = boundary_ids(tokenizer)
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
    train_chunks: Sequence[Sequence[int]], batches: Sequence[dict[str, torch.Tensor]], vocab_size: int, special_ids: set[int],
    causal: bool = False,
) -> float:
    """Perplexity of an add-one unigram model of the train tokens, on the scored tokens of `batches`.

    The floor any LM must beat: it knows how frequent each piece is and nothing else. Masked LM: the
    masked tokens (never special), counted over the non-special train tokens. Causal LM (`causal`):
    every next token (labels after the first position), the end-of-text token included, counted over
    every train token a causal LM is scored on (each chunk's tokens after its first).
    """
    if causal:
        counts = Counter(t for ids in train_chunks for t in ids[1:])
    else:
        counts = Counter(t for ids in train_chunks for t in ids if t not in special_ids)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for batch in batches:
        labels = batch["labels"][:, 1:] if causal else batch["labels"]
        for label in labels[labels != -100].tolist():
            nll -= math.log((counts.get(label, 0) + 1) / total)
            n += 1
    return math.exp(nll / n)
