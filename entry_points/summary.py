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
            print("            ppl after finetuning: " + "  ".join(f"{k.split('.', 1)[1]}={v:.0f}" for k, v in ppl.items()))
        if stage == "prune":
            children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
            for child in sorted(children, key=lambda c: c.info.run_name):
                lang = child.data.tags.get("xlsub.language", "?")
                m = child.data.metrics
                print(f"            {child.info.run_name:16s} heads kept {m.get('heads_kept', float('nan')):3.0f}"
                      f"  ppl on {lang} {m.get(f'ppl.{lang}', float('nan')):.0f} (full model {run.data.metrics.get(f'ppl_full.{lang}', float('nan')):.0f})")
        if stage == "finetune":
            break  # stop at the newest finetune run: the runs above it are its pipeline
    print(f"\nOpen the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
