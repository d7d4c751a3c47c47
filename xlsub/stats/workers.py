"""Independent pieces of an analysis side by side on the CPU's cores, each on one torch thread.

On few cores torch's intra-op threads scale poorly, and not at all for many small products. Measured on the
benchmark machine (2 vCPUs, AMD EPYC; `benchmarks/README.md`): a float64 5,000 x 768 Gram product takes as
long on two threads as on one, a float32 one 1.25x less; `xlsub.similarity.moments.feature_summary` (a few
hundred small products and eigenvalue problems) takes 0.67 s on one thread and 1.0-1.2 s on two. Eight such
products, two at a time on one thread each, take 0.7x the time of eight in a row on two threads.

`side_by_side` runs independent calls in threads (torch and numpy release the GIL in their kernels) with torch
set to one thread while they run; `one_thread` runs a block of small operations on one thread. Callers give
each call its own inputs and outputs (no shared mutable state) and seeded generators of their own, so the
results do not depend on the order the threads run in.
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
