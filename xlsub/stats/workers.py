"""Independent pieces of an analysis side by side on the CPU's cores, each on one torch thread.

Where the work is gathers, sorts and other memory-bound or serial steps, torch's intra-op threads gain little
inside each operation, and independent pieces run side by side, one thread each, use the cores better.
Measured on the benchmark machine (2 vCPUs), side by side in one run: the Mantel null's permuted sums of 20
permutations against six 5,000 x 5,000 rank matrices take 1.4-1.6 s split between two threads instead of
2.6-3.5 s (`xlsub.stats.inference.permuted_cross`). Also the kNN spectra of subsamples
(`xlsub.similarity.isomorphism.subsample_spectra`) and the RSA jackknife's languages (`xlsub.similarity.rsa`).
Dense products scale with the threads when the machine is quiet (a float32 4,096 x 4,096 product: 97 GFLOP/s on
one thread, 187 on two) and less under load (69 and 93 earlier in the same session), so they are left to torch's
own threads.

`side_by_side` runs independent calls in threads (torch and numpy release the GIL in their kernels) with torch
set to one thread while they run; `one_thread` runs a block on one thread. Callers give each call its own
inputs and outputs (no shared mutable state), so the results do not depend on the order the threads run in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (restored after it, also on an exception)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def side_by_side(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[fn(item) for item in items], the calls run by `workers` threads (default: torch's intra-op thread count)
    with torch on one thread each; results in the items' order, the first exception raised. Inside a call
    already running side by side (torch on one thread) the calls run one after the other."""
    items = list(items)
    workers = min(workers or torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
