"""prune under torchrun: two CPU processes share the subnetworks and give what one process gives, and a
rank that fails (an exception, or a process that dies) leaves no run RUNNING."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, children_of, free_port, runs_of, subprocess_env
from xlsub.artifacts import SubnetworkId
from xlsub.errors import XlsubError
from xlsub.tracking.fanout import FanOut

# 2 languages x 2 seeds: round-robin gives rank 0 en-s0, de-s0 and rank 1 en-s1, de-s1. No stock models
# (their logging is tested in test_logged_models): each is a full model's worth of artifacts.
SMALL = ["--languages", "en,de", "--seeds", "0,1", "--eval_examples", "16", "--batch_size", "16", "--random_draws", "1",
         "--bootstrap", "10", "--continue_to", "0", "--log_stock_models", "false", "--device", "cpu"]
SUBNETWORKS = {f"{lang}-s{seed}" for lang in ("en", "de") for seed in (0, 1)}


def test_round_robin_gives_each_subnetwork_to_exactly_one_rank():
    items = [SubnetworkId(lang, seed) for lang in ("en", "de", "zh") for seed in (0, 1, 2)]
    for world in (1, 2, 4, 8, 12):
        shares = [FanOut(rank, world).mine(items) for rank in range(world)]
        assert sorted(sid for share in shares for sid in share) == sorted(items)  # each once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(share == [items[i] for i in range(rank, len(items), world)] for rank, share in enumerate(shares))
    assert FanOut(1, 2).mine(items) == [SubnetworkId("en", 1), SubnetworkId("de", 0), SubnetworkId("de", 2), SubnetworkId("zh", 1)]


def test_one_process_shares_and_gathers_locally(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with FanOut.from_env() as fan:
        assert (fan.rank, fan.world) == (0, 1)
        assert fan.share(lambda: "decided") == "decided" and fan.gather({"a": 1}) == [{"a": 1}]
        assert fan.device("cuda") == "cuda" and fan.device("cpu") == "cpu"


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [FanOut(r, 16, r % 8, 8).device("cuda") for r in range(16)] == [f"cuda:{r % 8}" for r in range(16)]
    assert FanOut(3, 8, 3, 8).device("cpu") == "cpu" and FanOut(3, 8, 3, 8).device("cuda:0") == "cuda:0"
    with pytest.raises(XlsubError, match=r"^device: 9 processes on this node but 8 GPUs"):
        FanOut(0, 9, 0, 9).device("cuda")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *args]


def run(cmd: list[str], store: str, experiment: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME=experiment, PYTHONPATH=str(ROOT), **env),
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def parent_of(store: str, experiment: str):
    (parent,) = [r for r in runs_of(store, experiment, "prune") if r.data.tags.get("xlsub.child") != "true"]
    return parent


def by_subnetwork(store: str, parent) -> dict:
    return {c.data.tags["xlsub.subnetwork"]: c for c in children_of(store, parent)}


def mask_of(client: MlflowClient, run) -> list[list[int]]:
    with open(client.download_artifacts(run.info.run_id, "head_mask.json")) as f:
        return json.load(f)


def table_of(client: MlflowClient, run, name: str) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run.info.run_id, name))


@pytest.fixture(scope="module")
def one_and_two(store, finetune_run, tmp_path_factory):
    """The same prune in one process and in two (torchrun), each in its own experiment."""
    client = MlflowClient(store)
    parents = {}
    for name, cmd in (("one", [sys.executable, "-m", "entry_points.prune"]), ("two", torchrun("-m", "entry_points.prune"))):
        experiment = f"xlsub-fanout-{name}"
        client.create_experiment(experiment, artifact_location=(tmp_path_factory.mktemp(name) / "artifacts").as_uri())
        proc = run([*cmd, "--finetune_run_id", finetune_run.info.run_id, *SMALL], store, experiment)
        assert proc.returncode == 0, proc.stderr[-4000:]
        parents[name] = parent_of(store, experiment)
    return parents


@pytest.mark.slow
def test_two_processes_make_every_subnetwork_once_in_parallel(store, one_and_two):
    parent = one_and_two["two"]
    assert parent.info.status == "FINISHED" and parent.data.params["world_size"] == "2"
    children = by_subnetwork(store, parent)
    assert set(children) == SUBNETWORKS and len(children_of(store, parent)) == len(SUBNETWORKS)
    for sid, child in children.items():
        assert child.info.status == "FINISHED" and child.info.run_name == f"prune/{sid}"
        assert child.info.experiment_id == parent.info.experiment_id and child.data.tags["xlsub.child"] == "true"
        assert {"ppl.en", "ppl.de", "ppl.zh", "ppl_random.de", "heads_kept", "params_kept_frac", "importance_split_half_r"} <= set(child.data.metrics)
    # two processes worked at once: some children ran at the same time (one process makes them one after another)
    spans = sorted((c.info.start_time, c.info.end_time) for c in children.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    single = sorted((c.info.start_time, c.info.end_time) for c in children_of(store, one_and_two["one"]))
    assert all(later[0] >= earlier[1] for earlier, later in zip(single, single[1:]))


@pytest.mark.slow
def test_two_processes_give_what_one_gives(store, one_and_two):
    client = MlflowClient(store)
    one, two = (by_subnetwork(store, one_and_two[k]) for k in ("one", "two"))
    assert set(one) == set(two) == SUBNETWORKS
    for sid in SUBNETWORKS:
        assert mask_of(client, one[sid]) == mask_of(client, two[sid]), sid
        assert one[sid].data.metrics == two[sid].data.metrics, sid
    for name in ("cross_ppl.csv", "cross_ppl_random.csv", "cross_ppl_relative.csv", "chunk_losses.csv"):
        pd.testing.assert_frame_equal(table_of(client, one_and_two["one"], name), table_of(client, one_and_two["two"], name), check_exact=True)
    # the parent's own results; its system/* metrics (MLflow's monitor: CPU, memory) differ from run to run
    metrics_one, metrics_two = ({k: v for k, v in one_and_two[name].data.metrics.items() if not k.startswith("system/")}
                                for name in ("one", "two"))
    assert any(k.startswith("system/") for k in one_and_two["two"].data.metrics)
    assert {k for k in metrics_one if k.startswith("importance_split_half_r.")} == {f"importance_split_half_r.{s}" for s in SUBNETWORKS}
    assert metrics_one == metrics_two
    files = {a.path for a in client.list_artifacts(one_and_two["two"].info.run_id)}
    assert files == {a.path for a in client.list_artifacts(one_and_two["one"].info.run_id)}


# One rank fails at its first subnetwork: by an exception, or by dying without a word (os._exit).
FAILING = textwrap.dedent("""
    import os, sys
    import entry_points.prune as prune

    how, rank = sys.argv.pop(1), sys.argv.pop(1)
    real = prune.prune_language

    def prune_language(model, tokenizer, sid, *args):
        if os.environ["RANK"] == rank:
            if how == "raise":
                raise RuntimeError("injected failure")
            os._exit(3)
        return real(model, tokenizer, sid, *args)

    prune.prune_language = prune_language
    prune.main()
