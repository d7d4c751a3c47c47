"""The neurons stage end to end: LAPE on the session's small finetuned XLM-R through `mlflow run`, gate
importance on a decoder (`tiny-llama`) in process, and the refusals.

The deactivation matrix is checked against the stock models the stage logs (the language's neurons'
down-projection inputs zeroed), evaluated with their own `labels=` loss; the LAPE masks against a
selection recomputed from the children's activation probabilities."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
import transformers
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from entry_points import finetune as finetune_entry
from entry_points import neurons as neurons_entry
from tests.conftest import children_of, mlflow_run, refuse_in_process, runs_of
from tests.test_family_stages import stock_perplexity
from xlsub.models.mlm import lm_batches
from xlsub.models.neurons import lape_selection
from xlsub.models.training import load_finetuned
from xlsub.tracking import runs as tracking

pytestmark = pytest.mark.slow
LANGS = ["en", "de", "zh"]


@pytest.fixture(autouse=True)
def pinned_store(store):
    """The session store as this process's tracking URI while each test runs (`tracking.download` reads it;
    an earlier test may have pointed the process at its own server)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    yield
    mlflow.set_tracking_uri(previous)


def parent_of(store, stage):
    return next(r for r in runs_of(store, "xlsub-tests", stage) if r.data.tags.get("xlsub.child") != "true")


def stock_model(child, name, tmp_path, auto):
    model_id = tracking.logged_model_id(child.info.run_id, name)
    folder = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / name))
    return auto.from_pretrained(f"{folder}/model").eval()


def test_lape_neurons_and_their_deactivation_matrix(store, finetune_run, tmp_path):
    mlflow_run(store, "neurons", {"finetune_run_id": finetune_run.info.run_id, "examples": "32", "top_rate": "0.02"})
    parent = parent_of(store, "neurons")
    assert parent.info.status == "FINISHED" and parent.data.tags["xlsub.finetune_run_id"] == finetune_run.info.run_id
    children = {c.data.tags["xlsub.language"]: c for c in children_of(store, parent)}
    assert sorted(children) == sorted(LANGS) and all(c.info.run_name == f"neurons/{l}-s0" for l, c in children.items())
    client = MlflowClient(store)
    masks, probability = {}, {}
    for lang, child in children.items():
        folder = tmp_path / lang
        masks[lang] = torch.tensor(json.loads(open(client.download_artifacts(child.info.run_id, "neuron_mask.json", str(folder))).read()))
        probability[lang] = load_file(client.download_artifacts(child.info.run_id, "activation_probability.safetensors", str(folder)))["p"]
        m = child.data.metrics
        assert masks[lang].shape == (4, 512) and m["neurons_off"] == int((masks[lang] == 0).sum())
        assert sum(m[f"neurons_off_layer.{layer}"] for layer in range(4)) == m["neurons_off"]
        halves = json.loads(open(client.download_artifacts(child.info.run_id, "neuron_mask_halves.json", str(folder))).read())
        assert set(halves) == {"a", "b"} and torch.tensor(halves["a"]).shape == (4, 512)
    # the masks are LAPE's selection over the three languages' probabilities, 2% of 2,048 neurons at most
    selected = lape_selection(torch.stack([probability[l] for l in LANGS]).double(), 0.02, 0.95, 0.95)
    for i, lang in enumerate(LANGS):
        assert torch.equal(masks[lang] == 0, selected[i])
    assert 0 < sum(int((masks[l] == 0).sum()) for l in LANGS) and (selected.any(0).sum() <= round(2048 * 0.02))

    # the deactivation row of a language equals its stock model's own loss on every test set
    made = json.loads(open(client.download_artifacts(finetune_run.info.run_id, "manifest.json", str(tmp_path / "ft"))).read())
    model, tokenizer, lm, _ = load_finetuned(tracking.download(finetune_run.info.run_id, "model", tmp_path / "model"), made["lm_data"], LANGS, "cpu")
    lang = max(LANGS, key=lambda l: int((masks[l] == 0).sum()))
    stock = stock_model(children[lang], f"neurons-{lang}-s0", tmp_path, transformers.AutoModelForMaskedLM)
    for other in LANGS:
        batches = lm_batches(model, lm.test[other], tokenizer, 32)
        assert stock_perplexity(stock, batches) == pytest.approx(children[lang].data.metrics[f"ppl.{other}"], rel=1e-5)
        assert parent.data.metrics[f"ppl_full.{other}"] == pytest.approx(finetune_run.data.metrics[f"ppl_after.{other}"], rel=1e-5)
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"neuron_ppl.csv", "neuron_ppl_relative.csv", "neuron_ppl_random.csv", "neuron_chunk_losses.csv", "neuron_eligible.json",
            "neuron_ppl_relative.png", "ppl_full.json", "manifest.json"} <= files
    eligible = torch.tensor(json.loads(open(client.download_artifacts(parent.info.run_id, "neuron_eligible.json", str(tmp_path))).read())["0"])
    assert bool(eligible[selected.any(0)].all())  # every selected neuron was eligible


def test_importance_neurons_on_a_decoder_in_process(store, tmp_path, monkeypatch):
    """A causal LM (grouped-query attention, gated FFN): the untrained tiny-llama studied as it is
    (`eval_only`), then neurons by gate importance at a fixed sparsity."""
    client = MlflowClient(store)
    experiment = client.create_experiment("xlsub-decoder-neurons")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    finetune_entry.main(["--model", "tiny-llama", "--languages", "en,de", "--eval_only", "true", "--examples_per_lang", "32",
                         "--test_examples_per_lang", "8"])
    (decoder,) = client.search_runs([experiment], "tags.`xlsub.stage` = 'finetune'")
    assert decoder.info.status == "FINISHED"
    neurons_entry.main(["--method", "importance", "--target_sparsity", "0.25", "--examples", "8", "--batch_size", "4", "--random_draws", "1"])
    (parent,) = [r for r in client.search_runs([experiment], "tags.`xlsub.stage` = 'neurons'") if r.data.tags.get("xlsub.child") != "true"]
    assert parent.info.status == "FINISHED" and parent.data.tags["xlsub.finetune_run_id"] == decoder.info.run_id
    children = children_of(store, parent)
    assert sorted(c.data.tags["xlsub.language"] for c in children) == ["de", "en"]
    for child in children:
        m = child.data.metrics
        assert m["neurons_off"] == 32 and m["neurons_off_frac"] == 0.25  # a quarter of 2 layers x 64 neurons
        stock = stock_model(child, f"neurons-{child.data.tags['xlsub.language']}-s0", tmp_path, transformers.AutoModelForCausalLM)
        assert type(stock).__name__ == "LlamaForCausalLM" and math.isfinite(m["ppl.en"])


def test_bad_inputs_are_refused(capsys, store, finetune_run):
    experiment = MlflowClient(store).get_experiment_by_name("xlsub-tests").experiment_id
    line, _ = refuse_in_process(capsys, store, experiment, "neurons", ["--languages", "en,xx"])
    assert line.startswith("xlsub neurons: languages:") and "did not train 'xx'" in line
    line, _ = refuse_in_process(capsys, store, experiment, "neurons", ["--languages", "en"])
    assert line.startswith("xlsub neurons: languages:") and "two or more" in line
