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
                   bootstrap=20, permutations=20, resample_seed=0, device="cpu")
    metrics = [analyze(AnalysisInputs(languages=langs, encodings=e, tokens=tokens), **options).metrics for e in (store, eager)]
    assert metrics[0].keys() == metrics[1].keys() and "mean_cka_last_layer" in metrics[0]
    for name, value in metrics[0].items():
        assert value == pytest.approx(metrics[1][name], nan_ok=True), name


def test_study_inputs_have_the_studys_shape_on_tiny_sizes():
    """`--analyze-study`'s inputs: masks keeping 80.6% of heads on 3-step trajectories, per-chunk losses of every
    model and random draw, parallel token counts, and encodings generated deterministically in float16."""
    import torch

    from xlsub.artifacts import SubnetworkId

    langs = ["en", "de", "zh"]
    inputs = scale.study_inputs(30, languages=langs, layers=2, d=16, chunks=12, heads=(12, 12))
    assert sorted(inputs.masks) == sorted(SubnetworkId(l, 0) for l in langs)
    for sid, mask in inputs.masks.items():
        assert int(mask.sum()) == 144 - 2 * 14 and len(inputs.trajectories[sid]) == 4  # 116 of 144, as the study's 80.6%
        assert torch.equal(inputs.trajectories[sid][2], mask)
        assert all(bool((later <= earlier).all()) for earlier, later in zip(inputs.trajectories[sid], inputs.trajectories[sid][1:]))
    keys = {("full", -1, l) for l in langs} | {(f"{l}-s0", draw, e) for l in langs for e in langs for draw in (-1, 0, 1)}
    assert set(inputs.chunk_losses) == keys and all(len(c.nll) == 12 for c in inputs.chunk_losses.values())
    assert list(inputs.cross_ppl.index) == [f"{l}-s0" for l in langs] and list(inputs.cross_ppl.columns) == langs
    assert all(len(inputs.tokens[l]) == 30 for l in langs)
    store = inputs.encodings
    assert list(store) == ["full", "en-s0", "de-s0", "zh-s0", "base", "random"]
    first = store["de-s0"]["zh"].clone()
    assert first.shape == (2, 30, 16) and first.dtype == torch.float32
    assert torch.equal(first, first.half().float())  # stored in float16
    for key in store:  # past the cache: generated again, the same numbers
        store[key]["en"]
    assert torch.equal(store["de-s0"]["zh"], first) and store.loads > len(store)
    assert not torch.equal(store["full"]["de"], store["full"]["zh"])
    # the neurons run: LAPE's 1% of 12 x 3,072 neurons over the languages, halves inside the whole, losses of every set
    neurons = inputs.neurons
    assert sorted(neurons.masks) == sorted(inputs.masks) and all(m.shape == (12, 3072) for m in neurons.masks.values())
    off = torch.stack([m == 0 for m in neurons.masks.values()])
    assert 0 < int(off.any(0).sum()) <= round(0.01 * 12 * 3072) and bool(neurons.eligible["0"].bool()[off.any(0)].all())
    for sid, halves in neurons.halves.items():
        assert all(bool(((halves[h] == 0) <= (neurons.masks[sid] == 0)).all()) for h in ("a", "b"))
    assert set(neurons.chunk_losses) == keys


def test_analyze_defaults_are_the_stages():
    import torch

    from entry_points.analyze import AnalyzeArgs

    options, args = scale.analyze_defaults(), AnalyzeArgs()
    assert options["counts"].full == args.cka_permutations and options["counts"].subnetworks == args.subnetwork_permutations
    assert options["counts"].length == args.length_permutations and options["counts"].power_draws == args.power_draws
    assert (options["bootstrap"], options["permutations"], options["cka_kind"]) == (args.bootstrap, args.permutations, args.cka)
    assert args.device == "auto" and options["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # never MPS: no float64


def test_the_study_measurement_reads_its_synthetic_encodings_as_analyze_reads_a_real_run(tmp_path):
    """analyze_study writes the synthetic encodings as the encode stage does and hands analyze the EncodingStore:
    every tensor read back equals the generated one (float16 is their stored form, so exactly)."""
    import torch

    from xlsub import artifacts

    inputs = scale.study_inputs(30, languages=["en", "de"], layers=2, d=16, chunks=4, heads=(2, 4))
    seconds = scale.write_store(inputs.encodings, tmp_path)
    store = artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)
    assert seconds >= 0 and sorted(store) == sorted(inputs.encodings)
    for key in inputs.encodings:
        for lang in ("en", "de"):
            assert torch.equal(store[key][lang], inputs.encodings[key][lang])


def test_the_study_measurement_names_the_cpu_and_the_features_that_choose_its_kernels(tmp_path):
    """cpu_model reads the model name and, of `CPU_FEATURES`, the flags the CPU has, in that order; none where the
    source cannot be read."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu amx_bf16 sse avx2 avx512f\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU 9000\nflags\t\t: fpu amx_bf16 sse avx2 avx512f\n")
    assert scale.cpu_model(info) == {"name": "Some CPU 9000", "features": ["avx2", "avx512f", "amx_bf16"]}
    assert scale.cpu_model(tmp_path / "absent")["features"] == []


def test_the_isa_cap_reruns_the_measurement_in_a_capped_process_and_refuses_a_cpu_without_avx512(monkeypatch):
    """--isa avx2 re-executes this script with every library's cap and the marker set (once: the capped process
    itself runs on); on a CPU without AVX-512 it stops with one line naming the option."""
    import os

    calls = []

    class Replaced(Exception):
        pass

    def execve(path, argv, env):
        calls.append((argv, env))
        raise Replaced

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv(scale.ISA_CAPPED, raising=False)
    monkeypatch.setattr(scale, "cpu_model", lambda source=None: {"name": "x", "features": ["avx2", "avx512f"]})
    with pytest.raises(Replaced):
        scale.main(["--analyze-study", "--isa", "avx2", "--fraction", "0.01"])
    (argv, env), = calls
    assert argv[1].endswith("scale.py") and argv[2:] == ["--analyze-study", "--isa", "avx2", "--fraction", "0.01"]
    assert env[scale.ISA_CAPPED] == "avx2" and all(env[k] == v for k, v in scale.ISA_CAPS["avx2"].items())
    monkeypatch.setattr(scale, "cpu_model", lambda source=None: {"name": "x", "features": ["avx2"]})
    with pytest.raises(SystemExit) as stopped:
        scale.main(["--analyze-study", "--isa", "avx2"])
    assert stopped.value.code == 2 and len(calls) == 1
