"""End-to-end prune runs after a small finetune run: `mlflow run . -e prune` with no parameters, a
fresh process loading a subnetwork by run ID, and every bad input the stage refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, children_of, refuse_in_process, run_in_process, subprocess_env

pytestmark = pytest.mark.slow
LANGS = ["en", "de", "zh"]


def test_prune_parent_and_one_child_per_language(store, finetune_run, prune_run):
    assert prune_run.info.status == "FINISHED"
    assert prune_run.data.tags["xlsub.finetune_run_id"] == finetune_run.info.run_id
    children = {c.data.tags["xlsub.language"]: c for c in children_of(store, prune_run)}
    assert sorted(children) == sorted(LANGS)
    client = MlflowClient(store)
    total = None
    for lang, child in children.items():
        assert child.info.status == "FINISHED" and child.info.run_name == f"prune/{lang}-s0"
        assert child.data.tags["xlsub.subnetwork"] == f"{lang}-s0" and child.data.tags["xlsub.seed"] == "0"
        m = child.data.metrics
        for other in LANGS:
            assert math.isfinite(m[f"ppl.{other}"]) and math.isfinite(m[f"ppl_random.{other}"])
        path = client.download_artifacts(child.info.run_id, "head_mask.json")
        with open(path) as f:
            mask = json.load(f)
        total = sum(len(row) for row in mask)
        assert total == 32 and all(v in (0, 1) for row in mask for v in row)
        assert m["heads_kept"] == sum(map(sum, mask))
        assert math.isclose(m["heads_kept_frac"], m["heads_kept"] / total)
        assert 0 < m["params_kept_frac"] <= 1
        # the per-step curve: fraction pruned grows by max(1, int(32 * 0.1)) = 3 heads a step
        fracs = [p.value for p in sorted(client.get_metric_history(child.info.run_id, "path.frac_pruned"), key=lambda p: p.step)]
        assert fracs[0] == 0 and all(math.isclose(b - a, 3 / 32) or b == 1.0 for a, b in zip(fracs, fracs[1:]))
        # stop rule: the kept mask is within the threshold on the pruning data
        assert m["ppl_prune_data"] <= 1.1 * m["ppl_prune_data_unpruned"] + 1e-9
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"head_mask.json", "head_importance.json", "head_mask.png", "subnetwork"} <= names
    parent_files = {a.path for a in client.list_artifacts(prune_run.info.run_id)}
    assert {"cross_ppl.csv", "cross_ppl.png", "cross_ppl_random.csv", "cross_ppl_relative.png"} <= parent_files
    # the full model's perplexity on each test set is the finetune run's ppl_after
    for lang in LANGS:
        assert math.isclose(prune_run.data.metrics[f"ppl_full.{lang}"], finetune_run.data.metrics[f"ppl_after.{lang}"], rel_tol=1e-5)


def test_subnetwork_loads_by_run_id_in_a_fresh_process(store, finetune_run, prune_run):
    """The physically pruned subnetwork, rebuilt from its run ID, reproduces the logged perplexity row."""
    child = next(c for c in children_of(store, prune_run) if c.data.tags["xlsub.language"] == "de")
    code = f"""
