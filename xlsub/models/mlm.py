"""Masked-LM loss computed only where it is scored, and perplexity per language.

The stock `*ForMaskedLM.forward` applies the vocabulary-sized output layer at
every position; only the ~15% masked positions carry a label. In the tiny
model that output layer is more than half of the forward FLOPs, so xlsub runs
the encoder, gathers the masked positions, and applies the LM head to those
alone. The loss is the same cross-entropy the stock forward computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

IGNORE_INDEX = -100


def lm_head_of(model: nn.Module) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (RoBERTa/XLM-R `lm_head`, BERT `cls`)."""
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise TypeError(f"{type(model).__name__} has no masked-LM head (lm_head or cls)")


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer body under the LM head (`model.roberta`, `model.bert`, ...)."""
    return model.base_model


def masked_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the masked tokens of `batch` and their count.

    `batch` holds `input_ids`, `attention_mask` and `labels` (IGNORE_INDEX where
    a token is not scored), as `DataCollatorForLanguageModeling` produces.
    """
    labels = batch["labels"]
    hidden = encoder_of(model)(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state
    scored = labels != IGNORE_INDEX
    return masked_nll(lm_head_of(model)(hidden[scored]), labels[scored])


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy -log softmax(logits)[label] over the positions whose label is not IGNORE_INDEX,
    and their count. logits [..., vocab] (or log-probabilities: log_softmax leaves those unchanged),
    labels [...]. Computed in float32 at least, whatever the logits' dtype."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def masked_perplexity(nll_sum: float, n_tokens: int) -> float:
    """Masked-LM perplexity exp(sum of masked-token NLL / number of masked tokens): the mean is over tokens,
    not over batches or sentences. ValueError when no token was masked."""
    if n_tokens == 0:
        raise ValueError("no masked tokens to score")
    return math.exp(float(nll_sum) / n_tokens)


@dataclass(frozen=True)
class ChunkLosses:
    """Per test chunk: the summed NLL of its masked tokens (float64) and how many tokens were masked."""

    nll: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self):
        if self.nll.shape != self.tokens.shape or self.nll.dim() != 1:
            raise ValueError(f"nll {tuple(self.nll.shape)} and tokens {tuple(self.tokens.shape)} must be the same 1-d shape")

    @property
    def perplexity(self) -> float:
        return masked_perplexity(float(self.nll.sum()), int(self.tokens.sum()))

    def resampled_log_ppl(self, indices: torch.Tensor) -> torch.Tensor:
        """log perplexity under each row of `indices` ([B, n] chunk indices): [B]."""
        return self.nll.double()[indices].sum(-1) / self.tokens.double()[indices].sum(-1)


def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """`masked_perplexity` over every masked token of `batches`, under `torch.no_grad`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss, n = masked_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss)
            count += n
    model.train(was_training)
    return masked_perplexity(total, count)


def chunk_losses(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]):
    """Per chunk (row of each batch, in order): the summed NLL of its masked tokens and their count, as
    `ChunkLosses` (float64 sums), under `torch.no_grad`. Their ratio of sums is the
    log of `perplexity` over the same batches; the chunks are what a bootstrap resamples."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = [], []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            hidden = encoder_of(model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
            scored = labels != IGNORE_INDEX
            losses = F.cross_entropy(lm_head_of(model)(hidden[scored]).float(), labels[scored], reduction="none")
            rows = scored.nonzero()[:, 0]
            nll.append(torch.zeros(len(labels), dtype=torch.float64, device=device).index_add_(0, rows, losses.double()).cpu())
            tokens.append(scored.sum(1).cpu())
    model.train(was_training)
    return ChunkLosses(torch.cat(nll), torch.cat(tokens))


@contextmanager
def masked_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Make `model(...)` return the masked-only mean loss, so `Trainer` (and DDP around it) train that path.

    Set on the instance, not the class: the saved model stays a stock
    `*ForMaskedLM`, and the stock forward returns when the block ends.
    """

    def forward(input_ids=None, attention_mask=None, labels=None, **_):
        loss, n = masked_lm_loss(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return MaskedLMOutput(loss=loss / max(n, 1))

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward
