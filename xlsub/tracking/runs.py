"""Everything xlsub says to MLflow: stage runs, tags, input runs by ID, artifacts, the Trainer's loss.

The numerical modules never import mlflow; the entry points and this module do.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from xlsub import artifacts
from xlsub.artifacts import CHILD_TAG, CLAIM_TAG, CLAIM_TIME_TAG, CODE_TAG, ERROR_TAG, PARENT_TAG, STAGE_TAG, SubnetworkId
from xlsub.errors import XlsubError
from xlsub.tracking import checkpoints, interrupts, liveness, server
from xlsub.tracking.code_version import code_version

log = logging.getLogger(__name__)


def fail(stage: str, err: XlsubError) -> None:
    """The one line a user sees for bad input."""
    print(f"xlsub {stage}: {err}", file=sys.stderr, flush=True)


# -- system metrics: CPU, memory, disk, network and (with nvidia-ml-py, the `gpu` extra) GPU use, by MLflow ---------
# MLflow samples every 10 s by default; a stage of a minute would show a handful of points, one of a few
# seconds none. A user's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins.
SYSTEM_METRICS_SECONDS = 2.0
# its start and stop lines would follow a refusal's one line on stderr
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def _log_system_metrics(wanted: bool) -> bool | None:
    """`log_system_metrics` for `mlflow.start_run`: None (MLflow decides) where the user set MLflow's own switch
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, else `wanted`, unless psutil, which MLflow samples with, is missing."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined:
        return None
    if wanted and importlib.util.find_spec("psutil") is None:
        log.warning("system metrics not logged: psutil is not installed")
        return False
    return wanted


@contextmanager
def _sampling_interval(seconds: float) -> Iterator[None]:
    """MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL = `seconds` while the block runs, unless the user set it. MLflow
    reads it when the monitor starts (in `start_run`); unset after, so that child processes see the user's value."""
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL as interval

    if interval.defined:
        yield
        return
    interval.set(seconds)
    try:
        yield
    finally:
        interval.unset()


