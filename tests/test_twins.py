"""Identical stages in flight are computed once (issue 24, case 10), against a throwaway sqlite store in
process: a RUNNING twin with a live heartbeat is waited for and reused; a dead one, or one past the timeout,
is not; of two pipelines claiming the same stage together only the later one waits; no claim is left on a
main run. End to end (slow): two identical pipelines started together against a real tracking server."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_PIPELINE, mlflow_run, runs_of, sqlite_store, stage_ids
from xlsub import artifacts
from xlsub.tracking import liveness, twins
from xlsub.tracking.code_version import code_version

PARAMS = {"finetune_run_id": "f" * 32, "threshold": "1.1", "seeds": "0"}
# the end-to-end test's analyze needs no intervals worth reading: a few resamples keep it short
FEW_RESAMPLES = {"random_draws": "1", "use_random": "false", "bootstrap": "20", "permutations": "20", "cka_permutations": "20",
                 "subnetwork_permutations": "10", "length_permutations": "20", "power_draws": "2"}


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("twins")) as client:
        yield client


@pytest.fixture
def store(database, tmp_path):
    return database, database.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())


def live_run(client, exp, stage: str, params=None, **tags) -> str:
    """A RUNNING run beating now from this process (so alive), with `stage`'s tags and `params`."""
    run = client.create_run(exp, tags={artifacts.STAGE_TAG: stage, artifacts.CODE_TAG: code_version(stage),
                                       artifacts.HEARTBEAT_TAG: f"{time.time():.0f}", **liveness.this_process(), **tags})
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    time.sleep(0.01)
    return run.info.run_id


def test_a_running_twin_is_waited_for_and_reused_once_it_finishes(store, caplog):
    caplog.set_level(logging.INFO, logger="xlsub.tracking.twins")
    client, exp = store
    twin = live_run(client, exp, "prune", PARAMS)
    me = live_run(client, exp, "main")
    waiting = {}

    def finish():
        waiting.update(client.get_run(me).data.tags)
        client.set_terminated(twin, "FINISHED")

    threading.Timer(3.0, finish).start()
    start = time.monotonic()
    found = twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=30, poll=0.1)
    assert found.info.run_id == twin and 2.9 < time.monotonic() - start < 25  # well before the 30 s timeout
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"run {twin}" in line and "waiting for it" in line for line in lines), lines
    assert any("reusing run " + twin in line for line in lines), lines
    # while it waited, the claim this main made, for later twins of its own; once it reuses, none (issue 24: no stale claim)
    assert waiting[artifacts.CLAIM_TAG] == twins.claim_key("prune", PARAMS) and artifacts.CLAIM_TIME_TAG in waiting
    assert not {artifacts.CLAIM_TAG, artifacts.CLAIM_TIME_TAG} & client.get_run(me).data.tags.keys()


def test_a_twin_that_finishes_between_two_looks_is_reused_not_computed_again(store, monkeypatch):
    """The twin finishes right after a look for finished runs: the next look, for running twins, no longer
    sees it. That is no twin that ended without finishing: it is reused, not computed a second time."""
    client, exp = store
    twin = live_run(client, exp, "prune", PARAMS)
    me = live_run(client, exp, "main")
    find_reusable = twins.tracking.find_reusable

    def look_then_finish(*args, **kwargs):
        found = find_reusable(*args, **kwargs)
        if client.get_run(twin).info.status == "RUNNING":
            client.set_terminated(twin, "FINISHED")
        return found

    monkeypatch.setattr(twins.tracking, "find_reusable", look_then_finish)
    found = twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=30, poll=0.1)
    assert found is not None and found.info.run_id == twin


def test_other_parameters_or_a_dead_twin_are_not_waited_for(store):
    client, exp = store
    live_run(client, exp, "prune", {**PARAMS, "threshold": "1.2"})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    live_run(client, exp, "prune", PARAMS, **{artifacts.HEARTBEAT_PID_TAG: str(proc.pid)})  # killed a moment ago, fresh heartbeat
    me = live_run(client, exp, "main")
    start = time.monotonic()
    assert twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=30, poll=0.1) is None
    assert time.monotonic() - start < 25  # no wait for the 30 s timeout


def test_a_twin_that_does_not_finish_in_time_is_computed_here(store, caplog):
    client, exp = store
    twin = live_run(client, exp, "prune", PARAMS)
    me = live_run(client, exp, "main")
    start = time.monotonic()
    assert twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=0.5, poll=0.1) is None
    assert 0.5 <= time.monotonic() - start < 10
    assert any(f"run {twin} has not finished after" in r.getMessage() for r in caplog.records)


def test_a_twin_that_fails_is_computed_here(store, caplog):
    client, exp = store
    twin = live_run(client, exp, "prune", PARAMS)
    me = live_run(client, exp, "main")
    threading.Timer(2.0, client.set_terminated, (twin, "FAILED")).start()  # after the claim has settled: it waits, then sees it fail
    assert twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=30, poll=0.1) is None
    assert any(f"twin run {twin} ended without finishing it" in r.getMessage() for r in caplog.records)


