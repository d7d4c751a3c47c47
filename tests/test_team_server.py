"""A team's tracking server: `mlflow server --app-name basic-auth` over PostgreSQL with a proxied artifact
store (tests/team_server.py). Nobody without a login writes to it, the small pipeline runs on it with a
user's credentials, and four prune runs logging at once lose nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from entry_points.prune import PruneArgs
from tests.conftest import PIPELINE_EXPERIMENT, SMALL_PIPELINE, main_run, mlflow_run, stage_ids
from tests.team_server import auth_server, postgres, postgres_bin
from xlsub.artifacts import input_tag

pytestmark = pytest.mark.slow

USER = ("alice", "alice-password-for-tests")  # runs the pipeline; owns its experiment
READER = ("bob", "bob-password-for-tests")  # a colleague: default_permission = READ
THRESHOLDS = ("1.2", "1.3", "1.4", "1.5")  # the pipeline's prune has 1.1: four new runs, none reused


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """The server, its users made through the auth REST API by the admin, and the user's credentials in
    the environment (of this process and of every `mlflow run` it starts) while the module runs."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: `make postgres` (or `apt-get install postgresql`) installs it")
    folder = tmp_path_factory.mktemp("team")
    with postgres(bin_dir) as pg, auth_server(pg, folder) as server, pytest.MonkeyPatch.context() as env:
        for user in (USER, READER):
            made = requests.post(f"{server.url}/api/2.0/mlflow/users/create", json=dict(zip(("username", "password"), user)),
                                 auth=server.admin, timeout=30)
            assert made.status_code == 200, made.text
        env.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
        env.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
        experiment_id = MlflowClient(server.url).create_experiment(PIPELINE_EXPERIMENT)
        yield {"url": server.url, "experiment_id": experiment_id, "artifacts": folder / "artifacts"}


# The small pipeline with the fewest resamples that still run every code path: this test is about the
# server, not the statistics
TEAM_PIPELINE = {**SMALL_PIPELINE, "languages": "en,de", "random_draws": "1", "bootstrap": "20", "continue_to": "0",
                 "log_stock_models": "false", "permutations": "20", "cka_permutations": "20", "subnetwork_permutations": "10",
                 "length_permutations": "10", "units": "heads"}


@pytest.fixture(scope="module")
def team_pipeline(team_server):
    run, _ = main_run(team_server["url"], TEAM_PIPELINE)
    return run


@pytest.fixture(scope="module")
def concurrent_prunes(team_server, team_pipeline):
    """Four `mlflow run . -e prune` at once on the pipeline's finetune run, with its prune's parameters but
    the threshold; their parent runs by threshold."""
    own = MlflowClient(team_server["url"]).get_run(stage_ids(team_pipeline)["prune"])
    params = {f.name: own.data.params[f.name] for f in fields(PruneArgs)}
    with ThreadPoolExecutor(len(THRESHOLDS)) as pool:
        list(pool.map(lambda t: mlflow_run(team_server["url"], "prune", {**params, "threshold": t}, experiment=PIPELINE_EXPERIMENT),
                      THRESHOLDS))
    runs = MlflowClient(team_server["url"]).search_runs([team_server["experiment_id"]], "tags.`xlsub.stage` = 'prune'")
    parents = [r for r in runs if r.data.tags.get("xlsub.child") != "true"]  # a search for `!= 'true'` skips runs without the tag
    return {"own": own, "parents": {p.data.params["threshold"]: p for p in parents if p.data.params["threshold"] in THRESHOLDS}}


def create_run(url: str, experiment_id: str, auth) -> requests.Response:
    return requests.post(f"{url}/api/2.0/mlflow/runs/create", json={"experiment_id": experiment_id}, auth=auth, timeout=30)


def test_no_run_without_a_login_and_none_for_a_reader(team_server):
    url, experiment_id = team_server["url"], team_server["experiment_id"]
    client = MlflowClient(url)
    before = len(client.search_runs([experiment_id]))
    assert create_run(url, experiment_id, None).status_code == 401  # anonymous
    assert create_run(url, experiment_id, (USER[0], "not-" + USER[1])).status_code == 401  # a wrong password
    assert create_run(url, experiment_id, READER).status_code == 403  # logged in, may read but not write here
    read = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id]}, auth=READER, timeout=30)
    assert read.status_code == 200
    assert len(client.search_runs([experiment_id])) == before


def test_the_pipeline_runs_on_the_team_server(team_server, team_pipeline):
    client = MlflowClient(team_server["url"])
    assert team_pipeline.info.status == "FINISHED"
    for stage, run_id in stage_ids(team_pipeline).items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == team_pipeline.info.run_id, stage
        # artifacts go through the server into its --artifacts-destination, not to the client's disk
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), stage
    stored = Path(team_server["artifacts"], team_server["experiment_id"], stage_ids(team_pipeline)["analyze"], "artifacts", "report.html")
    assert stored.is_file()


def test_four_prune_runs_at_once_lose_nothing(team_server, concurrent_prunes):
    client = MlflowClient(team_server["url"])
    own, parents = concurrent_prunes["own"], concurrent_prunes["parents"]
    assert sorted(parents) == sorted(THRESHOLDS)

    def children(run) -> dict:
        found = client.search_runs([team_server["experiment_id"]], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        return {c.data.tags["xlsub.subnetwork"]: c for c in found}

    def artifacts(run) -> set[str]:
        return {f.path for f in client.list_artifacts(run.info.run_id)}

    own_children = children(own)
    assert sorted(own_children) == ["de-s0", "en-s0"]
    for threshold, parent in parents.items():
        assert parent.info.status == "FINISHED", threshold
        assert parent.data.tags[input_tag("finetune")] == own.data.tags[input_tag("finetune")], threshold
        assert set(parent.data.metrics) == set(own.data.metrics), threshold
        assert artifacts(parent) == artifacts(own), threshold
        got = children(parent)
        assert sorted(got) == sorted(own_children), threshold
        for sid, child in got.items():
            assert child.info.status == "FINISHED", (threshold, sid)
            assert set(child.data.metrics) == set(own_children[sid].data.metrics), (threshold, sid)
            assert child.data.params["threshold"] == threshold
    assert not client.search_runs([team_server["experiment_id"]], "attributes.status = 'RUNNING'")
