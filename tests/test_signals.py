"""Stopping: SIGTERM, SIGHUP and SIGINT mark a stage's run and its open child runs KILLED and end the
process within 10 s (`xlsub.tracking.interrupts`, `tracking.stage_run`); an unreachable tracking server is refused
in seconds."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, sqlite_store, subprocess_env
from xlsub.artifacts import CHILD_TAG, STAGE_TAG
from xlsub.tracking import interrupts
from xlsub.tracking import runs as tracking

DEAD_URI = "http://127.0.0.1:9"  # the discard port: nothing listens there


@dataclass
class TinyArgs:
    n: int = 1

    def validate(self) -> None:
        pass


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    with sqlite_store(tmp_path) as client:
        experiment = client.create_experiment("signals", artifact_location=(tmp_path / "artifacts").as_uri())
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)  # not mlflow.set_experiment: it leaves the variable set for later subprocesses
        yield mlflow.get_tracking_uri(), experiment


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_process_marks_the_run_and_its_open_child_killed(local_store, signum):
    uri, experiment = local_store
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    with pytest.raises(SystemExit) as stopped:
        with tracking.stage_run("prune", TinyArgs()) as run:
            parent = run.info.run_id
            with tracking.child_run(parent, experiment, "prune/en-s0", {CHILD_TAG: "true"}) as done:
                pass
            with pytest.raises(RuntimeError), tracking.child_run(parent, experiment, "prune/zh-s0", {CHILD_TAG: "true"}) as failed:
                raise RuntimeError("failed before the signal")
            with tracking.child_run(parent, experiment, "prune/de-s0", {CHILD_TAG: "true"}) as open_child:
                start = time.monotonic()
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises in here
                pytest.fail("the signal did not stop the stage")
    elapsed = time.monotonic() - start
    interrupts.disarm()  # this process goes on: no forced exit, collected as usual
    gc.unfreeze()
    assert stopped.value.code == 128 + signum
    assert elapsed < 2
    client = MlflowClient(uri)
    status = {r: client.get_run(r).info.status for r in (parent, done.info.run_id, failed.info.run_id, open_child.info.run_id)}
    assert status == {parent: "KILLED", done.info.run_id: "FINISHED", failed.info.run_id: "FAILED", open_child.info.run_id: "KILLED"}
    assert client.get_run(parent).data.tags[STAGE_TAG] == "prune"
    assert {s: signal.getsignal(s) for s in interrupts.SIGNALS} == before  # handlers restored
    assert mlflow.active_run() is None


def test_a_handler_installed_before_is_left_in_place():
    """xlsub.tracking.fanout's SIGTERM handler under torchrun (another rank died: FAILED) keeps SIGTERM."""
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with interrupts.stopping():
            assert signal.getsignal(signal.SIGTERM) is mine
            assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def _alive(pgid: int) -> list[int]:
    """Processes of group `pgid` that still run (zombies left unreaped by PID 1 do not count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def signal_once_a_child_runs(proc: subprocess.Popen, client: MlflowClient, experiment: str, log: Path, send, wait: float = 600,
                             running_filter: str = f"tags.`{CHILD_TAG}` = 'true' and attributes.status = 'RUNNING'"):
    """Wait until a run of `experiment` matches `running_filter` (by default: a child run is RUNNING),
    `send(proc)` a signal, and time how long `proc` takes to exit (SIGKILL to its group after 15 s, or on
    any failure). Returns the runs seen running and the seconds to exit."""
    try:
        deadline, running = time.time() + wait, []
        while not running:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            running = client.search_runs([experiment], running_filter)
            time.sleep(0.1)
        start = time.monotonic()
        send(proc)
        while _alive(proc.pid) and time.monotonic() - start < 15:
            time.sleep(0.05)
        return running, time.monotonic() - start
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_sigterm_to_mlflow_run_prune_marks_parent_and_children_killed(store, finetune_run, tmp_path):
    """`mlflow run . -e prune` as a user starts it, its process group sent SIGTERM while a child run is open."""
    client = MlflowClient(store)
    experiment = client.create_experiment("xlsub-signals", artifact_location=(tmp_path / "artifacts").as_uri())
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "prune", "--env-manager", "local", "--experiment-name", "xlsub-signals",
           "-P", f"finetune_run_id={finetune_run.info.run_id}", "-P", "seeds=0,1,2,3", "-P", "device=cpu"]
    with open(tmp_path / "prune.log", "w") as log:
        proc = subprocess.Popen(cmd, env=subprocess_env(store), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running, elapsed = signal_once_a_child_runs(proc, client, experiment, tmp_path / "prune.log",
                                                    lambda p: os.killpg(p.pid, signal.SIGTERM))
    output = (tmp_path / "prune.log").read_text()
    assert elapsed < 10, output[-3000:]
    runs = client.search_runs([experiment], f"tags.`{STAGE_TAG}` = 'prune'")
    (parent,) = [r for r in runs if r.data.tags.get(CHILD_TAG) != "true"]
    children = [r for r in runs if r.data.tags.get(CHILD_TAG) == "true"]
    assert parent.info.status == "KILLED", output[-3000:]
    assert client.get_run(running[0].info.run_id).info.status == "KILLED"
    assert not [r.info.run_name for r in children if r.info.status not in ("FINISHED", "KILLED")], output[-3000:]
    print(f"stopped in {elapsed:.2f} s; children: {sorted((r.info.run_name, r.info.status) for r in children)}")


def test_an_entry_point_refuses_a_dead_tracking_server_in_seconds(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "entry_points.prune"], env=subprocess_env(DEAD_URI), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert lines == [lines[-1]] and lines[-1].startswith("xlsub prune: MLFLOW_TRACKING_URI:"), proc.stderr
    assert DEAD_URI in lines[-1] and "Traceback" not in proc.stderr
    assert elapsed < 15


MAKEFILE_ENV = {}
for line in (ROOT / "Makefile").read_text().splitlines():
    if line.startswith("export MLFLOW_HTTP_REQUEST_"):
        name, _, value = line[len("export "):].partition("?=")
        MAKEFILE_ENV[name.strip()] = value.strip()


@pytest.mark.slow
def test_mlflow_run_with_the_makefile_settings_gives_up_on_a_dead_server_in_30_s(tmp_path):
    assert set(MAKEFILE_ENV) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "prune", "--env-manager", "local"],
                          env=subprocess_env(DEAD_URI, **MAKEFILE_ENV), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 30, (elapsed, proc.stderr[-2000:])
    print(f"mlflow run gave up after {elapsed:.1f} s")


@pytest.mark.slow
def test_sigterm_to_main_alone_stops_the_running_stage_and_marks_both_killed(store, tmp_path):
    """SIGTERM to the `main` process only (not its group): main passes it to the finetune stage it runs,
    signalled once that stage has logged its first training loss (it has 30 epochs to go).

    main is started as `python -m entry_points.main`: under `mlflow run`, MLflow's launcher marks the run
    FAILED once main has exited, whatever main marked (mlflow 3.17 `_maybe_set_run_terminated` compares
    a status string to integers), unless the launcher got the signal too (a process group's SIGTERM)."""
    from tests.conftest import SMALL_PIPELINE

    client = MlflowClient(store)
    experiment = client.create_experiment("xlsub-signals-main", artifact_location=(tmp_path / "artifacts").as_uri())
    cmd = [sys.executable, "-m", "entry_points.main"]
    for key, value in {**SMALL_PIPELINE, "epochs": "30"}.items():
        cmd += [f"--{key}", value]
    training = f"tags.`{STAGE_TAG}` = 'finetune' and attributes.status = 'RUNNING' and metrics.train_loss > -1"
    with open(tmp_path / "main.log", "w") as log:
        proc = subprocess.Popen(cmd, env=subprocess_env(store, MLFLOW_EXPERIMENT_ID=experiment), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        running, elapsed = signal_once_a_child_runs(proc, client, experiment, tmp_path / "main.log",
                                                    lambda p: os.kill(p.pid, signal.SIGTERM), wait=600, running_filter=training)
    output = (tmp_path / "main.log").read_text()
    assert elapsed < 10, output[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM
    runs = {r.info.run_id: r for r in client.search_runs([experiment], "")}
    by_stage = {r.data.tags.get(STAGE_TAG): r for r in runs.values()}
    assert set(by_stage) == {"main", "finetune"}, output[-3000:]  # no stage after the stopped one
    assert by_stage["main"].info.status == "KILLED", output[-3000:]
    assert by_stage["finetune"].info.status == "KILLED" and by_stage["finetune"].info.run_id == running[0].info.run_id
    assert "train_steps" not in by_stage["finetune"].data.metrics  # stopped in training, not after it
    print(f"main stopped in {elapsed:.2f} s")
