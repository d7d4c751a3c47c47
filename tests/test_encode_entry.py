"""End-to-end encode runs after small finetune and prune runs: `mlflow run . -e encode`, artifacts
loaded by run ID in a fresh process, and the bad inputs the stage refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from entry_points.encode import EncodeArgs
from tests.conftest import ROOT, refuse_in_process, subprocess_env

pytestmark = pytest.mark.slow


def test_encode_run_tags_metrics_and_artifacts_load_by_run_id(store, finetune_run, prune_run, encode_run):
    assert encode_run.info.status == "FINISHED"
    assert encode_run.data.tags["xlsub.finetune_run_id"] == finetune_run.info.run_id
    assert encode_run.data.tags["xlsub.prune_run_id"] == prune_run.info.run_id
    assert encode_run.data.metrics["sentences"] == 40 and encode_run.data.metrics["sentences_per_sec"] > 0
    assert {t.value for i in encode_run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"} == {"parallel"}
    code = f"""
import json, mlflow, torch
from pathlib import Path
from transformers import AutoModelForMaskedLM, AutoTokenizer
from xlsub.artifacts import load_encodings
from xlsub.models.encoding import encode
from xlsub.tracking.runs import download
root = download("{encode_run.info.run_id}", "encodings")
sentences = json.loads(download("{encode_run.info.run_id}", "sentences.json").read_text())
shapes = {{f"{{p.parent.name}}/{{p.stem}}": list(load_encodings(p).shape) for p in sorted(root.glob("*/*.safetensors"))}}
model_dir = download("{finetune_run.info.run_id}", "model")
model, tok = AutoModelForMaskedLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
again = encode(model, tok, sentences["texts"]["de"], batch_size=7, pooling="{EncodeArgs.pooling}")
diff = float((again - load_encodings(root / "full" / "de.safetensors")).abs().max())
print(json.dumps({{"shapes": shapes, "ids": len(sentences["ids"]), "langs": sentences["languages"], "diff": diff}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(store), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ["base", "de-s0", "en-s0", "full", "random", "zh-s0"]
    assert got["shapes"] == {f"{k}/{l}": [5, 40, 128] for k in keys for l in ("de", "en", "zh")}
    assert got["ids"] == 40 and got["langs"] == ["en", "de", "zh"]
    assert got["diff"] < 1e-5  # the stored full-model encodings are what the finetuned model computes


def encode_cli(store, *args):
    return subprocess.run([sys.executable, "-m", "entry_points.encode", *args], env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME="xlsub-tests"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_encode_refuses_bad_input(store, finetune_run, prune_run, capsys):
    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("xlsub-tests").experiment_id
    other = client.create_run(exp_id, tags={"xlsub.stage": "prune", "xlsub.finetune_run_id": "f" * 32})  # another lineage
    client.set_terminated(other.info.run_id, "FINISHED")
    unfinished = client.create_run(exp_id, tags={"xlsub.stage": "prune", "xlsub.finetune_run_id": finetune_run.info.run_id})
    ft, pr = finetune_run.info.run_id, prune_run.info.run_id
    cases = [
        (["--prune_run_id", pr, "--languages", "en,fr"], "languages"),
        (["--finetune_run_id", ft, "--prune_run_id", other.info.run_id], "prune_run_id"),
        (["--prune_run_id", "0123456789abcdef0123456789abcdef"], "prune_run_id"),
        (["--prune_run_id", unfinished.info.run_id], "prune_run_id"),
        (["--finetune_run_id", pr, "--prune_run_id", pr], "finetune_run_id"),
        (["--prune_run_id", pr, "--corpus", str(ROOT / "tests" / "missing.json")], "corpus"),
    ]
    try:
        proc = encode_cli(store, *cases[0][0])  # once through a real process; parameter values: tests/test_validation.py
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("xlsub encode: languages:"), proc.stderr[-2000:]
        for args, named in cases:
            line, _ = refuse_in_process(capsys, store, exp_id, "encode", args)
            assert line.startswith(f"xlsub encode: {named}:"), (args, line)
    finally:
        client.delete_run(other.info.run_id)
        client.set_terminated(unfinished.info.run_id, "KILLED")


def test_encode_in_mixed_precision_stores_what_autocast_computes(store, finetune_run, prune_run, encode_run, monkeypatch):
    """precision=bf16: the forward passes under torch.autocast, the stored encodings float32 and within a percent of the
    fp32 run's (`encode_run`, the same 40 sentences), not equal to them; the run records its precision."""
    import torch

    from tests.conftest import run_in_process
    from xlsub import devices
    from xlsub.artifacts import load_encodings
    from xlsub.tracking.runs import download

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: True)  # a CPU without them refuses bf16; this model is tiny
    exp_id = run_in_process(monkeypatch, store, "xlsub-encode-bf16", "encode",
                            ["--finetune_run_id", finetune_run.info.run_id, "--prune_run_id", prune_run.info.run_id, "--max_sentences", "40",
                             "--batch_size", "16", "--precision", "bf16", "--device", "cpu"])
    (run,) = MlflowClient(store).search_runs([exp_id])
    assert run.info.status == "FINISHED" and run.data.params["precision"] == "bf16"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for key in ("full", "de-s0"):
        mixed = load_encodings(download(run.info.run_id, f"encodings/{key}/de.safetensors"))
        exact = load_encodings(download(encode_run.info.run_id, f"encodings/{key}/de.safetensors"))
        assert mixed.dtype == torch.float32 and mixed.shape == exact.shape
        error = float((mixed - exact).abs().max()) / float(exact.abs().max())
        assert 1e-5 < error < 1e-2, (key, error)
