"""Models xlsub fine-tunes: a tiny XLM-R trained from scratch, or any pretrained masked LM.

`tiny` is the offline default: an XLM-R configuration small enough to train on
two CPU cores in minutes, with a Unigram tokenizer (XLM-R's special tokens)
trained on the corpus. Settings measured on the embedded corpus: hidden 128,
4 layers, lr 1e-3 and no dropout beat a per-language unigram model in every
language after ~1,000 steps; 8 heads per layer give subnetworks room to differ.

`tiny-base-shape` rehearses the real study offline: XLM-R base's layer shapes
(12 layers x 12 heads, hidden 768, feed-forward 3072, its dropout), randomly
initialised, with the same corpus tokenizer. Its 8k-entry vocabulary leaves out
XLM-R's 250k-entry embedding and tied LM head (~192M of its ~278M parameters):
`benchmarks/scale.py` adds that cost to its projections explicitly.

`tiny-<family>` (`tiny-llama`, `tiny-gpt2`, ...; `FAMILY_PRESETS`) is one random-init model of each
supported family (`xlsub.models.families`): hidden 32, 2 layers, 4 heads, 2 key/value heads where the
family has grouped-query attention, Gemma 3 with a head size (16) other than hidden / heads, and the
corpus tokenizer, whose padding token is not its EOS (so EOS stays in a causal LM's loss). They exist
to test every stage on every family in seconds, not to learn anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaTokenizer,
)

from xlsub.errors import XlsubError
from xlsub.models.families import adapter_for
from xlsub.models.hub import is_hub_id, looks_local

TINY = "tiny"
BASE_SHAPE = "tiny-base-shape"
TINY_VOCAB_SIZE = 8000
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=512,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# XLM-R base's layers (Conneau et al. 2020), with its dropout
XLMR_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
XLMR_VOCAB_SIZE = 250002
# models trained from scratch with the corpus tokenizer, by the name the `model` parameter takes
SCRATCH_SHAPES = {TINY: TINY_SHAPE, BASE_SHAPE: XLMR_BASE_SHAPE}
GPU_DEFAULT_MODEL = "FacebookAI/xlm-roberta-base"

# One tiny random-init model per family: (transformers config class, its shape). Token ids, the
# vocabulary and the position limit come from the corpus tokenizer and max_seq_len.
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_GQA = dict(_TINY, num_key_value_heads=2)
FAMILY_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-roberta": ("RobertaConfig", dict(_TINY, **_NO_DROPOUT)),
    "tiny-bert": ("BertConfig", dict(_TINY, **_NO_DROPOUT)),
    "tiny-distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
                                                 attention_dropout=0.0)),
    "tiny-modernbert": ("ModernBertConfig", dict(_TINY, global_attn_every_n_layers=2, local_attention=16)),
    "tiny-llama": ("LlamaConfig", _GQA),
    "tiny-mistral": ("MistralConfig", dict(_GQA, sliding_window=None)),
    "tiny-qwen2": ("Qwen2Config", _GQA),
    "tiny-qwen3": ("Qwen3Config", dict(_GQA, head_dim=8)),
    # Gemma 3: head_dim 16 != hidden / heads = 8, one sliding-window and one global layer
    "tiny-gemma": ("Gemma3TextConfig", dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                            layer_types=["sliding_attention", "full_attention"])),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)),
    "tiny-bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)),
}
# BLOOM's positions are ALiBi biases: no position limit in its config
_POSITION_LIMIT = {"GPT2Config": "n_positions", "BloomConfig": None}
# positions of RoBERTa-style embeddings start after the padding index
_POSITION_OFFSET = {"RobertaConfig"}


def is_scratch(name: str) -> bool:
    """Whether `name` is a model xlsub builds from scratch (`tiny`, `tiny-base-shape`, a `tiny-<family>`
    preset) rather than loads."""
    return name in SCRATCH_SHAPES or name in FAMILY_PRESETS


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, vocab_size: int | None = None):
    """The config of the `tiny-<family>` preset `name`, with the tokenizer's vocabulary and special tokens."""
    class_name, shape = FAMILY_PRESETS[name]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if class_name == "ModernBertConfig":
        ids |= dict(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    limit = _POSITION_LIMIT.get(class_name, "max_position_embeddings")
    positions = {} if limit is None else {
        limit: max_seq_len + (tokenizer.pad_token_id + 1 if class_name in _POSITION_OFFSET else 0)}
    return getattr(transformers, class_name)(vocab_size=vocab_size or len(tokenizer), **shape, **positions, **ids)


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int = TINY_VOCAB_SIZE) -> XLMRobertaTokenizer:
    """A Unigram (SentencePiece-style) tokenizer with XLM-R's special tokens, trained on `texts` (strings,
    or batches of them: the same pieces either way).

    Two trainings on the same texts differ: scores are summed in parallel (the
    last digits vary), and the characters the trainer must keep but did not
    select are appended from a hash set, in a different order each process,
    with made-up scores below every selected piece. Rounding the scores and
    putting the appended characters in character order makes the same texts always give the same ids, so
    a seeded run is reproducible.
    """
    trained = XLMRobertaTokenizer().train_new_from_iterator(texts, vocab_size=vocab_size)
    vocab = [(piece, round(score, 6)) for piece, score in json.loads(trained.backend_tokenizer.to_str())["model"]["vocab"]]
    n_special = len(XLMRobertaTokenizer().get_vocab())
    specials, pieces = vocab[:n_special], vocab[n_special:]
    # the appended characters score below every piece the trainer selected (those include all multi-character ones)
    floor = min(score for piece, score in pieces if len(piece) > 1)
    chosen = [p for p in pieces if len(p[0]) > 1 or p[1] >= floor]
    appended = sorted(piece for piece, score in pieces if len(piece) == 1 and score < floor)
    scores = sorted((score for piece, score in pieces if len(piece) == 1 and score < floor), reverse=True)
    ordered = sorted(chosen, key=lambda p: (-p[1], p[0])) + list(zip(appended, scores))
    return XLMRobertaTokenizer(vocab=specials + ordered)


