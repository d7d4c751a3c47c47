"""Feed-forward neurons as a unit of subnetwork: activation statistics, LAPE selection (Tang et al. 2024,
"Language-Specific Neurons: The Key to Multilingual Capabilities in Large Language Models"), neuron gates,
neuron importance (Michel et al. 2019's gate gradients, on neurons) and the stock form.

A neuron is one unit of a layer's FFN intermediate activation: one output of the family adapter's
`ffn_activation(layer)` (`act(W_in x)`; in gated FFNs the activated half, `act_fn(gate_proj x)` in
Llama-style blocks, `act(input)` of ModernBERT's `Wi` split into input and gate) and one input of its
`ffn_down_projection(layer)`.

Two conventions, as for heads:
- a neuron mask is a `[layers, neurons]` tensor of 0/1, **1 = kept**, 0 = switched off (`neuron_mask.json`);
- `lape_selection` returns `[languages, layers, neurons]` booleans, **True = that language's neuron**, i.e.
  one the language's subnetwork switches off: its mask is `1 - selected[i].float()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from xlsub.errors import Range, XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.heads import Gates, ImportanceResult, LossFn, normalize_importance
from xlsub.models.mlm import chunk_losses, encoder_of, lm_loss
from xlsub.models.pruning import random_mask_like

# LAPE's settings: a share of all neurons (top_rate) and two quantile levels over all p (Tang et al. 2024)
TOP_RATE = Range(0, 1, low_open=True, meaning="a fraction of all neurons")
FILTER_RATE = Range(0, 1, low_open=True, meaning="a quantile level")
ACTIVATION_BAR = Range(0, 1, low_open=True, meaning="a quantile level")


def ffn_activations(model: nn.Module) -> list[nn.Module]:
    """Each layer's FFN activation module, as the family adapter finds it (BERT `intermediate.intermediate_act_fn`,
    DistilBERT `ffn.activation`, ModernBERT `mlp.act`, Llama-style `mlp.act_fn`, GPT-2 `mlp.act`, BLOOM
    `mlp.gelu_impl`): one module per layer, so that a hook on it sees that layer only."""
    family = adapter_for(model)
    modules = [family.ffn_activation(layer) for layer in family.layers(model)]
    if not all(isinstance(m, nn.Module) for m in modules) or len({id(m) for m in modules}) != len(modules):
        raise XlsubError("model: its FFN activation is a plain function or one module shared by all layers, which "
                         "hooks cannot tell apart; give hidden_act in its config as a name (e.g. 'gelu')")
    return modules


def down_projections(model: nn.Module) -> list[nn.Module]:
    """Each layer's FFN down projection, whose inputs are the neurons (family adapter's `ffn_down_projection`)."""
    family = adapter_for(model)
    return [family.ffn_down_projection(layer) for layer in family.layers(model)]


def _neuron_axis(projection: nn.Module) -> int:
    """The weight axis that indexes the neurons: inputs are columns of a Linear [out, in], rows of a Conv1D [in, out]."""
    return 1 if isinstance(projection, nn.Linear) else 0


def neuron_mask_shape(model: nn.Module) -> tuple[int, int]:
    """[layers, neurons] of the model's neuron masks (the down projections' input width)."""
    widths = [p.weight.shape[_neuron_axis(p)] for p in down_projections(model)]
    if len(set(widths)) != 1:
        raise XlsubError(f"model: its layers have different FFN widths {widths}; neuron masks need one width: "
                         "use a model whose layers have the same intermediate size")
    return len(widths), widths[0]


def check_neuron_mask(model: nn.Module, mask: torch.Tensor, name: str = "neuron mask") -> torch.Tensor:
    """`mask` as a float [layers, neurons] tensor of 0/1 that fits `model`."""
    shape = neuron_mask_shape(model)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        raise XlsubError(f"{name}: has shape {tuple(getattr(mask, 'shape', ()))}, the model needs [layers, neurons] = {list(shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise XlsubError(f"{name}: entries must be 0 or 1")
    return mask.float()


# -- activation statistics ----------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationStats:
    """One language's counts: `active[l, i]` = real tokens at which neuron i of layer l had an activation > 0
    (int64 [layers, neurons]), out of `tokens` real tokens."""

    active: torch.Tensor
    tokens: int

    @property
    def probability(self) -> torch.Tensor:
        """LAPE's activation probability p = active / tokens (float64 [layers, neurons])."""
        if self.tokens == 0:
            raise XlsubError("activation statistics: no real tokens were counted; pass text for every language")
        return self.active.double() / self.tokens


