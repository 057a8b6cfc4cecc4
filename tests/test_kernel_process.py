"""KernelProcess: a kernel's process, watched through its pidfd."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

from kernelhib.kernel_process import KernelProcess


async def test_wait_returns_when_another_poll_saw_the_end_first() -> None:
    # The restarter polls the kernel while a hibernation waits for it to end; the
    # poll that sees the end closes the pidfd. The wait failed with "Invalid file
    # object: None" there, and the hibernation then resumed a dead kernel.
    child = subprocess.Popen(["sleep", "60"])
    process = KernelProcess(child.pid)
    waiting = asyncio.ensure_future(process.wait())
    await asyncio.sleep(0.1)  # the wait watches the pidfd now

    child.send_signal(signal.SIGKILL)
    while process.poll() is None:  # blocking: the waiting task cannot run before this poll
        time.sleep(0.001)

    assert await asyncio.wait_for(waiting, 5) == -signal.SIGKILL
    assert process.poll() == -signal.SIGKILL