@contextmanager
def stage_run(stage: str, args, *, log_to_mlflow: bool = True, system_metrics: bool = False) -> Iterator[Run | None]:
    """Run one stage in an MLflow run (the one `mlflow run` made, or a new one), with `args` (the stage's
    parameter dataclass) logged as parameters and validated inside the run.

    Bad input (XlsubError, from `args.validate()` or later) prints one line, marks the run FAILED and
    exits with status 2; any other exception (a bug) marks it FAILED with the same tag, `xlsub.error`, holding
    `crash_line` (its type, message and where it was raised), and propagates with its traceback. Ranks other
    than 0 of a distributed job pass `log_to_mlflow=False` and get the same error handling with no run.
    A twin claim (`xlsub.tracking.twins`) on the run ends with it: the run's page shows none once it ended.

    SIGTERM, SIGHUP and SIGINT (`xlsub.tracking.interrupts`) mark the run, the run the process was logging to and
    the run's children KILLED, and exit with status 128 + the signal's number. An http(s) tracking server
    that does not answer is refused first, in seconds: one line, exit status 2.

    `system_metrics` has MLflow log the machine's CPU, memory, disk, network and, where nvidia-ml-py is
    installed, GPU utilisation into the run (`system/...`, every SYSTEM_METRICS_SECONDS) from a thread that
    `mlflow.end_run` stops, on every path out of the run. MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, where set,
    decides instead.
    """
    try:
        server.check(mlflow.get_tracking_uri())
    except XlsubError as err:
        fail(stage, err)
        sys.exit(2)
    active = None
    if log_to_mlflow:
        with _sampling_interval(SYSTEM_METRICS_SECONDS):
            active = mlflow.start_run(run_name=stage, log_system_metrics=_log_system_metrics(system_metrics))
        mlflow.set_tags({STAGE_TAG: stage, CODE_TAG: code_version(stage)})
    status = "FAILED"
    try:
        with interrupts.stopping(current_run=lambda: (run := mlflow.active_run()) and run.info.run_id), heartbeat(active):
            if log_to_mlflow:
                # `mlflow run` has already logged the -P values as typed; add what it did not
                logged = active.data.params if active.data else {}
                values = asdict(args)
                mlflow.log_params({k: v for k, v in values.items() if k not in logged})
                for k in logged.keys() & values.keys():  # MLflow params cannot change: say which value counts
                    if isinstance(values[k], str) and logged[k] != values[k] and unquote(logged[k]) == values[k]:
                        log.warning("%s: `mlflow run` stored %s as typed; xlsub reads it as %r", stage, k, values[k])
            args.validate()
            yield active
        status = "FINISHED"
    except XlsubError as err:
        if log_to_mlflow:
            mlflow.set_tag(ERROR_TAG, str(err))
            mlflow.end_run(status)
            mark_models(active.info.run_id, status, active.info.experiment_id)
        fail(stage, err)
        sys.exit(2)
    except (KeyboardInterrupt, interrupts.Stopped) as stop:
        status = "KILLED"
        stopped = stop if isinstance(stop, interrupts.Stopped) else None
        if log_to_mlflow and mlflow.active_run() is not None:
            mlflow.end_run(status)
        mark_killed(active and active.info, stopped.active_run_id if stopped else None, stopped.at if stopped else time.time())
        if stopped is None:
            raise
        log.warning("%s: %s; runs marked KILLED", stage, stop)
        gc.freeze()  # the collection at exit walks torch's and transformers' objects for seconds: leave them be
        sys.exit(stopped.exit_code)
    except Exception as err:  # a bug: the run says what crashed in one line, the traceback goes to stderr as it is
        if active is not None:
            _set_tag(active.info.run_id, ERROR_TAG, crash_line(err))
        raise
    finally:
        if active is not None:
            drop_tags(active.info.run_id, (CLAIM_TAG, CLAIM_TIME_TAG))
        if log_to_mlflow and mlflow.active_run() is not None:
            mlflow.end_run(status)
            if status != "KILLED":  # mark_killed tags those
                mark_models(active.info.run_id, status, active.info.experiment_id)


