"""`python -m xlsub.tracking.gc` (issue 24, case 11), against a throwaway sqlite store: dead RUNNING runs,
orphans without a stage tag included, are marked FAILED with a tag, live ones and the children of live runs
are left alone; local checkpoints of finished runs are deleted and their bytes counted; --dry-run changes
nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, sqlite_store, subprocess_env
from xlsub import artifacts
from xlsub.tracking import gc, liveness
from xlsub.tracking import runs as tracking


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("gc")) as client:
        yield client


@pytest.fixture
def store(database, tmp_path):
    """The module's store, a fresh experiment (named after the test's folder) per test."""
    return database, database.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())


def run(client, exp, status="RUNNING", started=None, beat=None, **tags) -> str:
    made = client.create_run(exp, start_time=int(1000 * (started or time.time())), tags=tags)
    if beat is not None:
        client.set_tag(made.info.run_id, artifacts.HEARTBEAT_TAG, f"{beat:.0f}")
    if status != "RUNNING":
        client.set_terminated(made.info.run_id, status)
    return made.info.run_id


def folder(root: Path, run_id: str, size: int) -> Path:
    path = root / run_id / "checkpoint-5"
    path.mkdir(parents=True)
    (path / "optimizer.pt").write_bytes(b"x" * size)
    (path / "trainer_state.json").write_text("{}")
    return root / run_id


@pytest.fixture
def scene(store, tmp_path):
    """One run of each kind gc tells apart, and checkpoint folders for some."""
    client, exp = store
    old, now = time.time() - 10 * tracking.STALE_SECONDS, time.time()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    ids = {
        "stale": run(client, exp, beat=old, **{artifacts.STAGE_TAG: "prune"}),
        "orphan": run(client, exp, started=old),  # `mlflow run` made it, then conda was missing: no stage tag, no heartbeat
        "gone": run(client, exp, beat=now, **{**liveness.this_process(), artifacts.HEARTBEAT_PID_TAG: str(proc.pid)}),
        "alive": run(client, exp, beat=now, **liveness.this_process()),
        "young": run(client, exp),  # started a moment ago, no heartbeat yet
        "finished": run(client, exp, "FINISHED", **{artifacts.STAGE_TAG: "finetune"}),
        "killed": run(client, exp, "KILLED"),
    }
    ids["child"] = run(client, exp, started=old, **{artifacts.PARENT_TAG: ids["alive"]})  # a subnetwork run of a live prune
    ids["resumed"] = run(client, exp, "FAILED", **{artifacts.SUPERSEDED_BY_TAG: ids["finished"]})
    root = tmp_path / "outputs" / "checkpoints"
    sizes = {"finished": 1000, "resumed": 300, "killed": 50, "alive": 70}
    folders = {name: folder(root, ids[name], size) for name, size in sizes.items()}
    folders["elsewhere"] = folder(root, "0" * 32, 10)  # a run another tracking server knows
    return client, exp, ids, root, folders


def test_gc_marks_dead_runs_failed_and_frees_finished_runs_checkpoints(scene):
    client, exp, ids, root, folders = scene
    report = gc.collect(client, [exp], checkpoints=root)
    assert {run_id for run_id, _ in report.marked} == {ids["stale"], ids["orphan"], ids["gone"]}
    for name in ("stale", "orphan", "gone"):
        found = client.get_run(ids[name])
        assert found.info.status == "FAILED" and "marked FAILED by xlsub.tracking.gc" in found.data.tags[artifacts.GC_TAG], name
    assert "is gone" in client.get_run(ids["gone"]).data.tags[artifacts.GC_TAG]
    for name in ("alive", "young", "child"):
        assert client.get_run(ids[name]).info.status == "RUNNING", name
    # checkpoints: the finished run's and the one a finished run resumed go; a dead run's (resumable) stays
    assert {path for path, _, _ in report.deleted} == {folders["finished"], folders["resumed"]}
    assert not folders["finished"].exists() and not folders["resumed"].exists()
    assert all(folders[name].exists() for name in ("killed", "alive", "elsewhere"))
    assert report.freed == 1000 + 300 + 2 * len("{}")  # the bytes written, counted by hand
    # nothing left to do the second time
    again = gc.collect(client, [exp], checkpoints=root)
    assert again.marked == [] and again.deleted == []


def test_gc_dry_run_changes_nothing(scene):
    client, exp, ids, root, folders = scene
    report = gc.collect(client, [exp], checkpoints=root, dry_run=True)
    assert len(report.marked) == 3 and report.freed == 1304
    assert client.get_run(ids["stale"]).info.status == "RUNNING" and artifacts.GC_TAG not in client.get_run(ids["stale"]).data.tags
    assert all(path.exists() for path in folders.values())


def test_gc_command_prints_what_it_freed(scene, tmp_path, capsys):
    """`python -m xlsub.tracking.gc` as `make gc` runs it, --dry-run (a real process), then for real (in process)."""
    client, _, ids, root, folders = scene
    args = ["--experiment", tmp_path.name, "--checkpoints", str(root)]
    dry = subprocess.run([sys.executable, "-m", "xlsub.tracking.gc", *args, "--dry-run"], env=subprocess_env(client.tracking_uri),
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert dry.returncode == 0, dry.stderr
    assert f"would mark FAILED: run {ids['stale']}" in dry.stdout and "would free 1.3 KB (1304 bytes) in 2 checkpoint folders" in dry.stdout
    assert folders["finished"].exists()
    assert gc.main(args) == 0
    out = capsys.readouterr().out
    assert f"deleted {folders['finished']} (1002 B): finetune run {ids['finished']} FINISHED" in out
    assert f"kept {folders['elsewhere']}: no such run on this tracking server" in out
    assert out.splitlines()[-1] == "freed 1.3 KB (1304 bytes) in 2 checkpoint folders; 3 dead runs marked FAILED"
    assert not folders["finished"].exists()
    assert gc.main(["--experiment", "no-such"]) == 2
    assert capsys.readouterr().err.strip() == "xlsub gc: no experiment named no-such; see `mlflow experiments search`"


def test_size_text():
    assert [gc.size_text(n) for n in (0, 1023, 1536, 22 * 1024**2, 3 * 1024**3)] == ["0 B", "1023 B", "1.5 KB", "22.0 MB", "3.0 GB"]


def test_makefile_has_gc():
    text = (ROOT / "Makefile").read_text()
    assert "\ngc: setup\n\t$(PY) -m xlsub.tracking.gc $(GC_ARGS)\n" in text
