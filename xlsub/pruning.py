"""Iterative head pruning (Michel et al. 2019, section 4; HF bertology `mask_heads`) and physical pruning.

A language's subnetwork is the head mask this loop ends with: switch off the
least important heads a few at a time, recompute importance and perplexity
under the new mask, and keep the last mask whose perplexity stays within
`threshold` x the unpruned perplexity. `prune_heads` then removes the masked
heads' weights for real, and `save_pruned`/`load_pruned` store and rebuild
such a model.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from xlsub.errors import XlsubError
from xlsub.heads import HeadGates, attention_modules, head_importance, num_heads
from xlsub.mlm import perplexity

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One pruning step: the mask it evaluated, its perplexity and the fraction of heads it has off."""

    step: int
    ppl: float
    frac_pruned: float
    mask: torch.Tensor


@dataclass
class PruningResult:
    """The chosen mask, the head importance under it, every step evaluated, and the unpruned perplexity.

    `steps[kept]` is the chosen step. With the threshold rule the last step in
    `steps` is the first one past the threshold, not the chosen one.
    """

    mask: torch.Tensor
    importance: torch.Tensor
    steps: list[Step]
    base_ppl: float
    kept: int

    @property
    def ppl(self) -> float:
        """Perplexity (on the pruning batches) under the chosen mask."""
        return self.steps[self.kept].ppl


def select_mask(ppls: Sequence[float], base_ppl: float, threshold: float) -> int:
    """Index of the step to keep: the last one before the first perplexity above `threshold` x `base_ppl`.

    The stop rule of the study (bertology `mask_heads`, with perplexity as the
    score, lower is better). Step 0 is the unpruned model.
    """
    for i, ppl in enumerate(ppls):
        if ppl > threshold * base_ppl:
            return max(i - 1, 0)
    return len(ppls) - 1


def mask_least_important(importance: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """`mask` with its `n` least important heads still on switched off (ties: lower flat index first)."""
    scores = importance.flatten().double().clone()
    scores[mask.flatten() == 0] = math.inf  # heads already off are never picked again
    order = torch.sort(scores, stable=True).indices
    on = int(mask.sum())
    new = mask.flatten().clone()
    new[order[: min(n, on)]] = 0
    return new.view_as(mask)


Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, float]]


def _prune_loop(
    evaluate: Evaluate,
    shape: tuple[int, int],
    *,
    threshold: float,
    amount: float,
    target_sparsity: float | None,
    progress: Callable[[Step], None] | None,
    progress_desc: str,
) -> PruningResult:
    if not 0 < amount <= 1:
        raise XlsubError(f"amount={amount} must be a fraction of heads in (0, 1]")
    if threshold < 1:
        raise XlsubError(f"threshold={threshold} must be at least 1 (a factor on the unpruned perplexity)")
    if target_sparsity is not None and not 0 < target_sparsity < 1:
        raise XlsubError(f"target_sparsity={target_sparsity} must be a fraction of heads in (0, 1)")

    total = shape[0] * shape[1]
    per_step = max(1, int(total * amount))
    goal = total if target_sparsity is None else round(total * target_sparsity)
    mask = torch.ones(shape)
    importance, ppl = evaluate(mask)
    base_ppl = ppl
    steps = [Step(0, ppl, 0.0, mask)]
    importances = [importance]
    if progress is not None:
        progress(steps[0])
    bar = tqdm(total=math.ceil(goal / per_step), desc=progress_desc, unit="step", disable=None)
    while (off := total - int(mask.sum())) < goal:
        mask = mask_least_important(importance, mask, min(per_step, goal - off))
        off = total - int(mask.sum())
        importance, ppl = evaluate(mask)
        steps.append(Step(len(steps), ppl, off / total, mask))
        importances.append(importance)
        bar.update()
        log.info("step %d: %d of %d heads off, ppl %.4g (%.4g x unpruned)",
                 len(steps) - 1, off, total, ppl, ppl / base_ppl)
        if progress is not None:
            progress(steps[-1])
        if target_sparsity is None and select_mask([s.ppl for s in steps], base_ppl, threshold) < len(steps) - 1:
            break
    bar.close()
    kept = len(steps) - 1 if target_sparsity is not None else select_mask([s.ppl for s in steps], base_ppl, threshold)
    return PruningResult(mask=steps[kept].mask, importance=importances[kept], steps=steps, base_ppl=base_ppl,
                         kept=kept)


