"""End-to-end finetune runs: `mlflow run`, a fresh process loading the model by run ID, torchrun, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, SMALL_FINETUNE, mlflow_run, refuse_in_process, run_in_process, runs_of, subprocess_env

pytestmark = pytest.mark.slow
LANGS = SMALL_FINETUNE["languages"].split(",")


def test_finetune_run_logs_params_perplexities_tags_and_artifacts(store, finetune_run):
    run = finetune_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["xlsub.stage"] == "finetune"
    assert run.data.params["languages"] == "en,de,zh"
    assert run.data.params["examples_per_lang"] == "96"
    for lang in LANGS:
        for kind in ("ppl_before", "ppl_after", "ppl_unigram"):
            value = run.data.metrics[f"{kind}.{lang}"]
            assert math.isfinite(value) and value > 1
        # an untrained model is close to uniform over the vocabulary; one epoch must move it
        assert run.data.metrics[f"ppl_after.{lang}"] < run.data.metrics[f"ppl_before.{lang}"]
    client = MlflowClient(store)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2 and history[-1].value < history[0].value
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "perplexity.csv", "perplexity.png"} <= names
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert {"train", "test"} <= contexts
    # every run in the store is an xlsub stage run: the Trainer's MLflowCallback opened none of its own
    assert all(r.data.tags.get("xlsub.stage") for r in runs_of(store, "xlsub-tests"))


def test_model_loads_by_run_id_in_a_fresh_process_and_reproduces_ppl(store, finetune_run):
    """A user downloads model/ by run ID and loads it with from_pretrained; its perplexity matches the logged one."""
    code = f"""
