"""``%hibernate``: a kernel asks its server, through its own IOPub, to hibernate it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import zmq
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from kernelhib.hibernate_requests import SETTLE_S, HibernateRequests
from kernelhib.magic import NOT_MANAGED, STATUS_ENV

from .conftest import KernelChannel, summarize, wait_for_state


async def state(api: Any, kernel_id: str) -> str:
    return (await api("GET", "kernels", kernel_id))["execution_state"]


@pytest.mark.criu
async def test_magic_is_loaded_in_kernels_the_server_starts(start_kernel: Any) -> None:
    _, channel = await start_kernel()
    result = await channel.execute("%hibernate --status")
    assert result["status"] == "ok", result
    assert result["stdout"].startswith("Engine: ")


@pytest.mark.criu
async def test_hibernate_magic_hibernates_after_the_cell_and_again_after_a_wake(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("%load_ext kernelhib\nvalue = 'kept'")

    for round_ in range(2):
        result = await channel.execute("%hibernate\nvalue")
        assert result["status"] == "ok"
        assert "will hibernate with criu as soon as the kernel is idle" in result["stdout"]
        assert result["result"] == "'kept'"
        # The cell's reply came first: the kernel hibernates only after it.
        assert await state(api, kernel_id) != "hibernated"
        await wait_for_state(api, kernel_id, "hibernated")

        assert (await channel.execute("print(value)"))["stdout"] == "kept\n", round_


@pytest.mark.criu
async def test_a_hibernate_is_heard_however_late_the_server_s_subscriber_joins(
    start_kernel: Any, api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZMQ drops what a kernel publishes before a SUB socket is subscribed. Here the
    server's %hibernate watcher joins 1 s late, at the start and after the wake: the
    kernel counts as started, and as woken, only once the watcher hears it."""
    watch = HibernateRequests.__init__

    def joining_late(self: HibernateRequests, *args: Any) -> None:
        watch(self, *args)
        sub = self._stream.socket
        sub.setsockopt(zmq.UNSUBSCRIBE, b"")
        asyncio.get_running_loop().call_later(1.0, sub.setsockopt, zmq.SUBSCRIBE, b"")

    monkeypatch.setattr(HibernateRequests, "__init__", joining_late)
    kernel_id, channel = await start_kernel()
    for _ in range(2):  # the kernel's first cell, then the first after its wake
        result = await channel.execute("%hibernate")
        assert "will hibernate" in result["stdout"]
        await wait_for_state(api, kernel_id, "hibernated", timeout=20)
        await api("POST", "kernels", kernel_id, "wake")


@pytest.mark.criu
async def test_front_end_closing_the_unknown_comm_does_not_wake_the_kernel(
    start_kernel: Any, api: Any
) -> None:
    """JupyterLab answers a comm_open for a target it does not know with a comm_close."""
    kernel_id, channel = await start_kernel()
    await channel.execute("%load_ext kernelhib")

    await run_like_jupyterlab(channel, "%hibernate")

    await wait_for_state(api, kernel_id, "hibernated")
    await asyncio.sleep(2)
    assert await state(api, kernel_id) == "hibernated"


@pytest.mark.criu
async def test_engine_option_hibernates_with_that_engine(start_kernel: Any, api: Any) -> None:
    kernel_id, channel = await start_kernel()

    result = await channel.execute("%load_ext kernelhib\nvalue = 'kept'\n%hibernate --engine dill")

    assert "will hibernate with dill as soon as the kernel is idle" in result["stdout"]
    await wait_for_state(api, kernel_id, "hibernated")
    assert (await api("GET", "kernels", kernel_id))["hibernation"]["engine"] == "dill"
    assert (await channel.execute("value"))["result"] == "'kept'"


@pytest.mark.criu
async def test_force_freezes_the_queued_cell_which_carries_on_after_the_wake(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    result = await channel.execute("%load_ext kernelhib\n%hibernate --force")
    assert "even if a cell queued behind it runs" in result["stdout"]

    # Without --force the kernel would wait for this 10 s cell.
    queued = channel.send(
        "execute_request",
        {"code": "import time\nfor _ in range(100):\n    time.sleep(0.1)\nprint('done')"},
    )

    await wait_for_state(api, kernel_id, "hibernated", timeout=8)
    woken = await api("POST", "kernels", kernel_id, "wake")
    assert woken["execution_state"] == "busy"
    reply, output = await channel.reply_and_output(queued)
    assert summarize(reply, output)["stdout"] == "done\n"


async def test_a_malformed_request_from_the_kernel_is_ignored(start_kernel: Any, api: Any) -> None:
    """The kernel's code can open the comm with any data: force must be true or false."""
    kernel_id, channel = await start_kernel()
    code = (
        "import comm\n"
        "comm.create_comm(target_name='kernelhib', data={'request': 'hibernate', 'force': 'yes'})"
    )

    assert (await channel.execute(code))["status"] == "ok"

    await asyncio.sleep(SETTLE_S + 2)
    assert await state(api, kernel_id) == "idle"


async def run_like_jupyterlab(channel: KernelChannel, code: str) -> None:
    """Run ``code``, closing every comm the kernel opens, as JupyterLab does for unknown ones."""
    msg_id = channel.send("execute_request", {"code": code})
    reply, idle = None, False
    while reply is None or not idle:
        msg = await channel.next(60)
        if msg["msg_type"] == "comm_open":
            channel.send("comm_close", {"comm_id": msg["content"]["comm_id"], "data": {}})
        elif msg["parent_header"].get("msg_id") == msg_id:
            reply = msg if msg["channel"] == "shell" else reply
            idle = idle or msg["content"].get("execution_state") == "idle"


@pytest.mark.criu
async def test_status_says_which_engine_and_why(start_kernel: Any) -> None:
    _, channel = await start_kernel()

    result = await channel.execute("%load_ext kernelhib\n%hibernate --status")

    status = result["stdout"][result["stdout"].index("Engine:") :].splitlines()
    assert status[0] == "Engine: criu"
    assert status[1].startswith("Why: KernelHibernator.engine is 'auto'; CRIU 4.")
    assert "criu check passed" in status[1]
    assert "when it started this kernel" in status[2]


@pytest.mark.parametrize(
    "environment",
    [
        {},
        # Inherited by a kernel started from inside a managed one: names another kernel.
        {STATUS_ENV: json.dumps({"kernel_id": "another", "engine": "criu", "why": "..."})},
    ],
    ids=["plain", "inherited"],
)
async def test_outside_a_kernelhib_server_the_magic_says_so(
    environment: dict[str, str], monkeypatch: Any
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    # The test servers make kernelhib's provisioner the default in this process.
    monkeypatch.setattr(
        KernelProvisionerFactory.instance(), "default_provisioner_name", "local-provisioner"
    )
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        output: list[dict[str, Any]] = []
        reply = await client.execute_interactive(
            "%load_ext kernelhib\n%hibernate\n%hibernate --status",
            output_hook=output.append,
            timeout=60,
        )
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)
    result = summarize(reply, output)
    assert result["status"] == "ok"
    assert result["stdout"] == f"{NOT_MANAGED}\n" * 2
