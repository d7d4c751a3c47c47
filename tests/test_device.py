"""analyze's device path: every representation analysis keeps its tensors where the encodings are (checked on the
CPU by `tests.device_check.DeviceCheck`), GPU-only branches give the CPU's answers, and the device option resolves
as the stage documents."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.device_check import DeviceCheck
from xlsub import artifacts
from xlsub.devices import resolve_device
from xlsub.errors import XlsubError
from xlsub.report.similarity_tables import Counts
from xlsub.similarity import retrieval
from xlsub.stats import inference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402

OPTIONS = dict(layers=None, reference="en", bootstrap=40, permutations=40, resample_seed=0, counts=Counts(40, 40, 20, 20, 4))


def _stored_inputs(tmp_path: Path, n: int):
    inputs = scale.study_inputs(n, languages=["en", "de", "zh"], layers=3, d=24, chunks=12, heads=(3, 4))
    scale.write_store(inputs.encodings, tmp_path)
    return inputs, artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)


@pytest.mark.parametrize("n, kind, precision", [(120, "debiased", "float64"), (300, "debiased", "float32"), (120, "linear", "float64"),
                                                (120, "rbf", "float64"), (40, "debiased", "float64")])
def test_analyze_keeps_every_tensor_on_the_encodings_device(tmp_path, n, kind, precision):
    """The encodings read onto "the device" (`EncodingStore.to`, marked by the check): no operation of the whole
    analysis mixes them with CPU tensors or hands them to numpy, at the sizes that take each branch (feature and
    gram engines, tiled and all-pairs Mantel gathers, dense and Lanczos spectra, float32 products, rbf); and the
    tables are the plain run's. The check catches a mix: with the group labels of the exact null moments left on the
    CPU, it records the moments' gathers."""
    from xlsub.report.analysis import analyze
    from xlsub.similarity import moments

    inputs, store = _stored_inputs(tmp_path, n)
    check = DeviceCheck()
    with check.patched():
        checked = analyze(dataclasses.replace(inputs, encodings=store), cka_kind=kind, cka_precision=precision, device="cpu", **OPTIONS)
    assert not check.violations, "\n".join(f"{count} x {what}" for what, count in check.violations.items())
    assert check.marked, "nothing was marked: the encodings did not go through EncodingStore.to"
    plain = analyze(dataclasses.replace(inputs, encodings=artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)), cka_kind=kind,
                    cka_precision=precision, device="cpu", **OPTIONS)
    assert checked.tables.keys() == plain.tables.keys()
    for name, table in plain.tables.items():
        pd.testing.assert_frame_equal(checked.tables[name], table, obj=name)
    if n != 120 or kind != "debiased":
        return
    codes = moments.group_codes
    try:
        moments.group_codes = lambda groups, n, device="cpu": tuple(t.cpu() for t in codes(groups, n))
        check = DeviceCheck()
        with check.patched():
            analyze(dataclasses.replace(inputs, encodings=artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)), cka_kind=kind,
                    cka_precision=precision, device="cpu", **OPTIONS)
    finally:
        moments.group_codes = codes
    assert any(what.startswith("mixed index_add_: similarity/moments.py") for what in check.violations), list(check.violations)


@pytest.mark.parametrize("values", [torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                                    torch.randint(0, 40, (3000,), generator=torch.Generator().manual_seed(1)).double(),
                                    torch.tensor([2.0, 2.0, 2.0]), torch.tensor([3.0, 1.0, 2.0, 2.0, 1.0]), torch.tensor([1.0])])
def test_the_device_sort_gives_the_cpu_sorts_order_and_tie_runs(values):
    """`sorted_order` (torch's sort, what a GPU ranks with) against `value_order` (numpy's key sort): the same sorted
    values and the same runs of ties; the ranks `centred_ranks_` makes from either are the same."""
    order, runs = inference.sorted_order(values)
    cpu_order, cpu_runs = inference.value_order(values.clone())
    assert torch.equal(values[order], values[cpu_order]) and torch.equal(runs, cpu_runs)
    assert torch.equal(values[order], values.sort().values)