def test_two_pipelines_claiming_together_break_the_tie_by_claim_time_then_run_id(store):
    client, exp = store
    a, b = live_run(client, exp, "main"), live_run(client, exp, "main")
    first, second = sorted([a, b])
    at = time.time()
    twins.claim(second, "prune", PARAMS, at=at)
    twins.claim(first, "prune", PARAMS, at=at)  # the same instant: the smaller run ID goes first
    assert twins.ahead(exp, "prune", PARAMS, first) == []
    assert [r.info.run_id for r in twins.ahead(exp, "prune", PARAMS, second)] == [first]
    # an earlier claim goes first whatever the run IDs
    twins.claim(second, "prune", PARAMS, at=at - 1)
    assert twins.ahead(exp, "prune", PARAMS, second) == []
    assert [r.info.run_id for r in twins.ahead(exp, "prune", PARAMS, first)] == [second]
    # a claim of another stage, or of other parameters, is no twin
    twins.claim(second, "prune", {**PARAMS, "seeds": "1"}, at=at - 1)
    assert twins.ahead(exp, "prune", PARAMS, first) == []


def test_a_claim_stamped_earlier_that_arrives_late_is_still_seen(store, caplog, monkeypatch):
    """A claim is stamped before it reaches the server: one stamped before this main's own claim but written
    just after it must still put the other main first (the claim settles before the first look), else both compute."""
    caplog.set_level(logging.INFO, logger="xlsub.tracking.twins")
    client, exp = store
    other, me = live_run(client, exp, "main"), live_run(client, exp, "main")
    stamped = time.time()

    class Clock:
        """`time` as wait_for_twin sees it: the other main's claim lands while it first sleeps."""

        landed = False

        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            if not self.landed:
                self.landed = True
                twins.claim(other, "prune", PARAMS, at=stamped)
            time.sleep(seconds)

    monkeypatch.setattr(twins, "time", Clock())
    assert twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=2, poll=0.1) is None  # the other never computes it here
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"run {other}" in line and "waiting for it" in line for line in lines), lines
    assert any(f"run {other} has not finished after 2 s" in line for line in lines), lines


def test_the_claim_key_compares_parameters_by_value():
    assert twins.claim_key("prune", {"threshold": "1.1", "seeds": "0"}) == twins.claim_key("prune", {"seeds": "0", "threshold": "1.10"})
    assert twins.claim_key("prune", {"threshold": "1.1"}) != twins.claim_key("prune", {"threshold": "1.2"})
    assert twins.claim_key("prune", {"threshold": "1.1"}) != twins.claim_key("encode", {"threshold": "1.1"})


@pytest.mark.parametrize("ending", ["finished", "crashed", "refused"])
def test_a_main_run_that_computes_a_stage_keeps_its_claim_until_it_ends(store, monkeypatch, ending):
    """The claim of a main that computes the stage holds while it computes (a later twin waits for it), and is
    gone from the run's page once the run ends, however it ends."""
    from xlsub.errors import XlsubError
    from xlsub.tracking import runs as tracking

    client, exp = store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)

    @dataclasses.dataclass
    class Args:
        def validate(self):
            pass

    with contextlib.suppress(RuntimeError, SystemExit), tracking.stage_run("main", Args()) as run:
        me = run.info.run_id
        assert twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=5, poll=0.1) is None  # no twin: it computes
        assert client.get_run(me).data.tags[artifacts.CLAIM_TAG] == twins.claim_key("prune", PARAMS)
        later = live_run(client, exp, "main")
        twins.claim(later, "prune", PARAMS)
        assert [r.info.run_id for r in twins.ahead(exp, "prune", PARAMS, later)] == [me]  # a later twin waits for it
        if ending == "crashed":
            raise RuntimeError("a bug")
        if ending == "refused":
            raise XlsubError("threshold: bad")
    ended = client.get_run(me)
    assert ended.info.status == ("FINISHED" if ending == "finished" else "FAILED")
    assert not {artifacts.CLAIM_TAG, artifacts.CLAIM_TIME_TAG} & ended.data.tags.keys(), ended.data.tags


@pytest.mark.slow
def test_two_identical_pipelines_started_together_compute_each_stage_once(tracking_server, monkeypatch):
    """Issue 24, case 10, as a user meets it: two `mlflow run` of main with the same parameters, started
    together on one tracking server. Each stage runs once (one run of it in the experiment, FINISHED); for
    each stage one main computed it and the other reused it, said so, and neither keeps a claim."""
    experiment = "xlsub-twins"
    client = MlflowClient(tracking_server)
    client.create_experiment(experiment)  # both would create it otherwise, and the second to ask would fail
    monkeypatch.setenv("XLSUB_TWIN_POLL_SECONDS", "1")  # the waiting main sees a finished stage within a second
    params = {**SMALL_PIPELINE, **FEW_RESAMPLES, "units": "heads"}  # the neurons stage is one more twin like the others
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: mlflow_run(tracking_server, "main", params, experiment=experiment), range(2)))
    mains = runs_of(tracking_server, experiment, "main")
    assert len(mains) == 2 and all(run.info.status == "FINISHED" for run in mains)
    ids = stage_ids(mains[0])
    assert stage_ids(mains[1]) == ids
    for stage, run_id in ids.items():
        (run,) = [r for r in runs_of(tracking_server, experiment, stage) if r.data.tags.get(artifacts.CHILD_TAG) != "true"]
        assert run.info.run_id == run_id and run.info.status == "FINISHED", stage
        reused_by = [main for main in mains if stage in main.data.tags[artifacts.REUSED_TAG].split(",")]
        assert len(reused_by) == 1, stage  # the other main computed it: the stage run is its child
        (computed_by,) = [main for main in mains if main is not reused_by[0]]
        assert run.data.tags[artifacts.PARENT_TAG] == computed_by.info.run_id, stage
    logs = "".join(proc.stderr for proc in procs)
    assert "is computing the same stage with the same parameters and code; waiting for it" in logs
    for main in mains:
        assert not {artifacts.CLAIM_TAG, artifacts.CLAIM_TIME_TAG} & main.data.tags.keys(), main.data.tags
