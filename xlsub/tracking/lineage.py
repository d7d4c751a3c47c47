"""Lineage: which runs a stage reads, found by run ID on the tracking server, and what they made.

A stage names its inputs by run-ID parameters (`xlsub.stages`); each value is a run ID or `latest`.
Explicit IDs are resolved first; a `latest` input that an explicit input run was made from means that
run (an explicit encode run fixes its prune run), otherwise the newest FINISHED run of the stage. The
runs must form one lineage: an input run tagged as made from another stage's run must have been made
from the one resolved. Upstream stages that are not parameters (analyze's finetune run) are followed
through the input runs' tags. What an upstream run made is read from its manifest, never from its
parameters or its stage's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.entities import Run

from xlsub import artifacts, stages
from xlsub.artifacts import SubnetworkId
from xlsub.errors import XlsubError
from xlsub.tracking import runs as tracking


def resolve_inputs(stage: str, values: Mapping[str, str]) -> dict[str, Run]:
    """{upstream stage: its FINISHED run} for every stage in `stage`'s lineage, in registry order.
    `values` holds the stage's run-ID parameters as given (a run ID or `latest`; `none` for an optional
    input the stage goes without)."""
    declared = stages.get(stage)
    inputs = {p: s for p, s in declared.inputs.items() if not (p in declared.optional and values.get(p, "none") == "none")}
    runs: dict[str, Run] = {}
    params: dict[str, str] = {}  # upstream stage -> the parameter that named its run, for messages
    explicit = [p for p in inputs if values[p] != "latest"]
    for param in explicit + [p for p in inputs if p not in explicit]:
        upstream = inputs[param]
        value = values[param]
        if value == "latest":
            made_from = [r.data.tags.get(artifacts.input_tag(upstream)) for p, r in _named(runs, params, explicit)]
            value = next((run_id for run_id in made_from if run_id), "latest")
        runs[upstream] = tracking.resolve_run(param, value, upstream)
        params[upstream] = param
    for upstream, param in list(params.items()):  # follow the input runs' own lineage
        for further in stages.lineage(upstream):
            run_id = runs[upstream].data.tags.get(artifacts.input_tag(further))
            if not run_id:
                raise XlsubError(f"{param}: {upstream} run {runs[upstream].info.run_id} has no tag {artifacts.input_tag(further)}; rerun {upstream}")
            if further not in runs:
                runs[further] = tracking.resolve_run(f"{param} ({further} run {run_id})", run_id, further)
                params[further] = param
    _check_one_lineage(runs, params, list(inputs))
    return {name: runs[name] for name in stages.names() if name in runs}


def _named(runs: Mapping[str, Run], params: Mapping[str, str], explicit: list[str]):
    return [(p, runs[stage]) for stage, p in params.items() if p in explicit]


def _check_one_lineage(runs: Mapping[str, Run], params: Mapping[str, str], order: list[str]) -> None:
    """Refuse runs of two lineages, naming the later of the two parameters involved in the stage's order. An
    optional input counts where a run used one (an encode run that encoded a neurons run's neurons)."""
    for downstream, run in runs.items():
        for upstream in (name for name in stages.names() if name != downstream):
            made_from = run.data.tags.get(artifacts.input_tag(upstream))
            if upstream in runs and made_from and made_from != runs[upstream].info.run_id:
                param = max(params[downstream], params[upstream], key=order.index)
                raise XlsubError(f"{param}: {downstream} run {run.info.run_id} was made from {upstream} run {made_from}, "
                                 f"not {runs[upstream].info.run_id}; pass matching runs")


def tag_inputs(runs: Mapping[str, Run]) -> None:
    """Tag the active run with the run it used of every upstream stage (`xlsub.<stage>_run_id`)."""
    mlflow.set_tags({artifacts.input_tag(stage): run.info.run_id for stage, run in runs.items()})


def manifest(run: Run, param: str, dst: Path | None = None) -> dict:
    """What an upstream run made (`manifest.json`), refused with one line if it has none."""
    stage = run.data.tags.get(artifacts.STAGE_TAG, "?")
    tracking.require_artifacts(param, run, [artifacts.MANIFEST])
    return artifacts.read_manifest(tracking.download(run.info.run_id, artifacts.MANIFEST, dst, param), stage, param)


def subnetworks(parent: Run, param: str = "prune_run_id", dst: Path | None = None) -> dict[SubnetworkId, Run]:
    """A prune run's (or a neurons run's) child runs by SubnetworkId; refuses a run that lacks one its
    manifest names (a deleted child run would otherwise drop a language without a word)."""
    stage = parent.data.tags.get(artifacts.STAGE_TAG, "prune")
    children = tracking.child_runs(parent, param)
    made = [SubnetworkId.parse(text) for text in manifest(parent, param, dst)["subnetworks"]]
    missing = [str(sid) for sid in made if sid not in children]
    if missing:
        raise XlsubError(f"{param}: {stage} run {parent.info.run_id} has no child run for subnetwork {', '.join(missing)}; rerun {stage}")
    return {sid: children[sid] for sid in sorted(made)}


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, where the tracking server has an http(s) address; else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def run_link(run: Run) -> str:
    """The run's page for a link in the UI: its address where the server has an http(s) one, else the
    UI's own path to it (`#/experiments/<id>/runs/<id>`), which works in any `mlflow ui` on the store."""
    info = run.info
    return run_url(mlflow.get_tracking_uri(), info.experiment_id, info.run_id) or f"#/experiments/{info.experiment_id}/runs/{info.run_id}"


def run_links(runs: Mapping[str, Run]) -> dict[str, str] | None:
    """{key: the run's page} for runs by any key (stage, run ID), or None without an http(s) server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return {key: run_url(uri, run.info.experiment_id, run.info.run_id) for key, run in runs.items()}
