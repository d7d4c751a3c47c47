"""Where a stage computes and in what precision: `resolve_device` and `ieee_float32`, kept apart from the model code
so that a stage which only resolves a device (analyze) does not import transformers' modeling modules (about 80 MB)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

from xlsub.errors import XlsubError


def resolve_device(name: str, float64: bool = False) -> str:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit device must exist here. `float64`: the caller
    computes in float64, which MPS lacks: `auto` skips it and an explicit `mps` is refused."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available() and not float64:
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise XlsubError(f"device: unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == "mps" and float64:
        raise XlsubError(f"device: '{name}' has no float64, which this stage computes in; use auto, cpu or cuda")
    if not available[kind]:
        raise XlsubError(f"device: '{name}' is not available on this machine; use auto or cpu")
    return name


# The precisions a model's forward and backward passes may run in outside training (prune's and neurons' importance
# passes and evaluations): float32, or mixed precision by `torch.autocast` (matrix products in bfloat16 or float16, reductions
# and the loss in float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# The CPU features that multiply 16-bit floats in hardware (torch.cpu.get_capabilities' names). oneDNN's own checks
# (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) also say yes on AVX-512 without them, where it emulates bfloat16
# products: on an Ice Lake Xeon (AVX-512, VNNI, no BF16) a 5,000 x 768 x 5,000 product took 0.62 s in bfloat16 against
# 0.18 s in float32 (best of 5).
# On ARM64 the BF16 and FP16 arithmetic extensions (Graviton 3, Apple M2 and later).
NATIVE_16BIT = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"), torch.float16: ("avx512_fp16", "amx_fp16", "fp16_arith")}


def native_16bit_products(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies `dtype` (bfloat16 or float16) in this CPU's hardware: the CPU has one of
    `NATIVE_16BIT[dtype]` and oneDNN uses 16-bit products, not held below them (`ONEDNN_MAX_CPU_ISA`). Elsewhere torch
    emulates 16-bit products on the CPU, slower than float32's."""
    try:
        supported = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported
        capabilities = torch.cpu.get_capabilities()
        in_hardware = any(capabilities.get(feature, False) for feature in NATIVE_16BIT[dtype])
        return bool(in_hardware and torch.backends.mkldnn.is_available() and supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The block's model passes in `precision` (`PRECISIONS`) on `device`: nothing changes for fp32; bf16 and fp16 are
    `torch.autocast` of the device's kind (matrix products in 16 bits with float32 accumulation, softmax, norms and
    losses in float32). They run at several times float32's rate on GPUs with tensor cores and on CPUs that multiply
    16 bits in hardware (`native_16bit_products`); on another CPU they would be emulated, slower than fp32, and are
    refused."""
    if precision not in PRECISIONS:
        raise XlsubError(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    kind = device.split(":")[0]
    if not torch.amp.is_autocast_available(kind):
        raise XlsubError(f"precision: {precision} needs torch.autocast, which {device} lacks here; use fp32")
    if kind == "cpu" and not native_16bit_products(dtype):
        hardware = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
        raise XlsubError(f"precision: this CPU has no {precision} products in hardware ({hardware}): torch would emulate them, "
                         "slower than fp32; use fp32, or a GPU")
    return torch.autocast(kind, dtype=dtype)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matrix products in IEEE float32 inside the block (`torch.set_float32_matmul_precision("highest")`),
    the caller's setting restored after it. analyze's float32 kernels (the CKA nulls' products, rechecked in float64
    within a distance derived for float32; retrieval's float32 screen off the CPU, within its error bound) hold only
    for float32 arithmetic: "high" or "medium" (a notebook's setting, or `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`) would
    let cuBLAS compute them in TF32 (10-bit mantissa) and oneDNN in bfloat16 passes, outside those bounds."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has `malloc_trim`), else None."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):  # TypeError: Windows has no process-wide handle
        return None


def release_freed_memory() -> None:
    """Hand the C allocator's freed pages back to the system: glibc's `malloc_trim(0)`; nothing elsewhere.

    glibc keeps a freed block in its heaps unless it was allocated by mmap, and after the first large block is
    freed it raises its mmap threshold to that size, up to 32 MB. So tensors of a few tens of MB made and dropped
    in a loop stay resident as free heap memory: the power analysis's planted draws are 31 MB each at n = 5,000,
    d = 768, and after the length-only control's 50 draws 0.6 of the process's 1.06 GiB was such memory (released
    by this call: 0.48 GiB), which the next measure's curve then sat on. Called after each chunk of draws."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
