"""Sentence representations: masked mean pooling of every hidden layer of an encoder or decoder.

A sentence's representation at layer l is the mean of the layer-l hidden
states over its real tokens (attention mask 1, padding excluded; an encoder's
special tokens included, as in the study; a decoder's BOS/EOS left out, the
family adapter's `pool_excluded`), for l = 0 (embeddings) .. L. A decoder's
last token, which has attended to the whole sentence, is the other option
(`pooling="last"`). ``encode`` returns them all as one
float32 tensor ``[layers+1, n, d]``, the layout of the encode stage's
``encodings/<model_key>/<lang>.safetensors`` and of CKA's inputs.

``encode`` is the fast path: tokenise once, sort by length, pad each batch to
its own longest sentence, one forward of the base model (no LM head) per batch.
``tests/reference.py`` computes the same numbers the slow way (``encode_naive``);
the tests and ``benchmarks/encode.py`` hold the two together.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from xlsub.artifacts import BASE_MODEL, FULL_MODEL, KEPT_HEADS_CONFIG_KEY, RANDOM_MODEL, SubnetworkId
from xlsub.devices import autocast
from xlsub.errors import XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.loading import max_text_len

log = logging.getLogger(__name__)



def mean_pool(hidden_states: Sequence[torch.Tensor] | torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of every hidden state: ``sum_t m_bt h_lbt / sum_t m_bt``.

    ``hidden_states``: a tuple of ``[B, T, d]`` (embeddings, then each layer) or a stacked
    ``[layers+1, B, T, d]``; ``attention_mask``: ``[B, T]``, 1 for real tokens. Returns
    ``[layers+1, B, d]`` in float32 whatever the model's dtype, since the sums of a half-precision
    model's states lose digits in half precision. Padded positions are zeroed, not just weighted
    by 0, so whatever they hold (even NaN) cannot leak into the mean.
    """
    mask = attention_mask.to(device=hidden_states[0].device, dtype=torch.bool)
    counts = mask.sum(1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("mean_pool: a sentence has no token in attention_mask; its mean is undefined")
    counts = counts.to(torch.float32)
    keep = mask[..., None]
    return torch.stack([h.float().masked_fill(~keep, 0.0).sum(1) / counts for h in hidden_states])


def _max_length(model: nn.Module, tokenizer=None) -> int:
    """Longest input ``encode`` feeds the model: what its position embeddings allow
    (``xlsub.models.loading.max_text_len``), or the tokenizer's ``model_max_length`` if smaller."""
    limit = max_text_len(model)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    return limit


def _check_args(model: nn.Module, tokenizer, batch_size: int, max_length: int | None) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise XlsubError(f"batch_size: must be a positive number of sentences, got {batch_size!r}; try 64")
    limit = _max_length(model, tokenizer)
    if max_length is None:
        return limit
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 < max_length <= limit:
        raise XlsubError(
            f"max_length: {max_length!r} is not a token count between 3 and {limit} (what this model's "
            f"position embeddings allow); leave it out for {limit}"
        )
    return max_length


def _base_model(model: nn.Module) -> nn.Module:
    """The encoder without a task head: ``model.base_model`` (which is the model itself for a base model)."""
    return getattr(model, "base_model", model)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise XlsubError("tokenizer: it has no padding token; use the tokenizer saved with the model")
    return tokenizer.pad_token_id


POOLINGS = ("mean", "mean_no_special", "last")


def last_token(hidden_states: Sequence[torch.Tensor] | torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sentence's state at its last real token, ``h_{l, b, lengths_b - 1}``, for every hidden state:
    ``[layers+1, B, d]`` in float32. Sentences are right-padded, so the last real token is at length - 1."""
    rows = torch.arange(len(lengths), device=hidden_states[0].device)
    last = (lengths.to(hidden_states[0].device) - 1).clamp(min=0)
    return torch.stack([h[rows, last].float() for h in hidden_states])


def _forward_pooled(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pool_mask: torch.Tensor | None = None, last: bool = False) -> torch.Tensor:
    out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    if last:
        return last_token(out.hidden_states, attention_mask.sum(1))
    return mean_pool(out.hidden_states, attention_mask if pool_mask is None else pool_mask)


class _EvalMode:
    """Eval mode (no dropout) for the duration of a block, then the model's previous mode."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _prepare(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        model.to(device)
    return next(model.parameters()).device


def encode(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int,
    pooling: str,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress_desc: str | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Mean-pooled hidden states of every layer for each sentence: float32 ``[layers+1, n, d]``.

    ``pooling="mean"`` averages every real token: an encoder's ``<s>`` and ``</s>`` included (the
    study's pooling), a decoder's BOS and EOS left out (the family adapter's ``pool_excluded``: a
    causal LM's first token attends only to itself, the same state in every sentence);
    ``"mean_no_special"`` leaves all the tokenizer's special tokens out of the mean (they still
    take part in attention). Their share of a sentence's tokens shrinks as it grows, so they carry
    sentence length into the pooled vector. ``"last"`` takes the last real token's state (for a
    decoder, the one position that has attended to the whole sentence).

    All sentences are tokenised in one batch call (truncated to ``max_length``, by default what
    the position embeddings allow), sorted longest first, cut into batches padded to their own
    longest sentence, and run through the base model (``model.base_model``, no LM head) under
    ``torch.inference_mode``. Row i of the result is ``sentences[i]``. ``device``, if given,
    moves the model there; by default the model's own device is used. ``precision`` (fp32, bf16,
    fp16: `xlsub.devices.autocast`): the forward passes' matrix products; the pooled states are
    float32 whatever it is.
    """
    max_length = _check_args(model, tokenizer, batch_size, max_length)
    if pooling not in POOLINGS:
        raise XlsubError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
    if pooling == "mean_no_special":
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    else:
        special = torch.tensor(adapter_for(model).pool_excluded(tokenizer), dtype=torch.long)
    pad_id = _pad_id(tokenizer)
    base = _base_model(model)
    sentences = list(sentences)
    n = len(sentences)
    start_time = time.perf_counter()

    encoded = tokenizer(sentences, truncation=True, max_length=max_length, padding=False)["input_ids"] if n else []
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
    flat = torch.tensor([token for ids in encoded for token in ids], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    order = torch.argsort(lengths, descending=True, stable=True)  # longest first: peak memory shows at once

    device = _prepare(model, device)  # outside inference mode: moved weights must stay ordinary tensors
    config = base.config
    out = torch.empty(config.num_hidden_layers + 1, n, config.hidden_size)  # not an inference tensor
    with _EvalMode(model), torch.inference_mode(), autocast(device.type, precision):
        with tqdm(total=n, desc=progress_desc or "encode", unit="sent", leave=False) as bar:
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                batch_lengths = lengths[index]
                steps = torch.arange(int(batch_lengths[0]))
                attention_mask = steps[None, :] < batch_lengths[:, None]
                # each row reads its own tokens from the flat buffer; positions past its end read a pad
                gather = (offsets[index][:, None] + steps[None, :]).clamp_(max=flat.numel() - 1)
                input_ids = torch.where(attention_mask, flat[gather], pad_id)
                pool_mask = None
                if pooling != "last" and len(special):
                    pool_mask = (attention_mask & ~torch.isin(input_ids, special)).long().to(device)
                out[:, index] = _forward_pooled(base, input_ids.to(device), attention_mask.long().to(device), pool_mask,
                                                last=pooling == "last").cpu()
                bar.update(len(index))
    seconds = time.perf_counter() - start_time
    log.info("encoded %d sentences in %.2f s (%.0f sentences/s)", n, seconds, n / seconds if seconds else 0.0)
    return out


def random_like(model: nn.Module, seed: int) -> nn.Module:
    """A model of the same class and config with fresh random weights (the random-encoder control).

    Initialised under ``torch.manual_seed(seed)`` inside a forked RNG, so the same seed gives the
    same weights and the caller's random state is left alone. A pruned model (kept heads in its
    config) gets the same heads pruned, physically or in stock form as its family saves them
    (`subnetwork_model`). Same dtype and device, in eval mode.
    """
    from xlsub.models.pruning import kept_heads_mask, subnetwork_model  # pruning imports the MLM machinery

    config = copy.deepcopy(model.config)
    mask = kept_heads_mask(config)
    if mask is not None:
        delattr(config, KEPT_HEADS_CONFIG_KEY)  # prune_heads records it again
    parameter = next(model.parameters())
    kwargs = {}
    if getattr(config, "_attn_implementation", None):
        kwargs["attn_implementation"] = config._attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)._from_config(config, **kwargs)
    if mask is not None:
        fresh = subnetwork_model(fresh, mask)
    return fresh.to(device=parameter.device, dtype=parameter.dtype).eval()


def models_to_encode(model_folder: str | Path, subnetworks: Mapping[SubnetworkId, Callable[[], nn.Module]], *,
                     base: str | None, use_random: bool, seed: int, max_seq_len: int,
                     neurons: Mapping[SubnetworkId, Callable[[], nn.Module]] | None = None) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    """(model key, loader) for every model the encode stage encodes, loaded only when called: `full`
    (the finetuned model in `model_folder`), each subnetwork under its id (`de-s0`), each neuron subnetwork
    in `neurons` under `neurons.de-s0`, then the controls:
    `base` (the model before finetuning: `base` is the finetune run's `model` parameter, None to skip)
    and `random` (same configuration, random weights seeded with the finetune seed)."""
    from xlsub.models.loading import load_lm

    def full():
        return load_lm(model_folder)

    yield FULL_MODEL, full
    for sid, load in sorted(subnetworks.items()):
        yield str(sid), load
    for sid, load in sorted((neurons or {}).items()):
        yield sid.neurons_key, load
    if base is not None:
        yield BASE_MODEL, lambda: base_model(base, model_folder, max_seq_len, seed)
    if use_random:
        yield RANDOM_MODEL, lambda: random_like(full(), seed)


def base_model(name: str, model_folder: str | Path, max_seq_len: int, seed: int) -> nn.Module:
    """The model before finetuning: the pretrained `name`, or for `tiny` the same seeded initialisation
    the finetune run started from (its tokenizer, saved in `model_folder`, fixes the vocabulary); likewise
    for `tiny-base-shape`."""
    import transformers

    from xlsub.models import loading as models

    if not models.is_scratch(name):
        return models.load_pretrained(name)[0]
    transformers.set_seed(seed)
    return models.scratch_model(name, transformers.AutoTokenizer.from_pretrained(model_folder), max_seq_len)
