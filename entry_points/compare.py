"""compare: several analyze runs of the same languages as mean, spread and each run's value, with figures
with error bars and a report.

    mlflow run . -e compare --env-manager local -P analyze_run_ids=<id>,<id>,<id>

Each analyze run keeps its own lineage; the compare run names them in its parameter and in the tag
`xlsub.analyze_run_ids`. A run's languages are those its manifest records (its encode run's, which
are exactly the languages the analyze run was given); the tables' row labels depend on which analyses ran
and leave out the reference language.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from entry_points._common import RUN_ID, StageArgs, parse_args, split_items
from xlsub import artifacts, stages
from xlsub.errors import XlsubError
from xlsub.report.compare import PARAM, check_same_languages, compare, write_comparison
from xlsub.tracking import lineage
from xlsub.tracking import runs as tracking

log = logging.getLogger(compare.__module__)  # xlsub.report.compare, the library this stage drives


@dataclass
class CompareArgs(StageArgs):
    analyze_run_ids: str = field(default="", metadata={"help": "two or more FINISHED analyze run IDs, comma-separated, each once, of runs that analysed the same languages",
                                                       "items": RUN_ID})

    @property
    def run_ids(self) -> list[str]:
        return split_items(PARAM, self.analyze_run_ids, RUN_ID)

    def check_stage(self) -> None:
        ids = self.run_ids
        if "latest" in ids:
            raise XlsubError(f"{PARAM}: 'latest' names a single run and compare needs several; pass two or more analyze run IDs, comma-separated")
        if len(ids) < 2:
            raise XlsubError(f"{PARAM}: got {len(ids)} run ID{'' if len(ids) == 1 else 's'}; pass at least two analyze run IDs, comma-separated")


def resolve_inputs(args: CompareArgs) -> dict[str, Run]:
    """The FINISHED analyze runs, by ID, in the order given."""
    client, runs = MlflowClient(), {}
    for run_id in args.run_ids:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise XlsubError(f"{PARAM}: no run with ID '{run_id}' on {mlflow.get_tracking_uri()}; pass the IDs of existing analyze runs") from None
        runs[run_id] = tracking.resolve_run(PARAM, run_id, "analyze")
    return runs


def analysed_languages(run: Run, work: Path) -> list[str]:
    """The languages of the analyze run, as its manifest records them."""
    return list(lineage.manifest(run, PARAM, work / run.info.run_id)["languages"])


def load_tables(run: Run) -> dict[str, object]:
    """Every table the analyze run logged in long form, by table id (`mlflow.load_table`)."""
    client = MlflowClient()
    paths = [a.path for a in client.list_artifacts(run.info.run_id, artifacts.TABLES_DIR)]
    ids = [Path(p).stem for p in paths if p == artifacts.long_table_path(Path(p).stem)]
    return {table_id: client.load_table(run.info.experiment_id, artifacts.long_table_path(table_id), run_ids=[run.info.run_id])
            for table_id in ids}


def describe(run: Run) -> dict[str, str]:
    """What the report lists about an analyze run: its name, experiment, input runs and parameters."""
    tags = run.data.tags
    return {"run name": run.info.run_name or "", "experiment": run.info.experiment_id,
            **{f"{stage} run": tags.get(artifacts.input_tag(stage), "") for stage in stages.lineage("analyze")}, **run.data.params}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(CompareArgs, argv)
    with tracking.stage_run("compare", args) as run:
        runs = resolve_inputs(args)
        mlflow.set_tag(artifacts.ANALYZE_RUNS_TAG, ",".join(runs))
        with tempfile.TemporaryDirectory() as tmp:
            languages = {run_id: analysed_languages(r, Path(tmp) / "inputs") for run_id, r in runs.items()}
            log.info("comparing %d analyze runs of %s", len(runs), ",".join(check_same_languages(languages)))
            result = compare({run_id: r.data.metrics for run_id, r in runs.items()},
                             {run_id: load_tables(r) for run_id, r in runs.items()}, languages)
            uri = mlflow.get_tracking_uri()
            links = {r.info.run_id: lineage.run_url(uri, r.info.experiment_id, r.info.run_id) for r in [*runs.values(), run]}
            out = Path(tmp) / "out"
            write_comparison(out, result, {run_id: describe(r) for run_id, r in runs.items()}, links, run.info.run_id)
            mlflow.log_metrics(result.logged_metrics())
            mlflow.log_artifacts(str(out))
        for note in result.notes:
            log.info(note)


if __name__ == "__main__":
    main()
