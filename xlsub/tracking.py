"""Everything xlsub says to MLflow: stage runs, tags, input runs by ID, artifacts, the Trainer's loss.

The numerical modules never import mlflow; the entry points and this module do.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from xlsub import artifacts
from xlsub.artifacts import CHILD_TAG, CODE_TAG, ERROR_TAG, PARENT_TAG, STAGE_TAG, SubnetworkId
from xlsub.code_version import code_version
from xlsub.errors import XlsubError

STAGES = artifacts.STAGES
log = logging.getLogger(__name__)


def fail(stage: str, err: XlsubError) -> None:
    """The one line a user sees for bad input."""
    print(f"xlsub {stage}: {err}", file=sys.stderr, flush=True)


@contextmanager
def stage_run(stage: str, args, *, log_to_mlflow: bool = True) -> Iterator[Run | None]:
    """Run one stage in an MLflow run (the one `mlflow run` made, or a new one), with `args` (the stage's
    parameter dataclass) logged as parameters and validated inside the run.

    Bad input (XlsubError, from `args.validate()` or later) prints one line, marks the run FAILED and
    exits with status 2; any other exception marks it FAILED and propagates. Ranks other than 0 of a
    distributed job pass `log_to_mlflow=False` and get the same error handling with no run.
    """
    active = None
    if log_to_mlflow:
        active = mlflow.start_run(run_name=stage)
        mlflow.set_tags({STAGE_TAG: stage, CODE_TAG: code_version(stage)})
    status = "FAILED"
    try:
        if log_to_mlflow:
            # `mlflow run` has already logged the -P values as typed; add what it did not
            logged = active.data.params if active.data else {}
            mlflow.log_params({k: v for k, v in asdict(args).items() if k not in logged})
        args.validate()
        yield active
        status = "FINISHED"
    except XlsubError as err:
        if log_to_mlflow:
            mlflow.set_tag(ERROR_TAG, str(err))
            mlflow.end_run(status)
        fail(stage, err)
        sys.exit(2)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if log_to_mlflow and mlflow.active_run() is not None:
            mlflow.end_run(status)


def unquote(value: object) -> str:
    """A parameter value as `mlflow run` logged it, without its shell quoting (`''` is an empty value)."""
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = " ".join(shlex.split(text))
    return text


def same_value(a: object, b: object) -> bool:
    """Parameters compare by value: `1` equals `1.0`, `true` equals `True`, text compares as text."""

    def norm(v: object):
        text = unquote(v)
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return float(text)
        except ValueError:
            return text

    return norm(a) == norm(b)


def find_reusable(experiment_id: str, stage: str, params: Mapping[str, object]) -> Run | None:
    """The newest FINISHED top-level run of `stage` made by this code with these parameter values, if any.

    Input runs are parameters (`finetune_run_id`, ...), so the same inputs are part of the match.
    FAILED and KILLED runs never match.
    """
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{CODE_TAG}` = '{code_version(stage)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    for run in runs:
        if run.data.tags.get(CHILD_TAG) == "true":
            continue
        logged = run.data.params
        if all(key in logged and same_value(logged[key], value) for key, value in params.items()):
            return run
    return None


def resolve_run(param: str, value: str, stage: str) -> Run:
    """The FINISHED run of `stage` that parameter `param` names: a run ID or `latest` in the active experiment."""
    client = MlflowClient()
    value = str(value).strip()
    if value == "latest":
        experiment_id = mlflow.active_run().info.experiment_id if mlflow.active_run() else "0"
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=200,
        )
        runs = [r for r in runs if r.data.tags.get(CHILD_TAG) != "true"]
        if not runs:
            raise XlsubError(
                f"{param}: no FINISHED {stage} run in experiment {experiment_id}; run `mlflow run . -e {stage}` first or pass a run ID"
            )
        return runs[0]
    try:
        run = client.get_run(value)
    except MlflowException:
        raise XlsubError(f"{param}: no run with ID '{value}' on {mlflow.get_tracking_uri()}; pass an existing run ID or 'latest'") from None
    found = run.data.tags.get(STAGE_TAG)
    if found != stage:
        raise XlsubError(f"{param}: run {value} is {'a ' + found if found else 'not an xlsub'} run, not a {stage} run; pass a {stage} run ID")
    if run.data.tags.get(CHILD_TAG) == "true":
        parent = run.data.tags.get(PARENT_TAG, "?")
        raise XlsubError(f"{param}: run {value} is one language's child run; pass its parent {stage} run {parent}")
    if run.info.status != "FINISHED":
        raise XlsubError(f"{param}: run {value} is {run.info.status}, not FINISHED; pass a finished {stage} run")
    return run


def download(run_id: str, path: str, dst: Path | None = None, param: str = "run") -> Path:
    """Download artifact `path` of run `run_id` (a file or a folder) and return where it lies.

    `param` names the parameter that chose the run, for the error a missing artifact gives.
    """
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst) if dst else None)
    except (MlflowException, OSError) as err:
        raise XlsubError(f"{param}: run {run_id} has no artifact '{path}' ({type(err).__name__}); rerun that stage") from None
    return Path(local)


def require_artifacts(param: str, run: Run, paths: Iterable[str]) -> None:
    """Refuse an input run that lacks an artifact file the stage will read, before any work: one line
    naming the parameter, the run, the artifact and the stage to rerun. Lists folders, downloads nothing."""
    client, listed, missing = MlflowClient(), {}, []
    for path in paths:
        folder = path.rpartition("/")[0]
        if folder not in listed:
            listed[folder] = {a.path for a in client.list_artifacts(run.info.run_id, folder or None)}
        if path not in listed[folder]:
            missing.append(path)
    if not missing:
        return
    tags = run.data.tags
    stage = tags.get(STAGE_TAG, "that stage")
    which = f"{stage} run {run.info.run_id}"
    if tags.get(CHILD_TAG) == "true":
        which += f" (subnetwork {tags.get(artifacts.SUBNETWORK_TAG, '?')} of {stage} run {tags.get(PARENT_TAG, '?')})"
    more = f" and {len(missing) - 1} more ({', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""
    raise XlsubError(f"{param}: {which} has no artifact '{missing[0]}'{more}; rerun {stage}")


class LossLogger(TrainerCallback):
    """Logs the Trainer's training loss (and learning rate) by step into the active run.

    Replaces transformers' MLflowCallback, which would start or adopt a run on
    its own terms and log every TrainingArguments field as a parameter.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        if "loss" in logs:
            metrics["train_loss"] = float(logs["loss"])
        if "learning_rate" in logs:
            metrics["learning_rate"] = float(logs["learning_rate"])
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step, synchronous=False)