def test_the_device_ranks_equal_the_cpu_ranks_of_a_tied_rdm(monkeypatch):
    g = torch.Generator().manual_seed(3)
    d = torch.randint(0, 30, (60, 60), generator=g).double()
    d = d + d.T
    d.fill_diagonal_(0)
    expected = inference.centred_upper(d, "spearman")
    assert torch.equal(inference.centred_ranks_(d.clone()), expected)
    monkeypatch.setattr(inference, "on_cpu", lambda values: False)  # the GPU's branch
    assert torch.equal(inference.centred_ranks_(d.clone()), expected)
    assert inference.sorted_order(torch.tensor([1.0, float("nan")])) is None


def test_retrieval_screens_in_float32_off_the_cpu():
    """cuBLAS may reduce bfloat16 products in reduced precision, outside the screen's error bound: float32 there."""
    assert retrieval._screen_dtype(torch.device("cuda")) is torch.float32
    assert retrieval._screen_dtype(torch.device("cpu")) in (torch.bfloat16, torch.int8, torch.float32)


def test_encodings_move_to_the_device_when_read(tmp_path):
    inputs, store = _stored_inputs(tmp_path, 20)
    plain = {key: {lang: inputs.encodings[key][lang] for lang in inputs.encodings[key]} for key in ("full", "base")}
    assert artifacts.encodings_on(plain, "cpu") is plain and artifacts.encodings_on(store, "cpu") is store
    moved = artifacts.encodings_on(plain, "meta")
    assert moved["full"]["en"].device.type == "meta" and tuple(moved["full"]["en"].shape) == (3, 20, 24)
    assert artifacts.last_layer(moved["full"], "en").device.type == "meta" and artifacts.layer_count(moved["full"], "en") == 3
    assert "en" in moved["full"] and "xx" not in moved["full"] and list(moved) == ["full", "base"]
    on_meta = artifacts.encodings_on(store, "meta")
    assert isinstance(on_meta, artifacts.EncodingStore) and on_meta.device.type == "meta"
    assert on_meta["full"]["de"].device.type == "meta" and artifacts.last_layer(on_meta["full"], "de").shape == (20, 24)
    assert store["full"]["de"].device.type == "cpu"


