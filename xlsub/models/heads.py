"""Attention-head gates and head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

transformers v5 removed `head_mask` (a `head_mask=` argument is swallowed by
`**kwargs` without effect), so xlsub gates heads itself: a forward pre-hook on
each layer's attention output projection scales every head's slice of the
projection's input, the concatenated per-head context vectors. That is where
the old `head_mask` acted (on the attention probabilities, hence on each head's
context vector), so outputs and gradients are the same, with sdpa and eager
attention alike.

A head mask is a `[layers, heads]` tensor of 0/1 everywhere in xlsub; gates are
the same shape with any float value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from xlsub.errors import XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.mlm import lm_loss

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's attention block, as the model's family adapter (`xlsub.models.families`) finds it:
    BERT/RoBERTa/XLM-R `layer.attention` (with `.self` and `.output.dense`), DistilBERT `attention`,
    ModernBERT `attn`, Llama-style `self_attn`, GPT-2 `attn`, BLOOM `self_attention`."""
    family = adapter_for(model)
    return [family.attention(layer) for layer in family.layers(model)]


def output_projections(model: nn.Module) -> list[nn.Module]:
    """Each layer's attention output projection, whose input is the concatenated per-head context."""
    family = adapter_for(model)
    return [family.output_projection(family.attention(layer)) for layer in family.layers(model)]


def num_heads(model: nn.Module) -> list[int]:
    """Query heads in each layer (layers differ once heads are physically pruned)."""
    family = adapter_for(model)
    return [family.heads_in(attention, model.config) for attention in attention_modules(model)]


def mask_shape(model: nn.Module) -> tuple[int, int]:
    """[layers, heads] of the model's head masks; refuses a model whose layers lost different heads."""
    heads = num_heads(model)
    if len(set(heads)) != 1:
        raise XlsubError(
            f"model: its heads are already pruned (heads per layer {heads}); head masks, gates and pruning "
            "need the same heads in every layer: start from the full model"
        )
    return len(heads), heads[0]


class Gates:
    """Hooks that scale a model's units (heads, neurons) by `gates` [layers, units] while active: `remove()`
    takes them off, as does leaving a `with` block. Subclasses register `_handles`."""

    def __init__(self, gates: torch.Tensor, shape: tuple[int, int], unit: str):
        if tuple(gates.shape) != shape:
            raise XlsubError(f"{unit} mask has shape {tuple(gates.shape)}, the model needs [layers, {unit}s] = {list(shape)}")
        self.gates = gates
        self._handles: list = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class HeadGates(Gates):
    """Scale the output of head h in layer l by `gates[l, h]` while active.

    A forward pre-hook on each layer's attention output projection (the
    family adapter's: `attention.output.dense`, `o_proj`, GPT-2's `c_proj`,
    BLOOM's `dense`, ...) views its input as [batch, tokens, heads, head_dim]
    and multiplies each head's slice by its gate, before the output projection
    mixes the heads. Under grouped-query attention the gates are per query
    head; the key/value heads they share are left alone. A gate of 0 removes the
    head, 1 leaves it as is; when `gates` requires grad, d loss / d gates is
    the head-importance signal of Michel et al. 2019.

        with HeadGates(model, mask):
            loss, n = lm_loss(model, batch)
    """

    def __init__(self, model: nn.Module, gates: torch.Tensor):
        super().__init__(gates, mask_shape(model), "head")
        self._handles = [
            projection.register_forward_pre_hook(self._hook(layer))
            for layer, projection in enumerate(output_projections(model))
        ]

    def _hook(self, layer: int):
        def scale_heads(module: nn.Module, args: tuple) -> tuple:
            context = args[0]
            gate = self.gates[layer].to(device=context.device, dtype=context.dtype)
            heads = context.unflatten(-1, (gate.shape[0], -1))
            return ((heads * gate[:, None]).flatten(-2), *args[1:])

        return scale_heads


class AttentionEntropy:
    """Mean entropy of each head's attention distribution over the real (unpadded) query tokens.

    Reads the attention probabilities the eager attention returns from every
    self-attention module (sdpa never materialises them).
    """

    def __init__(self, model: nn.Module):
        if getattr(model.config, "_attn_implementation", None) != "eager":
            raise XlsubError(
                "attention entropy needs the attention probabilities: build the model with attn_implementation='eager'"
            )
        self._per_layer: list[torch.Tensor | None] = []
        self._handles = [
            (attention.self if hasattr(attention, "self") else attention).register_forward_hook(self._record)
            for attention in attention_modules(model)
        ]
        self.total: torch.Tensor | None = None  # [layers, heads], summed over tokens
        self.tokens = 0

    def _record(self, module: nn.Module, args: tuple, output: tuple) -> None:
        probs = output[1].detach()  # [batch, heads, query, key]
        self._per_layer.append(-torch.special.xlogy(probs, probs).sum(-1).double())  # [batch, heads, query]

    def add_batch(self, attention_mask: torch.Tensor) -> None:
        """Fold the entropies recorded by the last forward into the running sum."""
        real = attention_mask.to(torch.float64)[:, None, :]  # [batch, 1, query]
        sums = torch.stack([(entropy * real).sum((0, 2)) for entropy in self._per_layer])
        self.total = sums if self.total is None else self.total + sums
        self.tokens += int(attention_mask.sum())
        self._per_layer = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def mean(self) -> torch.Tensor:
        return (self.total / self.tokens).float()