def crash_line(err: BaseException, limit: int = 500) -> str:
    """One line for an unexpected exception: `<type>: <message> (at <file>:<line> in <function>)`, the frame
    that raised it, the message's lines joined and cut at `limit` characters."""
    message = " ".join(str(err).split())
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    frames = traceback.extract_tb(err.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        path = Path(last.filename)
        try:
            path = path.resolve().relative_to(Path.cwd())
        except ValueError:
            pass
        where = f" (at {path}:{last.lineno} in {last.name})"
    return f"{type(err).__name__}: {message}{where}" if message else f"{type(err).__name__}{where}"


def _set_tag(run_id: str, key: str, value: str) -> None:
    try:
        MlflowClient().set_tag(run_id, key, value)
    except MlflowException as err:  # the run's status still says it failed; the tag must not hide why
        log.warning("run %s not tagged %s: %s", run_id, key, err)


def drop_tags(run_id: str, keys: Iterable[str]) -> None:
    """Delete the tags `keys` of run `run_id` that it has (MLflow refuses to delete a tag a run lacks)."""
    client = MlflowClient()
    try:
        for key in keys & client.get_run(run_id).data.tags.keys():
            client.delete_tag(run_id, key)
    except MlflowException as err:
        log.warning("run %s: tags %s not removed: %s", run_id, ", ".join(keys), err)


def mark_models(run_id: str, status: str, experiment_id: str | None = None) -> None:
    """Tag the logged models of run `run_id` with its final status (`xlsub.run_status`): those it logged itself
    and, for a prune run, its subnetworks' (logged by its child runs, tagged `xlsub.prune_run_id`). A search
    that filters on the tag leaves out the models of runs that failed, were killed or still run."""
    experiment_id = experiment_id or MlflowClient().get_run(run_id).info.experiment_id
    for made_by in (f"source_run_id = '{run_id}'", f"tags.`{artifacts.input_tag('prune')}` = '{run_id}'"):
        try:
            models = mlflow.search_logged_models(experiment_ids=[experiment_id], filter_string=made_by, output_format="list")
            for model in models:
                MlflowClient().set_logged_model_tags(model.model_id, {artifacts.RUN_STATUS_TAG: status})
        except MlflowException as err:  # the run's own status is set; a model's tag must not hide why it ended
            log.warning("logged models of run %s not tagged %s: %s", run_id, status, err)


def main_run_id(run: Run) -> str | None:
    """The main run that `run` (a stage run, or a prune child run) was made under, or None."""
    client = MlflowClient()
    while run is not None:
        if run.data.tags.get(STAGE_TAG) == "main":
            return run.info.run_id
        parent = run.data.tags.get(PARENT_TAG)
        run = client.get_run(parent) if parent else None
    return None


def unquote(value: object) -> str:
    """A parameter value as `mlflow run` logged it, without its shell quoting (`''` is an empty value)."""
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = " ".join(shlex.split(text)).strip()  # every parameter loses surrounding spaces (`StageArgs`)
    return text


def param_value(v: object) -> bool | float | str:
    """A parameter's value as parameters compare: a bool, a number, else the unquoted text."""
    text = unquote(v)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def same_value(a: object, b: object) -> bool:
    """Parameters compare by value: `1` equals `1.0`, `true` equals `True`, text compares as text."""
    return param_value(a) == param_value(b)


def find_reusable(experiment_id: str, stage: str, params: Mapping[str, object]) -> Run | None:
    """The newest FINISHED top-level run of `stage` made by this code with these parameter values, if any.

    Input runs are parameters (`finetune_run_id`, ...), so the same inputs are part of the match.
    FAILED and KILLED runs never match.
    """
    return next(iter(_same_runs(experiment_id, stage, params, ("FINISHED",))), None)


def _same_runs(experiment_id: str, stage: str, params: Mapping[str, object], statuses: tuple[str, ...]) -> list[Run]:
    """Top-level runs of `stage` in one of `statuses`, made by this code with these parameter values, newest
    first: the one comparison behind reuse (FINISHED runs) and resume (dead ones)."""
    status = f" and attributes.status = '{statuses[0]}'" if len(statuses) == 1 else ""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{CODE_TAG}` = '{code_version(stage)}'{status}",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    return [run for run in runs if run.info.status in statuses and run.data.tags.get(CHILD_TAG) != "true"
            and all(key in run.data.params and same_value(run.data.params[key], value) for key, value in params.items())]


# -- crash resume: a run that died mid-training is continued from its newest checkpoint -----------------------
# The environment overrides them for tests, which cannot wait two minutes for a killed run to go stale.
HEARTBEAT_SECONDS = float(os.environ.get("XLSUB_HEARTBEAT_SECONDS", 30))  # how often a stage's run renews its heartbeat tag
STALE_SECONDS = float(os.environ.get("XLSUB_STALE_SECONDS", 120))  # a RUNNING run silent longer died without ending it (kill -9)


def last_heartbeat(run: Run) -> float:
    """Unix time of the run's last sign of life: its heartbeat tag, else its start."""
    try:
        return float(run.data.tags[artifacts.HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return run.info.start_time / 1000


def dead_because(run: Run, now: float | None = None, stale_after: float = STALE_SECONDS) -> str | None:
    """Why a RUNNING run counts as dead ("no heartbeat for 300 s", "its process 123 on this host is gone"), or
    None while it looks alive: a heartbeat younger than `stale_after` seconds and, where it ran on this host
    and boot, its process still there (`liveness`)."""
    silent = (time.time() if now is None else now) - last_heartbeat(run)
    if silent > stale_after:
        return f"no heartbeat for {silent:.0f} s" if artifacts.HEARTBEAT_TAG in run.data.tags else f"no heartbeat since it started {silent:.0f} s ago"
    return liveness.gone(run.data.tags)


def looks_alive(run: Run, now: float | None = None, stale_after: float = STALE_SECONDS) -> str:
    """The one line about a RUNNING run that looks alive: where it runs, and from when it counts as dead
    unless it beats again."""
    last = last_heartbeat(run)
    now = time.time() if now is None else now
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last + stale_after))
    return (f"run {run.info.run_id} still looks alive ({liveness.where(run.data.tags)}, last heartbeat {now - last:.0f} s ago); "
            f"without a new heartbeat it counts as dead from {until}")


def find_dead(experiment_id: str, stage: str, params: Mapping[str, object], exclude: Iterable[str] = (),
              now: float | None = None, stale_after: float = STALE_SECONDS) -> list[Run]:
    """Runs of `stage` by this code with these parameter values (as `find_reusable` compares them) that
    died before finishing, newest first: FAILED or KILLED, or RUNNING and dead (`dead_because`: a heartbeat
    older than `stale_after` seconds, or a process gone from this host). Runs already resumed by another
    (`xlsub.superseded_by`) and those in `exclude` are left out."""
    exclude = set(exclude)
    return [run for run in _same_runs(experiment_id, stage, params, ("FAILED", "KILLED", "RUNNING"))
            if run.info.run_id not in exclude and artifacts.SUPERSEDED_BY_TAG not in run.data.tags
            and (run.info.status != "RUNNING" or dead_because(run, now, stale_after))]


def find_alive(experiment_id: str, stage: str, params: Mapping[str, object], exclude: Iterable[str] = (),
               now: float | None = None, stale_after: float = STALE_SECONDS) -> list[Run]:
    """The RUNNING runs of `stage` by this code with these parameter values that look alive, newest first."""
    exclude = set(exclude)
    return [run for run in _same_runs(experiment_id, stage, params, ("RUNNING",))
            if run.info.run_id not in exclude and not dead_because(run, now, stale_after)]


def complete_checkpoints(folder: Path) -> list[Path]:
    """The Trainer's `checkpoint-<step>` folders in `folder` that were written in full, by step. The
    Trainer writes `trainer_state.json` last, so a folder without it was cut off mid-save."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _candidate_checkpoints(run: Run, local_root: Path, dst: Path) -> Iterator[tuple[Path, str | None]]:
    """`run`'s checkpoints, newest first, each with a reason not to take it (or None): the complete ones in
    `local_root/<run id>/`, then the one it logged as artifacts (downloaded into `dst` when reached), then
    those of the run it had itself resumed from. A run that resumed from a checkpoint and FAILED before its
    first save marks that checkpoint as the one it failed on: the next run does not take it again."""
    seen, failed_at = set(), None
    while run is not None and run.info.run_id not in seen:
        seen.add(run.info.run_id)
        failed_on, why = None, None
        if failed_at is not None:
            failed_on, why = f"checkpoint-{failed_at[1]}", f"run {failed_at[0]} resumed from it and FAILED before its first save"
        local = complete_checkpoints(Path(local_root) / run.info.run_id)
        for path in reversed(local):
            yield path, why if path.name == failed_on else None
        logged = run.data.tags.get(artifacts.CHECKPOINT_TAG)
        if logged:  # reached only where no local one loads: a copy of a damaged local one may be whole
            if reason := why if logged.rpartition("/")[2] == failed_on else None:  # named, not downloaded: it would not be taken
                yield Path(logged), reason
            else:
                try:
                    yield download(run.info.run_id, logged, dst, param="resume"), None
                except XlsubError as err:
                    yield Path(logged), str(err)
        previous = run.data.tags.get(artifacts.RESUMED_FROM_TAG)
        at = run.data.metrics.get("resumed_at_step")
        failed_at = (run.info.run_id, int(at)) if run.info.status == "FAILED" and at is not None and not local and not logged else None
        run = MlflowClient().get_run(previous) if previous else None


def latest_checkpoint(run: Run, local_root: Path, dst: Path, damaged: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint of `run` that loads in full (`checkpoints.checkpoint_damage`): in `local_root/<run id>/`
    where the run trained on this machine, then the one it logged as artifacts (`checkpoint_artifacts`,
    downloaded into `dst`), then those of the run it had itself resumed from. None if there is none.
    Checkpoints passed over are appended to `damaged`, with why."""
    for path, reason in _candidate_checkpoints(run, local_root, dst):
        reason = reason or checkpoints.checkpoint_damage(path)
        if reason is None:
            return path
        if damaged is not None:
            damaged.append((path, reason))
    return None


def find_resume_point(experiment_id: str, stage: str, params: Mapping[str, object], run_id: str, local_root: Path,
                      dst: Path) -> tuple[Run, Path] | None:
    """The newest dead run like this one (`find_dead`) that left a checkpoint that loads, and that checkpoint.
    Damaged checkpoints passed over are named in one line, with what is taken instead (an older checkpoint, or
    a fresh start); live runs like this one, which are not resumed, in one line each."""
    damaged: list[tuple[Path, str]] = []
    found = None
    for dead in find_dead(experiment_id, stage, params, exclude=[run_id]):
        checkpoint = latest_checkpoint(dead, local_root, dst, damaged)
        if checkpoint is not None:
            found = dead, checkpoint
            break
    if damaged:
        skipped = "; ".join(f"{path} ({reason})" for path, reason in damaged)
        instead = f"resuming from the previous complete checkpoint {found[1]}" if found else "no complete checkpoint left: starting fresh"
        log.warning("skipping damaged checkpoint%s %s; %s", "s" * (len(damaged) > 1), skipped, instead)
    if found is None:
        for alive in find_alive(experiment_id, stage, params, exclude=[run_id]):
            log.warning("not resuming: %s (rerun after that to resume it)", looks_alive(alive))
    return found


def supersede(dead: Run, run_id: str) -> None:
    """Record that run `run_id` continues `dead`: tags on both, and `dead` FAILED if it still reads RUNNING."""
    client = MlflowClient()
    client.set_tag(dead.info.run_id, artifacts.SUPERSEDED_BY_TAG, run_id)
    client.set_tag(run_id, artifacts.RESUMED_FROM_TAG, dead.info.run_id)
    if dead.info.status == "RUNNING":
        client.set_terminated(dead.info.run_id, "FAILED")


@contextmanager
def heartbeat(run: Run | None, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Renew `run`'s heartbeat tag every `every` seconds from a daemon thread while the block runs (at its
    start too, with the host, boot id and PID of this process: `liveness`), so that a run that is RUNNING
    but silent, or whose process is gone from this host, can be told dead. No-op for `run=None`."""
    if run is None:
        yield
        return
    client, stop = MlflowClient(), threading.Event()

    def beat(where: Mapping[str, str] = {}):  # noqa: B006 - read, never written
        try:
            tags = {**where, artifacts.HEARTBEAT_TAG: f"{time.time():.0f}"}
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as err:  # noqa: BLE001 - a missed beat must not end training
            log.warning("heartbeat of run %s not recorded: %s", run.info.run_id, err)

    def beats():
        while not stop.wait(every):
            beat()

    beat(liveness.this_process())
    thread = threading.Thread(target=beats, name="xlsub-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def resolve_run(param: str, value: str, stage: str) -> Run:
    """The FINISHED run of `stage` that parameter `param` names: a run ID or `latest` in the active experiment."""
    client = MlflowClient()
    value = unquote(value)  # pasted with spaces, or with the quotes `mlflow run` logs such a value with
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
            name = client.get_experiment(experiment_id).name
            raise XlsubError(
                f"{param}: no FINISHED {stage} run in experiment '{name}' (ID {experiment_id}); pass a run ID, or search another "
                f"experiment with `mlflow run ... --experiment-name <name>` (or MLFLOW_EXPERIMENT_NAME=<name>), or run `mlflow run . -e {stage}` there first"
            )
        return runs[0]
    try:
        run = client.get_run(value)
    except MlflowException:
        raise XlsubError(f"{param}: no run with ID '{value}' on {mlflow.get_tracking_uri()}; pass an existing run ID or 'latest'") from None
    if run.info.lifecycle_stage == "deleted":  # `latest` never finds these; an ID still does until the store is gc'ed
        raise XlsubError(f"{param}: run {value} is deleted; restore it (`mlflow runs restore --run-id {value}`) or pass another {stage} run ID or 'latest'")
    found = run.data.tags.get(STAGE_TAG)
    if found != stage:
        raise XlsubError(f"{param}: run {value} is {_a(found) if found else 'not an xlsub'} run, not {_a(stage)} run; pass {_a(stage)} run ID")
    if run.data.tags.get(CHILD_TAG) == "true":
        parent = run.data.tags.get(PARENT_TAG, "?")
        raise XlsubError(f"{param}: run {value} is one language's child run; pass its parent {stage} run {parent}")
    if run.info.status != "FINISHED":
        raise XlsubError(f"{param}: run {value} is {run.info.status}, not FINISHED; pass a finished {stage} run")
    return run


def _a(word: str) -> str:
    """`word` with its indefinite article: a prune, an encode."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


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


class CheckpointLogger(TrainerCallback):
    """Logs each checkpoint the Trainer saves as artifacts of the active run, `checkpoints/checkpoint-<step>/`,
    then points the run's `xlsub.checkpoint` tag at it: a run on another machine resumes from there."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        path = f"{artifacts.CHECKPOINTS_DIR}/{name}"
        mlflow.log_artifacts(str(Path(args.output_dir) / name), path)
        mlflow.set_tag(artifacts.CHECKPOINT_TAG, path)  # only now: a checkpoint cut off mid-upload is never named


def log_corpus(corpus, train_examples: Mapping[str, int]) -> dict:
    """Log the corpus' splits as MLflow dataset inputs, with its provenance (e.g. Debian package versions);
    returns the datasets by split, for metrics computed on one (`mlflow.log_metric(..., dataset=)`)."""
    source = str(corpus.source.get("uri") or corpus.source.get("folder") or corpus.name)
    datasets = {}
    for split, ds in corpus.texts.items():
        datasets[split] = dataset = mlflow.data.from_huggingface(ds, name=f"{corpus.name}-{split}", source=source if "://" in source else None,
                                                                 path=None if "://" in source else corpus.name)
        mlflow.log_input(dataset, context=split, tags={k: str(v) for k, v in corpus.source.items()})
    mlflow.set_tags({f"{artifacts.SOURCE_TAG_PREFIX}{k}": str(v) for k, v in corpus.source.items()})
    mlflow.log_params({f"train_examples.{lang}": n for lang, n in train_examples.items()})
    return datasets


def log_parallel(corpus) -> None:
    """Log a parallel corpus (one column per language, row i aligned) as the run's dataset input."""
    import datasets

    table = datasets.Dataset.from_dict({"id": corpus.ids, **corpus.texts})
    source = str(corpus.source.get("uri") or corpus.name)
    dataset = mlflow.data.from_huggingface(table, name=f"{corpus.name}-parallel", source=source if "://" in source else None,
                                           path=None if "://" in source else corpus.name)
    mlflow.log_input(dataset, context="parallel", tags={k: str(v)[:500] for k, v in corpus.source.items()})


def child_runs(parent: Run, param: str = "prune_run_id") -> dict[SubnetworkId, Run]:
    """The per-language runs nested in a prune run (its subnetworks) or a neurons run (its neuron sets), by
    SubnetworkId, in id order."""
    stage = parent.data.tags.get(STAGE_TAG, "prune")
    children = MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{CHILD_TAG}` = 'true'", max_results=5000)
    found = {}
    for child in children:
        tags = child.data.tags
        sid = SubnetworkId(tags[artifacts.LANGUAGE_TAG], int(tags[artifacts.SEED_TAG]))
        if sid in found:
            raise XlsubError(f"{param}: {stage} run {parent.info.run_id} has two runs for {sid}; rerun {stage}")
        found[sid] = child
    if not found:
        raise XlsubError(f"{param}: {stage} run {parent.info.run_id} has no child runs; rerun {stage}")
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
    it), and with `children` its child runs still RUNNING: those of a process that died without ending them.
    A run already ended keeps its status (KILLED by a signal another rank handled first)."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
        mark_models(run_id, "FAILED", experiment_id)
    if children:
        for child in client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(child.info.run_id, "FAILED")
            mark_models(child.info.run_id, "FAILED", experiment_id)