import json, mlflow
from xlsub import artifacts
from xlsub.data import lm as data
from xlsub.tracking import runs as tracking
from xlsub.data.corpus import load_corpus
from xlsub.models.heads import num_heads
from xlsub.models.mlm import perplexity
from xlsub.models.pruning import load_subnetwork
mask = artifacts.read_head_mask(tracking.download("{child.info.run_id}", "head_mask.json"))
model, tok = load_subnetwork(tracking.download("{child.info.run_id}", "subnetwork"), mask)  # refuses a config that disagrees
lm = data.build_lm_data(load_corpus("embedded", ["en", "de", "zh"]).texts, ["en", "de", "zh"], tok, 64, 96, 16, 0)
out = {{l: perplexity(model, data.masked_batches(lm.test[l], tok, 32)) for l in ["en", "de", "zh"]}}
out["params"] = sum(p.numel() for p in model.parameters())
from transformers import AutoModelForMaskedLM
full = AutoModelForMaskedLM.from_pretrained(tracking.download("{finetune_run.info.run_id}", "model"))
out["full_params"] = sum(p.numel() for p in full.parameters())
out["heads"] = sum(num_heads(model))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(store), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heads"] == child.data.metrics["heads_kept"]
    for lang in ("en", "de", "zh"):
        assert math.isclose(got[lang], child.data.metrics[f"ppl.{lang}"], rel_tol=1e-4)
    # hidden 128, head_dim 16: each pruned head removes its query, key and value rows (weights and
    # biases) and its 16 input columns of the output projection
    pruned = 32 - int(child.data.metrics["heads_kept"])
    assert got["params"] == got["full_params"] - pruned * (3 * (128 * 16 + 16) + 16 * 128)


def prune_cli(store, experiment, *args):
    return subprocess.run([sys.executable, "-m", "entry_points.prune", *args], env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME=experiment),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_prune_refuses_bad_input(store, finetune_run, prune_run, capsys):
    """Input runs that cannot be pruned. Parameter values alone (nan, repeated languages or seeds, ranges) are
    refused in tests/test_validation.py; the first case also goes through a real process."""
    client = MlflowClient(store)
    experiment = "xlsub-tests"  # the same experiment, so `latest` and the real runs are in reach
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    unfinished = client.create_run(exp_id, tags={"xlsub.stage": "finetune"})  # left RUNNING, like a crashed run
    ft = finetune_run.info.run_id
    try:
        proc = prune_cli(store, experiment, "--finetune_run_id", f" {unfinished.info.run_id}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"xlsub prune: finetune_run_id: run {unfinished.info.run_id} is RUNNING")
        cases = [
            (["--finetune_run_id", "0123456789abcdef0123456789abcdef"], "finetune_run_id"),
            (["--finetune_run_id", prune_run.info.run_id], "finetune_run_id"),  # a run of another stage
            (["--finetune_run_id", unfinished.info.run_id], "finetune_run_id"),
            (["--finetune_run_id", ft, "--languages", "en,es"], "languages"),  # es was not trained
        ]
        for args, named in cases:
            line, run = refuse_in_process(capsys, store, exp_id, "prune", args)
            assert line.startswith(f"xlsub prune: {named}:"), (args, line)
            assert not children_of(store, run), args
    finally:
        client.set_terminated(unfinished.info.run_id, "KILLED")


def test_prune_in_bf16_runs_its_passes_under_autocast(store, finetune_run, prune_run, monkeypatch):
    """precision=bf16: the pruning loop runs under torch.autocast in bfloat16, and the full model's test perplexities,
    measured in it, lie within 1% of the fp32 run's on the same finetune run without equalling them. In an
    experiment of its own, so that no other test's `latest` prune run is this one."""
    import torch

    from entry_points import prune
    from xlsub import devices

    seen = []
    real = prune.iterative_pruning

    def probe(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(prune, "iterative_pruning", probe)
    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: True)  # a CPU without them refuses bf16; this model is tiny
    exp_id = run_in_process(monkeypatch, store, "xlsub-prune-bf16", "prune",
                            ["--finetune_run_id", finetune_run.info.run_id, "--languages", "en", "--precision", "bf16", "--random_draws",
                             "1", "--bootstrap", "10", "--log_stock_models", "false", "--device", "cpu"])
    client = MlflowClient(store)
    (run,) = [r for r in client.search_runs([exp_id]) if r.data.tags.get("xlsub.child") != "true"]
    assert run.info.status == "FINISHED" and run.data.params["precision"] == "bf16"
    assert seen == [(True, torch.bfloat16)]
    for lang in LANGS:
        mixed, exact = run.data.metrics[f"ppl_full.{lang}"], prune_run.data.metrics[f"ppl_full.{lang}"]
        assert mixed == pytest.approx(exact, rel=1e-2) and mixed != exact, lang
