"""Logged models: the finetuned model and every subnetwork in stock form (the full architecture, pruned
heads' output-projection columns zeroed) as MLflow models, loadable without xlsub."""

from __future__ import annotations

import copy
import hashlib
import math
import subprocess
import sys
from dataclasses import dataclass

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, children_of, subprocess_env
from tests.test_heads import HEADS, HIDDEN, LAYERS, logits, tiny_batches, tiny_model
from xlsub import artifacts
from xlsub.models.heads import HeadGates, attention_modules
from xlsub.models.pruning import prune_heads, zero_pruned_heads

LANGS = ["en", "de", "zh"]


def awkward_mask() -> torch.Tensor:
    """Layer 0 loses every head, layer 1 keeps one, layer 2 loses one."""
    return torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.float32)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_zeroed_model_equals_gated_and_physically_pruned_models(kind, attn):
    model = tiny_model(kind, attn)
    mask = awkward_mask()
    before = copy.deepcopy(model.state_dict())
    stock = zero_pruned_heads(model, mask)
    pruned = prune_heads(copy.deepcopy(model), mask)
    for seed in range(3):
        batch = tiny_batches(1, seed=seed)[0]
        with HeadGates(model, mask):
            gated = logits(model, batch)
        assert (logits(stock, batch) - gated).abs().max() < 1e-5
        assert (logits(pruned, batch) - gated).abs().max() < 1e-5
        assert (logits(model, batch) - gated).abs().max() > 1e-3  # the mask matters on these inputs
    # the copy, not the model, is changed: exactly the pruned heads' head_dim columns are zero, biases kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    head_dim = HIDDEN // HEADS
    for layer, (attention, original) in enumerate(zip(attention_modules(stock), attention_modules(model))):
        weight = attention.output.dense.weight
        for h in range(HEADS):
            cols = weight[:, h * head_dim:(h + 1) * head_dim]
            if mask[layer, h] == 0:
                assert bool((cols == 0).all())
            else:
                assert torch.equal(cols, original.output.dense.weight[:, h * head_dim:(h + 1) * head_dim])
        assert torch.equal(attention.output.dense.bias, original.output.dense.bias)
    assert getattr(stock.config, artifacts.KEPT_HEADS_CONFIG_KEY, None) is None  # a stock config
    assert LAYERS == mask.shape[0]


def test_mask_digest_is_the_sha256_of_head_mask_json(tmp_path):
    mask = awkward_mask()
    path = artifacts.write_head_mask(tmp_path, mask)
    assert artifacts.mask_digest(mask) == hashlib.sha256(path.read_bytes()).hexdigest()


def logged_models(store, run_id):
    experiment = MlflowClient(store).get_run(run_id).info.experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'", output_format="list")


@pytest.mark.slow
def test_every_subnetwork_and_the_finetuned_model_are_logged_models(store, finetune_run, prune_run):
    client = MlflowClient(store)
    (finetuned,) = logged_models(store, finetune_run.info.run_id)
    assert finetuned.name == "finetuned" and finetuned.tags["xlsub.languages"] == ",".join(LANGS)
    by_key = {m.key: m for m in finetuned.metrics}
    for lang in LANGS:
        metric = by_key[f"ppl_after.{lang}"]
        assert math.isclose(metric.value, finetune_run.data.metrics[f"ppl_after.{lang}"])
        assert metric.model_id == finetuned.model_id and metric.dataset_name.endswith("-test")  # linked to the test split
    children = children_of(store, prune_run)
    assert sorted(c.data.tags["xlsub.subnetwork"] for c in children) == [f"{l}-s0" for l in sorted(LANGS)]
    for child in children:
        sid = child.data.tags["xlsub.subnetwork"]
        (model,) = logged_models(store, child.info.run_id)
        assert model.name == f"subnetwork-{sid}" and model.source_run_id == child.info.run_id
        tags = model.tags
        assert tags["xlsub.language"] == child.data.tags["xlsub.language"] and tags["xlsub.seed"] == "0"
        assert tags["xlsub.source_model_id"] == finetuned.model_id
        mask_file = client.download_artifacts(child.info.run_id, "head_mask.json")
        with open(mask_file, "rb") as f:
            assert tags["xlsub.mask_sha256"] == hashlib.sha256(f.read()).hexdigest()
        metrics = {m.key: m.value for m in model.metrics}
        for lang in LANGS:
            assert metrics[f"ppl.{lang}"] == child.data.metrics[f"ppl.{lang}"]
            assert metrics[f"ppl_random.{lang}"] == child.data.metrics[f"ppl_random.{lang}"]
        assert metrics["heads_kept_frac"] == child.data.metrics["heads_kept_frac"]
        # issue 24, case 2: the run's `ppl` and `frac_pruned` are the subnetwork's, equal to its model's, not the
        # end of the pruning path (`path.*`, which goes on past the chosen step)
        m = child.data.metrics
        assert math.isclose(metrics["frac_pruned"], 1 - m["heads_kept_frac"]) and metrics["frac_pruned"] == m["frac_pruned"]
        assert metrics["ppl"] == m["ppl_prune_data"] == m["ppl"]
        path = sorted(client.get_metric_history(child.info.run_id, "path.frac_pruned"), key=lambda p: p.step)
        assert path[-1].value >= m["frac_pruned"] and [p.value for p in path if p.step == m["steps"]] == [m["frac_pruned"]]
        assert len(client.get_metric_history(child.info.run_id, "ppl")) == 1
        assert tags["xlsub.prune_run_id"] == prune_run.info.run_id and tags["xlsub.run_status"] == "FINISHED"
        assert "xlsub.main_run_id" not in tags and tags["threshold"] == "1.1" and tags["target_sparsity"] == "none"
        steps = client.get_metric_history(child.info.run_id, "heads_kept_frac")
        assert len(steps) == 1  # linking the metrics to the model logged nothing twice on the run


