"""A kernel process addressed by pidfd rather than by pid.

A restored kernel is not always our child (after a server restart it is not),
and a plain pid can be recycled by another process while we look away. A pidfd
stays bound to the one process it was opened for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

# Every process of a kernel carries its id in its environment, restored ones too: whoever
# cleans up after a dead server finds them by it.
KERNEL_ID_VAR = "KERNELHIB_KERNEL_ID"
# A process that holds a kernel's lazy memory (a lazy wake's userfaultfd holder) carries
# this too: it is ended only after the kernel, which would otherwise read zeros where it
# faults.
HELPER_VAR = "KERNELHIB_HELPER"


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    tree, i = [pid], 0
    while i < len(tree):
        tree += _children(tree[i])
        i += 1
    return tree


def proc_fields(path: Path) -> dict[str, str]:
    """The ``Key: value`` lines of a /proc file (``status``, ``fdinfo/N``) as a dict.

    OSError if the process is gone.
    """
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def process_start(pid: int) -> int:
    """When a process started, in clock ticks since boot; 0 if it is gone.

    With the pid, it names one process: a later process with the same pid
    started later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name, in parentheses, may hold spaces: fields count from its end.
    return int(stat.rpartition(")")[2].split()[19])


def _private_memory(pid: int) -> int:
    """Anonymous and shared-memory pages: what the process alone holds.

    Its file-backed pages (Python, shared libraries) stay in the page cache
    after it ends, so counting them would overstate what hibernation frees.
    """
    try:
        fields = proc_fields(Path(f"/proc/{pid}/status"))
    except OSError:
        return 0
    return sum(
        int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssShmem") if key in fields
    )


def traced(pid: int) -> bool:
    """Whether a tracer (CRIU, checkpointing it) holds the process."""
    try:
        return proc_fields(Path(f"/proc/{pid}/status")).get("TracerPid", "0") != "0"
    except OSError:
        return False


def tree_memory(pid: int) -> int:
    """Private resident memory of ``pid`` and its descendants."""
    return sum(_private_memory(p) for p in process_tree(pid))


def gpu_memory(pid: int) -> int:
    """GPU memory that ``pid`` and its descendants hold, as ``nvidia-smi`` reports it
    (0 without it): what a dill hibernation of a CUDA kernel gives back."""
    if not shutil.which("nvidia-smi"):
        return 0
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        listed = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    tree, total = set(process_tree(pid)), 0
    for line in listed.stdout.splitlines():
        owner, _, mib = (field.strip() for field in line.partition(","))
        if owner.isdigit() and int(owner) in tree and mib.isdigit():
            total += int(mib) << 20
    return total


def available_memory() -> int:
    """What the system could hand out now: ``MemAvailable`` plus the free pages
    held in per-CPU lists, which /proc/meminfo counts as used.

    Since Linux 6.7 those lists grow while a process frees a lot: right after a
    1 GiB kernel ended, half a GiB of its freed memory sat there here for many
    seconds, and ``MemAvailable`` alone showed only the other half returned.
    """
    meminfo = Path("/proc/meminfo").read_text()
    available = next(int(line.split()[1]) for line in meminfo.splitlines()
                     if line.startswith("MemAvailable:"))  # fmt: skip
    per_cpu = sum(
        int(line.split()[1])
        for line in Path("/proc/zoneinfo").read_text().splitlines()
        if line.strip().startswith("count:")
    )
    return available * 1024 + per_cpu * os.sysconf("SC_PAGE_SIZE")


async def namespace_init(
    unshare_pid: int, exited: Callable[[], int | None], timeout: float = 10
) -> int:
    """The host pid of the process that ``unshare --pid --fork`` started in its new
    namespace; ``exited()`` is unshare's exit status once it has exited."""
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
    for _ in range(int(timeout / 0.01)):
        status = exited()
        if status is not None:
            raise RuntimeError(f"the kernel exited at start (status {status})")
        pids = children.read_text().split()
        if pids:
            return int(pids[0])
        await asyncio.sleep(0.01)
    raise RuntimeError(f"unshare started no kernel within {timeout} s")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class KernelProcess:
    """The kernel's root process: poll, signal, wait, and measure its whole tree."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)
        self._status: int | None = None

    def poll(self) -> int | None:
        """None while running; else the exit status, or -1 if we are not its parent."""
        if self._status is not None or self._pidfd is None:
            return self._status
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            ended = select.select([self._pidfd], [], [], 0)[0]
            if not ended:
                return None
            self._finish(-1)
        else:
            if result is None:
                return None
            code = result.si_status
            self._finish(code if result.si_code == os.CLD_EXITED else -code)
        return self._status

    def _finish(self, status: int) -> None:
        self._status = status
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        """Wait for the process to end; return its status as :meth:`poll` does.

        A pidfd turns readable when its process ends: no polling delay, which
        every hibernation would pay once its kernel is killed.
        """
        loop = asyncio.get_running_loop()
        while (status := self.poll()) is None:
            assert self._pidfd is not None  # poll() returns the status once it is closed
            # A copy of our own to watch: a poll() elsewhere (the restarter's, say) may
            # see the end first and close the pidfd while this waits on it.
            pidfd = os.dup(self._pidfd)
            ended = loop.create_future()
            loop.add_reader(pidfd, _resolve, ended)
            try:
                await ended
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        return status

    def send_signal(self, signum: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def tree(self) -> list[int]:
        """This process and its descendants, while it runs."""
        return process_tree(self.pid) if self.poll() is None else []

    def memory_bytes(self) -> int:
        """Private resident memory of the whole tree: what ending it gives back."""
        return tree_memory(self.pid) if self.poll() is None else 0

    def resume(self) -> None:
        """Continue every process of the tree that a checkpoint or a restore left stopped."""
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
