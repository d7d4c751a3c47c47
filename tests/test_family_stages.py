"""The prune stage's subnetwork step on every model family, in process: one prune child per tiny preset
(`entry_points.prune.prune_child`, tracked in a sqlite store), checked against the stock model it logs.

The expected perplexities come from outside xlsub's loss code: the logged stock model (pruned heads'
output slices zeroed, loaded with `AutoModelFor*LM` from the MLflow model's folder) and its own
`labels=` loss, token-weighted over the test batches.
"""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
import transformers

from entry_points._common import parse_args
from entry_points.prune import PruneArgs, prune_child
from tests.conftest import sqlite_store
from tests.test_families import PHYSICAL, PRESETS, TEXTS, build, tokenizer  # noqa: F401 (the fixture)
from xlsub import artifacts
from xlsub.artifacts import SubnetworkId
from xlsub.models.families import CAUSAL, adapter_for
from xlsub.models.mlm import IGNORE_INDEX, lm_batches
from xlsub.models.pruning import kept_heads_mask, load_subnetwork, masked_chunk_losses
from xlsub.tracking import runs as tracking

LANGUAGES = ("en", "de")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one experiment and a FINISHED run standing in for the finetune run."""
    with sqlite_store(tmp_path_factory.mktemp("families")) as client:
        experiment = client.create_experiment("families")
        finetune = client.create_run(experiment, tags={artifacts.STAGE_TAG: "finetune"})
        client.set_terminated(finetune.info.run_id)
        yield client, experiment, finetune.info.run_id


def stock_perplexity(model, batches) -> float:
    """exp(token-weighted mean of the stock model's own loss): the loss `*ForMaskedLM`/`*ForCausalLM` return
    for `labels=`, weighted by the tokens each batch scores (masked tokens; next tokens after the first)."""
    causal = adapter_for(model).objective == CAUSAL
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"][:, 1:] if causal else batch["labels"]
            n = int((labels != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    return math.exp(total / count)


@pytest.mark.parametrize("preset", PRESETS)
def test_one_prune_child_per_family_matches_its_stock_model(preset, tokenizer, store, tmp_path):  # noqa: F811
    client, experiment, finetune_id = store
    model = build(preset, tokenizer)
    chunks = tokenizer(TEXTS)["input_ids"]
    test = {"en": chunks[:6], "de": chunks[6:]}
    args = parse_args(PruneArgs, ["--target_sparsity", "0.5", "--eval_examples", "8", "--batch_size", "4", "--random_draws", "1",
                                  "--bootstrap", "10", "--continue_to", "0.5"])
    test_batches = {lang: lm_batches(model, test[lang], tokenizer, 4) for lang in LANGUAGES}
    full = masked_chunk_losses(model, None, test_batches)
    with mlflow.start_run(experiment_id=experiment, run_name=f"prune {preset}") as parent:
        prune_child(parent.info, finetune_id, SubnetworkId("de", 0), args, model, tokenizer, chunks, test_batches, full)
    (child,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    metrics = child.data.metrics
    assert child.info.status == "FINISHED"
    assert metrics["heads_kept"] == 4 and metrics["frac_pruned"] == 0.5  # 2 layers x 4 heads, half off
    assert 0 < metrics["params_kept_frac"] < 1

    # the logged stock model: its task, and its own loss gives the child's perplexities
    model_id = tracking.logged_model_id(child.info.run_id, "subnetwork-de-s0")
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    causal = adapter_for(model).objective == CAUSAL
    assert info.flavors["transformers"]["task"] == ("text-generation" if causal else "fill-mask")
    folder = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "stock"))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    stock = auto.from_pretrained(f"{folder}/model").eval()
    for lang in LANGUAGES:
        assert stock_perplexity(stock, test_batches[lang]) == pytest.approx(metrics[f"ppl.{lang}"], rel=1e-5)

    # the saved subnetwork: physically pruned where the family allows, else the stock form, with its mask
    mask = artifacts.read_head_mask(tracking.download(child.info.run_id, artifacts.HEAD_MASK, tmp_path / "mask"))
    saved, _ = load_subnetwork(tracking.download(child.info.run_id, artifacts.SUBNETWORK_DIR, tmp_path / "sub"), mask)
    assert torch.equal(kept_heads_mask(saved.config), mask)
    weights = sum(p.numel() for p in saved.parameters())
    assert (weights < sum(p.numel() for p in model.parameters())) == (preset in PHYSICAL)
    for lang in LANGUAGES:
        assert stock_perplexity(saved, test_batches[lang]) == pytest.approx(metrics[f"ppl.{lang}"], rel=1e-5)


def test_a_tokenizer_without_a_start_token_chunks_as_text_then_eos():
    """Qwen's tokenizers have an EOS and no BOS: chunks are `block </s>`, nothing lost or repeated."""
    from types import SimpleNamespace

    from xlsub.data.lm import boundary_ids, chunk_ids

    qwen_like = SimpleNamespace(bos_token_id=None, eos_token_id=9, cls_token_id=None, sep_token_id=None)
    assert boundary_ids(qwen_like) == (None, 9)
    chunks = chunk_ids([[1, 2, 3], [4, 5]], max_seq_len=3, bos=None, eos=9)
    assert chunks == [[1, 2, 9], [3, 9, 9], [4, 5, 9], [9, 9]]  # the stream 1 2 3 </s> 4 5 </s>, two a block, each + </s>
    bert_like = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=101, sep_token_id=102)
    assert boundary_ids(bert_like) == (101, 102)


def test_causal_unigram_floor_scores_every_next_token_eos_included(tokenizer):  # noqa: F811
    from xlsub.data.lm import unigram_perplexity
    from xlsub.models.mlm import causal_batch

    vocab = 50
    train = [[0, 5, 6, 2], [0, 5, 2]]  # scored tokens (after the first): 5 6 2 5 2
    batches = [causal_batch([[0, 5, 7, 2]], tokenizer)]  # scores 5, 7, 2
    total = 5 + vocab
    expected = math.exp(-(math.log(3 / total) + math.log(1 / total) + math.log(3 / total)) / 3)
    assert unigram_perplexity(train, batches, vocab, {0, 2}, causal=True) == pytest.approx(expected, rel=1e-12)


def test_a_hub_decoder_tokenizer_without_padding_pads_with_eos(tokenizer, tmp_path):  # noqa: F811
    from xlsub.models.loading import load_pretrained

    build("tiny-llama", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    unpadded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    unpadded.pad_token = None
    unpadded.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    _, loaded = load_pretrained(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token and loaded.pad_token_id == tokenizer.eos_token_id