# Run with `python -I` from a folder outside the repository, with xlsub blocked in sys.modules: the
# stock model must load with transformers (and mlflow) alone.
NO_XLSUB = """
import sys
sys.modules["xlsub"] = None  # `import xlsub` now raises ImportError, even if it is installed
try:
    import xlsub
    raise SystemExit("xlsub was importable")
except ImportError:
    pass
import mlflow.transformers, torch
from transformers import AutoModelForMaskedLM
folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
batch = expected["inputs"]
model = AutoModelForMaskedLM.from_pretrained(folder + "/model").eval()
components = mlflow.transformers.load_model(folder, return_type="components")
with torch.no_grad():
    for m in (model, components["model"].eval()):
        got = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        diff = float((got - expected["logits"]).abs().max())
        assert diff < 1e-5, diff
assert components["tokenizer"].mask_token_id == expected["mask_token_id"]
assert "xlsub" not in [k for k, v in sys.modules.items() if v is not None]
print("ok")
"""


@pytest.mark.slow
def test_stock_subnetwork_loads_without_xlsub_and_equals_the_gated_model(store, finetune_run, prune_run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    child = next(c for c in children_of(store, prune_run) if c.data.tags["xlsub.language"] == "de")
    (logged,) = logged_models(store, child.info.run_id)
    folder = mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}", dst_path=str(tmp_path / "stock"))
    client = MlflowClient(store)
    mask = artifacts.read_head_mask(client.download_artifacts(child.info.run_id, "head_mask.json", str(tmp_path)))
    full_dir = client.download_artifacts(finetune_run.info.run_id, "model", str(tmp_path))
    full = AutoModelForMaskedLM.from_pretrained(full_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(full_dir)
    assert mask.sum() < mask.numel()  # some head is pruned, so equality says something
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (4, 20), generator=g)
    ids[:, 3] = tokenizer.mask_token_id
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": attention_mask}
    with torch.no_grad(), HeadGates(full, mask):
        gated = full(**batch).logits
    with torch.no_grad():
        assert float((full(**batch).logits - gated).abs().max()) > 1e-4
    torch.save({"inputs": batch, "logits": gated, "mask_token_id": tokenizer.mask_token_id}, tmp_path / "expected.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = subprocess_env(store)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", NO_XLSUB, folder, str(tmp_path / "expected.pt")], env=env, cwd=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- issue 24: subnetworks of different prune runs told apart; models of runs that did not finish left out ------
# The filter docs/stages.md's recipe loads a subnetwork with: its name, its prune run's settings, FINISHED only.
RECIPE_FILTER = "name = 'subnetwork-de-s0' AND tags.threshold = '1.1' AND tags.`xlsub.run_status` = 'FINISHED'"


@dataclass
class _NoArgs:
    def validate(self):
        pass


