"""The neurons stage end to end: LAPE on the session's small finetuned XLM-R through `mlflow run`, gate
importance on a decoder (`tiny-llama`) in process, and the refusals.

The deactivation matrix is checked against the stock models the stage logs (the language's neurons'
down-projection inputs zeroed), evaluated with their own `labels=` loss; the LAPE masks against a
selection recomputed from the children's activation probabilities."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd
import pytest
import torch
import transformers
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from entry_points import finetune as finetune_entry
from entry_points import neurons as neurons_entry
from entry_points.encode import EncodeArgs
from tests.conftest import LAPE_TEST_RATE, children_of, mlflow_run, refuse_in_process, runs_of
from tests.test_family_stages import stock_perplexity
from xlsub import devices
from xlsub.artifacts import load_encodings
from xlsub.models.encoding import encode as encode_sentences
from xlsub.models.mlm import lm_batches
from xlsub.models.neurons import NeuronGates, lape_selection
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


def stock_model(child, name, tmp_path, auto):
    model_id = tracking.logged_model_id(child.info.run_id, name)
    folder = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / name))
    return auto.from_pretrained(f"{folder}/model").eval()


def test_lape_neurons_and_their_deactivation_matrix(store, finetune_run, neurons_run, tmp_path):
    parent = neurons_run
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
    selected = lape_selection(torch.stack([probability[l] for l in LANGS]).double(), 0.02, LAPE_TEST_RATE, LAPE_TEST_RATE)
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
    # precision=bf16: the selection runs under torch.autocast, the full model's perplexities within 1% of fp32's
    seen, real = [], neurons_entry.select_importance
    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: True)  # a CPU without them refuses bf16; this model is tiny
    monkeypatch.setattr(neurons_entry, "select_importance",
                        lambda *a, **k: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) or real(*a, **k))
    neurons_entry.main(["--method", "importance", "--target_sparsity", "0.25", "--examples", "8", "--batch_size", "4", "--random_draws", "1",
                        "--precision", "bf16", "--log_stock_models", "false"])
    mixed = next(r for r in client.search_runs([experiment], "tags.`xlsub.stage` = 'neurons'")
                 if r.data.tags.get("xlsub.child") != "true" and r.info.run_id != parent.info.run_id)
    assert mixed.info.status == "FINISHED" and seen == [torch.bfloat16]
    for lang in ("en", "de"):
        assert mixed.data.metrics[f"ppl_full.{lang}"] == pytest.approx(parent.data.metrics[f"ppl_full.{lang}"], rel=1e-2)
        assert mixed.data.metrics[f"ppl_full.{lang}"] != parent.data.metrics[f"ppl_full.{lang}"]


def test_neuron_subnetworks_are_encoded_and_analysed_beside_the_heads(capsys, store, finetune_run, prune_run, neurons_run, tmp_path):
    """encode with a neurons run: every language's neuron subnetwork under `neurons.<id>`, equal to the
    finetuned model encoded under neuron gates (hooks, not the zeroed weights encode uses); analyze then tests
    them like the head subnetworks, takes the neurons run from the encode run, and refuses another."""
    client = MlflowClient(store)
    experiment = "xlsub-neuron-encode"  # its own experiment: other tests read the session's latest encode run
    mlflow_run(store, "encode", {"finetune_run_id": finetune_run.info.run_id, "prune_run_id": prune_run.info.run_id,
                                 "neurons_run_id": neurons_run.info.run_id, "max_sentences": "24", "batch_size": "16"}, experiment=experiment)
    (encode,) = runs_of(store, experiment, "encode")
    assert encode.data.tags["xlsub.neurons_run_id"] == neurons_run.info.run_id
    keys = {a.path.split("/", 1)[1] for a in client.list_artifacts(encode.info.run_id, "encodings")}
    assert keys == {"full", *(f"{l}-s0" for l in LANGS), *(f"neurons.{l}-s0" for l in LANGS)}

    children = {c.data.tags["xlsub.language"]: c for c in children_of(store, neurons_run)}
    masks = {l: torch.tensor(json.loads(open(client.download_artifacts(c.info.run_id, "neuron_mask.json", str(tmp_path / l))).read())).float()
             for l, c in children.items()}
    lang = max(LANGS, key=lambda l: int((masks[l] == 0).sum()))
    assert int((masks[lang] == 0).sum()) > 0
    sentences = json.loads(tracking.download(encode.info.run_id, "sentences.json", tmp_path / "enc").read_text())
    folder = tracking.download(finetune_run.info.run_id, "model", tmp_path / "model")
    model, tokenizer = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    with NeuronGates(model, masks[lang]):
        gated = encode_sentences(model, tokenizer, sentences["texts"][lang], batch_size=5, pooling=EncodeArgs.pooling)
    # one folder each: a file artifact lands in its folder under its base name, and both are `<lang>.safetensors`
    stored = load_encodings(tracking.download(encode.info.run_id, f"encodings/neurons.{lang}-s0/{lang}.safetensors", tmp_path / "neurons"))
    full = load_encodings(tracking.download(encode.info.run_id, f"encodings/full/{lang}.safetensors", tmp_path / "full"))
    assert float((gated - stored).abs().max()) < 1e-5 and float((full - stored).abs().max()) > 1e-4

    mlflow_run(store, "analyze", {"encode_run_id": encode.info.run_id, "neurons_run_id": "latest", "bootstrap": "20", "permutations": "20",
                                  "cka_permutations": "20", "subnetwork_permutations": "10", "length_permutations": "10", "power_draws": "4"},
               experiment=experiment)
    (analyze,) = runs_of(store, experiment, "analyze")
    assert analyze.data.tags["xlsub.neurons_run_id"] == neurons_run.info.run_id  # 'latest' is the encode run's neurons run
    tested = pd.read_csv(client.download_artifacts(analyze.info.run_id, "tables/cka_pvalue.csv", str(tmp_path / "an")))
    models = list(dict.fromkeys(tested["model"]))
    assert models[:1 + 2 * len(LANGS)] == ["full", *(f"{l}-s0" for l in LANGS), *(f"neurons.{l}-s0" for l in LANGS)]
    assert tested.loc[tested["model"] == f"neurons.{lang}-s0", "p_value"].between(0, 1).all()

    other = client.create_run(client.get_experiment_by_name(experiment).experiment_id,
                              tags={"xlsub.stage": "neurons", "xlsub.finetune_run_id": finetune_run.info.run_id})
    client.set_terminated(other.info.run_id, "FINISHED")
    line, _ = refuse_in_process(capsys, store, client.get_experiment_by_name(experiment).experiment_id, "analyze",
                                ["--encode_run_id", encode.info.run_id, "--neurons_run_id", other.info.run_id])
    assert line.startswith("xlsub analyze: neurons_run_id: encode run") and f"was made from neurons run {neurons_run.info.run_id}" in line


def test_bad_inputs_are_refused(capsys, store, finetune_run):
    experiment = MlflowClient(store).get_experiment_by_name("xlsub-tests").experiment_id
    line, _ = refuse_in_process(capsys, store, experiment, "neurons", ["--languages", "en,xx"])
    assert line.startswith("xlsub neurons: languages:") and "did not train 'xx'" in line
    line, _ = refuse_in_process(capsys, store, experiment, "neurons", ["--languages", "en"])
    assert line.startswith("xlsub neurons: languages:") and "two or more" in line


def test_a_lape_run_that_selects_nothing_says_why():
    """More than 5% of the activation probabilities exactly 1 (a saturated model): the 0.95 quantile is 1, nothing lies
    above it and LAPE selects no neuron; the stage names the quantile and the parameter to lower. None where a neuron is
    selected, or where the bar is below the largest probability (then the emptiness has another cause)."""
    from entry_points.neurons import NeuronsArgs, empty_lape_notice, lape_masks

    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 4, 100, generator=g, dtype=torch.float64) * 0.9
    p.view(-1)[torch.randperm(p.numel(), generator=g)[:84]] = 1.0  # 7% of 1,200
    probability = {lang: p[i] for i, lang in enumerate(LANGS)}
    args = NeuronsArgs(top_rate=0.02)
    masks = lape_masks(probability, args)
    assert all(bool((mask == 1).all()) for mask in masks.values())
    notice = empty_lape_notice(probability, masks, args)
    assert notice.startswith("xlsub neurons: lape selected no neuron") and "(0.95)" in notice and "7.0% of them" in notice
    assert "lower activation_bar" in notice
    lower = NeuronsArgs(top_rate=0.02, filter_rate=0.9, activation_bar=0.9)  # 10% above 7%: some neuron's p lies above
    assert any(bool((mask == 0).any()) for mask in lape_masks(probability, lower).values())
    assert empty_lape_notice(probability, lape_masks(probability, lower), lower) is None
    assert empty_lape_notice(probability, {lang: torch.ones(4, 100) for lang in LANGS}, lower) is None  # the bar lies below 1