""")
FIRST, LATER = {0: "en-s0", 1: "en-s1"}, {0: {"de-s0"}, 1: {"de-s1"}}  # each rank's subnetworks


@pytest.mark.slow
@pytest.mark.parametrize("how, rank", [("raise", 1), ("die", 1), ("die", 0)])
def test_a_failing_rank_fails_its_child_and_the_parent(store, finetune_run, tmp_path, how, rank):
    """Rank 0 dying is covered too: then rank 1 marks the parent FAILED, and the child rank 0 left RUNNING."""
    client = MlflowClient(store)
    experiment = f"xlsub-fanout-{how}-{rank}"
    client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    script = tmp_path / "failing_prune.py"
    script.write_text(FAILING)
    proc = run(torchrun(str(script), how, str(rank), "--finetune_run_id", finetune_run.info.run_id, *SMALL), store, experiment)
    assert proc.returncode != 0
    parent = parent_of(store, experiment)
    assert parent.info.status == "FAILED", proc.stderr[-4000:]
    children = by_subnetwork(store, parent)
    assert children[FIRST[rank]].info.status == "FAILED"
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children.values()), {s: c.info.status for s, c in children.items()}
    assert not LATER[rank] & set(children)  # the failing rank stopped
    assert "cross_ppl.csv" not in {a.path for a in client.list_artifacts(parent.info.run_id)}
    if how == "raise":
        assert "subnetwork en-s1 failed on rank 1: injected failure" in proc.stderr
