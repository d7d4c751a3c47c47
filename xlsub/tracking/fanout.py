"""Independent work items fanned out over the processes of a `torchrun` job, one device each.

Rank 0 decides what every rank needs (`share`), each rank takes its round-robin share of the items
(`mine`), and rank 0 collects what the others made (`gather`). Outside torchrun (WORLD_SIZE unset or 1)
there is one process and every call is local.

The collectives carry small Python objects over gloo, also on GPU machines: no GPU memory is spent on
them and they behave the same with or without CUDA. Before each collective the ranks meet at a barrier
that is polled from Python, so that the SIGTERM torchrun sends when another rank died is handled (the
runs of this rank marked FAILED, see `SIGTERM`) instead of waiting inside gloo until torchrun's SIGKILL.
`tracking.stage_run` leaves this SIGTERM handler in place and takes SIGINT and SIGHUP (signals from
outside: KILLED, `xlsub.tracking.interrupts`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from xlsub.errors import XlsubError

T = TypeVar("T")
# Ranks reach a collective hours apart: a subnetwork of XLM-R base takes minutes to hours and the items
# need not divide evenly. A rank that dies is caught by torchrun, which stops the others, not by this.
TIMEOUT = timedelta(days=2)
POLL_SECONDS = 0.2
SIGTERM_EXIT = 128 + signal.SIGTERM  # the status a process killed by SIGTERM reports


def _exit_on_sigterm(signum, frame):
    """SIGTERM (torchrun stopping the job) as SystemExit: `with` blocks and `finally` run, so open MLflow
    runs end FAILED instead of staying RUNNING."""
    sys.exit(SIGTERM_EXIT)


@dataclass(frozen=True)
class FanOut:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this node

    @classmethod
    def from_env(cls) -> FanOut:
        """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one
        process without."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    def __enter__(self) -> FanOut:
        if self.world > 1:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            dist.init_process_group("gloo", timeout=TIMEOUT)
        return self

    def __exit__(self, *exc) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def device(self, resolved: str) -> str:
        """This rank's device: `cuda` (what `auto` resolves to with CUDA present) becomes cuda:LOCAL_RANK,
        one GPU per process; any other device (cpu, mps, an explicit cuda:N) is used as given. Every rank
        of a node refuses too many processes alike, before any collective."""
        if self.world == 1 or resolved != "cuda":
            return resolved
        import torch

        gpus = torch.cuda.device_count()
        if self.local_world > gpus:
            raise XlsubError(f"device: {self.local_world} processes on this node but {gpus} GPUs; start at most {gpus} "
                             "(torchrun --nproc_per_node), or pass --device cpu")
        return f"cuda:{self.local_rank}"

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th from the rank-th, the same split on every rank."""
        return list(items)[self.rank :: self.world]

    def share(self, make: Callable[[], T]) -> T:
        """`make()`, run on rank 0 only, on every rank. When it raises, every rank raises: rank 0 its own
        error, the others an XlsubError with the same line if it was one (bad input), else a RuntimeError."""
        if self.world == 1:
            return make()
        sent: list = [None]
        error = None
        if self.is_zero:
            try:
                sent = [("value", make())]
            except Exception as err:
                error = err
                sent = [("xlsub" if isinstance(err, XlsubError) else "error", str(err))]
        self._meet()
        dist.broadcast_object_list(sent, src=0)
        if error is not None:
            raise error
        kind, value = sent[0]
        if kind == "xlsub":
            raise XlsubError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def gather(self, value: T) -> list[T] | None:
        """Every rank's `value`, in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.is_zero else None
        self._meet()
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def _meet(self) -> None:
        """Wait for every rank, from Python (signals are handled), before a blocking collective."""
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            time.sleep(POLL_SECONDS)
        work.wait()  # raises if the barrier failed (a rank gone)
