"""Model families: the one place that knows how each architecture lays out its layers.

Everything else in xlsub asks the adapter of a model (`adapter_for(model)`) and never
"is this BERT or Llama?". An adapter knows:

- the objective (`masked` or `causal`) and the module that maps the last hidden states to
  vocabulary logits (`lm_head`);
- each layer's attention block, its output projection and the head layout (query heads,
  key/value heads under grouped-query attention, head size from the config: Gemma 3's is
  not hidden / heads). A head's slice of the output projection's input is what head gates
  scale and what the stock form zeroes: columns of an `nn.Linear` weight [out, in], rows of
  GPT-2's `Conv1D` weight [in, out];
- which of the attention block's projections are laid out per query head and which per key/value
  head, hence what share of the block's parameters a head mask keeps (`attention_params`);
- the feed-forward block's intermediate activation module (where neuron statistics are read);
- the special tokens the default mean pooling leaves out (none for encoders, the study's
  pooling; BOS/EOS for decoders);
- whether heads can be pruned physically: only where a layer may hold its own head count
  (the encoders and GPT-2). Llama-style configs hold one head count, and one key/value
  group layout, for all layers; for those the stock form with zeroed slices is the saved form.

Adding a family = one adapter registered here + a tiny preset in `loading.py` + its row in
`docs/families.md` (`tests/test_families.py` fails on a family without both).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from types import MethodType

import torch
import transformers
from torch import nn

from xlsub.errors import XlsubError
from xlsub.stats.overlap import AttentionParams

MASKED = "masked"
CAUSAL = "causal"


@dataclass(frozen=True)
class HeadLayout:
    """The attention heads of a full (unpruned) layer: query heads, key/value heads (fewer under
    grouped-query attention: query head i reads key/value head i // (heads / kv_heads)), head size."""

    heads: int
    kv_heads: int
    head_dim: int

    def kv_head_of(self, head: int) -> int:
        return head // (self.heads // self.kv_heads)


class SoftCap(nn.Module):
    """Gemma's final-logit soft cap: cap * tanh(logits / cap)."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.cap) * self.cap


class Family:
    """The interface; one subclass per architecture layout. Adapters hold no state."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    objective: str = MASKED
    auto_class: str = "AutoModelForMaskedLM"
    physical_pruning: bool = False
    # GPT-2's Conv1D stores the output projection's weight as [in, out]
    transposed_output: bool = False

    # -- layers -----------------------------------------------------------------------------
    def body(self, model: nn.Module) -> nn.Module:
        """The transformer under the LM head (`model.roberta`, `model.model`, `model.transformer`)."""
        return model.base_model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def output_projection(self, attention: nn.Module) -> nn.Module:
        raise NotImplementedError

    def query_modules(self, attention: nn.Module) -> list[nn.Module]:
        """The projections whose output rows are laid out per query head (the query projection; a fused
        q/k/v projection, where every head has its own key and value)."""
        raise NotImplementedError

    def kv_modules(self, attention: nn.Module) -> list[nn.Module]:
        """The projections whose output rows are laid out per key/value head (key and value projections);
        none where they are fused into a `query_modules` projection."""
        return []

    def ffn_activation(self, layer: nn.Module) -> nn.Module:
        """The module whose output is the FFN's intermediate activation (gated FFNs: act(gate_proj x))."""
        raise NotImplementedError

    def ffn_down_projection(self, layer: nn.Module) -> nn.Module:
        """The FFN's output projection, whose input is the (gated) activation: one input per neuron
        (columns of an `nn.Linear` weight, rows of GPT-2's `Conv1D` weight); the stock form zeroes them."""
        raise NotImplementedError

    def head_layout(self, config) -> HeadLayout:
        heads = config.num_attention_heads
        return HeadLayout(heads, heads, config.hidden_size // heads)

    def heads_in(self, attention: nn.Module, config) -> int:
        """Query heads a layer holds now (fewer than the config's once physically pruned)."""
        projection = self.output_projection(attention)
        width = projection.weight.shape[0] if self.transposed_output else projection.weight.shape[1]
        return width // self.head_layout(config).head_dim

    def attention_params(self, config) -> AttentionParams:
        """What one layer's attention block (`attention`) of a full model of `config` holds per query head, per
        key/value head and shared, counted from the block itself, built on the meta device (no memory).

        A query head's share: its rows of `query_modules` (weights and biases) and its slice of the output
        projection's weight; a key/value head's: its rows of `kv_modules`; shared: the rest of the block
        (output bias, norms). With as many key/value heads as query heads, the key/value rows are counted
        per query head. `xlsub.stats.overlap.params_kept_frac` turns a head mask into the share it keeps.
        """
        with torch.device("meta"):  # on a copy: from_config sets the attention implementation on its config
            model = getattr(transformers, self.auto_class).from_config(copy.deepcopy(config))
        attention = self.attention(self.layers(model)[0])
        layout = self.head_layout(config)
        output_weight = self.output_projection(attention).weight
        per_query = _rows_per_head(self.query_modules(attention), layout.heads) + _split(output_weight.numel(), layout.heads)
        per_kv = _rows_per_head(self.kv_modules(attention), layout.kv_heads)
        if layout.kv_heads == layout.heads:
            per_query, per_kv = per_query + per_kv, 0
        shared = sum(p.numel() for p in attention.parameters()) - layout.heads * per_query - layout.kv_heads * per_kv
        return AttentionParams(per_query, per_kv, shared, layout.heads, layout.kv_heads)

    # -- LM head ------------------------------------------------------------------------------
    def lm_head(self, model: nn.Module) -> nn.Module:
        """The module mapping last hidden states [..., hidden] to vocabulary logits [..., vocab]."""
        return model.lm_head

    # -- positions and pooling ------------------------------------------------------------------
    def max_positions(self, config) -> int | None:
        """Longest input the position embeddings allow; None when positions are unbounded (ALiBi)."""
        return config.max_position_embeddings

    def pool_excluded(self, tokenizer) -> list[int]:
        """Token ids the default mean pooling leaves out."""
        return []

    # -- heads in weights -----------------------------------------------------------------------
    def zero_heads(self, attention: nn.Module, heads_off: torch.Tensor, head_dim: int) -> None:
        """Zero the slices of the output projection's weight that read the heads `heads_off` (bool [heads])."""
        weight = self.output_projection(attention).weight
        off = heads_off.to(weight.device)
        with torch.no_grad():
            if self.transposed_output:  # [heads * head_dim, out]: rows
                weight.view(len(off), head_dim, weight.shape[1])[off] = 0
            else:  # [out, heads * head_dim]: columns
                weight.view(weight.shape[0], len(off), head_dim)[:, off] = 0

    def prune_attention(self, attention: nn.Module, kept: list[int], layout: HeadLayout) -> None:
        """Remove every head not in `kept` from this attention block, in place (only where
        `physical_pruning`)."""
        raise NotImplementedError


def _split(count: int, heads: int) -> int:
    if count % heads:
        raise ValueError(f"{count} parameters do not split evenly over {heads} heads")
    return count // heads


def _rows_per_head(modules: list[nn.Module], heads: int) -> int:
    """One head's share of the parameters (weights and biases) of projections laid out per head."""
    return _split(sum(p.numel() for module in modules for p in module.parameters()), heads)


# -- weight slicing for physical pruning --------------------------------------------------------

def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
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


def slice_conv1d(conv: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """GPT-2's Conv1D (weight [in, out]) keeping the inputs (dim 0) or outputs (dim 1) in `index`."""
    from transformers.pytorch_utils import Conv1D

    weight = conv.weight.detach().index_select(dim, index.to(conv.weight.device))
    bias = conv.bias.detach().index_select(0, index.to(conv.bias.device)) if dim == 1 else conv.bias.detach().clone()
    new = Conv1D(weight.shape[1], weight.shape[0])
    new.weight = nn.Parameter(weight.clone(), requires_grad=conv.weight.requires_grad)
    new.bias = nn.Parameter(bias.clone(), requires_grad=conv.bias.requires_grad)
    return new


def head_index(kept: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Flat indices of the kept heads' slices in a [heads * head_dim] axis starting at `offset`."""
    return torch.tensor([offset + h * head_dim + i for h in kept for i in range(head_dim)], dtype=torch.long)


def _bert_no_heads_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """BERT self-attention with every head pruned: a zero-width context, so that the output projection
    (now with zero input columns) returns exactly its bias, followed by the residual and LayerNorm."""
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    weights = None
    if self.config._attn_implementation == "eager":  # eager returns probabilities: keep one entry per layer
        batch, tokens = hidden_states.shape[:2]
        weights = hidden_states.new_zeros(batch, 0, tokens, tokens)
    return context, weights


def _projection_only_forward(projection_name: str):
    """An attention forward for a block with every head pruned: what its output projection gives for a
    zero-width context, i.e. exactly the projection's bias (what the gated model adds too). Conv1D
    cannot take a zero-width input, so its bias is broadcast directly. (Eval-mode output: the block's
    dropout after the projection is not applied.)"""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        projection = getattr(self, projection_name)
        if isinstance(projection, nn.Linear):
            return projection(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None
        output = hidden_states.new_zeros(*hidden_states.shape[:-1], projection.weight.shape[1])
        return output + projection.bias, None

    return forward


# -- the families -----------------------------------------------------------------------------

class BertLayout(Family):
    """BERT, mBERT, RoBERTa, XLM-R: `encoder.layer[i].attention` with `.self` (query/key/value)
    and `.output.dense`; LM head `lm_head` (RoBERTa) or `cls` (BERT)."""

    name = "BERT-family"
    model_types = ("xlm-roberta", "roberta", "bert")
    physical_pruning = True

    def layers(self, model):
        return list(self.body(model).encoder.layer)

    def attention(self, layer):
        return layer.attention

    def output_projection(self, attention):
        return attention.output.dense

    def query_modules(self, attention):
        return [attention.self.query]

    def kv_modules(self, attention):
        return [attention.self.key, attention.self.value]

    def ffn_activation(self, layer):
        return layer.intermediate.intermediate_act_fn

    def ffn_down_projection(self, layer):
        return layer.output.dense

    def heads_in(self, attention, config):
        return attention.self.num_attention_heads

    def lm_head(self, model):
        for name in ("lm_head", "cls"):
            head = getattr(model, name, None)
            if head is not None:
                return head
        raise XlsubError(f"model: {type(model).__name__} has no masked-LM head (lm_head or cls); load it as *ForMaskedLM")

    def max_positions(self, config):
        # RoBERTa positions start after the padding index
        offset = (config.pad_token_id + 1) if config.model_type in ("roberta", "xlm-roberta") else 0
        return config.max_position_embeddings - offset

    def prune_attention(self, attention, kept, layout):
        self_attention = attention.self
        index = head_index(kept, layout.head_dim)
        for name in ("query", "key", "value"):
            setattr(self_attention, name, slice_linear(getattr(self_attention, name), index, dim=0))
        attention.output.dense = slice_linear(attention.output.dense, index, dim=1)
        # v5 reshapes with view(*shape, -1, head_size), so the head count follows
        self_attention.num_attention_heads = len(kept)
        self_attention.all_head_size = len(kept) * layout.head_dim
        if not kept:
            self_attention.forward = MethodType(_bert_no_heads_forward, self_attention)


class DistilBertLayout(Family):
    """DistilBERT: `transformer.layer[i].attention` with q_lin/k_lin/v_lin and `out_lin`; the LM head is
    vocab_transform -> activation -> vocab_layer_norm -> vocab_projector."""

    name = "distilbert"
    model_types = ("distilbert",)
    physical_pruning = True

    def layers(self, model):
        return list(self.body(model).transformer.layer)

    def attention(self, layer):
        return layer.attention

    def output_projection(self, attention):
        return attention.out_lin

    def query_modules(self, attention):
        return [attention.q_lin]

    def kv_modules(self, attention):
        return [attention.k_lin, attention.v_lin]

    def ffn_activation(self, layer):
        return layer.ffn.activation

    def ffn_down_projection(self, layer):
        return layer.ffn.lin2

    def lm_head(self, model):
        return nn.Sequential(model.vocab_transform, model.activation, model.vocab_layer_norm, model.vocab_projector)

    def prune_attention(self, attention, kept, layout):
        index = head_index(kept, layout.head_dim)
        for name in ("q_lin", "k_lin", "v_lin"):
            setattr(attention, name, slice_linear(getattr(attention, name), index, dim=0))
        attention.out_lin = slice_linear(attention.out_lin, index, dim=1)
        attention.n_heads = len(kept)
        if not kept:
            attention.forward = MethodType(_projection_only_forward("out_lin"), attention)


class ModernBertLayout(Family):
    """ModernBERT: `layers[i].attn` with fused `Wqkv` (rows laid out [3, heads, head_dim]) and `Wo`;
    the LM head is `head` (dense, act, norm) then `decoder`; gated FFN whose activated half is `mlp.act`."""

    name = "modernbert"
    model_types = ("modernbert",)
    physical_pruning = True

    def layers(self, model):
        return list(self.body(model).layers)

    def attention(self, layer):
        return layer.attn

    def output_projection(self, attention):
        return attention.Wo

    def query_modules(self, attention):
        return [attention.Wqkv]

    def ffn_activation(self, layer):
        return layer.mlp.act

    def ffn_down_projection(self, layer):
        return layer.mlp.Wo

    def lm_head(self, model):
        return nn.Sequential(model.head, model.decoder)

    def prune_attention(self, attention, kept, layout):
        width = layout.heads * layout.head_dim
        qkv = torch.cat([head_index(kept, layout.head_dim, part * width) for part in range(3)])
        attention.Wqkv = slice_linear(attention.Wqkv, qkv, dim=0)
        attention.Wo = slice_linear(attention.Wo, head_index(kept, layout.head_dim), dim=1)
        if not kept:
            attention.forward = MethodType(_projection_only_forward("Wo"), attention)


class Decoder(Family):
    """The causal-LM defaults: `lm_head` on the body's last hidden state, BOS/EOS left out of mean pooling."""

    objective = CAUSAL
    auto_class = "AutoModelForCausalLM"

    def pool_excluded(self, tokenizer):
        return sorted({i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None})


class LlamaLayout(Decoder):
    """Llama, Mistral, Qwen2, Qwen3: `model.layers[i].self_attn` with q/k/v/o_proj, grouped-query
    attention (num_key_value_heads), head_dim from the config; gated FFN (act_fn(gate_proj x))."""

    name = "Llama-family"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self, model):
        return list(self.body(model).layers)

    def attention(self, layer):
        return layer.self_attn

    def output_projection(self, attention):
        return attention.o_proj

    def query_modules(self, attention):
        return [attention.q_proj]

    def kv_modules(self, attention):
        return [attention.k_proj, attention.v_proj]

    def ffn_activation(self, layer):
        return layer.mlp.act_fn

    def ffn_down_projection(self, layer):
        return layer.mlp.down_proj

    def head_layout(self, config):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadLayout(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class Gemma3Layout(LlamaLayout):
    """Gemma 3 (text): the Llama layout, head_dim independent of hidden / heads, and the final
    logits soft-capped when the config says so."""

    name = "gemma3"
    model_types = ("gemma3_text",)

    def lm_head(self, model):
        cap = getattr(model.config, "final_logit_softcapping", None)
        return model.lm_head if cap is None else nn.Sequential(model.lm_head, SoftCap(cap))


class GPT2Layout(Decoder):
    """GPT-2 (mGPT): `transformer.h[i].attn` with fused `c_attn` and output projection `c_proj`, both
    Conv1D (weight [in, out]: a head's slice of c_proj is rows)."""

    name = "gpt2"
    model_types = ("gpt2",)
    physical_pruning = True
    transposed_output = True

    def layers(self, model):
        return list(self.body(model).h)

    def attention(self, layer):
        return layer.attn

    def output_projection(self, attention):
        return attention.c_proj

    def query_modules(self, attention):
        return [attention.c_attn]

    def ffn_activation(self, layer):
        return layer.mlp.act

    def ffn_down_projection(self, layer):
        return layer.mlp.c_proj

    def max_positions(self, config):
        return config.n_positions

    def prune_attention(self, attention, kept, layout):
        width = layout.heads * layout.head_dim
        qkv = torch.cat([head_index(kept, layout.head_dim, part * width) for part in range(3)])
        attention.c_attn = slice_conv1d(attention.c_attn, qkv, dim=1)
        attention.c_proj = slice_conv1d(attention.c_proj, head_index(kept, layout.head_dim), dim=0)
        attention.num_heads = len(kept)
        attention.split_size = len(kept) * layout.head_dim  # c_attn's output splits into q, k, v of this width
        if not kept:
            attention.forward = MethodType(_projection_only_forward("c_proj"), attention)


class BloomLayout(Decoder):
    """BLOOM: `transformer.h[i].self_attention` with fused `query_key_value` ([heads, 3, head_dim] per
    token) and output projection `dense`; ALiBi positions (no position limit). The gate sits on `dense`'s
    input, which is the merged per-head context; BLOOM's tensor-parallel emulation (`slow_but_exact`)
    bypasses `dense`'s forward, so such configs are refused."""

    name = "bloom"
    model_types = ("bloom",)

    def layers(self, model):
        if getattr(model.config, "pretraining_tp", 1) > 1 and getattr(model.config, "slow_but_exact", False):
            raise XlsubError("model: this BLOOM config sets slow_but_exact with pretraining_tp > 1, which bypasses the "
                             "output projection's forward; set slow_but_exact=False in its config")
        return list(self.body(model).h)

    def attention(self, layer):
        return layer.self_attention

    def output_projection(self, attention):
        return attention.dense

    def query_modules(self, attention):
        return [attention.query_key_value]

    def ffn_activation(self, layer):
        return layer.mlp.gelu_impl

    def ffn_down_projection(self, layer):
        return layer.mlp.dense_4h_to_h

    def head_layout(self, config):
        return HeadLayout(config.n_head, config.n_head, config.hidden_size // config.n_head)

    def max_positions(self, config):
        return None


FAMILIES: tuple[Family, ...] = (BertLayout(), DistilBertLayout(), ModernBertLayout(), LlamaLayout(),
                                Gemma3Layout(), GPT2Layout(), BloomLayout())
REGISTRY: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def adapter_for(model_or_config) -> Family:
    """The adapter of a model (or its config), chosen by `config.model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = REGISTRY.get(model_type)
    if family is None:
        what = type(model_or_config).__name__
        supported = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
        raise XlsubError(f"model: {what} has model type {model_type!r}, which xlsub does not support; "
                         f"use a model of a supported type: {supported}")
    return family
