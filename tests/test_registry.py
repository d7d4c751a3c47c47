"""Registered subnetworks: with register=true each subnetwork's stock model becomes a version of the
registered model `<experiment>-<language>`, tagged with its seed, threshold, mask digest and child run,
and loads by `models:/<name>/<version>`; main registers a reused prune run's models without recomputing it."""

from __future__ import annotations

import hashlib

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PIPELINE_EXPERIMENT, SMALL_PIPELINE, children_of, main_run, stage_ids
from xlsub import artifacts

pytestmark = pytest.mark.slow


def versions_of(client: MlflowClient, prune_run_id: str) -> dict[str, tuple]:
    """{subnetwork id: (child run, logged model, its registered versions)} of a prune run."""
    found = {}
    for child in children_of(client.tracking_uri, client.get_run(prune_run_id)):
        sid = child.data.tags[artifacts.SUBNETWORK_TAG]
        (model,) = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list",
                                               filter_string=f"source_run_id = '{child.info.run_id}'")
        name = f"{PIPELINE_EXPERIMENT}-{child.data.tags[artifacts.LANGUAGE_TAG]}"
        found[sid] = (child, model, [v for v in client.search_model_versions(f"name = '{name}'") if v.source == f"models:/{model.model_id}"])
    return found


@pytest.fixture
def server_uri(tracking_server):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    mlflow.set_tracking_uri(previous)


def test_register_makes_one_tagged_version_per_subnetwork_that_loads(server_uri, pipeline, tmp_path):
    client = MlflowClient(server_uri)
    prune_id = stage_ids(pipeline["third"])["prune"]  # the run with register=true, threshold 1.3
    found = versions_of(client, prune_id)
    assert sorted(found) == ["de-s0", "en-s0", "zh-s0"]
    for sid, (child, model, versions) in found.items():
        (version,) = versions
        mask_file = client.download_artifacts(child.info.run_id, artifacts.HEAD_MASK, str(tmp_path))
        with open(mask_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert version.tags == {"xlsub.seed": "0", "xlsub.subnetwork": sid, "threshold": "1.3", "target_sparsity": "none",
                                "xlsub.mask_sha256": digest, "source_run_id": child.info.run_id}
        assert version.run_id == child.info.run_id
    # load one version by name and number; its pruned heads' output columns are zero, the kept ones are not
    child, _, (version,) = found["de-s0"]
    parts = mlflow.transformers.load_model(f"models:/{version.name}/{version.version}", return_type="components")
    mask = artifacts.read_head_mask(client.download_artifacts(child.info.run_id, artifacts.HEAD_MASK, str(tmp_path)))
    assert mask.sum() < mask.numel()  # at threshold 1.3 a subnetwork may lose every head
    config = parts["model"].config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer, row in enumerate(mask):
        weight = parts["model"].roberta.encoder.layer[layer].attention.output.dense.weight
        for head, kept in enumerate(row):
            cols = weight[:, head * head_dim:(head + 1) * head_dim]
            assert bool((cols == 0).all()) == (kept == 0), (layer, head)
    assert parts["tokenizer"].mask_token_id is not None


def test_main_registers_a_reused_prune_runs_models(server_uri, pipeline):
    """register is not compared for reuse: the first run's parameters plus register=true reuse every stage,
    and main registers the reused prune run's models, once."""
    client = MlflowClient(server_uri)
    first_prune = stage_ids(pipeline["first"])["prune"]
    assert all(not versions for _, _, versions in versions_of(client, first_prune).values())
    run, _ = main_run(server_uri, {**SMALL_PIPELINE, "register": "true", "units": "heads"})
    assert run.data.tags["xlsub.reused.prune"] == first_prune
    for sid, (_, _, versions) in versions_of(client, first_prune).items():
        (version,) = versions
        assert version.tags["threshold"] == "1.1" and version.tags["xlsub.subnetwork"] == sid