def iterative_pruning(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    threshold: float = 1.1,
    amount: float = 0.1,
    target_sparsity: float | None = None,
    progress: Callable[[Step], None] | None = None,
    progress_desc: str = "pruning",
) -> PruningResult:
    """Michel et al. 2019 iterative pruning, one importance pass per step.

    Step 0 scores every head with all heads on. Each step switches off the
    `max(1, int(heads * amount))` least important heads still on, then one
    gradient pass (`head_importance`) gives both the new importances and the
    perplexity under the new mask. Stops at the first step whose perplexity
    exceeds `threshold` x unpruned and keeps the step before (`select_mask`),
    or when no heads remain. With `target_sparsity`, prunes until exactly
    `round(heads * target_sparsity)` heads are off, whatever the perplexity.
    `progress(step)` is called after every step (step 0 included), and a tqdm
    bar labelled `progress_desc` counts steps. `batches` are pre-masked, so
    the result is deterministic.
    """
    batches = list(batches)

    def evaluate(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        result = head_importance(model, batches, mask)
        return result.importance, result.perplexity

    return _prune_loop(evaluate, _mask_shape(model), threshold=threshold, amount=amount,
                       target_sparsity=target_sparsity, progress=progress, progress_desc=progress_desc)


def iterative_pruning_two_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    threshold: float = 1.1,
    amount: float = 0.1,
    target_sparsity: float | None = None,
    progress: Callable[[Step], None] | None = None,
    progress_desc: str = "pruning",
) -> PruningResult:
    """Reference for `iterative_pruning` as bertology runs it: per step an importance pass with
    gradients for every weight, then a separate no-grad pass for the perplexity. Same masks, slower."""
    batches = list(batches)

    def evaluate(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        importance = head_importance(model, batches, mask, freeze_weights=False).importance
        with HeadGates(model, mask):
            ppl = perplexity(model, batches)
        return importance, ppl

    return _prune_loop(evaluate, _mask_shape(model), threshold=threshold, amount=amount,
                       target_sparsity=target_sparsity, progress=progress, progress_desc=progress_desc)


def masked_perplexities(
    model: nn.Module, mask: torch.Tensor | None, batches_by_language: Mapping[str, Iterable[Mapping[str, torch.Tensor]]]
) -> dict[str, float]:
    """Perplexity of each language's batches under a head mask (None: every head on).

    One row of the cross-language perplexity matrix: a subnetwork evaluated on every language.
    """
    if mask is None:
        return {lang: perplexity(model, batches) for lang, batches in batches_by_language.items()}
    with HeadGates(model, mask):
        return {lang: perplexity(model, batches) for lang, batches in batches_by_language.items()}


def _mask_shape(model: nn.Module) -> tuple[int, int]:
    heads = num_heads(model)
    if len(set(heads)) != 1:
        raise XlsubError(
            f"cannot prune a model whose heads are already pruned (heads per layer {heads}); start from the full model"
        )
    return len(heads), heads[0]


def random_mask_like(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A random head mask with as many heads kept in each layer as `mask`: the control for
    "any subnetwork of this size would do"."""
    generator = torch.Generator().manual_seed(seed)
    layers, heads = mask.shape
    random = torch.zeros(layers, heads, dtype=mask.dtype)
    for layer in range(layers):
        kept = int(mask[layer].sum())
        random[layer, torch.randperm(heads, generator=generator)[:kept]] = 1
    return random


def params_kept_frac(mask: torch.Tensor, config) -> float:
    """Fraction of the attention parameters kept: query/key/value/output weights and biases and the
    attention LayerNorm of every layer, after removing the masked heads' rows and columns."""
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden
    per_head = 3 * (hidden * head_dim + head_dim) + hidden * head_dim
    removed = int((mask == 0).sum()) * per_head
    total = per_layer * mask.shape[0]
    return (total - removed) / total


# -- physical pruning ---------------------------------------------------------------------------

def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the output rows (dim 0) or input columns (dim 1) in `index`."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None:
        bias = bias.detach().index_select(0, index.to(bias.device)) if dim == 0 else bias.detach().clone()
    out_features, in_features = weight.shape
    # Built on the meta device: its random init is overwritten anyway (and warns at width 0).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def _no_heads_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Self-attention with every head pruned: a zero-width context, so that the output projection
    (now with zero input columns) returns exactly its bias, followed by the residual and LayerNorm."""
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    weights = None
    if self.config._attn_implementation == "eager":  # eager returns probabilities: keep one entry per layer
        batch, tokens = hidden_states.shape[:2]
        weights = hidden_states.new_zeros(batch, 0, tokens, tokens)
    return context, weights


def prune_heads(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Remove the heads `mask` switches off, in place, and record the kept heads in the config.

    Per layer, keeps the query/key/value output rows and the output
    projection's input columns of the kept heads, and sets the attention
    module's `num_attention_heads` and `all_head_size` (v5 reshapes with
    `view(*shape, -1, head_size)`, so the head count follows). A layer with no
    head left gets a forward returning a zero-width context. The kept head
    indices go to `config.xlsub_kept_heads` (a list per layer, saved with
    `save_pretrained`), which `load_pruned` reads back. The result computes
    what the gated model computes with `HeadGates(model, mask)`.
    """
    attentions = attention_modules(model)
    full = model.config.num_attention_heads
    if any(a.self.num_attention_heads != full for a in attentions):
        raise XlsubError("this model already has heads pruned; prune the full model with the combined mask")
    if tuple(mask.shape) != (len(attentions), full):
        raise XlsubError(
            f"head mask has shape {tuple(mask.shape)}, the model needs [layers, heads] = {[len(attentions), full]}"
        )

    kept_heads = []
    for layer, attention in enumerate(attentions):
        kept = [h for h in range(full) if mask[layer, h] != 0]  # always a list, even for one head
        kept_heads.append(kept)
        if len(kept) == full:
            continue
        self_attention = attention.self
        size = self_attention.attention_head_size
        index = torch.tensor([h * size + i for h in kept for i in range(size)], dtype=torch.long)
        for name in ("query", "key", "value"):
            setattr(self_attention, name, _slice_linear(getattr(self_attention, name), index, dim=0))
        attention.output.dense = _slice_linear(attention.output.dense, index, dim=1)
        self_attention.num_attention_heads = len(kept)
        self_attention.all_head_size = len(kept) * size
        if not kept:
            self_attention.forward = MethodType(_no_heads_forward, self_attention)
    model.config.xlsub_kept_heads = kept_heads
    return model


def kept_heads_mask(config) -> torch.Tensor | None:
    """The head mask `prune_heads` recorded in `config`, or None for an unpruned model."""
    kept_heads = getattr(config, "xlsub_kept_heads", None)
    if kept_heads is None:
        return None
    mask = torch.zeros(len(kept_heads), config.num_attention_heads)
    for layer, kept in enumerate(kept_heads):
        mask[layer, kept] = 1
    return mask


def save_pruned(model: nn.Module, folder: str | Path) -> None:
    """Save a (pruned) model with `save_pretrained`: safetensors weights, kept heads in config.json."""
    model.save_pretrained(folder)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        raise XlsubError(f"{folder} has no model.safetensors: save the model with save_pruned (safetensors)")
    weights = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(folder / shard))
    return weights


def load_pruned(folder: str | Path, *, attn_implementation: str | None = None) -> nn.Module:
    """Rebuild a model saved by `save_pruned`: the architecture from config.json, the heads in
    `config.xlsub_kept_heads` pruned, then the safetensors weights loaded strictly (only weights
    tied to a loaded one, such as the LM decoder, may be absent from the file). In eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise XlsubError(f"{folder} has no config.json: pass a folder written by save_pruned")
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (getattr(config, "architectures", None) or ["AutoModelForMaskedLM"])[0]
    model_class = getattr(transformers, architecture, transformers.AutoModelForMaskedLM)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = model_class.from_config(config, **kwargs) if model_class is transformers.AutoModelForMaskedLM \
        else model_class._from_config(config, **kwargs)
    mask = kept_heads_mask(config)
    if mask is not None:
        prune_heads(model, mask)

    weights = _read_weights(folder)
    expected = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = [k for k in expected.keys() - weights.keys() if not (k in tied and tied[k] in weights)]
    unexpected = sorted(weights.keys() - expected.keys())
    resized = sorted(k for k in weights.keys() & expected.keys() if weights[k].shape != expected[k].shape)
    if missing or unexpected or resized:
        raise XlsubError(
            f"weights in {folder} do not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {unexpected[:3]}, other shape {resized[:3]}; save the model with save_pruned"
        )
    model.load_state_dict(weights, strict=False)
    return model.eval()