import json, math, mlflow
from transformers import AutoModelForMaskedLM, AutoTokenizer
from xlsub.data.corpus import load_corpus
from xlsub.data import lm as data
from xlsub.models.mlm import perplexity
path = mlflow.artifacts.download_artifacts(run_id="{finetune_run.info.run_id}", artifact_path="model")
model = AutoModelForMaskedLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
c = load_corpus("embedded", ["de"])
lm = data.build_lm_data(c.texts, ["de"], tok, 64, 96, 16, 0)
print(json.dumps({{"ppl": perplexity(model, data.masked_batches(lm.test["de"], tok, 16)), "heads": model.config.num_attention_heads}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(store), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heads"] == 8
    assert math.isclose(result["ppl"], finetune_run.data.metrics["ppl_after.de"], rel_tol=1e-4)


def test_torchrun_two_processes_log_one_run(store, tmp_path):
    experiment = "xlsub-torchrun"
    MlflowClient(store).create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    args = ["--languages", "en,de", "--epochs", "1", "--examples_per_lang", "64", "--test_examples_per_lang", "8",
            "--batch_size", "8", "--log_every", "1", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "entry_points.finetune", *args]
    proc = subprocess.run(cmd, env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME=experiment, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = runs_of(store, experiment)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["world_size"] == "2"
    # 128 examples, 8 per device, 2 devices: 8 optimizer steps (a single process would take 16)
    assert run.data.metrics["train_steps"] == 8
    assert {f"ppl_after.{l}" for l in ("en", "de")} <= set(run.data.metrics)


def test_bad_input_through_mlflow_run_is_one_line_nonzero_exit_and_failed_run(store, tmp_path):
    """A local model path that does not exist is refused at once (no hub retries), as `mlflow run` shows it."""
    experiment = "xlsub-bad-model"
    MlflowClient(store).create_experiment(experiment, artifact_location=(tmp_path / "a").as_uri())
    proc = mlflow_run(store, "finetune", {**SMALL_FINETUNE, "model": "./no/such/model"}, experiment=experiment, check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("xlsub finetune:")]
    assert len(lines) == 1 and lines[0].startswith("xlsub finetune: model:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (run,) = runs_of(store, experiment)
    assert run.info.status == "FAILED"
    assert "model" not in {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("params, named", [({"languages": "en,xx"}, "languages"), ({"corpus": "/nonexistent/corpus-folder"}, "corpus")])
def test_input_the_corpus_cannot_serve_is_refused(store, capsys, params, named, tmp_path):
    """Well-formed values that name nothing: checked against the corpus (the values alone, in tests/test_validation.py)."""
    exp_id = MlflowClient(store).create_experiment(f"xlsub-bad-{named}", artifact_location=(tmp_path / "a").as_uri())
    argv = [f"--{k}={v}" for k, v in {**SMALL_FINETUNE, **params}.items()]
    line, _ = refuse_in_process(capsys, store, exp_id, "finetune", argv)
    assert line.startswith(f"xlsub finetune: {named}:"), line


def test_unreadable_corpus_folder(store, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "en.txt").write_bytes(b"\xff\xfe\x00binary\x80\x81 not text\n" * 5)
    proc = subprocess.run([sys.executable, "-m", "entry_points.finetune", "--corpus", str(folder), "--languages", "en"],
                          env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME="xlsub-unreadable"), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("xlsub finetune: corpus")
    (run,) = runs_of(store, "xlsub-unreadable")
    assert run.info.status == "FAILED"


def test_language_absent_from_a_folder_corpus(store, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "en.txt").write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    proc = subprocess.run([sys.executable, "-m", "entry_points.finetune", "--corpus", str(folder), "--languages", "en,de"],
                          env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME="xlsub-absent"), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xlsub finetune: languages:") and "'de'" in last


def test_finetune_on_a_saved_wikipedia_subset_layout(store, tmp_path):
    """The study's hub dataset layout (one split per language, a `text` column of articles), saved to disk."""
    import datasets

    from xlsub.data.corpus import load_corpus

    source = load_corpus("embedded", ["en", "ru"])
    articles = {}
    for lang in ("en", "ru"):
        rows = [t for l, t in zip(source.texts["train"]["lang"], source.texts["train"]["text"]) if l == lang]
        articles[lang] = datasets.Dataset.from_dict({"text": [" ".join(rows[i : i + 40]) for i in range(0, 2400, 40)]})
    path = tmp_path / "wikipedia_subset"
    datasets.DatasetDict(articles).save_to_disk(str(path))
    experiment = "xlsub-saved-hub"
    MlflowClient(store).create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    args = ["--corpus", str(path), "--epochs", "1", "--examples_per_lang", "32", "--test_examples_per_lang", "4",
            "--batch_size", "16", "--max_seq_len", "128", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "entry_points.finetune", *args], env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME=experiment),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(store, experiment)
    assert run.data.tags["xlsub.languages"] == "en,ru"
    assert run.data.params["train_examples.en"] == "32" and run.data.params["train_examples.ru"] == "32"
    assert {"ppl_after.en", "ppl_after.ru"} <= set(run.data.metrics)


def test_compile_reaches_the_training_loop_and_the_run(store, monkeypatch):
    """compile=true through the entry point: the Trainer loop runs with `TrainSettings.compile` set, the run finishes
    with the parameter logged, and the model it logs is the stock module (its layers eager again)."""
    from entry_points import finetune
    from xlsub.models.families import adapter_for

    seen = []
    real = finetune.train_masked_lm

    def probe(model, tokenizer, train, settings, *args, **kwargs):
        seen.append(settings.compile)
        result = real(model, tokenizer, train, settings, *args, **kwargs)
        seen.append(all(layer._compiled_call_impl is None for layer in adapter_for(model).layers(model)))
        return result

    monkeypatch.setattr(finetune, "train_masked_lm", probe)
    exp_id = run_in_process(monkeypatch, store, "xlsub-compiled-finetune", "finetune",
                            ["--languages", "en,de", "--epochs", "1", "--examples_per_lang", "32", "--test_examples_per_lang", "8",
                             "--batch_size", "16", "--compile", "true", "--device", "cpu"])
    (run,) = MlflowClient(store).search_runs([exp_id])
    assert run.info.status == "FINISHED" and run.data.params["compile"] == "True"
    assert seen == [True, True]
    assert all(math.isfinite(run.data.metrics[f"ppl_after.{lang}"]) for lang in ("en", "de"))
