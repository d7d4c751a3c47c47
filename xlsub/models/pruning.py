"""Iterative head pruning (Michel et al. 2019, section 4; HF bertology `mask_heads`) and physical pruning.

A language's subnetwork is the head mask this loop ends with: switch off the
least important heads a few at a time, recompute importance and perplexity
under the new mask, and keep the last mask whose perplexity stays within
`threshold` x the unpruned perplexity. `prune_heads` then removes the masked
heads' weights for real, and `save_pruned`/`load_pruned` store and rebuild
such a model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from xlsub import artifacts
from xlsub.errors import Range, XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.heads import HeadGates, attention_modules, head_importance, mask_shape
from xlsub.models.mlm import chunk_losses, perplexity

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

    `steps[kept]` is the chosen step. The steps go on past it (the first one past the
    threshold, and with `continue_to` on to that fraction of heads off): the trajectory
    that equal-size overlaps compare.
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


# The bounds of the pruning loop's settings, the same for the prune stage (its fields' metadata) and the
# library. `threshold` is a factor on the unpruned perplexity (lower is better), so it must be at least 1:
# below 1 even the unpruned model fails the stop rule. `amount` is the fraction of all heads switched off
# per step, `target_sparsity` the fraction off at the end. NaN and inf lie in no Range.
THRESHOLD = Range(1, meaning="a perplexity ratio (keep masks with ppl <= threshold x unpruned)")
AMOUNT = Range(0, 1, low_open=True, meaning="a fraction of heads")
TARGET_SPARSITY = Range(0, 1, low_open=True, high_open=True, meaning="a fraction of heads (or none)")
CONTINUE_TO = Range(0, 1, meaning="a fraction of heads")


def check_settings(*, threshold: float, amount: float, target_sparsity: float | None, continue_to: float) -> None:
    """The pruning loop's settings within their Ranges, with the messages the prune stage gives."""
    THRESHOLD.check("threshold", threshold)
    AMOUNT.check("amount", amount)
    if target_sparsity is not None:
        TARGET_SPARSITY.check("target_sparsity", target_sparsity)
    CONTINUE_TO.check("continue_to", continue_to)


Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, float]]


def prune_loop(
    evaluate: Evaluate,
    shape: tuple[int, int],
    *,
    threshold: float,
    amount: float,
    target_sparsity: float | None,
    continue_to: float,
    progress: Callable[[Step], None] | None,
    progress_desc: str,
    unit: str = "heads",
) -> PruningResult:
    """The iterative pruning loop over any `shape` of units ([layers, heads], or [layers, neurons]): `evaluate(mask)`
    gives (importance, perplexity) under a mask; see `iterative_pruning` for the rule. `unit` names them in the log."""
    check_settings(threshold=threshold, amount=amount, target_sparsity=target_sparsity, continue_to=continue_to)
    total = shape[0] * shape[1]
    per_step = max(1, int(total * amount))
    goal = None if target_sparsity is None else round(total * target_sparsity)
    trajectory_end = round(total * continue_to)
    mask = torch.ones(shape)
    importance, ppl = evaluate(mask)
    base_ppl = ppl
    steps = [Step(0, ppl, 0.0, mask)]
    importances = [importance]
    if progress is not None:
        progress(steps[0])

    def done(off: int) -> bool:
        chosen = off >= goal if goal is not None else (off == total or select_mask([s.ppl for s in steps], base_ppl, threshold) < len(steps) - 1)
        return chosen and off >= trajectory_end

    bar = tqdm(total=math.ceil(max(goal or 0, trajectory_end) / per_step), desc=progress_desc, unit="step", disable=None)
    while not done(off := total - int(mask.sum())):
        # land exactly on the target sparsity, then go on in whole steps
        n = min(per_step, goal - off) if goal is not None and off < goal else min(per_step, total - off)
        mask = mask_least_important(importance, mask, n)
        off = total - int(mask.sum())
        importance, ppl = evaluate(mask)
        steps.append(Step(len(steps), ppl, off / total, mask))
        importances.append(importance)
        bar.update()
        log.info("step %d: %d of %d %s off, ppl %.4g (%.4g x unpruned)",
                 len(steps) - 1, off, total, unit, ppl, ppl / base_ppl)
        if progress is not None:
            progress(steps[-1])
    bar.close()
    if goal is not None:
        kept = next(i for i, s in enumerate(steps) if round(s.frac_pruned * total) == goal)
    else:
        kept = select_mask([s.ppl for s in steps], base_ppl, threshold)
    return PruningResult(mask=steps[kept].mask, importance=importances[kept], steps=steps, base_ppl=base_ppl,
                         kept=kept)


