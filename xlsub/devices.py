"""Where a stage computes: `resolve_device`, kept apart from the model code so that a stage which only resolves a
device (analyze) does not import transformers' modeling modules (about 80 MB)."""

from __future__ import annotations

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
