"""End-to-end analyze runs after small upstream runs: every figure, table and the report exist, the
report references every figure, and bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from html import escape

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, children_of, mlflow_run, refuse_in_process, runs_of, subprocess_env
from xlsub.report.verdicts import QUESTIONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def analyze_run(store, encode_run):
    mlflow_run(store, "analyze", {})
    return runs_of(store, "xlsub-tests", "analyze")[0]


def test_analyze_logs_every_figure_table_and_a_report_that_shows_them(store, finetune_run, prune_run, encode_run, analyze_run):
    run = analyze_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["xlsub.encode_run_id"] == encode_run.info.run_id
    assert run.data.tags["xlsub.prune_run_id"] == prune_run.info.run_id
    assert run.data.tags["xlsub.finetune_run_id"] == finetune_run.info.run_id
    client = MlflowClient(store)
    figures = {a.path.split("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "figures")}
    tables = {a.path.split("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "tables")}
    expected = {"mask_jaccard.png", "cross_ppl.png", "cross_ppl_relative.png", "heads_kept_per_layer.png", "cka_vs_reference.png",
                "cka_pairs.png", "cka_full_vs_subnetwork.png", "cka_controls.png", "token_overlap.png"}
    assert expected <= figures
    assert {"mask_jaccard.csv", "mask_jaccard_expected.csv", "cross_ppl.csv", "cross_ppl_relative.csv", "cross_ppl_random.csv",
            "heads_kept_per_layer.csv", "params_kept_per_layer.csv", "cka_vs_reference.csv", "cka_controls.csv",
            "cka_full_vs_subnetwork.csv", "token_overlap.csv", "mask_jaccard_pvalue.csv", "specificity_gap.csv",
            "cross_ppl_relative_lo.csv", "cross_ppl_relative_hi.csv", "cross_ppl_random_relative_lo.csv",
            "equal_size_jaccard.csv"} <= tables
    # the verdicts open the report and are an artifact of their own
    verdicts = json.load(open(client.download_artifacts(run.info.run_id, "verdicts.json")))
    assert [v["question"] for v in verdicts] == list(QUESTIONS[:5])  # the heads' questions: no neurons run given
    report = open(client.download_artifacts(run.info.run_id, "report.html"), encoding="utf-8").read()
    assert report.index(escape(QUESTIONS[0])) < report.index("Lineage")
    lo = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/cross_ppl_relative_lo.csv"), index_col=0)
    hi = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/cross_ppl_relative_hi.csv"), index_col=0)
    point = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/cross_ppl_relative.csv"), index_col=0)
    assert ((lo <= point.loc[lo.index, lo.columns] + 1e-9) & (point.loc[lo.index, lo.columns] <= hi + 1e-9)).all().all()
    html = open(client.download_artifacts(run.info.run_id, "report.html"), encoding="utf-8").read()
    for name in figures:
        assert f'src="figures/{name}"' in html
    for run_id in (finetune_run.info.run_id, prune_run.info.run_id, encode_run.info.run_id, run.info.run_id):
        assert run_id in html
    metrics = run.data.metrics
    # the summary numbers, recomputed by hand from the prune run's head masks
    masks = {}
    for child in children_of(store, prune_run):
        with open(client.download_artifacts(child.info.run_id, "head_mask.json")) as f:
            masks[child.data.tags["xlsub.language"]] = {(l, h) for l, row in enumerate(json.load(f)) for h, v in enumerate(row) if v}
    pairs = [(a, b) for a in masks for b in masks if a < b]
    # two masks that keep nothing are identical: Jaccard 1 (a barely trained model can lose every head)
    jaccards = [len(masks[a] & masks[b]) / len(masks[a] | masks[b]) if masks[a] | masks[b] else 1.0 for a, b in pairs]
    assert metrics["mean_jaccard"] == pytest.approx(sum(jaccards) / len(jaccards))
    assert metrics["mean_heads_kept_frac"] == pytest.approx(sum(len(m) for m in masks.values()) / (32 * len(masks)))
    # the control: parallel sentences are more alike than shuffled pairings
    assert metrics["mean_cka_last_layer"] > metrics["mean_cka_shuffled_last_layer"]


def test_every_table_is_also_an_mlflow_table_with_the_csv_values(store, analyze_run):
    run_id = analyze_run.info.run_id
    client = MlflowClient(store)
    names = {a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "tables")}
    csvs = {n[:-4] for n in names if n.endswith(".csv")}
    assert csvs and csvs == {n[:-5] for n in names if n.endswith(".json")}
    long = client.load_table(analyze_run.info.experiment_id, "tables/cka_vs_reference.json", run_ids=[run_id],
                             extra_columns=["run_id"])
    wide = pd.read_csv(client.download_artifacts(run_id, "tables/cka_vs_reference.csv"), index_col=0)
    assert list(long.columns) == ["language", "layer", "value", "run_id"] and set(long["run_id"]) == {run_id}
    assert len(long) == wide.size
    for row in long.itertuples():
        # MLflow writes table JSON with 10 decimals
        assert row.value == pytest.approx(wide.loc[row.language, str(row.layer)], abs=1e-10)


def analyze_cli(store, *args):
    return subprocess.run([sys.executable, "-m", "entry_points.analyze", *args], env=subprocess_env(store, MLFLOW_EXPERIMENT_NAME="xlsub-tests"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_analyze_refuses_bad_input(store, prune_run, encode_run, capsys):
    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("xlsub-tests").experiment_id
    hollow = client.create_run(exp_id, tags={"xlsub.stage": "encode", "xlsub.prune_run_id": prune_run.info.run_id,
                                             "xlsub.finetune_run_id": encode_run.data.tags["xlsub.finetune_run_id"]})
    client.set_terminated(hollow.info.run_id, "FINISHED")  # finished, but without artifacts
    stray = client.create_run(exp_id, tags={"xlsub.stage": "prune"})
    client.set_terminated(stray.info.run_id, "FINISHED")
    enc = encode_run.info.run_id
    cases = [
        (["--encode_run_id", enc, "--prune_run_id", stray.info.run_id], "prune_run_id"),
        (["--encode_run_id", hollow.info.run_id], "encode_run_id"),
    ]
    try:
        proc = analyze_cli(store, *cases[0][0])  # once through a real process; parameter values: tests/test_validation.py
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("xlsub analyze: prune_run_id:"), proc.stderr[-2000:]
        for args, named in cases:
            line, _ = refuse_in_process(capsys, store, exp_id, "analyze", args)
            assert line.startswith(f"xlsub analyze: {named}:"), (args, line)
    finally:
        client.delete_run(hollow.info.run_id)
        client.delete_run(stray.info.run_id)


def test_two_pruning_seeds_are_named_de_s0_and_de_s1_in_every_stage(store, finetune_run):
    """prune -> encode -> analyze with seeds 0,1: run names, encoding keys and table rows all spell a
    subnetwork `<lang>-s<seed>`, and the per-seed tables hold what the child runs logged."""
    experiment = "xlsub-two-seeds"
    MlflowClient(store).create_experiment(experiment)
    # the naming is the point: no stock models, one random draw, few resamples
    params = {"finetune_run_id": finetune_run.info.run_id, "languages": "en,de", "seeds": "0,1", "eval_examples": "16",
              "log_stock_models": "false", "random_draws": "1", "continue_to": "0", "bootstrap": "20"}
    mlflow_run(store, "prune", params, experiment=experiment)
    (prune,) = [r for r in runs_of(store, experiment, "prune") if r.data.tags.get("xlsub.child") != "true"]
    children = {c.info.run_name: c for c in children_of(store, prune)}
    assert sorted(children) == ["prune/de-s0", "prune/de-s1", "prune/en-s0", "prune/en-s1"]
    mlflow_run(store, "encode", {"prune_run_id": prune.info.run_id, "max_sentences": "24", "batch_size": "16", "subnetwork_seeds": "all"},
               experiment=experiment)
    (encode,) = runs_of(store, experiment, "encode")
    client = MlflowClient(store)
    keys = {a.path.split("/", 1)[1] for a in client.list_artifacts(encode.info.run_id, "encodings")}
    assert keys == {"full", "de-s0", "de-s1", "en-s0", "en-s1"}
    mlflow_run(store, "analyze", {"encode_run_id": encode.info.run_id, "bootstrap": "20", "permutations": "20", "cka_permutations": "20",
                                  "subnetwork_permutations": "10", "length_permutations": "10"}, experiment=experiment)
    (analyze,) = runs_of(store, experiment, "analyze")
    by_seed = pd.read_csv(client.download_artifacts(analyze.info.run_id, "tables/cross_ppl_by_seed.csv"), index_col=0)
    assert sorted(by_seed.index) == ["de-s0", "de-s1", "en-s0", "en-s1"]
    for name, child in children.items():
        for lang in ("en", "de", "zh"):
            assert by_seed.loc[name.removeprefix("prune/"), lang] == pytest.approx(child.data.metrics[f"ppl.{lang}"], rel=1e-9)
    kept = pd.read_csv(client.download_artifacts(analyze.info.run_id, "tables/heads_kept_per_layer.csv"), index_col=0)
    assert sorted(kept.index) == ["de-s0", "de-s1", "en-s0", "en-s1"]
    stability = pd.read_csv(client.download_artifacts(analyze.info.run_id, "tables/mask_seed_stability.csv"), index_col=0)
    assert list(stability["pairs"]) == [1, 1]  # one seed pair per language
