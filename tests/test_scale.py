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
    recorded = json.loads((ROOT / "benchmarks/results/gpu-h100.json").read_text())
    assert scale.gpu_stage_hours("finetune", recorded) > 0


def test_analyze_core_runs_streamed_and_eager_on_tiny_sizes():
    for eager in (False, True):
        assert scale.child_analyze(n=12, subnetworks=1, eager=eager, languages=2, layers=2, d=8) > 0
