"""Slow, straightforward computations of what xlsub computes fast: references for the tests and benchmarks.

Each computes the same numbers as its xlsub counterpart from the definition, with plain torch loops and
none of xlsub's helpers (no gates, pooling, loss, pruning loop or CKA internals of its own), so a test
or benchmark that holds the two together compares xlsub against an independent computation. None is
part of xlsub's API. Benchmarks import this module with the repository root on `sys.path`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a BERT-family model (BERT, RoBERTa, XLM-R), with or without its LM head."""
    return list(getattr(model, "base_model", model).encoder.layer)


def _max_length(model: nn.Module, tokenizer) -> int:
    """Positions the model can take: RoBERTa-style models start counting after the padding index."""
    config = model.config
    limit = config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    return min(limit, tokenizer_limit) if isinstance(tokenizer_limit, int) and tokenizer_limit > 0 else limit


def encode_naive(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress_desc: str | None = None,
) -> torch.Tensor:
    """Mean pooling of every hidden layer, as the paper defines it, one sentence and one layer at a time:
    the average of the sentence's real (unpadded) token vectors: float32 ``[layers+1, n, d]``.

    Sentences in their given order; each tokenised on its own inside the loop; every batch padded
    to the longest sentence of the whole input (found by a first tokenising pass), not to its own.
    The LM head never runs (the base model's hidden states).
    """
    max_length = max_length or _max_length(model, tokenizer)
    base = getattr(model, "base_model", model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    sentences = list(sentences)
    width = max((len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences), default=0)
    pooled = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(sentences), batch_size), desc=progress_desc or "encode (naive)", leave=False):
            rows, lengths = [], []
            for sentence in sentences[start:start + batch_size]:
                ids = tokenizer(sentence, truncation=True, max_length=max_length)["input_ids"]
                rows.append(ids + [pad_id] * (width - len(ids)))
                lengths.append(len(ids))
            input_ids = torch.tensor(rows, device=device)
            attention_mask = (torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
            hidden = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
            for i, length in enumerate(lengths):
                pooled.append(torch.stack([h[i, :length].float().mean(0) for h in hidden]).cpu())
    model.train(was_training)
    if not pooled:
        return torch.empty(base.config.num_hidden_layers + 1, 0, base.config.hidden_size)
    return torch.stack(pooled, dim=1)


# -- iterative head pruning (Michel et al. 2019), the two passes of HF's bertology script ------------------

@dataclass
class NaiveStep:
    step: int
    ppl: float
    frac_pruned: float
    mask: torch.Tensor


@dataclass
class NaivePruning:
    mask: torch.Tensor
    importance: torch.Tensor
    steps: list[NaiveStep]
    base_ppl: float
    kept: int


def _gated(model: nn.Module, gates: torch.Tensor) -> list:
    """Multiply each head's context vector (the self-attention module's output, before the output
    projection) by its gate: what the old `head_mask` did through the attention probabilities."""
    handles = []
    for layer, block in enumerate(_encoder_layers(model)):
        def scale(module, args, output, layer=layer):
            context = output[0]
            heads = gates.shape[1]
            per_head = context.reshape(*context.shape[:-1], heads, context.shape[-1] // heads)
            scaled = (per_head * gates[layer].to(context.dtype)[:, None]).reshape(context.shape)
            return (scaled, *output[1:])

        handles.append(block.attention.self.register_forward_hook(scale))
    return handles


def _summed_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of -log p(label) over the scored (label != -100) tokens, from the full LM logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"]
    scored = labels != -100
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs[scored].gather(-1, labels[scored][:, None])[:, 0]
    return -picked.sum(), int(scored.sum())


def _importance_then_perplexity(model: nn.Module, batches: list, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pass 1: I_h = sum over batches of |d L / d gate_h| (gates at `mask`, every weight's gradient computed,
    as bertology's `loss.backward()`), over the scored tokens, then each layer divided by its L2 norm and
    min-max scaled over all heads. Pass 2, without gradients: exp(mean NLL) under `mask`."""
    gates = mask.clone().double().requires_grad_(True)
    total = torch.zeros(mask.shape, dtype=torch.float64)
    tokens = 0
    handles = _gated(model, gates)
    try:
        for batch in batches:
            loss, n = _summed_nll(model, batch)
            loss.backward()
            total += gates.grad.abs()
            gates.grad = None
            tokens += n
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    importance = total / tokens
    importance = importance / (importance.pow(2).sum(-1, keepdim=True).sqrt() + 1e-20)
    low, high = importance.min(), importance.max()
    importance = (importance - low) / (high - low) if high > low else torch.zeros_like(importance)

    nll, count = 0.0, 0
    handles = _gated(model, mask.double())
    try:
        with torch.no_grad():
            for batch in batches:
                loss, n = _summed_nll(model, batch)
                nll += float(loss)
                count += n
    finally:
        for handle in handles:
            handle.remove()
    return importance.float(), math.exp(nll / count)


def iterative_pruning_two_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    threshold: float = 1.1,
    amount: float = 0.1,
    target_sparsity: float | None = None,
    continue_to: float = 0.0,
) -> NaivePruning:
    """Reference for `xlsub.models.pruning.iterative_pruning` as bertology runs it (Michel et al. 2019): per step an
    importance pass with gradients for every weight, then a separate no-grad pass for the perplexity.

    Step 0 is the unpruned model. Each step switches off the max(1, int(heads x amount)) heads still on
    with the lowest importance (ties: lower flat index first). The loop stops at the first step whose
    perplexity exceeds threshold x unpruned, or when no head is left; the subnetwork is the step before
    the first one past the threshold (the last step if none is). With `target_sparsity` it stops instead
    at exactly round(heads x target_sparsity) heads off (a shorter last step lands there), which is the
    subnetwork. With `continue_to` the loop goes on until at least that fraction of heads is off."""
    batches = list(batches)
    was_training = model.training
    model.eval()
    layers = _encoder_layers(model)
    shape = (len(layers), layers[0].attention.self.num_attention_heads)
    total = shape[0] * shape[1]
    per_step = max(1, int(total * amount))
    goal = None if target_sparsity is None else round(total * target_sparsity)
    end = round(total * continue_to)
    mask = torch.ones(shape)
    importance, ppl = _importance_then_perplexity(model, batches, mask)
    steps, importances = [NaiveStep(0, ppl, 0.0, mask)], [importance]

    def heads_off() -> int:
        return total - int(mask.sum())

    def stopped() -> bool:
        if goal is not None:
            reached = heads_off() >= goal
        else:
            reached = heads_off() == total or any(s.ppl > threshold * steps[0].ppl for s in steps)
        return reached and heads_off() >= end

    while not stopped():
        n = min(per_step, goal - heads_off()) if goal is not None and heads_off() < goal else per_step
        scores = importance.flatten().tolist()
        on = [i for i in range(total) if mask.flatten()[i] == 1]
        off = sorted(on, key=lambda i: (scores[i], i))[:n]
        mask = mask.clone()
        for i in off:
            mask[i // shape[1], i % shape[1]] = 0
        importance, ppl = _importance_then_perplexity(model, batches, mask)
        steps.append(NaiveStep(len(steps), ppl, (total - int(mask.sum())) / total, mask))
        importances.append(importance)
    model.train(was_training)
    if goal is not None:
        kept = next(i for i, s in enumerate(steps) if round(s.frac_pruned * total) == goal)
    else:
        past = [i for i, s in enumerate(steps) if s.ppl > threshold * steps[0].ppl]
        kept = max(past[0] - 1, 0) if past else len(steps) - 1
    return NaivePruning(steps[kept].mask, importances[kept], steps, steps[0].ppl, kept)


def linear_cka_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA in its Gram form (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with
    HSIC(K, L) = tr(KHLH), K = XX', L = YY', H = I - 11'/n; x [..., n, d1], y [..., n, d2] -> [...].

    The O(n^2 d) time, O(n^2) memory reference for `linear_cka` (tests, benchmark), which works with d x d
    feature products instead: here the n x n centred Gram matrices HKH = (HX)(HX)' are formed, and
    tr(KHLH) = <HKH, HLH> since H is idempotent. NaN where X or Y has no variance.
    """
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} need the same leading dimensions and n")
    x, y = x.to(torch.float64), y.to(torch.float64)
    xc, yc = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
    kc, lc = xc @ xc.mT, yc @ yc.mT
    cross, self_x, self_y = (kc * lc).sum((-2, -1)), (kc * kc).sum((-2, -1)), (lc * lc).sum((-2, -1))
    valid = (self_x > 0) & (self_y > 0)
    return torch.where(valid, cross / torch.where(valid, self_x * self_y, 1.0).sqrt(), math.nan)
