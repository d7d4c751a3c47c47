"""benchmarks/scale.py: the growth-exponent fit, the GPU projection from measured stage rates, and the
analyze core it runs, on tiny sizes."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402


def test_exponent_recovers_a_power_law():
    sizes = [100, 200, 400]
    assert scale.exponent(sizes, [3.0 * s**1.7 for s in sizes]) == pytest.approx(1.7)
    value, b = scale.extrapolate(sizes, [2.0 * s for s in sizes], 5000)
    assert b == pytest.approx(1.0) and value == pytest.approx(10_000.0)


def test_gpu_projection_uses_the_measured_stage_rates():
    result = {"rows": [{"stage": "finetune bf16", "rate": 16.0}, {"stage": "finetune fp32", "rate": 10.0},
                       {"stage": "prune (importance pass, fp32)", "rate": 100.0}, {"stage": "encode (fp32)", "rate": 1000.0}]}
    s = scale.STUDY
    assert scale.gpu_stage_hours("finetune", result) == pytest.approx(s["finetune_steps"] / 16.0 / 3600)
    chunks = 8 * 10 * 256 + 8 * 3 * 8 * 3000 / 3  # importance passes + forward-only evaluations
    assert scale.gpu_stage_hours("prune", result) == pytest.approx(chunks / 100.0 / 3600)
    assert scale.gpu_stage_hours("encode", result) == pytest.approx(11 * 8 * 5000 / 1000.0 / 3600)
    assert math.isnan(scale.gpu_stage_hours("analyze", result))
    # the recorded H100 run: the hours follow from the file's own rates
    recorded = json.loads((ROOT / "benchmarks/results/gpu-h100.json").read_text())
    bf16 = next(row["rate"] for row in recorded["rows"] if row["stage"] == "finetune bf16")
    assert scale.gpu_stage_hours("finetune", recorded) == pytest.approx(s["finetune_steps"] / bf16 / 3600)
    # hours are inversely proportional to the rate: half as fast, twice as long, for every projected stage
    halved = {"rows": [{**row, "rate": row["rate"] / 2} for row in result["rows"]]}
    for stage in ("finetune", "prune", "encode"):
        assert scale.gpu_stage_hours(stage, halved) == pytest.approx(2 * scale.gpu_stage_hours(stage, result))


def test_analyze_core_runs_streamed_and_eager_on_tiny_sizes(tmp_path):
    import time

    for eager in (False, True):
        start = time.perf_counter()
        seconds = scale.child_analyze(n=12, subnetworks=1, eager=eager, languages=2, layers=2, d=8)
        assert 0 < seconds <= time.perf_counter() - start  # it times analyze alone, in seconds
    # streamed from files or handed over at once, analyze sees the same numbers
    from xlsub import artifacts
    from xlsub.report.analysis import AnalysisInputs, analyze
    from xlsub.report.similarity_tables import Counts

    langs = ["en", "de"]
    scale.synthetic_encodings(tmp_path, 12, 1, langs, 2, 8)
    store = artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)
    assert sorted(store) == ["base", "en-s0", "full", "random"]
    assert all(tuple(store[key][lang].shape) == (2, 12, 8) for key in store for lang in langs)
    eager = {key: {lang: store[key][lang].clone() for lang in store[key]} for key in store}
    tokens = {lang: [list(range(k)) for k in range(6, 18)] for lang in langs}
    counts = Counts(full=20, controls=20, subnetworks=10, length=10, power_draws=10)
    options = dict(cka_kind="debiased", layers=None, cka_precision="float64", reference="en", counts=counts,
                   bootstrap=20, permutations=20, resample_seed=0)
    metrics = [analyze(AnalysisInputs(languages=langs, encodings=e, tokens=tokens), **options).metrics for e in (store, eager)]
    assert metrics[0].keys() == metrics[1].keys() and "mean_cka_last_layer" in metrics[0]
    for name, value in metrics[0].items():
        assert value == pytest.approx(metrics[1][name], nan_ok=True), name
