"""Print where a demo's results are: the experiment, its newest runs, their artifacts, and how to open the UI."""

from __future__ import annotations

import argparse
import sys

import mlflow
from mlflow.tracking import MlflowClient

from xlsub.tracking import STAGE_TAG


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="xlsub-demo")
    args = parser.parse_args(argv)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"xlsub summary: no experiment '{args.experiment}' on {mlflow.get_tracking_uri()}; run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=20)
    uri = mlflow.get_tracking_uri()
    print(f"\nExperiment '{experiment.name}' (ID {experiment.experiment_id}) on {uri}")
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId"):
            continue
        stage = run.data.tags.get(STAGE_TAG, "?")
        print(f"  {stage:9s} run {run.info.run_id}  {run.info.status}  artifacts: {run.info.artifact_uri}")
        ppl = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("ppl_after.")}
        if ppl:
            print("            " + "  ".join(f"{k.split('.', 1)[1]}={v:.0f}" for k, v in ppl.items()))
        if stage == "finetune":
            break  # only the newest run of the pipeline as it exists today
    print(f"\nOpen the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
