"""Run resolution and reuse rules, against a throwaway sqlite store."""

import pytest

from tests.conftest import sqlite_store
from xlsub.errors import XlsubError
from xlsub.tracking import runs as tracking


@pytest.fixture()
def client(tmp_path):
    with sqlite_store(tmp_path) as client:
        yield client


def make_run(client, stage, params, status="FINISHED", code=None, child=False):
    tags = {tracking.STAGE_TAG: stage, tracking.CODE_TAG: code or tracking.code_version(stage)}
    if child:
        tags[tracking.CHILD_TAG] = "true"
    run = client.create_run("0", tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_same_value_compares_by_value_not_spelling():
    assert tracking.same_value("1", 1.0) and tracking.same_value("0.10", "0.1") and tracking.same_value("True", "true")
    assert tracking.same_value("''", "")  # how `mlflow run` logs an empty -P value
    assert not tracking.same_value("1.1", "1.2") and not tracking.same_value("en,de", "en")


def test_find_reusable_rules(client):
    params = {"threshold": "1.1", "seeds": "0", "finetune_run_id": "abc"}
    assert tracking.find_reusable("0", "prune", params) is None
    make_run(client, "prune", {"threshold": "1.1", "seeds": "0", "finetune_run_id": "abc"}, status="FAILED")
    make_run(client, "prune", {"threshold": "1.1", "seeds": "0", "finetune_run_id": "abc"}, status="KILLED")
    make_run(client, "prune", {"threshold": "1.1", "seeds": "0", "finetune_run_id": "abc"}, code="0.0.0+old")
    make_run(client, "prune", {"threshold": "1.1", "seeds": "0", "finetune_run_id": "abc"}, child=True)
    make_run(client, "prune", {"threshold": "1.1", "seeds": "0", "finetune_run_id": "xyz"})
    assert tracking.find_reusable("0", "prune", params) is None  # none of those may be reused
    good = make_run(client, "prune", {"threshold": "1.10", "seeds": "0", "finetune_run_id": "abc", "extra": "x"})
    assert tracking.find_reusable("0", "prune", params).info.run_id == good
    assert tracking.find_reusable("0", "finetune", params) is None


def test_resolve_run_refuses_wrong_stage_unfinished_child_and_missing(client):
    finished = make_run(client, "finetune", {})
    running = client.create_run("0", tags={tracking.STAGE_TAG: "finetune"}).info.run_id
    child = make_run(client, "finetune", {}, child=True)
    prune = make_run(client, "prune", {})
    assert tracking.resolve_run("finetune_run_id", "latest", "finetune").info.run_id == finished  # children are skipped
    assert tracking.resolve_run("finetune_run_id", finished, "finetune").info.run_id == finished
    assert tracking.resolve_run("finetune_run_id", f" {finished} ", "finetune").info.run_id == finished  # pasted with spaces
    for value, fragment in [(running, "RUNNING"), (child, "child"), (prune, "a prune run"), ("f" * 32, "no run")]:
        with pytest.raises(XlsubError, match=f"^finetune_run_id: .*{fragment}"):
            tracking.resolve_run("finetune_run_id", value, "finetune")
    with pytest.raises(XlsubError, match="^encode_run_id: no FINISHED encode run"):
        tracking.resolve_run("encode_run_id", "latest", "encode")
