"""LM loss computed only where it is scored, and perplexity per language, for both objectives.

Masked LM: the stock `*ForMaskedLM.forward` applies the vocabulary-sized output
layer at every position; only the ~15% masked positions carry a label. In the
tiny model that output layer is more than half of the forward FLOPs, so xlsub
runs the encoder, gathers the masked positions, and applies the LM head to those
alone. The loss is the same cross-entropy the stock forward computes.

Causal LM: the exact next-token NLL, -log p(x_{t+1} | x_{<=t}), over every real
token after the first (no masking, no randomness): the loss `*ForCausalLM`
computes with `labels=input_ids`. The LM head sees only the positions whose next
token is scored (padding and each chunk's last position are skipped).

Which objective a model has is its family adapter's (`xlsub.models.families`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from xlsub.models.families import CAUSAL, adapter_for

IGNORE_INDEX = -100


def lm_head_of(model: nn.Module) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (RoBERTa/XLM-R `lm_head`, BERT `cls`,
    DistilBERT's vocab_transform..vocab_projector, ModernBERT's head + decoder, decoders' `lm_head`
    with Gemma's soft cap): the family adapter's."""
    return adapter_for(model).lm_head(model)


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer body under the LM head (`model.roberta`, `model.bert`, `model.model`, ...)."""
    return adapter_for(model).body(model)


def is_causal(model: nn.Module) -> bool:
    """Whether the model is a causal (next-token) LM, by its family adapter."""
    return adapter_for(model).objective == CAUSAL


def causal_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unshifted causal-LM labels of `batch`: its `labels` if it has them (as `*ForCausalLM` takes
    them), else `input_ids` with padding (attention mask 0) set to IGNORE_INDEX. Taken from the
    attention mask, not from the pad id, so an EOS that doubles as the pad token is still scored."""
    if batch.get("labels") is not None:
        return batch["labels"]
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    return labels if mask is None else labels.masked_fill(mask == 0, IGNORE_INDEX)


def causal_batch(chunks: Sequence[Sequence[int]], tokenizer) -> dict[str, torch.Tensor]:
    """Token-id chunks padded into one causal-LM batch: `input_ids`, `attention_mask` and `labels`
    (`causal_labels`: every real token; padding from the attention mask, so an EOS that is also the
    pad token stays scored, where a stock `mlm=False` collator would drop it)."""
    # right padding whatever the tokenizer's default: positions count from each chunk's first token
    padded = tokenizer.pad([{"input_ids": list(ids)} for ids in chunks], return_tensors="pt", padding_side="right")
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    batch["labels"] = causal_labels(batch)
    return batch


def lm_batches(model: nn.Module, chunks: Sequence[Sequence[int]], tokenizer, batch_size: int,
               seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches of `chunks` for the model's objective: masked once with a seeded collator
    (`xlsub.data.lm.masked_batches`, `seed` or its default), or every next token of a causal LM
    (`causal_batch`: nothing random, the seed is not used)."""
    if is_causal(model):
        return [causal_batch(chunks[i:i + batch_size], tokenizer) for i in range(0, len(chunks), batch_size)]
    from xlsub.data import lm as data

    return data.masked_batches(chunks, tokenizer, batch_size) if seed is None else \
        data.masked_batches(chunks, tokenizer, batch_size, seed=seed)


def scored_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, vocab], labels [n], row of each [n]) at the scored positions of `batch` only.

    Masked LM: the positions whose label is not IGNORE_INDEX. Causal LM: position t scores token
    t + 1, so the hidden states of positions 0..T-2 whose next label is not IGNORE_INDEX.
    """
    hidden = encoder_of(model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    if is_causal(model):
        labels = causal_labels(batch)[:, 1:]
        hidden = hidden[:, :-1]
    else:
        labels = batch["labels"]
    scored = labels != IGNORE_INDEX
    return lm_head_of(model)(hidden[scored]), labels[scored], scored.nonzero()[:, 0]


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the scored tokens of `batch` and their count, for the model's objective:
    `masked_lm_loss` or `causal_lm_loss`."""
    return causal_lm_loss(model, batch) if is_causal(model) else masked_lm_loss(model, batch)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of `batch` and the number of scored tokens: `*ForCausalLM`'s loss with
    `labels=causal_labels(batch)`, times the count. `batch` holds `input_ids`, `attention_mask` and
    optionally `labels`."""
    logits, labels, _ = scored_logits(model, batch)
    return masked_nll(logits, labels)


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
    """Per test chunk: the summed NLL of its scored tokens (float64: masked tokens of a masked LM, every
    next token of a causal LM) and how many tokens were scored."""

    nll: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self):
        if self.nll.shape != self.tokens.shape or self.nll.dim() != 1:
            raise ValueError(f"nll {tuple(self.nll.shape)} and tokens {tuple(self.tokens.shape)} must be the same 1-d shape")

    @property
    def perplexity(self) -> float:
        return masked_perplexity(float(self.nll.sum()), int(self.tokens.sum()))

    def resampled_log_ppl(self, counts: torch.Tensor) -> torch.Tensor:
        """log perplexity of each bootstrap resample of the chunks, given by how often it drew each chunk (float64
        [B, chunks], `xlsub.stats.intervals.chunk_counts`: computed once for every model scored on the same resample,
        then two matrix-vector products per model, no [B, n] gather): [B]."""
        return (counts @ self.nll.double()) / (counts @ self.tokens.double())


def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """`masked_perplexity` over every scored token of `batches` (`lm_loss`), under `torch.no_grad`:
    masked-LM perplexity, or a causal LM's token perplexity."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss, n = lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss)
            count += n
    model.train(was_training)
    return masked_perplexity(total, count)


def chunk_losses(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]):
    """Per chunk (row of each batch, in order): the summed NLL of its scored tokens and their count, as
    `ChunkLosses` (float64 sums), under `torch.no_grad`. Their ratio of sums is the
    log of `perplexity` over the same batches; the chunks are what a bootstrap resamples."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = [], []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, labels, rows = scored_logits(model, batch)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            chunks = len(batch["input_ids"])
            nll.append(torch.zeros(chunks, dtype=torch.float64, device=device).index_add_(0, rows, losses.double()).cpu())
            tokens.append(torch.bincount(rows, minlength=chunks).cpu())
    model.train(was_training)
    return ChunkLosses(torch.cat(nll), torch.cat(tokens))


@contextmanager
def masked_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Make `model(...)` return the scored-only mean loss (`lm_loss`: masked tokens, or every next
    token of a causal LM), so `Trainer` (and DDP around it) train that path.

    Set on the instance, not the class: the saved model stays a stock
    `*ForMaskedLM`/`*ForCausalLM`, and the stock forward returns when the block ends.
    """
    output = CausalLMOutput if is_causal(model) else MaskedLMOutput

    def forward(input_ids=None, attention_mask=None, labels=None, **_):
        loss, n = lm_loss(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return output(loss=loss / max(n, 1))

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward
