"""Crash resume of finetune: which dead run a new run continues (against a throwaway sqlite store, no
training), and end to end a run killed with SIGKILL mid-training, continued by a rerun with the same
parameters, ending where an uninterrupted run ends."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port, sqlite_store, subprocess_env
from xlsub import artifacts
from xlsub.tracking import runs as tracking
from xlsub.tracking.code_version import code_version

PARAMS = {"languages": "en,de", "seed": "0", "epochs": "1.0"}


# -- which dead run is chosen ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def database(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("resume")) as client:
        yield client


@pytest.fixture
def store(database, tmp_path):
    """The module's store, a fresh experiment per test: each test sees only its own runs."""
    return database, database.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())


def fake_run(client, exp, status, params=PARAMS, heartbeat=None, tags=None, code=None):
    """A finetune run as a dead or live one leaves it: params, stage and code tags, a status, a heartbeat."""
    run = client.create_run(exp, tags={artifacts.STAGE_TAG: "finetune", artifacts.CODE_TAG: code or code_version("finetune"), **(tags or {})})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    if heartbeat is not None:
        client.set_tag(run.info.run_id, artifacts.HEARTBEAT_TAG, f"{heartbeat:.0f}")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    time.sleep(0.01)  # distinct start times: newest first is well defined
    return run.info.run_id


def dead_ids(exp, params=PARAMS, exclude=(), now=None):
    return [r.info.run_id for r in tracking.find_dead(exp, "finetune", params, exclude=exclude, now=now)]


def test_dead_runs_newest_first_finished_and_fresh_ones_left_out(store):
    client, exp = store
    now = time.time()
    failed = fake_run(client, exp, "FAILED")
    killed = fake_run(client, exp, "KILLED")
    stale = fake_run(client, exp, "RUNNING", heartbeat=now - tracking.STALE_SECONDS - 5)
    fake_run(client, exp, "RUNNING", heartbeat=now - 10)  # alive: a concurrent run, not a dead one
    fake_run(client, exp, "FINISHED")
    assert dead_ids(exp, now=now) == [stale, killed, failed]
    # the same stale run is alive to a clock that reads earlier
    assert dead_ids(exp, now=now - 10) == [killed, failed]


def test_a_running_run_without_heartbeat_goes_stale_from_its_start(store):
    client, exp = store
    silent = fake_run(client, exp, "RUNNING")
    start = client.get_run(silent).info.start_time / 1000
    assert dead_ids(exp, now=start + tracking.STALE_SECONDS - 1) == []
    assert dead_ids(exp, now=start + tracking.STALE_SECONDS + 1) == [silent]


def test_other_parameters_code_children_superseded_and_self_are_not_chosen(store):
    client, exp = store
    mine = fake_run(client, exp, "FAILED")
    fake_run(client, exp, "FAILED", params={**PARAMS, "seed": "1"})
    fake_run(client, exp, "FAILED", params={k: v for k, v in PARAMS.items() if k != "seed"})  # seed not logged
    fake_run(client, exp, "FAILED", code="0.0.0+0000000000000000")
    fake_run(client, exp, "FAILED", tags={artifacts.CHILD_TAG: "true"})
    fake_run(client, exp, "KILLED", tags={artifacts.SUPERSEDED_BY_TAG: "x" * 32})
    assert dead_ids(exp) == [mine]
    # parameters compare by value, as for reuse: epochs 1 is 1.0
    assert dead_ids(exp, params={**PARAMS, "epochs": "1"}) == [mine]
    assert dead_ids(exp, exclude=[mine]) == []


def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(str(step))
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_checkpoint_local_then_artifacts_then_the_run_it_resumed(store, tmp_path):
    client, exp = store
    local, dst = tmp_path / "local", tmp_path / "dst"
    # on this machine: the newest complete checkpoint; one cut off mid-save (no trainer_state.json) is skipped
    here = fake_run(client, exp, "FAILED")
    checkpoint(local / here, 20)
    checkpoint(local / here, 100)
    checkpoint(local / here, 120, complete=False)
    assert tracking.latest_checkpoint(client.get_run(here), local, dst) == local / here / "checkpoint-100"
    # on another machine: the checkpoint its tag names, from its artifacts
    there = fake_run(client, exp, "KILLED", tags={artifacts.CHECKPOINT_TAG: "checkpoints/checkpoint-40"})
    client.log_artifacts(there, str(checkpoint(tmp_path / "elsewhere", 40)), "checkpoints/checkpoint-40")
    found = tracking.latest_checkpoint(client.get_run(there), local, dst)
    assert found.name == "checkpoint-40" and (found / "model.safetensors").read_text() == "40"
    # died before its first save: the checkpoint it had itself resumed from
    again = fake_run(client, exp, "FAILED", tags={artifacts.RESUMED_FROM_TAG: here})
    assert tracking.latest_checkpoint(client.get_run(again), local, dst) == local / here / "checkpoint-100"
    none = fake_run(client, exp, "FAILED")
    assert tracking.latest_checkpoint(client.get_run(none), local, dst) is None


def test_resume_point_skips_dead_runs_without_checkpoint_and_supersede_tags_both(store, tmp_path):
    client, exp = store
    local = tmp_path / "local"
    older = fake_run(client, exp, "RUNNING", heartbeat=time.time() - tracking.STALE_SECONDS - 60)
    checkpoint(local / older, 60)
    fake_run(client, exp, "FAILED")  # newer, but died before any checkpoint
    new = fake_run(client, exp, "RUNNING", heartbeat=time.time())
    dead, path = tracking.find_resume_point(exp, "finetune", PARAMS, new, local, tmp_path / "dst")
    assert dead.info.run_id == older and path == local / older / "checkpoint-60"
    tracking.supersede(dead, new)
    old_run, new_run = client.get_run(older), client.get_run(new)
    assert old_run.info.status == "FAILED" and old_run.data.tags[artifacts.SUPERSEDED_BY_TAG] == new
    assert new_run.data.tags[artifacts.RESUMED_FROM_TAG] == older
    assert tracking.find_resume_point(exp, "finetune", PARAMS, new, local, tmp_path / "dst") is None


def test_heartbeat_renews_its_tag_while_the_block_runs(store):
    client, exp = store
    run = client.get_run(fake_run(client, exp, "RUNNING"))
    with tracking.heartbeat(run, every=0.2):
        first = float(client.get_run(run.info.run_id).data.tags[artifacts.HEARTBEAT_TAG])  # beats at once
        time.sleep(1.3)
        later = float(client.get_run(run.info.run_id).data.tags[artifacts.HEARTBEAT_TAG])
    assert abs(first - time.time()) < 5 and later >= first + 1


# -- end to end: kill -9 at half way, rerun, same result as without the crash ----------------------------
# 2 languages x 160 examples / batch 4 = 80 steps; a checkpoint every 10
E2E = {"languages": "en,de", "epochs": "1", "examples_per_lang": "160", "test_examples_per_lang": "8", "batch_size": "4",
       "max_seq_len": "32", "log_every": "1", "save_steps": "10", "device": "cpu"}
TOTAL_STEPS = 80


def finetune(source: Path, cwd: Path, store: str, experiment: str, processes: int = 1, **extra: str) -> subprocess.Popen:
    """`python -m entry_points.finetune` from a copy of the code (an edit to the tree mid-test would change
    the code version, and a changed code version is never resumed), in `cwd` (its own machine: its own
    outputs/checkpoints), with a one-second heartbeat that goes stale after three; `processes` > 1 runs it
    under torchrun, in its own process group."""
    argv = [f"--{k}={v}" for k, v in {**E2E, **extra}.items()]
    env = subprocess_env(store, MLFLOW_EXPERIMENT_NAME=experiment, PYTHONPATH=str(source), OMP_NUM_THREADS="1",
                         XLSUB_HEARTBEAT_SECONDS="1", XLSUB_STALE_SECONDS="3")
    cwd.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(free_port())] if processes > 1 else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "entry_points.finetune", *argv], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(cwd / "stderr.log", "w"))


def finished(proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, (cwd / "stderr.log").read_text()[-3000:]


def code_copy(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    for name in ("xlsub", "entry_points"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "MLproject", source / "MLproject")
    return source


def kill_after_half(proc: subprocess.Popen, client: MlflowClient, exp: str, total: int, log: Path):
    """SIGKILL to `proc`'s process group once its run has checkpointed past half of `total` steps; the run,
    which nobody ends, reads RUNNING, and it returns once its heartbeat has gone stale."""
    deadline = time.time() + 240
    while True:
        runs = client.search_runs([exp])
        tag = runs[0].data.tags.get(artifacts.CHECKPOINT_TAG, "") if runs else ""
        if tag and int(tag.rpartition("-")[2]) >= total // 2:
            break
        assert proc.poll() is None and time.time() < deadline, f"no checkpoint past half way: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    launcher = psutil.Process(proc.pid)  # and torchrun's workers, which it starts in sessions of their own
    for process in [launcher, *launcher.children(recursive=True)]:
        process.kill()
    proc.wait()
    (dead,) = client.search_runs([exp])
    assert dead.info.status == "RUNNING"  # nobody ended it
    time.sleep(3.5)  # its heartbeat goes stale
    return dead


def second_id(client: MlflowClient, exp: str, dead) -> str:
    (second,) = [r.info.run_id for r in client.search_runs([exp]) if r.info.run_id != dead.info.run_id]
    return second


def resumed_run(client: MlflowClient, exp: str, dead, total: int):
    """The run that continued `dead`, checked: tags both ways, and it trained only the steps after its checkpoint."""
    dead = client.get_run(dead.info.run_id)
    (resumed,) = [r for r in client.search_runs([exp]) if r.info.run_id != dead.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[artifacts.RESUMED_FROM_TAG] == dead.info.run_id
    assert dead.info.status == "FAILED" and dead.data.tags[artifacts.SUPERSEDED_BY_TAG] == resumed.info.run_id
    at = int(resumed.data.metrics["resumed_at_step"])
    assert at >= total // 2 and at % 10 == 0
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(at + 1, total + 1))
    assert resumed.data.metrics["train_steps"] == total
    return resumed, steps


@pytest.mark.slow
def test_a_run_killed_mid_training_is_resumed_and_ends_as_an_uninterrupted_run(tmp_path):
    start = time.perf_counter()
    source = code_copy(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    exp = client.create_experiment("resume", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_experiment("reference", artifact_location=(tmp_path / "artifacts-ref").as_uri())

    # the uninterrupted reference beside the run to be killed; checkpoints go to artifacts as well, so the
    # rerun can resume on "another machine" (another working folder)
    reference = finetune(source, tmp_path / "ref", store, "reference")
    first = finetune(source, tmp_path / "machine-a", store, "resume", checkpoint_artifacts="true")
    dead = kill_after_half(first, client, exp, TOTAL_STEPS, tmp_path / "machine-a" / "stderr.log")

    second = finetune(source, tmp_path / "machine-b", store, "resume")
    finished(second, tmp_path / "machine-b")
    finished(reference, tmp_path / "ref")
    took = time.perf_counter() - start

    resumed, steps = resumed_run(client, exp, dead, TOTAL_STEPS)
    (ref,) = client.search_runs([client.get_experiment_by_name("reference").experiment_id])
    assert ref.data.metrics["train_steps"] == TOTAL_STEPS
    # and lands where the uninterrupted run lands. CPU training in one thread replays the same arithmetic
    # (masks seeded by batch content, the restored RNG states), but MKL's kernels may take another path
    # for another buffer alignment, so two processes can part in the last bits (1e-6 relative seen once
    # in CI). A wrong RNG state masks other tokens: its per-step losses part far beyond 1e-4.
    for lang in ("en", "de"):
        assert resumed.data.metrics[f"ppl_after.{lang}"] == pytest.approx(ref.data.metrics[f"ppl_after.{lang}"], rel=1e-4), lang
    # the reference's losses after the checkpoint are the resumed run's, step by step
    ref_loss = {m.step: m.value for m in client.get_metric_history(ref.info.run_id, "train_loss")}
    got = {m.step: m.value for m in client.get_metric_history(resumed.info.run_id, "train_loss")}
    assert got == pytest.approx({s: ref_loss[s] for s in steps}, rel=1e-4)
    print(f"kill, resume and reference took {took:.0f} s")


@pytest.mark.slow
def test_resume_under_torchrun_every_rank_continues_from_rank_zeros_checkpoint(tmp_path):
    """Two processes: rank 0 finds the dead run and its checkpoint, the other rank continues from the same."""
    source = code_copy(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    exp = client.create_experiment("resume", artifact_location=(tmp_path / "artifacts").as_uri())
    total, examples = TOTAL_STEPS, str(2 * int(E2E["examples_per_lang"]))  # each process takes its own batch of 4 a step
    first = finetune(source, tmp_path, store, "resume", processes=2, checkpoint_artifacts="true", examples_per_lang=examples)
    dead = kill_after_half(first, client, exp, total, tmp_path / "stderr.log")
    second = finetune(source, tmp_path, store, "resume", processes=2, examples_per_lang=examples)  # the same machine
    finished(second, tmp_path)
    # one checkpoint folder for both ranks, each rank's RNG state in it
    assert not (tmp_path / "outputs" / "checkpoints" / "rank-other").exists()
    (saved,) = (tmp_path / "outputs" / "checkpoints" / second_id(client, exp, dead)).glob("checkpoint-*")
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed, _ = resumed_run(client, exp, dead, total)
    assert resumed.data.params["world_size"] == "2"
    assert all(math.isfinite(resumed.data.metrics[f"ppl_after.{lang}"]) for lang in ("en", "de"))
