"""Stopping on a signal: SIGTERM, SIGHUP and SIGINT end a stage within seconds, its runs marked KILLED.

The first signal raises `Stopped` in the main thread, so `with` blocks unwind (open files, temp folders,
child runs) and `tracking.stage_run` marks the runs KILLED; a watchdog ends the process `GRACE_SECONDS`
after the signal in case that cleanup hangs (a tracking server gone, the main thread stuck in C). Every
signal is passed on to the stage subprocesses registered with `forwarding` (what `main` runs), and
signals after the first are otherwise ignored, so that the cleanup is not interrupted. No mlflow here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_SECONDS = 8.0  # from the first signal to the forced exit: under the 10 s a user or a scheduler waits
CHILD_SECONDS = 6.0  # how long a stopped parent waits for a stage subprocess to mark its own runs


class Stopped(BaseException):
    """A signal stopped the stage. Not an Exception: `except Exception` in a stage does not swallow it."""

    def __init__(self, signum: int, at: float, active_run_id: str | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.at, self.active_run_id = signum, at, active_run_id

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


_children: list[subprocess.Popen] = []
_stopped: Stopped | None = None
_watchdog: threading.Timer | None = None


def disarm() -> None:
    """Cancel the forced exit after a signal: for a process that handled `Stopped` and goes on (a test)."""
    if _watchdog is not None:
        _watchdog.cancel()


def _pass_on(signum: int) -> None:
    # SIGINT goes on as SIGTERM: an `mlflow run` launcher in the group would take SIGINT as a KeyboardInterrupt
    # and mark the stage's run FAILED after it ended KILLED; SIGTERM ends the launcher at once
    signum = signal.SIGTERM if signum == signal.SIGINT else signum
    for proc in list(_children):
        if proc.poll() is None:
            try:  # the whole group where the stage leads one (mlflow's own launcher makes one with setsid)
                os.killpg(proc.pid, signum) if os.getpgid(proc.pid) == proc.pid else os.kill(proc.pid, signum)
            except OSError:
                pass  # ended meanwhile


@contextmanager
def stopping(current_run: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """Inside the block, SIGTERM, SIGHUP and SIGINT raise `Stopped` (carrying `current_run()` at the signal:
    the innermost run the process was logging to). A handler a caller installed before (xlsub.tracking.fanout's
    SIGTERM under torchrun) is left in place. Outside the main thread nothing changes."""
    global _stopped
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _stopped, _watchdog
        _pass_on(signum)
        if _stopped is not None:
            return
        _stopped = Stopped(signum, time.time(), current_run())
        _watchdog = threading.Timer(GRACE_SECONDS, os._exit, (128 + signum,))
        _watchdog.daemon = True
        _watchdog.start()
        raise _stopped

    _stopped = None
    previous = {}
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if callable(current) and current is not signal.default_int_handler:
            continue
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _running(proc: subprocess.Popen) -> bool:
    """`proc`, or where it leads a process group (mlflow's launcher) anything left in that group."""
    if proc.poll() is None:
        return True
    try:
        os.killpg(proc.pid, 0)
    except OSError:
        return False
    return True


@contextmanager
def forwarding(proc: subprocess.Popen) -> Iterator[None]:
    """Signals this process gets are passed on to `proc` (a stage running as a subprocess) and its process
    group. When one stops this process, wait (at most CHILD_SECONDS) for them to end, having marked their
    own runs, before unwinding further."""
    _children.append(proc)
    try:
        yield
    except Stopped:
        deadline = time.monotonic() + CHILD_SECONDS
        while _running(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        raise
    finally:
        _children.remove(proc)
