"""The whole pipeline against a real `mlflow server`: `main` runs the four stages as child runs, a
second identical run reuses all of them, a changed prune parameter recomputes prune, encode and
analyze but not finetune, an edit of code only analyze uses recomputes analyze alone, and a fresh
process resolves every stage's inputs by run ID from the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PIPELINE_EXPERIMENT, ROOT, SMALL_PIPELINE, main_run, mlflow_run, runs_of, stage_ids, subprocess_env

pytestmark = pytest.mark.slow


def test_main_runs_the_four_stages_as_child_runs(tracking_server, pipeline):
    client = MlflowClient(tracking_server)
    first = pipeline["first"]
    assert first.info.status == "FINISHED" and first.data.tags["xlsub.reused"] == "none"
    for stage, run_id in stage_ids(first).items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["xlsub.stage"] == stage
        assert run.data.tags["mlflow.parentRunId"] == first.info.run_id
    prune = client.get_run(stage_ids(first)["prune"])
    assert prune.data.params["finetune_run_id"] == stage_ids(first)["finetune"]


def test_identical_rerun_reuses_every_stage(tracking_server, pipeline):
    first, second = pipeline["first"], pipeline["second"]
    assert stage_ids(second) == stage_ids(first)
    assert second.data.tags["xlsub.reused"] == "finetune,prune,neurons,encode,analyze"
    assert second.data.tags["xlsub.reused.prune"] == stage_ids(first)["prune"]
    # issue 24, case 4: computed or reused, the main run links its stage runs and carries the verdicts
    analyze = MlflowClient(tracking_server).get_run(stage_ids(first)["analyze"]).data.metrics
    verdicts = {k: v for k, v in analyze.items() if k.startswith("verdict.")}
    for run in (first, second):
        assert verdicts and {k: run.data.metrics[k] for k in verdicts} == verdicts
        assert all(f"[{run_id}](http" in run.data.tags["mlflow.note.content"] for run_id in stage_ids(run).values())


def test_changed_prune_parameter_recomputes_downstream_only(pipeline):
    first, third = stage_ids(pipeline["first"]), stage_ids(pipeline["third"])
    assert third["finetune"] == first["finetune"]
    assert all(third[s] != first[s] for s in ("prune", "encode", "analyze"))
    assert pipeline["third"].data.tags["xlsub.reused"] == "finetune,neurons"  # the neurons stage reads only the finetune run


def test_a_fresh_process_resolves_inputs_and_downloads_artifacts_from_the_server(tracking_server, pipeline):
    ids = stage_ids(pipeline["first"])
    code = f"""
