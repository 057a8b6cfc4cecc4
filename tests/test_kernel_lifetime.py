"""A kernel never outlives its server unnoticed: killed outright, the server takes its kernels."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from kernelhib.recovery import kernel_processes

pytestmark = pytest.mark.criu


@pytest.mark.parametrize("woken_by_criu", [False, True])
async def test_a_server_killed_outright_takes_its_kernels_along(
    launch_server: Any, woken_by_criu: bool
) -> None:
    """Freshly started, a kernel dies through unshare; woken by CRIU, as the server's child."""
    server = await launch_server()
    kernel = await server.api("POST", "kernels", body={"name": "python3"}, expect=201)
    channel = await server.open_channel(kernel["id"])
    assert (await channel.execute("x = 1"))["status"] == "ok"
    if woken_by_criu:
        await server.api("POST", "kernels", kernel["id"], "hibernate", body={"engine": "criu"})
        assert (await channel.execute("x + 1"))["result"] == "2"
    assert kernel_processes(kernel["id"]), "the kernel runs"

    server.process.send_signal(signal.SIGKILL)
    server.process.wait()

    for _ in range(50):
        if not kernel_processes(kernel["id"]):
            break
        await asyncio.sleep(0.1)
    assert not kernel_processes(kernel["id"]), "an orphaned kernel would hold its memory forever"