def iterative_pruning(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    threshold: float,
    amount: float,
    target_sparsity: float | None,
    continue_to: float,
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
    With `continue_to`, the loop goes on (importance only) until at least that
    fraction of heads is off; the chosen mask is the same.
    `progress(step)` is called after every step (step 0 included), and a tqdm
    bar labelled `progress_desc` counts steps. `batches` are pre-masked, so
    the result is deterministic.
    """
    batches = list(batches)

    def evaluate(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        result = head_importance(model, batches, mask)
        return result.importance, result.perplexity

    return prune_loop(evaluate, mask_shape(model), threshold=threshold, amount=amount,
                       target_sparsity=target_sparsity, continue_to=continue_to, progress=progress, progress_desc=progress_desc)


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


def masked_chunk_losses(model: nn.Module, mask: torch.Tensor | None,
                        batches_by_language: Mapping[str, Iterable[Mapping[str, torch.Tensor]]]) -> dict:
    """Per-chunk losses (`xlsub.models.mlm.chunk_losses`) of each language's batches under a head mask (None:
    every head on): what the perplexity matrix and its bootstrap intervals are computed from."""
    if mask is None:
        return {lang: chunk_losses(model, batches) for lang, batches in batches_by_language.items()}
    with HeadGates(model, mask):
        return {lang: chunk_losses(model, batches) for lang, batches in batches_by_language.items()}


@dataclass
class SubnetworkEvaluation:
    """A subnetwork's per-chunk losses on every language, and those of its random-mask controls."""

    losses: dict
    random_masks: list[torch.Tensor]
    random_losses: list[dict]

    @property
    def perplexity(self) -> dict[str, float]:
        return {lang: c.perplexity for lang, c in self.losses.items()}

    @property
    def random_perplexity(self) -> dict[str, float]:
        """Mean over the random draws of each language's perplexity."""
        return {lang: sum(d[lang].perplexity for d in self.random_losses) / len(self.random_losses) for lang in self.losses}


def evaluate_subnetwork(model: nn.Module, mask: torch.Tensor, subnetwork, batches_by_language, random_draws: int) -> SubnetworkEvaluation:
    """The subnetwork on every language, beside `random_draws` random masks with the same heads per layer
    (the control for "any subnetwork of this size would do"), each draw seeded by `control_seed`."""
    masks = [random_mask_like(mask, control_seed(subnetwork, draw)) for draw in range(random_draws)]
    return SubnetworkEvaluation(masked_chunk_losses(model, mask, batches_by_language), masks,
                                [masked_chunk_losses(model, m, batches_by_language) for m in masks])


def split_half_importance(model: nn.Module, half_a, half_b) -> float:
    """Reliability of head importance (Michel et al. 2019) on this much data: Spearman r between the
    importances, all heads on, from two disjoint halves of the pruning batches."""
    from xlsub.stats.overlap import split_half_reliability

    ones = torch.ones(mask_shape(model))
    return split_half_reliability(head_importance(model, half_a, ones).importance, head_importance(model, half_b, ones).importance)


# -- the cross-language perplexity matrix ------------------------------------------------------------

def cross_perplexity_matrix(rows: Mapping[artifacts.SubnetworkId, Mapping[str, float]], languages: Sequence[str]) -> pd.DataFrame:
    """The cross-language perplexity matrix: {SubnetworkId: {evaluation language: ppl}} -> rows `de-s0`
    (index "subnetwork", languages in `languages` order, seeds ascending) x evaluation languages (columns
    "evaluated on", in `languages` order, any others after them)."""
    ids = artifacts.subnetwork_ids(rows, languages)
    columns = artifacts.ordered(dict.fromkeys(lang for sid in ids for lang in rows[sid]), languages)
    return pd.DataFrame([[float(rows[sid].get(c, math.nan)) for c in columns] for sid in ids],
                        index=pd.Index([str(sid) for sid in ids], name="subnetwork"),
                        columns=pd.Index(columns, name="evaluated on"))


