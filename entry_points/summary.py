"""Print where a pipeline's results are: the experiment, the newest main run and its stage runs,
the report, and the command that opens the MLflow UI on the same store."""

from __future__ import annotations

import argparse
import json
import sys

import mlflow
from mlflow.tracking import MlflowClient

from xlsub import stages
from xlsub.artifacts import METRIC, REPORT, REUSED_TAG, STAGE_TAG, VERDICTS, input_tag
from xlsub.errors import XlsubError
from xlsub.tracking.runs import download


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="xlsub-demo")
    args = parser.parse_args(argv)
    client = MlflowClient()
    uri = mlflow.get_tracking_uri()
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"xlsub summary: no experiment '{args.experiment}' on {uri}; run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{STAGE_TAG}` = 'main'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"xlsub summary: no main run in experiment '{args.experiment}'; run `make demo` first")
    run = runs[0]
    print(f"\nExperiment '{experiment.name}' (ID {experiment.experiment_id}) on {uri}")
    print(f"main run {run.info.run_id}: {run.info.status}; reused stages: {run.data.tags.get(REUSED_TAG, '?')}")
    reused = run.data.tags.get(REUSED_TAG, "").split(",")
    for stage in stages.lineage_order():
        stage_id = run.data.tags.get(input_tag(stage))
        if stage_id:
            info = client.get_run(stage_id).info
            seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
            print(stage_line(stage, stage_id, seconds, stage in reused))
    analyze_id = run.data.tags.get(input_tag("analyze"))
    if analyze_id:
        report = client.get_run(analyze_id).info.artifact_uri.rstrip("/") + "/" + REPORT
        print(f"\nReport: {report.removeprefix('file://')}")
        metrics = client.get_run(analyze_id).data.metrics
        for key in (METRIC.mean_jaccard, METRIC.mean_expected_jaccard, METRIC.mean_cka_last_layer,
                    METRIC.mean_cka_control_last_layer("shuffled"), METRIC.mean_heads_kept_frac, METRIC.specificity_gap,
                    METRIC.specificity_gap_random):
            if key in metrics:
                print(f"  {key:30s} {metrics[key]:.3f}")
        try:
            answers = json.loads(download(analyze_id, VERDICTS).read_text())
        except XlsubError:
            answers = []
        for verdict in answers:
            print(f"\n{verdict['question']}\n  {verdict['answer']}")
    for line in next_steps(uri, experiment.experiment_id, run.data.tags):
        print(line)


def stage_line(stage: str, run_id: str, seconds: float | None, reused: bool) -> str:
    """One stage of the pipeline: its run and how long it took (a reused run's own time, said so)."""
    took = "still running" if seconds is None else f"{seconds:6.0f} s"
    return f"  {stage:9s} {run_id}  {took}{' (reused: computed by an earlier pipeline)' if reused else ''}"


def next_steps(uri: str, experiment_id: str, tags: dict) -> list[str]:
    """The commands after `make demo`: activate the venv (`mlflow run` runs the `python` on PATH), open the
    UI on the runs table (an experiment's root page opens MLflow's GenAI overview, empty here), rerun a
    stage on the demo's runs."""
    server = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    lines = ["", "Next (from this folder):", "  source .venv/bin/activate   # `mlflow run` runs the python on PATH"]
    if not uri.startswith("http"):
        lines.append(f"  mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    lines.append(f"  open {server.rstrip('/')}/#/experiments/{experiment_id}/runs   # the training-runs table")
    finetune, encode = tags.get(input_tag("finetune")), tags.get(input_tag("encode"))
    if finetune:
        lines.append(f"  mlflow run . -e prune --env-manager local -P finetune_run_id={finetune} -P languages=en,de")
    if encode:
        lines.append(f"  mlflow run . -e analyze --env-manager local -P encode_run_id={encode} -P cka=linear")
    return lines


if __name__ == "__main__":
    main()
