"""Clean up after crashes and finished runs: `python -m xlsub.tracking.gc [--dry-run]` (`make gc`).

A library tool, not a pipeline stage (it makes no run). Against the tracking server of MLFLOW_TRACKING_URI:

1. Every RUNNING run that is dead (`runs.dead_because`: no heartbeat for longer than the stale limit, or its
   process gone from this host) is marked FAILED, with the tag `xlsub.gc` saying why. That covers the run
   `mlflow run` makes before any xlsub code runs (no stage tag, no heartbeat: a missing conda, a kill -9
   during start-up): its start counts as its last heartbeat. A nested run (a prune's subnetworks) lives as
   long as its parent does.
2. Local checkpoints, `outputs/checkpoints/<run id>/`, that no rerun will resume from are deleted: those of
   runs that FINISHED, and of dead runs a FINISHED run resumed (`xlsub.superseded_by`). Those of runs that
   died unresumed are kept (`resume=auto` continues them), and so are those of runs this server does not know.

It prints each run it marks and each folder it deletes with its size, then the bytes freed in all;
`--dry-run` prints the same and changes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from xlsub.artifacts import GC_TAG, LOCAL_CHECKPOINTS, PARENT_TAG, STAGE_TAG, SUPERSEDED_BY_TAG
from xlsub.tracking import runs as tracking


def folder_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def size_text(size: int) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as `du -h`)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def remove_local_checkpoints(folder: Path) -> int:
    """Delete a run's local checkpoint folder; returns the bytes it held (0 where there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    size = folder_size(folder)
    shutil.rmtree(folder)
    return size


@dataclass
class Report:
    marked: list[tuple[str, str]] = field(default_factory=list)  # (run ID, why it is dead)
    deleted: list[tuple[Path, int, str]] = field(default_factory=list)  # (folder, bytes, whose)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why)

    @property
    def freed(self) -> int:
        return sum(size for _, size, _ in self.deleted)


def _dead(client: MlflowClient, run: Run, now: float, stale_after: float, cache: dict[str, str | None]) -> str | None:
    """Why a RUNNING run is dead, or None while it, or the parent it is nested in, lives."""
    if run.info.run_id in cache:
        return cache[run.info.run_id]
    cache[run.info.run_id] = None  # a cycle of parents (never made by MLflow) counts as alive
    why = tracking.dead_because(run, now, stale_after)
    if why is not None and (parent_id := run.data.tags.get(PARENT_TAG)):
        try:
            parent = client.get_run(parent_id)
        except MlflowException:
            parent = None
        if parent is not None and parent.info.status == "RUNNING" and _dead(client, parent, now, stale_after, cache) is None:
            why = None
    cache[run.info.run_id] = why
    return why


def _resumed_to_finish(client: MlflowClient, run: Run) -> bool:
    """Whether the chain of runs that resumed `run` (`xlsub.superseded_by`) ends in a FINISHED run."""
    seen = {run.info.run_id}
    while (after := run.data.tags.get(SUPERSEDED_BY_TAG)) and after not in seen:
        seen.add(after)
        try:
            run = client.get_run(after)
        except MlflowException:
            return False
    return run.info.status == "FINISHED" and len(seen) > 1


def collect(client: MlflowClient, experiment_ids: list[str] | None = None, stale_after: float = tracking.STALE_SECONDS,
            checkpoints: Path = LOCAL_CHECKPOINTS, dry_run: bool = False, now: float | None = None) -> Report:
    """Mark dead RUNNING runs FAILED and delete local checkpoints no rerun needs (the module's two rules);
    with `dry_run`, only say so. `experiment_ids` None is every active experiment."""
    now = time.time() if now is None else now
    report = Report()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50_000)]
    cache: dict[str, str | None] = {}
    for start in range(0, len(experiment_ids), 100):
        for run in client.search_runs(experiment_ids[start:start + 100], "attributes.status = 'RUNNING'", max_results=50_000):
            why = _dead(client, run, now, stale_after, cache)
            if why is None:
                continue
            report.marked.append((run.info.run_id, why))
            if not dry_run:
                client.set_tag(run.info.run_id, GC_TAG, f"marked FAILED by xlsub.tracking.gc at {time.strftime('%Y-%m-%d %H:%M:%S')}: {why}")
                client.set_terminated(run.info.run_id, "FAILED")
    for folder in sorted(p for p in Path(checkpoints).glob("*") if p.is_dir()):
        try:
            run = client.get_run(folder.name)
        except MlflowException:
            report.kept.append((folder, "no such run on this tracking server"))
            continue
        stage = run.data.tags.get(STAGE_TAG, "xlsub")
        if run.info.status == "FINISHED":
            whose = f"{stage} run {run.info.run_id} FINISHED"
        elif _resumed_to_finish(client, run):
            whose = f"{stage} run {run.info.run_id} {run.info.status}, resumed by a run that FINISHED"
        else:
            continue
        size = folder_size(folder)
        if not dry_run:
            shutil.rmtree(folder)
        report.deleted.append((folder, size, whose))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlsub.tracking.gc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be marked and deleted; change nothing")
    parser.add_argument("--experiment", action="append", help="only this experiment (by name; repeatable); default: all")
    parser.add_argument("--stale-seconds", type=float, default=tracking.STALE_SECONDS,
                        help=f"a RUNNING run silent longer than this is dead (default {tracking.STALE_SECONDS:.0f})")
    parser.add_argument("--checkpoints", type=Path, default=LOCAL_CHECKPOINTS, help=f"the local checkpoint folder (default {LOCAL_CHECKPOINTS})")
    args = parser.parse_args(argv)
    client = MlflowClient()
    ids = None
    if args.experiment:
        found = {name: client.get_experiment_by_name(name) for name in args.experiment}
        if missing := [name for name, exp in found.items() if exp is None]:
            print(f"xlsub gc: no experiment named {', '.join(missing)}; see `mlflow experiments search`", file=sys.stderr)
            return 2
        ids = [exp.experiment_id for exp in found.values()]
    report = collect(client, ids, args.stale_seconds, args.checkpoints, args.dry_run)
    mark, delete = ("would mark", "would delete") if args.dry_run else ("marked", "deleted")
    for run_id, why in report.marked:
        print(f"{mark} FAILED: run {run_id} ({why})")
    for folder, size, whose in report.deleted:
        print(f"{delete} {folder} ({size_text(size)}): {whose}")
    for folder, why in report.kept:
        print(f"kept {folder}: {why}")
    print(f"{'would free' if args.dry_run else 'freed'} {size_text(report.freed)} ({report.freed} bytes) in {len(report.deleted)} checkpoint "
          f"folder{'s' * (len(report.deleted) != 1)}; {len(report.marked)} dead run{'s' * (len(report.marked) != 1)} "
          f"{'to mark' if args.dry_run else 'marked'} FAILED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
