"""An accelerator's device rules, checked on the CPU: `DeviceCheck` marks tensors as living on "the device" and
reports every operation that would fail there, so analyze's GPU path is tested without a GPU.

Tensors become device tensors where the code puts them there: a factory or `Tensor.to` given an explicit
`device`, or any operation with a device tensor among its inputs. Tensors made without `device` (a CPU
generator's draws, `torch.arange(n)`) are CPU tensors; `.cpu()` gives one. As on CUDA, these are recorded:
- an operation mixing device tensors with CPU tensors of one element or more (0-dim CPU tensors are allowed, as
  CUDA allows them), `copy_` excepted;
- indexing a CPU tensor with a device index, or assigning between a device and a CPU tensor by index;
- `.numpy()` of a device tensor.
On the CPU `.to(cpu)` and `.cpu()` return their input; here a move that changes a tensor's side gives a copy,
as a real move would. The mode is thread-local: `patched` runs `side_by_side`'s work in the calling thread and
lets `xlsub.stats.inference.on_cpu` see the marks.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.rand, torch.randn, torch.randint,
             torch.randperm, torch.tensor, torch.linspace, torch.from_numpy, torch.sparse_coo_tensor, torch.as_tensor,
             torch.empty_strided, torch.triu_indices, torch.tril_indices}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _explicit_device(func, args, kwargs) -> bool:
    return "device" in kwargs or (func is torch.Tensor.to and any(isinstance(a, (torch.device, str)) for a in args[1:]))


class DeviceCheck(TorchFunctionMode):
    """`violations`: Counter of "what: file:line code" for everything that would fail on an accelerator."""

    def __init__(self):
        super().__init__()
        self.marked = WeakIdKeyDictionary()
        self.violations: collections.Counter = collections.Counter()

    def on_device(self, t: torch.Tensor) -> bool:
        return t in self.marked

    @contextlib.contextmanager
    def patched(self):
        import xlsub.stats.inference as inference
        import xlsub.stats.workers as workers

        original, saved = workers.side_by_side, {}
        for name, module in list(sys.modules.items()):
            if name.startswith("xlsub") and getattr(module, "side_by_side", None) is original:
                saved[module] = original
                module.side_by_side = lambda fn, items, workers=None: [fn(item) for item in items]
        cpu_check = inference.on_cpu
        inference.on_cpu = lambda values: not self.on_device(values)
        try:
            with self:
                yield self
        finally:
            inference.on_cpu = cpu_check
            for module, value in saved.items():
                module.side_by_side = value

    def _where(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/xlsub/" in frame.filename:
                return f"{frame.filename.split('/xlsub/')[1]}:{frame.lineno} {frame.line}"
        return "?"

    def _record(self, what: str) -> None:
        self.violations[f"{what}: {self._where()}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [t for t in leaves if self.on_device(t)]
        name = getattr(func, "__name__", str(func))
        if func in INDEXING:
            target = args[0]
            index = [t for t in pytree.tree_leaves(args[1]) if isinstance(t, torch.Tensor)]
            value = args[2] if func is torch.Tensor.__setitem__ and isinstance(args[2], torch.Tensor) and args[2].dim() > 0 else None
            if (not self.on_device(target) and any(self.on_device(t) for t in index)) \
                    or (value is not None and self.on_device(value) != self.on_device(target)):
                self._record(f"mixed {name}")
        elif device and func is not torch.Tensor.copy_ and any(not self.on_device(t) and t.dim() > 0 for t in leaves):
            self._record(f"mixed {name}")
        if device and func in (torch.Tensor.numpy, torch.Tensor.__array__):
            self._record("numpy of a device tensor")
        out = func(*args, **kwargs)
        explicit = _explicit_device(func, args, kwargs)
        if func is torch.Tensor.cpu:
            marked = False
        elif func in FACTORIES or func is torch.Tensor.to:
            marked = explicit or (func in (torch.as_tensor, torch.Tensor.to) and bool(device))
        elif func in INDEXING:
            marked = self.on_device(args[0])
        else:
            marked = bool(device)
        if isinstance(out, torch.Tensor) and any(out is t for t in leaves) and self.on_device(out) != marked \
                and (func is torch.Tensor.cpu or explicit):
            out = out.clone()  # a real move copies
        if marked:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.marked[t] = True
        return out