@dataclass
class ImportanceResult:
    """Head importance [layers, heads] and the masked-LM loss of the same pass."""

    importance: torch.Tensor
    loss_sum: float
    token_count: int
    entropy: torch.Tensor | None = None

    @property
    def perplexity(self) -> float:
        """exp(mean masked-token loss) under the gates the importance was computed with."""
        return math.exp(self.loss_sum / self.token_count)


def normalize_importance(importance: torch.Tensor, *, layers: bool = True, global_: bool = True) -> torch.Tensor:
    """Bertology's normalisation: divide each layer by its L2 norm, then min-max over all heads."""
    if layers:
        importance = importance / (importance.pow(2).sum(-1).pow(0.5)[:, None] + 1e-20)
    if global_:
        low, high = importance.min(), importance.max()
        # Equal importances (one head, or none with a gradient) have no range to scale.
        importance = (importance - low) / (high - low) if high > low else torch.zeros_like(importance)
    return importance


def head_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    mask: torch.Tensor | None = None,
    *,
    normalize_layers: bool = True,
    normalize_global: bool = True,
    entropy: bool = False,
    loss_fn: LossFn | None = None,
    freeze_weights: bool = True,
) -> ImportanceResult:
    """Head importance I_h = E_x |d L(x) / d xi_h| (Michel et al. 2019, eq. 5), as bertology computes it.

    The gates xi start at `mask` (all ones if None). For every batch: forward
    with the gates, summed LM loss (`loss_fn`, by default `lm_loss`: the
    masked-LM loss, or the next-token loss of a causal LM), the gradient with respect to the
    gates, its absolute value added up; the sum is divided by the number of
    masked (scored) tokens (bertology divides by all tokens: a constant factor
    the normalisation removes). Then, each switchable, per-layer L2
    normalisation and a global min-max, as HF's bertology
    `compute_heads_importance`.

    Heads that `mask` switches off get the gradient at gate 0 (the first-order
    effect of adding them back); the pruning loop never picks them again.

    The loss of this same pass is returned, so `result.perplexity` is the
    perplexity under `mask` at no extra cost. Only the gates need a gradient:
    with `freeze_weights` the weights are frozen for the pass (restored after)
    and only the gates' gradient is computed, which skips every weight-gradient
    matmul. `freeze_weights=False` is bertology's pass (`loss.backward()` into
    every weight, gradients then discarded), kept as the timing reference.
    `entropy=True` also returns each head's mean attention entropy over the
    real query tokens (bertology also counts padding); needs eager attention.
    The model is evaluated in eval mode (no dropout), so the pass is
    deterministic for given batches.
    """
    layers, heads = mask_shape(model)
    loss_fn = loss_fn or lm_loss
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gates = torch.ones(layers, heads) if mask is None else mask.detach().clone()
    gates = gates.to(device=device, dtype=dtype).requires_grad_(True)

    frozen = [p for p in model.parameters() if p.requires_grad] if freeze_weights else []
    weight_grads = {} if freeze_weights else {p: p.grad for p in model.parameters()}
    was_training = model.training
    entropies = AttentionEntropy(model) if entropy else None
    gate_hooks = HeadGates(model, gates)
    importance = torch.zeros(layers, heads, dtype=torch.float64, device=device)
    loss_sum, token_count = 0.0, 0
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, count = loss_fn(model, batch)
            # Each batch adds its own |gradient|. Bertology's `loss.backward()` never
            # zeroes `head_mask.grad`, so it adds running totals |g1|, |g1 + g2|, ...
            # instead of |g1| + |g2| + ...; here the gates' grad is taken per batch.
            if freeze_weights:
                (grad,) = torch.autograd.grad(loss, gates)
            else:
                loss.backward()
                grad, gates.grad = gates.grad, None
            importance += grad.abs().double()
            loss_sum += float(loss.detach())
            token_count += count
            if entropies is not None:
                entropies.add_batch(batch.get("attention_mask", torch.ones_like(batch["input_ids"])))
    finally:
        gate_hooks.remove()
        if entropies is not None:
            entropies.remove()
        for p in frozen:
            p.requires_grad_(True)
        for p, grad in weight_grads.items():
            p.grad = grad
        model.train(was_training)

    if token_count == 0:
        raise XlsubError("no masked tokens to score head importance on: pass more evaluation examples")
    importance = normalize_importance(
        (importance / token_count).float(), layers=normalize_layers, global_=normalize_global
    )
    return ImportanceResult(
        importance=importance.cpu(),
        loss_sum=loss_sum,
        token_count=token_count,
        entropy=None if entropies is None else entropies.mean().cpu(),
    )