def mark_killed(stage_run, active_run_id: str | None, since: float) -> None:
    """After a signal at `since` (Unix seconds): mark KILLED the stage's run (`stage_run`, a RunInfo, or None
    on a rank without one), the run this process was logging to at the signal, and, below the stage's run,
    every descendant still RUNNING or FAILED by the unwinding since (a `with` block around a child run
    ends it FAILED). Runs that ended before the signal keep their status."""
    client = MlflowClient()
    killed = {active_run_id} - {None}
    if stage_run is not None:
        killed.add(stage_run.run_id)
        parents = [stage_run.run_id]
        while parents:  # main -> stage runs -> prune's children
            parent = parents.pop()
            for child in client.search_runs([stage_run.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=5000):
                info = child.info
                if info.status == "RUNNING" or (info.status == "FAILED" and (info.end_time or 0) >= int(since * 1000)):
                    killed.add(info.run_id)
                    parents.append(info.run_id)
    for run_id in killed:
        try:
            client.set_terminated(run_id, "KILLED")
        except MlflowException as err:
            log.warning("run %s not marked KILLED: %s", run_id, err)
            continue
        mark_models(run_id, "KILLED")


def log_table(table, path: str) -> None:
    """A table as an MLflow table artifact (`mlflow.load_table` reads it back across runs)."""
    mlflow.log_table(table, path)


# -- logged models ----------------------------------------------------------------------------------------
# What a logged model needs to run, pinned as pyproject.toml pins them: without explicit requirements
# mlflow.transformers infers them by importing the model's dependencies and asks for torchvision.
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")


def model_requirements() -> list[str]:
    """The pins of `MODEL_REQUIREMENTS` from xlsub's package metadata (pyproject.toml), else the installed versions."""
    import importlib.metadata as metadata
    import re

    pinned = {}
    for requirement in metadata.requires("xlsub") or []:
        name = re.split(r"[\s=<>!~\[;]", requirement, maxsplit=1)[0].lower()
        if name in MODEL_REQUIREMENTS and "extra ==" not in requirement:
            pinned[name] = requirement.split(";")[0].strip()
    return [pinned.get(name) or f"{name}=={metadata.version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


# What mlflow.transformers says of every local model (no hub card, no licence file): nothing to act on offline.
OFFLINE_HUB_WARNINGS = ("The model card could not be retrieved from the hub", "Unable to find license information")
# What it says when it checks the input example with the signature's default parameters, at every log.
EXAMPLE_CHECK_WARNING = "params provided to the `predict` method will override"


@contextmanager
def _quiet(logger: logging.Logger, starts: tuple[str, ...]) -> Iterator[None]:
    """Drop `logger`'s records whose message starts with one of `starts` while the block runs; the rest pass."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def fill_mask_signature(tokenizer):
    """An input example (one sentence with the mask token) and a signature for a fill-mask model: a string in,
    the top prediction out, and the pipeline's `top_k` as a parameter (`params: {top_k: 3}` when serving)."""
    from mlflow.models import infer_signature

    example = f"Paris is the {tokenizer.mask_token} of France."
    return example, infer_signature(example, ["capital"], params={"top_k": 1})


def text_generation_signature():
    """An input example (the start of a sentence) and a signature for a text-generation model: a string in,
    the continued text out, and the generation parameters `max_new_tokens` and `do_sample` (greedy by
    default) as parameters (`params: {max_new_tokens: 5}` when serving)."""
    from mlflow.models import infer_signature

    example = "Paris is the capital of"
    return example, infer_signature(example, ["Paris is the capital of France."], params={"max_new_tokens": 20, "do_sample": False})


def log_lm(model, tokenizer, name: str, *, tags: Mapping[str, str], params: Mapping[str, object] | None = None,
           step: int = 0, link: Iterable[str] = ()):
    """Log `model` (a stock masked or causal LM) and `tokenizer` as an MLflow transformers-flavor model of the
    active run (its source run), named `name`, with `tags` and `params`: task `fill-mask` for a masked LM,
    `text-generation` for a causal LM (the family adapter's objective), each with its input example and
    parameters. Loadable without xlsub by `mlflow.transformers.load_model("models:/<model_id>")` or, in
    its `model/` folder, `AutoModelForMaskedLM`/`AutoModelForCausalLM.from_pretrained`. Returns the
    ModelInfo (`.model_id`).

    MLflow itself links the run's metrics at `step` to the model (with the dataset each was logged
    with); `link` names step-0 metrics to link besides, as logged (same value, timestamp and dataset,
    so the run's history gains nothing)."""
    import mlflow.transformers
    from mlflow.entities import Metric

    from xlsub.models.families import CAUSAL, adapter_for

    causal = adapter_for(model).objective == CAUSAL
    task = "text-generation" if causal else "fill-mask"
    example, signature = text_generation_signature() if causal else fill_mask_signature(tokenizer)
    with _quiet(logging.getLogger("mlflow.transformers"), (*OFFLINE_HUB_WARNINGS, EXAMPLE_CHECK_WARNING)):
        info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer}, task=task, name=name,
                                             pip_requirements=model_requirements(), tags={artifacts.RUN_STATUS_TAG: "RUNNING", **tags}, step=step,
                                             params={k: str(v) for k, v in (params or {}).items()} or None,
                                             signature=signature, input_example=example)
    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    linked = []
    for key in link:
        logged = [m for m in client.get_metric_history(run_id, key) if m.step == 0 and m.model_id is None]
        if logged:
            m = logged[-1]
            linked.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id, dataset_name=m.dataset_name,
                                 dataset_digest=m.dataset_digest, run_id=run_id))
    if linked:
        client.log_batch(run_id, metrics=linked)
    return info