def tiny_model(tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> XLMRobertaForMaskedLM:
    """A randomly initialised small XLM-R; call `transformers.set_seed` first for reproducibility."""
    return scratch_model(TINY, tokenizer, max_seq_len)


def scratch_model(name: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                  vocab_size: int | None = None) -> XLMRobertaForMaskedLM:
    """A randomly initialised XLM-R of the shape `name` names (`tiny`, `tiny-base-shape`), with the
    tokenizer's vocabulary unless `vocab_size` is given (XLMR_VOCAB_SIZE to price XLM-R's embedding);
    call `transformers.set_seed` first for reproducibility. A `tiny-<family>` preset (`FAMILY_PRESETS`)
    gives that family's `AutoModelForMaskedLM`/`AutoModelForCausalLM` class."""
    if name in FAMILY_PRESETS:
        config = preset_config(name, tokenizer, max_seq_len, vocab_size)
        return getattr(transformers, adapter_for(config).auto_class).from_config(config)
    config = XLMRobertaConfig(
        vocab_size=vocab_size or len(tokenizer),
        **SCRATCH_SHAPES[name],
        # RoBERTa positions start after the padding index
        max_position_embeddings=max_seq_len + tokenizer.pad_token_id + 1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return XLMRobertaForMaskedLM(config)


def load_pretrained(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained masked or causal LM (its family adapter's objective) and its tokenizer from a local
    folder or a hub id.

    A local path that does not exist fails at once rather than falling through to the hub.
    """
    if looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise XlsubError(f"model: '{name}' is not a folder with config.json; give a model folder, a hub id, 'tiny', 'tiny-base-shape' or a tiny-<family> preset ({', '.join(FAMILY_PRESETS)})")
        name = str(path)
    elif not is_hub_id(name):
        raise XlsubError(f"model: '{name}' is neither 'tiny', 'tiny-base-shape', a tiny-<family> preset ({', '.join(FAMILY_PRESETS)}), an existing folder nor a hub id like {GPU_DEFAULT_MODEL}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        auto_class = getattr(transformers, adapter_for(AutoConfig.from_pretrained(name)).auto_class)
        model = auto_class.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise XlsubError(f"model: cannot load '{name}' ({first}); check the id, the network or HF_HUB_OFFLINE") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # many decoders' tokenizers have no padding token: pad with EOS (padding is read from the attention
        # mask, so a real EOS is still scored) and save it so, for the later stages
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_lm(folder: str | Path, **kwargs) -> PreTrainedModel:
    """A saved model folder as its family's LM class (`AutoModelForMaskedLM` or `AutoModelForCausalLM`,
    as the family adapter's objective says)."""
    auto_class = getattr(transformers, adapter_for(AutoConfig.from_pretrained(folder)).auto_class)
    return auto_class.from_pretrained(folder, **kwargs)


# what max_text_len answers for a model without a position limit (BLOOM's ALiBi)
UNBOUNDED_TEXT_LEN = 2**31 - 1


def max_text_len(model: PreTrainedModel) -> int:
    """Longest input the model's position embeddings allow (its family adapter's `max_positions`)."""
    limit = adapter_for(model).max_positions(model.config)
    return UNBOUNDED_TEXT_LEN if limit is None else limit
