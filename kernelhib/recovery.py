"""Clean up after a server that died: its kernels end up running or hibernated, never neither.

Run twice over, on purpose: by the dead server's watchdog at once, so that no
kernel outlives its server for long, and by the next server on the same image
store at its start, in case the watchdog died too. Both decide from the same
durable facts (the journal, and whether an image was committed), so whichever
comes second finds nothing left to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .journal import HIBERNATING, Entry, Journal
from .kernel_process import HELPER_VAR, KERNEL_ID_VAR, process_start, traced

log = logging.getLogger(__name__)

# A dump that was running when its server died may still take this long to finish.
CRIU_PATIENCE_S = 600.0


def boot_ticks() -> int:
    """Now, in the unit of :func:`process_start`: a process started later is not the dead
    server's."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def kernel_processes(kernel_id: str, started_before: int | None = None) -> list[int]:
    """The processes of a kernel (they carry its id in their environment, as restored
    ones do too), only those started before ``started_before`` if given; those that
    serve its memory (:data:`HELPER_VAR`) last, to be ended last."""
    marker = f"{KERNEL_ID_VAR}={kernel_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        with contextlib.suppress(OSError):
            variables = environ.read_bytes().split(b"\0")
            if marker in variables and (
                started_before is None or 0 < process_start(pid) < started_before
            ):
                helper = any(v.startswith(f"{HELPER_VAR}=".encode()) for v in variables)
                found.append((helper, pid))
    return [pid for _, pid in sorted(found)]


def _signal(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            # Through a pidfd: the pid cannot be reused between the look and the signal.
            fd = os.pidfd_open(pid)
            try:
                signal.pidfd_send_signal(fd, signum)
            finally:
                os.close(fd)


def _let_run(pids: list[int], patience: float) -> None:
    """Continue a kernel left frozen, once CRIU has let go of it (a dump runs to its end)."""
    deadline = time.monotonic() + patience
    while any(traced(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(pids, signal.SIGCONT)


def recover(
    journal: Journal,
    committed: Callable[[str], bool],
    entries: Iterable[Entry],
    started_before: int,
    patience: float = CRIU_PATIENCE_S,
) -> list[Entry]:
    """End the processes of a dead server's kernels; keep those being saved, uncommitted.

    A kernel whose hibernation was in flight and whose image was not committed
    is all there is of it: it is continued and returned, for the next server to
    adopt as running. Every other process is ended: a running kernel dies with
    its server as it always has, a committed kernel lives on in its image, and
    a waking kernel was never verified (its image is still there). Their
    entries are removed.
    """
    kept = []
    for entry in entries:
        pids = kernel_processes(entry.kernel_id, started_before)
        alive = entry.pid in pids and process_start(entry.pid) == entry.pid_start
        if entry.state == HIBERNATING and alive and not committed(entry.kernel_id):
            _let_run(pids, patience)
            log.warning("Kept kernel %s, whose hibernation its server left", entry.kernel_id)
            kept.append(entry)
            continue
        if entry.state == HIBERNATING and not alive and not committed(entry.kernel_id):
            log.error("Kernel %s died with its server during hibernation", entry.kernel_id)
        _signal(pids, signal.SIGKILL)
        journal.remove(entry.kernel_id, owner=entry.server)
        if pids:
            log.info("Ended kernel %s (%s) of a server that died", entry.kernel_id, entry.state)
    return kept
