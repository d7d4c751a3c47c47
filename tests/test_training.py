"""finetune's compiled training (`TrainSettings.compile`: each transformer layer compiled by torch.compile) against the
eager Trainer loop on the same data and seed, and the check that refuses it where it cannot run."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import transformers

from xlsub.models.families import adapter_for
from xlsub.models.training import TrainSettings, compile_unavailable, train_masked_lm

VOCAB, SEQ = 300, 24


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.XLMRobertaTokenizer(vocab=[(t, 0.0) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
                                            + [(f"▁w{i}", -1.0) for i in range(VOCAB - 5)])


def dropout_model(tokenizer) -> transformers.XLMRobertaForMaskedLM:
    """Three XLM-R layers with XLM-R's dropout (0.1): dropout is where compiled and eager training could part."""
    config = transformers.XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=96, max_position_embeddings=SEQ + 2, pad_token_id=tokenizer.pad_token_id,
                                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    return transformers.XLMRobertaForMaskedLM(config)


def test_compiled_layers_train_the_eager_model_and_leave_it_eager(tokenizer, tmp_path):
    """The same steps with and without `compile`: equal losses step by step and equal weights after (the dropout masks
    are the eager run's), at least one graph compiled, and the layers eager again and named as before afterwards."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(1)
    chunks = [[0, *torch.randint(5, VOCAB, (SEQ - 2,), generator=g).tolist(), 2] for _ in range(48)]
    train = datasets.Dataset.from_dict({"input_ids": chunks})
    eager = dropout_model(tokenizer)
    compiled = copy.deepcopy(eager)
    losses = {}

    class Losses(transformers.TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.setdefault(self.key, []).append(logs["loss"])

    graphs = counters["stats"]["unique_graphs"]
    for key, model in (("eager", eager), ("compiled", compiled)):
        settings = TrainSettings(epochs=1, batch_size=8, lr=3e-3, weight_decay=0.01, seed=0, device="cpu", fp16=False, bf16=False,
                                 log_every=1, save_steps=1000, compile=key == "compiled")
        train_masked_lm(model, tokenizer, train, settings, tmp_path / key, [Losses(key)])
    assert counters["stats"]["unique_graphs"] > graphs  # torch.compile did run
    assert len(losses["eager"]) == len(losses["compiled"]) == 6
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    assert len(set(losses["eager"])) > 1  # the steps did train
    before = dropout_model(tokenizer).state_dict()
    after_eager, after_compiled = eager.state_dict(), compiled.state_dict()
    assert list(after_compiled) == list(after_eager)
    moved = max(float((after_eager[k] - before[k]).abs().max()) for k in after_eager)
    apart = max(float((after_eager[k] - after_compiled[k]).abs().max()) for k in after_eager)
    assert moved > 1e-3 and apart < 1e-3 * moved  # trained, and to the same weights up to float rounding
    assert all(layer._compiled_call_impl is None for layer in adapter_for(compiled).layers(compiled))
    assert "forward" not in vars(compiled)


def test_compile_unavailable_names_what_is_missing(monkeypatch):
    import importlib.util
    import shutil

    assert compile_unavailable("cpu") is None  # g++ is installed with the tests' packages
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert "C++ compiler" in compile_unavailable("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert "triton" in compile_unavailable("cuda:1")
    assert compile_unavailable("mps") is None