def test_analyze_resolves_its_device_without_mps(monkeypatch):
    """analyze computes in float64, which MPS lacks: auto passes over MPS, and an explicit mps is refused in one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps" and resolve_device("auto", float64=True) == "cpu"
    with pytest.raises(XlsubError, match="device: 'mps' has no float64.*use auto, cpu or cuda"):
        resolve_device("mps", float64=True)
    assert resolve_device("mps") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", float64=True) == "cuda"


def test_ieee_float32_holds_inside_and_restores_the_callers_setting():
    from xlsub.devices import ieee_float32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with ieee_float32():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(KeyError), ieee_float32():
            raise KeyError("inside")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_analyze_computes_in_ieee_float32_whatever_the_callers_setting(tmp_path, monkeypatch):
    """A caller that allows TF32 or bfloat16 passes ("high", "medium") still gets IEEE float32 products in every table
    of analyze (recorded in the CKA p-value, retrieval and power tables), and its own setting back afterwards."""
    from xlsub.report import similarity_tables
    from xlsub.report.analysis import analyze

    seen = {}
    for name in ("cka_pvalue_table", "retrieval_table", "power_table"):
        table = getattr(similarity_tables, name)

        def recording(*args, _table=table, _name=name, **kwargs):
            seen[_name] = torch.get_float32_matmul_precision()
            return _table(*args, **kwargs)

        monkeypatch.setattr(similarity_tables, name, recording)
    inputs, store = _stored_inputs(tmp_path, 40)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        analyze(dataclasses.replace(inputs, encodings=store), cka_kind="debiased", cka_precision="float32", device="cpu", **OPTIONS)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == dict.fromkeys(("cka_pvalue_table", "retrieval_table", "power_table"), "highest")


def test_release_freed_memory_hands_glibcs_kept_heap_back():
    """Tensors of 24 MB made and dropped on a worker thread (as `side_by_side`'s) after a 30 MB one was freed (which
    raises glibc's mmap threshold) stay in the thread's heap, resident, kept there by the 1 MB blocks still live
    between them; `release_freed_memory` returns them to the system."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from xlsub import devices

    if devices._glibc() is None:
        pytest.skip("not glibc: malloc_trim does not exist here")
    process = psutil.Process()

    def churn() -> tuple[int, int, list]:
        first = torch.ones(30 * 2**20 // 8, dtype=torch.float64)
        del first  # mmapped, then freed: the threshold rises to 30 MB
        blocks, pins = [], []
        for _ in range(20):
            blocks.append(torch.ones(24 * 2**20 // 8, dtype=torch.float64))  # written: resident
            pins.append(torch.ones(2**20 // 8, dtype=torch.float64))
        before = process.memory_info().rss
        del blocks
        return before, process.memory_info().rss, pins

    with ThreadPoolExecutor(1) as pool:
        before, kept, pins = pool.submit(churn).result()
    devices.release_freed_memory()
    after = process.memory_info().rss
    assert kept > before - 100 * 2**20  # freed, but still resident
    assert after < kept - 300 * 2**20  # 480 MB were freed: most of it handed back
    del pins


@pytest.mark.parametrize("setting", [None, "0"])
def test_stage_processes_back_large_tensors_with_huge_pages(setting):
    """A process that imports `entry_points` (every stage's, and `scale.py --analyze-study`'s) has torch back a 64 MB
    tensor with transparent huge pages, counted by the kernel (AnonHugePages); a user's THP_MEM_ALLOC_ENABLE=0 turns
    that off. Needs the kernel's madvise mode (always would give huge pages either way)."""
    import os
    import subprocess

    from entry_points import HUGE_PAGES

    kernel = scale.transparent_huge_pages()
    if kernel != "madvise" and not (setting is None and kernel == "always"):
        pytest.skip(f"transparent huge pages are {kernel} here")
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES} | ({} if setting is None else {HUGE_PAGES: setting})
    code = ("import re, entry_points, torch; x = torch.ones(64 << 20, dtype=torch.uint8); "
            "print(re.search(r'AnonHugePages:\\s+(\\d+) kB', open('/proc/self/smaps_rollup').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    huge_mb = int(done.stdout.strip()) / 1024
    if setting is None:
        assert huge_mb >= 32, f"{huge_mb} MB of the 64 MB tensor in huge pages"
    else:
        assert huge_mb < 32, f"{huge_mb} MB in huge pages with {HUGE_PAGES}=0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_count_as_native_only_with_the_cpu_feature(monkeypatch, dtype):
    """oneDNN says it supports bfloat16 on any AVX-512 CPU (it emulates the products there, about 3.4x float32's time on
    an Ice Lake Xeon): `native_16bit_products` also asks the CPU for AVX512-BF16 / AMX-BF16 (AVX512-FP16 / AMX-FP16; on
    ARM64, BF16 / SVE-BF16 (FP16 arithmetic)), and retrieval's screen and prune's precision follow it."""
    from xlsub import devices

    ice_lake = {"avx512_f": True, "avx512_bw": True, "avx512_vnni": True, "avx512_bf16": False, "amx_bf16": False,
                "avx512_fp16": False, "amx_fp16": False}
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: ice_lake)
    assert devices.native_16bit_products(dtype) is False
    with pytest.raises(XlsubError, match="no (bf|fp)16 products in hardware"):
        devices.autocast("cpu", "bf16" if dtype == torch.bfloat16 else "fp16")
    if dtype == torch.bfloat16:
        assert retrieval._screen_dtype(torch.device("cpu")) is not torch.bfloat16
    neoverse_n1 = {"architecture": "arm64", "neon": True, "dot": True, "fp16_arith": False, "bf16": False, "sve": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: neoverse_n1)
    assert devices.native_16bit_products(dtype) is False
    for feature in devices.NATIVE_16BIT[dtype]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**ice_lake, feature: True})
        assert devices.native_16bit_products(dtype) is True
        if dtype == torch.bfloat16:
            assert retrieval._screen_dtype(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # held below it by ONEDNN_MAX_CPU_ISA
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert devices.native_16bit_products(dtype) is False