def logged_model_id(run_id: str, name: str) -> str | None:
    """The ID of the newest model named `name` that run `run_id` logged, or None (e.g. a run made before
    models were logged)."""
    run = MlflowClient().get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1)
    return found[0].model_id if found else None


def register_subnetworks(prune_run_id: str) -> list:
    """Register the stock model of every subnetwork of prune run `prune_run_id` as a version of the registered
    model `<experiment>-<language>`, tagged with its seed, the run's threshold and target_sparsity, its mask
    digest and its child run. A model registered there before is not registered again, so that main can
    register a reused run's models. Returns the versions, new or found."""
    client = MlflowClient()
    prune = client.get_run(prune_run_id)
    experiment = client.get_experiment(prune.info.experiment_id).name
    versions = []
    for sid, child in child_runs(prune).items():
        model_id = logged_model_id(child.info.run_id, sid.model_name)
        if model_id is None:
            raise XlsubError(f"register: prune run {prune_run_id} logged no stock model {sid.model_name}; rerun prune with log_stock_models=true")
        name = f"{experiment}-{sid.language}"
        found = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == f"models:/{model_id}"]  # v.model_id is unset
        if found:
            versions.append(found[0])
            continue
        model = mlflow.get_logged_model(model_id)
        tags = {artifacts.SEED_TAG: str(sid.seed), artifacts.SUBNETWORK_TAG: str(sid),
                artifacts.REGISTERED_THRESHOLD_TAG: prune.data.params["threshold"],
                artifacts.REGISTERED_TARGET_SPARSITY_TAG: prune.data.params["target_sparsity"],
                artifacts.MASK_DIGEST_TAG: model.tags[artifacts.MASK_DIGEST_TAG], artifacts.REGISTERED_SOURCE_RUN_TAG: child.info.run_id}
        versions.append(mlflow.register_model(f"models:/{model_id}", name, tags=tags))
        log.info("registered %s as %s version %s", sid.model_name, name, versions[-1].version)
    return versions