def log_corpus(corpus, train_examples: Mapping[str, int]) -> None:
    """Log the corpus' splits as MLflow dataset inputs, with its provenance (e.g. Debian package versions)."""
    source = str(corpus.source.get("uri") or corpus.source.get("folder") or corpus.name)
    for split, ds in corpus.texts.items():
        dataset = mlflow.data.from_huggingface(ds, name=f"{corpus.name}-{split}", source=source if "://" in source else None,
                                               path=None if "://" in source else corpus.name)
        mlflow.log_input(dataset, context=split, tags={k: str(v) for k, v in corpus.source.items()})
    mlflow.set_tags({f"{artifacts.SOURCE_TAG_PREFIX}{k}": str(v) for k, v in corpus.source.items()})
    mlflow.log_params({f"train_examples.{lang}": n for lang, n in train_examples.items()})


def log_parallel(corpus) -> None:
    """Log a parallel corpus (one column per language, row i aligned) as the run's dataset input."""
    import datasets

    table = datasets.Dataset.from_dict({"id": corpus.ids, **corpus.texts})
    source = str(corpus.source.get("uri") or corpus.name)
    dataset = mlflow.data.from_huggingface(table, name=f"{corpus.name}-parallel", source=source if "://" in source else None,
                                           path=None if "://" in source else corpus.name)
    mlflow.log_input(dataset, context="parallel", tags={k: str(v)[:500] for k, v in corpus.source.items()})


def prune_children(prune: Run, param: str = "prune_run_id") -> dict[SubnetworkId, Run]:
    """The subnetwork runs nested in a prune run, by SubnetworkId, in id order."""
    children = MlflowClient().search_runs(
        [prune.info.experiment_id], f"tags.`{PARENT_TAG}` = '{prune.info.run_id}' and tags.`{CHILD_TAG}` = 'true'", max_results=5000)
    found = {}
    for child in children:
        tags = child.data.tags
        sid = SubnetworkId(tags[artifacts.LANGUAGE_TAG], int(tags[artifacts.SEED_TAG]))
        if sid in found:
            raise XlsubError(f"{param}: prune run {prune.info.run_id} has two runs for subnetwork {sid}; rerun prune")
        found[sid] = child
    if not found:
        raise XlsubError(f"{param}: prune run {prune.info.run_id} has no subnetwork runs; rerun prune")
    return dict(sorted(found.items()))


@contextmanager
def child_run(parent_run_id: str, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> Iterator[Run]:
    """A run nested in run `parent_run_id`, active inside the block, FINISHED at its end and FAILED if the
    block raises. Any process may open it: the one that holds the parent active, or another rank of a
    torchrun job that only knows the parent's ID."""
    # `mlflow run` hands its run to the first start_run of a process through MLFLOW_RUN_ID; a rank that
    # did not start the parent would take that run as its child
    os.environ.pop("MLFLOW_RUN_ID", None)
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, parent_run_id=parent_run_id, nested=True, tags=dict(tags)) as run:
        yield run


def mark_failed(run_id: str, experiment_id: str, children: bool = False) -> None:
    """Mark run `run_id` FAILED from any process (another rank of a torchrun job than the one that holds
    it), and with `children` its child runs still RUNNING: those of a process that died without ending them."""
    client = MlflowClient()
    client.set_terminated(run_id, "FAILED")
    if children:
        for child in client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(child.info.run_id, "FAILED")


def log_table(table, path: str) -> None:
    """A table as an MLflow table artifact (`mlflow.load_table` reads it back across runs)."""
    mlflow.log_table(table, path)
