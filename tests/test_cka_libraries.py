"""xlsub's CKA against the CKA libraries benchmarks/cka.py times it with (the `bench` extra), and the
benchmark's skipping of a library that is not installed. The library tests skip without the extra."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from xlsub.similarity.cka import debiased_linear_cka, linear_cka, rbf_cka

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "cka.py"


def related(n: int = 80, d1: int = 12, d2: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = z @ torch.randn(3, d1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, d1, generator=g,
                                                                                       dtype=torch.float64) + 3.0
    y = z @ torch.randn(3, d2, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, d2, generator=g,
                                                                                       dtype=torch.float64) - 1.0
    return x, y


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_cka", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ckatorch_gram_form_agrees():
    ckatorch = pytest.importorskip("ckatorch")
    x, y = related()
    assert float(ckatorch.cka_base(x, y, "linear")) == pytest.approx(float(linear_cka(x, y)), abs=1e-12)
    assert float(ckatorch.cka_base(x, y, "linear", unbiased=True)) == pytest.approx(
        float(debiased_linear_cka(x, y)), abs=1e-12)
    assert float(ckatorch.cka_batch(x[None], y[None])) == pytest.approx(float(debiased_linear_cka(x, y)), abs=1e-12)


def test_ckatorch_rbf_differs_only_by_its_bandwidth():
    """ckatorch's median includes the n zero self-distances (a lower quantile of the pairs: a smaller
    bandwidth); with xlsub's bandwidth its kernel and centring give xlsub's value."""
    ckatorch = pytest.importorskip("ckatorch")
    x, y = related(n=41)  # small n: the diagonal's share of ckatorch's median is large
    ours = float(rbf_cka(x, y))
    assert abs(float(ckatorch.cka_base(x, y, "rbf")) - ours) > 1e-6
    assert float(load_benchmark()._ckatorch_rbf_matched(ckatorch, x, y)) == pytest.approx(ours, abs=1e-12)


def test_pytorch_cka_agrees_in_float64():
    pytorch_cka = pytest.importorskip("cka", reason="pytorch-cka not installed")
    if not hasattr(pytorch_cka, "cka_from_features"):
        pytest.skip("`cka` is not pytorch-cka")
    x, y = related()
    assert float(pytorch_cka.cka_from_features(x, y)[0, 0]) == pytest.approx(float(debiased_linear_cka(x, y)),
                                                                             abs=1e-12)


def test_benchmark_skips_a_missing_library_with_one_line(monkeypatch, capsys):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "LIBRARIES", {"no-such-cka-library": "no_such_cka_library"})
    methods, checks = bench.library_methods()
    assert capsys.readouterr().out.splitlines() == [
        "no-such-cka-library: not installed, skipped (pip install -e '.[bench]')"]
    assert [label for group in methods.values() for label, _ in group] == [
        "xlsub linear_cka", "xlsub debiased_linear_cka", "xlsub rbf_cka",
        "xlsub debiased_linear_cka(precision=float32)"]
    assert checks == {}
    bench.compare_libraries()  # nothing to compare: the header, the line, no timings
    out = [line for line in capsys.readouterr().out.splitlines() if line]
    assert out[0].startswith("CKA libraries") and out[1:] == [
        "no-such-cka-library: not installed, skipped (pip install -e '.[bench]')"]
