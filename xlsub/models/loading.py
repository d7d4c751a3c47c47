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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaTokenizer,
)

from xlsub.errors import XlsubError
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


def is_scratch(name: str) -> bool:
    """Whether `name` is a model xlsub builds from scratch (`tiny`, `tiny-base-shape`) rather than loads."""
    return name in SCRATCH_SHAPES


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
    call `transformers.set_seed` first for reproducibility."""
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
    """A pretrained masked LM and its tokenizer from a local folder or a hub id.

    A local path that does not exist fails at once rather than falling through to the hub.
    """
    if looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise XlsubError(f"model: '{name}' is not a folder with config.json; give a model folder, a hub id, 'tiny' or 'tiny-base-shape'")
        name = str(path)
    elif not is_hub_id(name):
        raise XlsubError(f"model: '{name}' is neither 'tiny', 'tiny-base-shape', an existing folder nor a hub id like {GPU_DEFAULT_MODEL}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForMaskedLM.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise XlsubError(f"model: cannot load '{name}' ({first}); check the id, the network or HF_HUB_OFFLINE") from None
    return model, tokenizer


def max_text_len(model: PreTrainedModel) -> int:
    """Longest input the model's position embeddings allow."""
    offset = (model.config.pad_token_id + 1) if model.config.model_type in ("roberta", "xlm-roberta") else 0
    return model.config.max_position_embeddings - offset


def resolve_device(name: str) -> str:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit device must exist here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise XlsubError(f"device: unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise XlsubError(f"device: '{name}' is not available on this machine; use auto or cpu")
    return name
