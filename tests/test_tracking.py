"""Run resolution and reuse rules, against a throwaway sqlite store."""

import dataclasses

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


def test_resolve_run_refuses_a_deleted_run_and_names_the_experiment_latest_searched(client):
    """Issue 24, cases 1, 6 and 8: a deleted run is refused by ID in one line; `latest` names the experiment
    it searched and how to pick another; the wrong-stage line reads `an encode run`; quotes are stripped."""
    finetune = make_run(client, "finetune", {})
    encode = make_run(client, "encode", {})
    assert tracking.resolve_run("finetune_run_id", f"' {finetune} '", "finetune").info.run_id == finetune  # as `mlflow run` logs it
    client.delete_run(finetune)
    with pytest.raises(XlsubError, match=f"^finetune_run_id: run {finetune} is deleted; restore it .*or pass another finetune run ID or 'latest'$"):
        tracking.resolve_run("finetune_run_id", finetune, "finetune")
    with pytest.raises(XlsubError, match="^finetune_run_id: no FINISHED finetune run in experiment 'Default' \\(ID 0\\); .*--experiment-name"):
        tracking.resolve_run("finetune_run_id", "latest", "finetune")  # the deleted run is skipped
    with pytest.raises(XlsubError, match=f"^prune_run_id: run {encode} is an encode run, not a prune run; pass a prune run ID$"):
        tracking.resolve_run("prune_run_id", encode, "prune")
    with pytest.raises(XlsubError, match=f"^encode_run_id: run {finetune} is deleted"):
        tracking.resolve_run("encode_run_id", finetune, "encode")  # deleted comes before the wrong stage


def test_a_main_run_that_reuses_every_stage_shows_its_pipeline(client):
    """Issue 24, case 4: a main run whose every stage is reused still links the stage runs by ID in its
    description (the run note) and carries the analyze run's verdict metrics (and no other of its metrics)."""
    from dataclasses import replace

    from entry_points import main as pipeline

    args = pipeline.MainArgs()
    ids = {}
    for stage in pipeline.STAGE_ARGS:
        ids[stage] = make_run(client, stage, replace(args.stage_args(stage), **args.stage_inputs(stage, ids)).reuse_params())
    client.log_metric(ids["analyze"], "verdict.specificity.value", 0.25)
    client.log_metric(ids["analyze"], "verdict.specificity.p", 1 / 256)
    client.log_metric(ids["analyze"], "mean_jaccard", 0.5)
    pipeline.main([])
    (run,) = client.search_runs(["0"], f"tags.`{tracking.STAGE_TAG}` = 'main'")
    assert run.info.status == "FINISHED" and run.data.tags["xlsub.reused"] == "finetune,prune,neurons,encode,analyze"
    note = run.data.tags["mlflow.note.content"]
    for stage, run_id in ids.items():
        assert f"- {stage}: [{run_id}](#/experiments/0/runs/{run_id}) (reused)" in note
    assert run.data.metrics == {"verdict.specificity.value": 0.25, "verdict.specificity.p": 1 / 256}


def test_a_run_id_mlflow_run_logged_with_quotes_is_read_without_them(client, monkeypatch, caplog):
    """Issue 24, case 6: `mlflow run -P finetune_run_id=" <id> "` logs `' <id> '` before xlsub runs (MLflow's
    params cannot change). xlsub says which value it reads, logs no second copy, and resolves the run."""
    import logging
    from dataclasses import dataclass

    finetune = make_run(client, "finetune", {})

    @dataclass
    class Args:
        finetune_run_id: str = finetune  # as StageArgs normalises ` <id> `

        def validate(self):
            pass

    run = client.create_run("0").info.run_id
    client.log_param(run, "finetune_run_id", f"' {finetune} '")  # what `mlflow run` logs for " <id> "
    monkeypatch.setenv("MLFLOW_RUN_ID", run)
    with caplog.at_level(logging.WARNING, logger=tracking.__name__), tracking.stage_run("prune", Args()):
        assert tracking.resolve_run("finetune_run_id", client.get_run(run).data.params["finetune_run_id"], "finetune").info.run_id == finetune
    assert f"prune: `mlflow run` stored finetune_run_id as typed; xlsub reads it as '{finetune}'" in caplog.text
    assert client.get_run(run).info.status == "FINISHED"


def test_a_stage_that_crashes_fails_its_run_with_one_error_line(client):
    """Issue 24, case 7: an unexpected exception (a bug, not bad input) fails the run with the `xlsub.error` tag
    that bad input gets: one line with the exception's type, its message (lines joined) and the frame that
    raised it. The exception still propagates with its traceback."""
    from xlsub import artifacts

    @dataclasses.dataclass
    class Args:
        def validate(self):
            pass

    def load_checkpoint():
        raise RuntimeError("PytorchStreamReader failed reading zip archive:\n  failed finding central directory")

    with pytest.raises(RuntimeError, match="^PytorchStreamReader"), tracking.stage_run("finetune", Args()) as run:
        load_checkpoint()
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED"
    line = load_checkpoint.__code__.co_firstlineno + 1  # the raise
    assert ended.data.tags[artifacts.ERROR_TAG] == ("RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
                                                    f"directory (at tests/test_tracking.py:{line} in load_checkpoint)")
    assert "\n" not in ended.data.tags[artifacts.ERROR_TAG]
