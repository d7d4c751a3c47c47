"""The compare entry point against fake analyze runs made with MlflowClient in a throwaway sqlite store: the
logged means and standard deviations equal a hand computation, the artifacts exist, and bad input is
refused with one line and a FAILED run."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, refuse_in_process, subprocess_env

pytestmark = pytest.mark.slow
EXPERIMENT = "xlsub-compare-tests"
METRICS = {"mean_jaccard": [0.2, 0.4, 0.9], "mean_cka_last_layer": [0.5, 0.7, 0.6], "specificity_gap.de": [0.1, -0.1, 0.3]}
CKA = {("de", 0): [0.9, 0.8, 0.7], ("de", 1): [0.5, 0.6, 0.4], ("zh", 0): [0.3, 0.1, 0.2], ("zh", 1): [0.05, 0.1, 0.6]}
OVERLAP = {"de": [0.5, 0.25, 0.75], "zh": [0.0, 0.1, 0.05]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three analyze runs of en,de,zh (one with an extra metric), one of en,de, and a prune run."""
    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())

    def finished(stage, tags=None):
        run = client.create_run(exp, tags={"xlsub.stage": stage, **(tags or {})})
        return run.info.run_id

    def encode(languages):
        run_id = finished("encode")
        client.set_terminated(run_id, "FINISHED")
        return run_id, languages

    def analyze(encoded, i, extra_metric=False):
        encode_id, languages = encoded
        run_id = finished("analyze", {"xlsub.encode_run_id": encode_id, "xlsub.prune_run_id": "p", "xlsub.finetune_run_id": "f"})
        client.log_dict(run_id, {"stage": "analyze", "languages": languages, "tables": ["cka_vs_reference", "token_overlap"]},
                        "manifest.json")
        client.log_param(run_id, "cka", "linear")
        for name, values in METRICS.items():
            client.log_metric(run_id, name, values[i])
        if extra_metric:
            client.log_metric(run_id, "only_here", 1.0)
        cka = pd.DataFrame([(lang, layer, values[i]) for (lang, layer), values in CKA.items()], columns=["language", "layer", "value"])
        client.log_table(run_id, cka.iloc[::-1] if i == 1 else cka, "tables/cka_vs_reference.json")  # any row order
        overlap = pd.DataFrame({"language": list(OVERLAP), "token_overlap": [v[i] for v in OVERLAP.values()]})
        client.log_table(run_id, overlap, "tables/token_overlap.json")
        client.set_terminated(run_id, "FINISHED")
        return run_id

    three = encode(["en", "de", "zh"])
    runs = [analyze(three, i, extra_metric=i == 0) for i in range(3)]
    two = analyze(encode(["en", "de"]), 0)
    prune = finished("prune")
    client.set_terminated(prune, "FINISHED")
    return {"uri": uri, "client": client, "exp": exp, "runs": runs, "other_languages": two, "prune": prune}


def compare_cli(store, *args):
    return subprocess.run([sys.executable, "-m", "entry_points.compare", *args], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(store["uri"], MLFLOW_EXPERIMENT_NAME=EXPERIMENT), timeout=300)


def new_run(store, before):
    (run,) = [r for r in store["client"].search_runs([store["exp"]]) if r.info.run_id not in before]
    return run


def test_compare_logs_mean_and_std_of_every_shared_metric_and_cell(store):
    client, runs = store["client"], store["runs"]
    before = {r.info.run_id for r in client.search_runs([store["exp"]])}
    proc = compare_cli(store, "--analyze_run_ids", ",".join(runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = new_run(store, before)
    assert run.info.status == "FINISHED" and run.data.tags["xlsub.stage"] == "compare"
    assert run.data.tags["xlsub.analyze_run_ids"] == ",".join(runs) and run.data.params["analyze_run_ids"] == ",".join(runs)
    metrics = run.data.metrics
    assert set(metrics) == {f"{name}_{stat}" for name in METRICS for stat in ("mean", "std")}  # only_here: one run only
    for name, values in METRICS.items():
        assert metrics[f"{name}_mean"] == pytest.approx(statistics.mean(values))
        assert metrics[f"{name}_std"] == pytest.approx(statistics.stdev(values))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for folder in ("tables", "figures") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"metrics.csv", "report.html", "tables/cka_vs_reference.csv", "tables/token_overlap.csv",
            "figures/metrics.png", "figures/cka_vs_reference.png"} <= artifacts
    cka = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/cka_vs_reference.csv"), index_col=[0, 1])
    assert list(cka.columns) == ["mean", "std", "n", *runs]
    for (lang, layer), values in CKA.items():
        row = cka.loc[(lang, layer)]
        assert row["mean"] == pytest.approx(statistics.mean(values)) and row["std"] == pytest.approx(statistics.stdev(values))
        assert row["n"] == 3 and list(row[runs]) == pytest.approx(values)
    overlap = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/token_overlap.csv"), index_col=[0, 1])
    assert overlap.loc[("de", "token_overlap"), "std"] == pytest.approx(statistics.stdev(OVERLAP["de"]))
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "metrics.csv"), index_col=0)
    assert table.loc["mean_jaccard", runs[2]] == 0.9
    html = open(client.download_artifacts(run.info.run_id, "report.html"), encoding="utf-8").read()
    assert all(r in html for r in runs) and 'src="figures/cka_vs_reference.png"' in html


def test_compare_refuses_bad_input_with_one_line_and_a_failed_run(store, capsys):
    runs = store["runs"]
    cases = [
        ([runs[0]], "got 1 run ID"),
        ([runs[0], runs[0]], "given more than once"),
        ([runs[0], "latest"], "'latest'"),
        ([runs[0], "f" * 32], "no run with ID"),
        ([runs[0], store["prune"]], "is a prune run"),
        ([runs[0], runs[1], store["other_languages"]], "the runs analysed different languages"),
    ]
    proc = compare_cli(store, "--analyze_run_ids", ",".join(cases[0][0]))  # once through a real process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "got 1 run ID" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    for ids, fragment in cases:
        last, _ = refuse_in_process(capsys, store["uri"], store["exp"], "compare", ["--analyze_run_ids", ",".join(ids)])
        assert last.startswith("xlsub compare: analyze_run_ids:") and fragment in last, (ids, last)
    # the languages line names the runs and their languages
    assert f"{runs[0]}, {runs[1]}: en,de,zh; {store['other_languages']}: en,de" in last
