"""Identical stages in flight are computed once (issue 24, case 10), against a throwaway sqlite store in
process: a RUNNING twin with a live heartbeat is waited for and reused; a dead one, or one past the timeout,
is not; of two pipelines claiming the same stage together only the later one waits."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import sqlite_store
from xlsub import artifacts
from xlsub.tracking import liveness, twins
from xlsub.tracking.code_version import code_version

PARAMS = {"finetune_run_id": "f" * 32, "threshold": "1.1", "seeds": "0"}


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
    threading.Timer(3.0, client.set_terminated, (twin, "FINISHED")).start()
    start = time.monotonic()
    found = twins.wait_for_twin(exp, "prune", PARAMS, me, timeout=30, poll=0.1)
    assert found.info.run_id == twin and 2.9 < time.monotonic() - start < 25  # well before the 30 s timeout
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"run {twin}" in line and "waiting for it" in line for line in lines), lines
    assert any("reusing run " + twin in line for line in lines), lines
    # the claim this main made, for later twins of its own
    tags = client.get_run(me).data.tags
    assert tags[artifacts.CLAIM_TAG] == twins.claim_key("prune", PARAMS)


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
    threading.Timer(0.5, client.set_terminated, (twin, "FAILED")).start()
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


def test_the_claim_key_compares_parameters_by_value():
    assert twins.claim_key("prune", {"threshold": "1.1", "seeds": "0"}) == twins.claim_key("prune", {"seeds": "0", "threshold": "1.10"})
    assert twins.claim_key("prune", {"threshold": "1.1"}) != twins.claim_key("prune", {"threshold": "1.2"})
    assert twins.claim_key("prune", {"threshold": "1.1"}) != twins.claim_key("encode", {"threshold": "1.1"})