def test_subnetwork_models_carry_their_prune_run_and_its_final_status(tmp_path, monkeypatch, caplog):
    """Issue 24, cases 3, 5 and 6: each subnetwork model names its prune run, main run, threshold and
    target_sparsity; `xlsub.run_status` is RUNNING while the prune run runs, then its final status (FINISHED
    through stage_run, KILLED through mark_killed, FAILED through mark_failed), so the recipe finds only the
    finished one. The model has an input example and a `top_k` parameter; the offline hub warnings are gone."""
    import logging
    import time

    from entry_points import prune
    from tests.conftest import sqlite_store
    from xlsub.models.loading import tiny_model as scratch_model
    from xlsub.models.loading import train_tokenizer
    from xlsub.tracking import runs as tracking

    tokenizer = train_tokenizer(["hello world this is a test", "hallo welt das ist ein test", "bonjour le monde"] * 20, vocab_size=60)
    model = scratch_model(tokenizer, 32)
    mask = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    mask[0, :3] = 0
    caplog.set_level(logging.WARNING, logger="mlflow.transformers")
    with sqlite_store(tmp_path) as client:
        finetune = client.create_run("0", tags={artifacts.STAGE_TAG: "finetune"}).info.run_id
        main = client.create_run("0", tags={artifacts.STAGE_TAG: "main"}).info.run_id
        sid = artifacts.SubnetworkId("de", 0)

        def subnetwork(prune_run_id):
            tags = {artifacts.STAGE_TAG: "prune", artifacts.CHILD_TAG: "true", artifacts.input_tag("finetune"): finetune}
            with tracking.child_run(prune_run_id, "0", sid.run_name, tags):
                prune.log_stock_model(model, tokenizer, mask, sid, 0, prune.PruneArgs())
            (made,) = mlflow.search_logged_models(experiment_ids=["0"], filter_string=f"tags.`xlsub.prune_run_id` = '{prune_run_id}'",
                                                  output_format="list")
            return made

        # a prune run under main that ends well, as `mlflow run` hands its run to the stage (MLFLOW_RUN_ID)
        finished = client.create_run("0", tags={artifacts.PARENT_TAG: main}).info.run_id
        monkeypatch.setenv("MLFLOW_RUN_ID", finished)
        with tracking.stage_run("prune", _NoArgs()):
            made = subnetwork(finished)
            assert made.tags[artifacts.RUN_STATUS_TAG] == "RUNNING"
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # child_run took it
        made = mlflow.get_logged_model(made.model_id)
        assert {k: made.tags.get(k) for k in ("xlsub.prune_run_id", "xlsub.main_run_id", "threshold", "target_sparsity", "xlsub.run_status")} == {
            "xlsub.prune_run_id": finished, "xlsub.main_run_id": main, "threshold": "1.1", "target_sparsity": "none", "xlsub.run_status": "FINISHED"}
        # a prune run killed by a signal, and one a dead rank left to be marked FAILED (no main run)
        killed, failed = (client.create_run("0", tags={artifacts.STAGE_TAG: "prune"}).info for _ in range(2))
        killed_model, failed_model = subnetwork(killed.run_id), subnetwork(failed.run_id)
        assert "xlsub.main_run_id" not in killed_model.tags
        tracking.mark_killed(killed, None, time.time())
        tracking.mark_failed(failed.run_id, "0", children=True)
        assert mlflow.get_logged_model(killed_model.model_id).tags[artifacts.RUN_STATUS_TAG] == "KILLED"
        assert mlflow.get_logged_model(failed_model.model_id).tags[artifacts.RUN_STATUS_TAG] == "FAILED"
        found = mlflow.search_logged_models(experiment_ids=["0"], filter_string=RECIPE_FILTER, output_format="list")
        assert [m.model_id for m in found] == [made.model_id]
        # served: an input example, and top_k as a parameter (mlflow serving drops params the signature lacks)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{made.model_id}")
        assert [p.name for p in pyfunc.metadata.signature.params] == ["top_k"]
        assert tokenizer.mask_token in str(pyfunc.metadata.load_input_example(mlflow.artifacts.download_artifacts(f"models:/{made.model_id}")))
        assert len(pyfunc.predict(["Hello <mask>."], params={"top_k": 3})) == 1
    hub = [r.getMessage() for r in caplog.records if r.getMessage().startswith(tracking.OFFLINE_HUB_WARNINGS)]
    assert not hub
    assert "tags.`xlsub.run_status` = 'FINISHED'" in (ROOT / "docs" / "stages.md").read_text()
