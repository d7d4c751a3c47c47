"""Where a run's process runs, and whether it is certainly gone: what a heartbeat records beside its time.

A RUNNING run whose heartbeat went stale is dead wherever it ran; one that recorded this host and this boot
is dead at once when its PID is gone (kill -9, an OOM kill), without waiting for the heartbeat to go stale.
On another host nothing can be checked but the heartbeat's age. No mlflow here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from xlsub.artifacts import HEARTBEAT_BOOT_TAG, HEARTBEAT_HOST_TAG, HEARTBEAT_PID_TAG

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: a new value at every boot


def boot_id() -> str:
    """This machine's boot id, or '' where there is none (not Linux)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def this_process() -> dict[str, str]:
    """The heartbeat tags that say where this process runs: host, boot id, PID."""
    return {HEARTBEAT_HOST_TAG: socket.gethostname(), HEARTBEAT_BOOT_TAG: boot_id(), HEARTBEAT_PID_TAG: str(os.getpid())}


def process_exists(pid: int) -> bool:
    """Whether process `pid` exists on this machine and has not ended (a zombie, ended but not yet reaped by
    its parent, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def gone(tags: Mapping[str, str]) -> str | None:
    """Why the process that wrote these heartbeat tags has certainly ended ("its process 123 on this host is
    gone"), or None where it may still run: on another host, or tags from before hosts were recorded."""
    here = this_process()
    if not tags.get(HEARTBEAT_HOST_TAG) or tags[HEARTBEAT_HOST_TAG] != here[HEARTBEAT_HOST_TAG]:
        return None
    boot = tags.get(HEARTBEAT_BOOT_TAG, "")
    if boot and here[HEARTBEAT_BOOT_TAG] and boot != here[HEARTBEAT_BOOT_TAG]:
        return f"host {tags[HEARTBEAT_HOST_TAG]} has rebooted since its process ran"
    try:
        pid = int(tags[HEARTBEAT_PID_TAG])
    except (KeyError, ValueError):
        return None
    if pid != os.getpid() and not process_exists(pid):
        return f"its process {pid} on this host ({tags[HEARTBEAT_HOST_TAG]}) is gone"
    return None


def where(tags: Mapping[str, str]) -> str:
    """'host h, pid 123' as the heartbeat tags record it, or 'host unknown'."""
    host = tags.get(HEARTBEAT_HOST_TAG)
    return f"host {host}, pid {tags.get(HEARTBEAT_PID_TAG, '?')}" if host else "host unknown"