def relative_perplexity(matrix: pd.DataFrame, ppl_full: Mapping[str, float]) -> pd.DataFrame:
    """Subnetwork perplexity / full-model perplexity on the same evaluation language (columns): 1 = no loss.

    The one place the relative matrix is computed (prune logs it, analyze shows it)."""
    missing = [c for c in matrix.columns if c not in ppl_full]
    if missing:
        raise XlsubError(f"ppl_full: no full-model perplexity for {missing}; pass one for every evaluation language")
    full = pd.Series([float(ppl_full[c]) for c in matrix.columns], index=matrix.columns)
    return matrix.div(full, axis="columns")


def control_seed(subnetwork, draw: int) -> int:
    """The seed of random-mask draw `draw` of a subnetwork (`SubnetworkId`): a digest of (language,
    pruning seed, draw), so that every subnetwork and draw gets its own independent permutation (one
    seed shared by the languages would make their random masks nested subsets of each other)."""
    import hashlib

    digest = hashlib.sha256(f"random-mask/{subnetwork.language}/{subnetwork.seed}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


# -- physical pruning ---------------------------------------------------------------------------

def prune_heads(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Remove the heads `mask` switches off, in place, and record the kept heads in the config.

    Per layer, the family adapter (`xlsub.models.families`) keeps the query/key/value rows and the
    output projection's input slices of the kept heads and sets the layer's head count (v5 reshapes
    with `view(*shape, -1, head_size)`, so the head count follows). A layer with no head left gets a
    forward returning the output projection of a zero-width context (its bias). The kept head indices
    go to `config.xlsub_kept_heads` (a list per layer, saved with `save_pretrained`), which
    `load_pruned` reads back. The result computes what the gated model computes with
    `HeadGates(model, mask)`. Only families whose layers may hold their own head count (the encoders
    and GPT-2) can be pruned physically; the others refuse (use `zero_pruned_heads`).
    """
    family = adapter_for(model)
    attentions = attention_modules(model)
    layout = family.head_layout(model.config)
    full = layout.heads
    if any(family.heads_in(a, model.config) != full for a in attentions):
        raise XlsubError("this model already has heads pruned; prune the full model with the combined mask")
    if tuple(mask.shape) != (len(attentions), full):
        raise XlsubError(
            f"head mask has shape {tuple(mask.shape)}, the model needs [layers, heads] = {[len(attentions), full]}"
        )

    kept_heads = artifacts.kept_heads(mask)  # what head_mask.json holds too: one object, two files
    if any(len(kept) != full for kept in kept_heads) and not family.physical_pruning:
        raise XlsubError(
            f"model: {model.config.model_type} layers share one head count in their config, so heads cannot be "
            "removed physically; save the stock form (zero_pruned_heads) instead"
        )
    for attention, kept in zip(attentions, kept_heads):
        if len(kept) != full:
            family.prune_attention(attention, kept, layout)
    setattr(model.config, artifacts.KEPT_HEADS_CONFIG_KEY, kept_heads)
    return model


def zero_pruned_heads(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """A copy of the full `model` that computes what `HeadGates(model, mask)` computes, in stock form.

    Each switched-off head's slice of the output projection's weight (the `head_dim` inputs that
    read the head: columns of a Linear, rows of GPT-2's Conv1D; the family adapter knows which) is
    set to 0. A gate of 0 zeroes that slice of the projection's input, so both give
    `W_o[:, kept] @ context[kept] + b`: the bias stays (the gated and the physically pruned models
    add it too, also in a layer with no head left). Under grouped-query attention only query heads
    are zeroed; the key/value heads stay. The architecture and config are untouched, so
    `AutoModelForMaskedLM`/`AutoModelForCausalLM.from_pretrained` loads it without xlsub; it is as
    large as the full model.
    """
    mask = artifacts.check_mask(mask)
    shape = mask_shape(model)
    if tuple(mask.shape) != shape:
        raise XlsubError(f"head mask has shape {tuple(mask.shape)}, the model needs [layers, heads] = {list(shape)}")
    if getattr(model.config, artifacts.KEPT_HEADS_CONFIG_KEY, None) is not None:
        raise XlsubError("this model already has heads pruned; zero the heads of the full model")
    stock = copy.deepcopy(model)
    family = adapter_for(stock)
    head_dim = family.head_layout(stock.config).head_dim
    for attention, gates in zip(attention_modules(stock), mask):
        family.zero_heads(attention, gates == 0, head_dim)
    return stock


def subnetwork_model(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """The form a subnetwork is saved in, as a new model (`model` is left alone): physically pruned
    (`prune_heads`) where the family allows per-layer head counts (the encoders, GPT-2), else the stock
    form (`zero_pruned_heads`) with the kept heads recorded in its config all the same. Both compute
    what `HeadGates(model, mask)` computes; `load_pruned` rebuilds either."""
    if adapter_for(model).physical_pruning:
        return prune_heads(copy.deepcopy(model), mask)
    stock = zero_pruned_heads(model, mask)
    setattr(stock.config, artifacts.KEPT_HEADS_CONFIG_KEY, artifacts.kept_heads(mask))
    return stock


def kept_heads_mask(config) -> torch.Tensor | None:
    """The head mask `prune_heads` recorded in `config`, or None for an unpruned model."""
    kept_heads = getattr(config, artifacts.KEPT_HEADS_CONFIG_KEY, None)
    if kept_heads is None:
        return None
    return artifacts.mask_from_kept_heads(kept_heads, adapter_for(config).head_layout(config).heads)


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
    `config.xlsub_kept_heads` pruned (where the family prunes physically; a stock-form subnetwork of
    another family has its heads' weights zeroed in the file, `subnetwork_model`), then the
    safetensors weights loaded strictly (only weights tied to a loaded one, such as the LM decoder,
    may be absent from the file). In eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise XlsubError(f"{folder} has no config.json: pass a folder written by save_pruned")
    config = transformers.AutoConfig.from_pretrained(folder)
    auto_class = getattr(transformers, adapter_for(config).auto_class)
    architecture = (getattr(config, "architectures", None) or [auto_class.__name__])[0]
    model_class = getattr(transformers, architecture, auto_class)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = model_class.from_config(config, **kwargs) if model_class is auto_class \
        else model_class._from_config(config, **kwargs)
    mask = kept_heads_mask(config)
    if mask is not None and adapter_for(config).physical_pruning:
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


def load_subnetwork(folder: str | Path, head_mask: torch.Tensor | None = None):
    """(model, tokenizer) from a prune run's `subnetwork/` folder; with `head_mask` (its `head_mask.json`),
    refuses a model whose config keeps other heads."""
    model = load_pruned(folder)
    if head_mask is not None:
        recorded = kept_heads_mask(model.config)
        if recorded is None or not torch.equal(recorded, artifacts.check_mask(head_mask)):
            raise XlsubError(f"{artifacts.SUBNETWORK_DIR}: the model in {folder} keeps other heads than its {artifacts.HEAD_MASK}; rerun prune")
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def prune_run_tables(evaluations: Mapping, full: Mapping, languages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The prune run's tables by id: the cross-language perplexity matrix of the subnetworks (`cross_ppl`)
    and of their random-mask controls (`cross_ppl_random`, mean over draws), each also relative to the
    full model (`*_relative`), and every model's per-chunk losses (`chunk_losses`, indexed by model)."""
    ppl_full = {l: c.perplexity for l, c in full.items()}
    tables = {}
    for name, rows in ((artifacts.CROSS_PPL, {sid: e.perplexity for sid, e in evaluations.items()}),
                       (artifacts.CROSS_PPL_RANDOM, {sid: e.random_perplexity for sid, e in evaluations.items()})):
        tables[name] = cross_perplexity_matrix(rows, languages)
        tables[f"{name}_relative"] = relative_perplexity(tables[name], ppl_full)
    losses = {(artifacts.FULL_MODEL, -1, l): c for l, c in full.items()}
    for sid, e in evaluations.items():
        losses |= {(str(sid), -1, l): c for l, c in e.losses.items()}
        losses |= {(str(sid), k, l): c for k, draw in enumerate(e.random_losses) for l, c in draw.items()}
    tables[artifacts.CHUNK_LOSSES] = artifacts.chunk_losses_table(losses).set_index("model")
    return tables