class ActivationCounter:
    """Count, per layer and neuron, the real tokens at which the FFN activation's output is > 0.

    A forward hook on each layer's activation module (`ffn_activations`) adds, for every batch passed to
    `count`, `((act > 0) & attention_mask).sum(tokens)` into an int64 [neurons] tensor per layer, on
    that layer's device: nothing is kept per token, memory is O(layers x neurons). This is what LAPE's
    `over_zero` counts (Tang et al. 2024, in place in the FFN forward); padding is left out here, and
    the token count is the number of real tokens. Forwards run outside `count` are not counted.

        with ActivationCounter(model) as counter:
            for batch in batches:
                counter.count(batch)
        stats = counter.stats()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._real: torch.Tensor | None = None  # the batch's attention mask, set only inside `count`
        self.tokens = 0
        modules = ffn_activations(model)
        self._active: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, module in enumerate(modules)]

    def _hook(self, layer: int):
        def count_active(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._real is None:
                return
            real = self._real.to(output.device)
            if output.shape[:-1] != real.shape:
                raise XlsubError(f"model: layer {layer}'s FFN activation has shape {tuple(output.shape)}, not [batch, tokens, "
                                 f"neurons] = {[*real.shape, '...']}; set chunk_size_feed_forward=0 in its config")
            active = ((output > 0) & real[..., None]).sum((0, 1))
            self._active[layer] = active if self._active[layer] is None else self._active[layer] + active

        return count_active

    def count(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Run the model's transformer body on `batch` (`input_ids`, optional `attention_mask`) under
        `torch.no_grad` and add its real tokens to the counts. The LM head is not run: no count needs it."""
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        self._real = mask.bool()
        try:
            with torch.no_grad():
                encoder_of(self.model)(input_ids=input_ids, attention_mask=mask)
        finally:
            self._real = None
        self.tokens += int(mask.sum())

    def stats(self) -> ActivationStats:
        """The counts so far, on the CPU."""
        neurons = neuron_mask_shape(self.model)[1]
        active = torch.stack([torch.zeros(neurons, dtype=torch.int64) if a is None else a.cpu() for a in self._active])
        return ActivationStats(active, self.tokens)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def activation_statistics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                          desc: str = "activations") -> ActivationStats:
    """One streamed pass of `ActivationCounter` over one language's batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with ActivationCounter(model) as counter:
            for batch in tqdm(batches, desc=desc, unit="batch", disable=None):
                counter.count(batch)
    finally:
        model.train(was_training)
    return counter.stats()


# -- LAPE ------------------------------------------------------------------------------------------

def lape_quantile(values: torch.Tensor, rate: float) -> float:
    """The reference code's quantile: the k-th smallest value, k = round(n * rate) (Python's round) and at least 1."""
    flat = values.flatten()
    return float(flat.kthvalue(max(1, round(len(flat) * rate))).values)


def lape_eligible(probabilities: torch.Tensor, filter_rate: float = 0.95) -> torch.Tensor:
    """The neurons LAPE can select (step 2 of `lape_selection`): bool [layers, neurons], True where p exceeds,
    in at least one language, the `filter_rate` quantile of all p (`probabilities` [languages, layers,
    neurons], flattened). The base rate a layer distribution of language neurons is compared with."""
    FILTER_RATE.check("filter_rate", filter_rate)
    p = probabilities.detach().double().cpu()
    return (p > lape_quantile(p, filter_rate)).any(0)


def lape_selection(probabilities: torch.Tensor, top_rate: float = 0.01, filter_rate: float = 0.95,
                   activation_bar: float = 0.95) -> torch.Tensor:
    """Language activation probability entropy (LAPE; Tang et al. 2024, as their `identify.py` computes it).

    `probabilities` [languages, layers, neurons]: p, each neuron's share of a language's real tokens at which
    it is active (`ActivationStats.probability`, stacked). Steps:
    1. p normalised over languages (a neuron active in no language gets 0 everywhere); its entropy
       -sum p' log p' (0 log 0 = 0);
    2. a neuron whose p exceeds, in no language, the `filter_rate` quantile of all p (every layer, neuron
       and language flattened; the k-th smallest value, k = round(n x rate)) gets infinite entropy;
    3. the round(layers x neurons x `top_rate`) neurons of lowest entropy are selected, over all layers
       (ties: lower flat index first; the reference's `topk` leaves them unspecified);
    4. each selected neuron belongs to every language whose p is strictly above the `activation_bar`
       quantile of all p (the same kind of quantile) — possibly several languages, possibly none.

    Returns bool [languages, layers, neurons], True = that language's neuron (one its subnetwork switches
    off; the neuron mask, 1 = kept, is its negation). Computed in float64.
    """
    TOP_RATE.check("top_rate", top_rate)
    FILTER_RATE.check("filter_rate", filter_rate)
    ACTIVATION_BAR.check("activation_bar", activation_bar)
    if probabilities.dim() != 3:
        raise XlsubError(f"probabilities: expected [languages, layers, neurons], got shape {tuple(probabilities.shape)}")
    p = probabilities.detach().double().cpu()
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise XlsubError("probabilities: entries must be activation probabilities in [0, 1]")
    normed = torch.nan_to_num(p / p.sum(0, keepdim=True), nan=0.0)
    entropy = -torch.special.xlogy(normed, normed).sum(0)  # [layers, neurons]
    entropy[~lape_eligible(p, filter_rate)] = math.inf
    candidates = torch.zeros(entropy.numel(), dtype=torch.bool)
    candidates[torch.sort(entropy.flatten(), stable=True).indices[: round(entropy.numel() * top_rate)]] = True
    return (p > lape_quantile(p, activation_bar)) & candidates.view_as(entropy)


# -- gates, importance, stock form ------------------------------------------------------------------

class NeuronGates(Gates):
    """Scale neuron i of layer l by `gates[l, i]` while active.

    A forward hook on each layer's FFN activation module multiplies its output [..., neurons] by the layer's
    gates, before the down projection (in gated FFNs, before the product with the up/gate half). A gate
    of 0 switches the neuron off (what zeroing its down-projection input column does: `zero_neurons`), 1
    leaves it; when `gates` requires grad, d loss / d gates is the neuron's importance signal.

        with NeuronGates(model, mask):
            loss, n = lm_loss(model, batch)
    """

    def __init__(self, model: nn.Module, gates: torch.Tensor):
        super().__init__(gates, neuron_mask_shape(model), "neuron")
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, module in enumerate(ffn_activations(model))]

    def _hook(self, layer: int):
        def scale_neurons(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.gates[layer].to(device=output.device, dtype=output.dtype)

        return scale_neurons


def neuron_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    mask: torch.Tensor | None = None,
    *,
    normalize_layers: bool = True,
    normalize_global: bool = True,
    loss_fn: LossFn | None = None,
) -> ImportanceResult:
    """Neuron importance I_i = E_x |d L(x) / d xi_i| (Michel et al. 2019, eq. 5, with gates on FFN neurons):
    `head_importance`'s pass with `NeuronGates` in place of head gates.

    Gates start at `mask` (all ones if None); per batch the summed LM loss (`loss_fn`, default `lm_loss`),
    its gradient with respect to the gates only (weights frozen for the pass, restored after), |.|
    added up and divided by the scored tokens; then bertology's per-layer L2 and global min-max
    normalisation, each switchable. Eval mode. The loss of the same pass gives `result.perplexity`.
    """
    layers, neurons = neuron_mask_shape(model)
    loss_fn = loss_fn or lm_loss
    parameter = next(model.parameters())
    gates = torch.ones(layers, neurons) if mask is None else check_neuron_mask(model, mask).clone()
    gates = gates.to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True)

    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    gate_hooks = NeuronGates(model, gates)
    importance = torch.zeros(layers, neurons, dtype=torch.float64, device=parameter.device)
    loss_sum, token_count = 0.0, 0
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        for batch in batches:
            loss, count = loss_fn(model, {k: v.to(parameter.device) for k, v in batch.items()})
            (grad,) = torch.autograd.grad(loss, gates)
            importance += grad.abs().double()
            loss_sum += float(loss.detach())
            token_count += count
    finally:
        gate_hooks.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)

    if token_count == 0:
        raise XlsubError("no scored tokens to compute neuron importance on: pass more evaluation examples")
    importance = normalize_importance((importance / token_count).float(), layers=normalize_layers, global_=normalize_global)
    return ImportanceResult(importance=importance.cpu(), loss_sum=loss_sum, token_count=token_count)


def zero_neurons(model: nn.Module, mask: torch.Tensor, copy: bool = True) -> nn.Module:
    """A copy of `model` (`model` itself with `copy=False`) computing what `NeuronGates(model, mask)` computes,
    in stock form: each switched-off neuron's input of the down projection (a column of a Linear weight, a
    row of GPT-2's Conv1D weight) is set to 0; the bias stays. Architecture and config are untouched, so
    `AutoModelFor*.from_pretrained` loads it without xlsub."""
    mask = check_neuron_mask(model, mask)
    stock = deepcopy(model) if copy else model
    with torch.no_grad():
        for projection, gates in zip(down_projections(stock), mask):
            off = (gates == 0).to(projection.weight.device)
            if _neuron_axis(projection) == 1:
                projection.weight[:, off] = 0
            else:
                projection.weight[off, :] = 0
    return stock


def random_neuron_mask_like(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A random neuron mask with as many neurons kept in each layer as `mask`, drawn independently per layer
    (a seeded permutation): the random-neuron control. The same draw as heads' `random_mask_like`."""
    return random_mask_like(mask, seed)


def neuron_control_seed(subnetwork, draw: int) -> int:
    """The seed of random-neuron draw `draw` of a language's neuron set (`SubnetworkId`): a digest of
    (language, seed, draw), so every language, seed and draw gets its own independent draw."""
    import hashlib

    digest = hashlib.sha256(f"random-neurons/{subnetwork.language}/{subnetwork.seed}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gated_chunk_losses(model: nn.Module, mask: torch.Tensor | None,
                       batches_by_language: Mapping[str, Iterable[Mapping[str, torch.Tensor]]]) -> dict:
    """Per-chunk losses (`xlsub.models.mlm.chunk_losses`) of each language's batches with the neurons `mask`
    switches off (None: every neuron on): one row of the deactivation matrix and what its intervals resample."""
    if mask is None:
        return {lang: chunk_losses(model, batches) for lang, batches in batches_by_language.items()}
    with NeuronGates(model, check_neuron_mask(model, mask)):
        return {lang: chunk_losses(model, batches) for lang, batches in batches_by_language.items()}