import json
from mlflow.tracking import MlflowClient
from xlsub.tracking import runs as tracking
from xlsub.artifacts import load_encodings
analyze = tracking.resolve_run("analyze_run_id", "{ids['analyze']}", "analyze")
encode = tracking.resolve_run("encode_run_id", analyze.data.tags["xlsub.encode_run_id"], "encode")
prune = tracking.resolve_run("prune_run_id", encode.data.tags["xlsub.prune_run_id"], "prune")
finetune = tracking.resolve_run("finetune_run_id", prune.data.tags["xlsub.finetune_run_id"], "finetune")
from xlsub.artifacts import SubnetworkId
from xlsub.models.pruning import load_subnetwork
child = tracking.child_runs(prune)[SubnetworkId("de", 0)]
model, tok = load_subnetwork(tracking.download(child.info.run_id, "subnetwork"))
enc = load_encodings(tracking.download(encode.info.run_id, "encodings/full/de.safetensors"))
html = tracking.download(analyze.info.run_id, "report.html").read_text()
print(json.dumps({{"chain": [finetune.info.run_id, prune.info.run_id, encode.info.run_id], "shape": list(enc.shape),
                   "heads": sum(len(h) for h in model.config.xlsub_kept_heads), "report": "figures/cka_vs_reference.png" in html}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(tracking_server), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["chain"] == [ids["finetune"], ids["prune"], ids["encode"]]
    assert got["shape"] == [5, 30, 128] and got["report"]
    child_heads = MlflowClient(tracking_server).search_runs(
        [pipeline["first"].info.experiment_id], f"tags.`mlflow.parentRunId` = '{ids['prune']}' and tags.`xlsub.language` = 'de'")[0]
    assert got["heads"] == child_heads.data.metrics["heads_kept"]


def test_an_analyze_only_code_change_recomputes_analyze_alone(tracking_server, pipeline, tmp_path):
    """A copy of the project with a changed line in the report writer: `mlflow run .` from the copy reuses
    finetune, prune and encode (their code versions are unchanged) and runs a new analyze."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "mlruns", "mlartifacts", "outputs", "*.db"))
    with open(copy / "xlsub" / "report" / "html.py", "a") as f:
        f.write("\n# the report's wording changed\n")
    run, _ = main_run(tracking_server, SMALL_PIPELINE, root=copy)
    first, edited = stage_ids(pipeline["first"]), stage_ids(run)
    assert run.data.tags["xlsub.reused"] == "finetune,prune,neurons,encode"
    assert all(edited[s] == first[s] for s in ("finetune", "prune", "encode")) and edited["analyze"] != first["analyze"]
    client = MlflowClient(tracking_server)
    versions = {s: client.get_run(edited[s]).data.tags["xlsub.code_version"] for s in edited}
    before = {s: client.get_run(first[s]).data.tags["xlsub.code_version"] for s in first}
    assert [s for s in versions if versions[s] != before[s]] == ["analyze"]
    assert client.get_experiment_by_name(PIPELINE_EXPERIMENT).experiment_id == run.info.experiment_id


def test_main_runs_every_stage_on_a_decoder(tracking_server, tmp_path):
    """Issue 22: `mlflow run . -P model=tiny-llama` (grouped-query attention, causal LM) through finetune,
    prune, neurons, encode (the neuron subnetworks too) and analyze, with verdicts; its models are logged for text generation, and a subnetwork
    (stock form: Llama layers share one head count) loads without xlsub and computes what the gated
    model computes."""
    import mlflow

    experiment = "xlsub-decoder"
    fast = {"use_random": "false", "bootstrap": "200", "permutations": "99", "cka_permutations": "99", "subnetwork_permutations": "99",
            "length_permutations": "99", "power_draws": "5", "target_sparsity": "0.5", "neuron_examples": "16"}
    mlflow_run(tracking_server, "main", {**SMALL_PIPELINE, **fast, "model": "tiny-llama", "encode_neurons": "true"}, experiment=experiment)
    client = MlflowClient(tracking_server)
    (main,) = runs_of(tracking_server, experiment, "main")
    assert main.info.status == "FINISHED" and main.data.tags["xlsub.reused"] == "none"
    ids = stage_ids(main)
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in ids.values())
    # encode_neurons: the encode run encoded the neurons run's neuron subnetworks, and analyze tested them
    neurons_id = main.data.tags["xlsub.neurons_run_id"]
    assert client.get_run(ids["encode"]).data.tags["xlsub.neurons_run_id"] == neurons_id == client.get_run(ids["analyze"]).data.tags["xlsub.neurons_run_id"]
    keys = {a.path.split("/", 1)[1] for a in client.list_artifacts(ids["encode"], "encodings")}
    assert {"neurons.en-s0", "neurons.de-s0", "neurons.zh-s0"} <= keys
    analyze = client.get_run(ids["analyze"]).data.metrics
    # one pruning seed: every verdict but stability is answered (different heads says "cannot tell" without a value)
    answered = {key.split(".")[1] for key in analyze if key.startswith("verdict.")}
    assert {"different_heads", "specificity", "beyond_length", "pruning_specific"} <= answered
    assert {"verdict.specificity.value", "verdict.pruning_specific.value"} <= set(analyze)
    assert 0 < analyze["mean_params_kept_frac"] <= 1

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    try:
        decoder_models(client, ids, tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)  # the later tests' in-process runs read it


def decoder_models(client, ids, tmp_path):
    import mlflow
    import torch
    import transformers

    from xlsub.artifacts import SubnetworkId, read_head_mask
    from xlsub.models.heads import HeadGates
    from xlsub.models.mlm import causal_batch, causal_lm_loss
    from xlsub.tracking import runs as tracking

    child = tracking.child_runs(client.get_run(ids["prune"]))[SubnetworkId("de", 0)]
    model_id = tracking.logged_model_id(child.info.run_id, "subnetwork-de-s0")
    flavor = mlflow.models.get_model_info(f"models:/{model_id}").flavors["transformers"]
    assert flavor["task"] == "text-generation"
    folder = tracking.download(child.info.run_id, "subnetwork", tmp_path)
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # no xlsub code
    assert type(stock).__name__ == "LlamaForCausalLM"
    full = transformers.AutoModelForCausalLM.from_pretrained(tracking.download(ids["finetune"], "model", tmp_path / "full")).eval()
    mask = read_head_mask(tracking.download(child.info.run_id, "head_mask.json", tmp_path / "mask"))
    assert mask.sum() == mask.numel() / 2  # target_sparsity: half the heads of the untrained-looking model off
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = causal_batch([tokenizer("Der Hund schläft.")["input_ids"], tokenizer("Ein Haus")["input_ids"]], tokenizer)
    with torch.no_grad(), HeadGates(full, mask):
        gated, n = causal_lm_loss(full, batch)
    with torch.no_grad():
        assert stock(**batch).loss.item() == pytest.approx(gated.item() / n, abs=1e-5)
