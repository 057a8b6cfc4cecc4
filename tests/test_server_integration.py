"""A hibernated kernel stays a kernel: restarter, culling, sessions, shutdown, restart, events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kernelhib.engines import criu
from kernelhib.hibernator import EVENT_SCHEMA_ID

from .conftest import image_path

pytestmark = pytest.mark.criu

CULL_FAST = {"MappingKernelManager": {"cull_idle_timeout": 1, "cull_interval": 1}}


@pytest.mark.parametrize("server_config", [CULL_FAST])
async def test_hibernated_kernel_outlives_restarter_and_culler_with_its_session(
    api: Any, open_channel: Any, jp_serverapp: Any
) -> None:
    session = await api(
        "POST",
        "sessions",
        body={"path": "demo.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        expect=201,
    )
    kernel_id = session["kernel"]["id"]
    channel = await open_channel(kernel_id)
    await channel.execute("value = 'kept'")
    await api("POST", "kernels", kernel_id, "hibernate")

    await asyncio.sleep(5)  # the restarter polls every 3 s; the culler every second

    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    sessions = await api("GET", "sessions")
    assert [s["kernel"]["id"] for s in sessions] == [kernel_id]
    assert (await channel.execute("print(value)"))["stdout"] == "kept\n"


async def test_shutting_down_a_hibernated_kernel_discards_its_image(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, _ = await start_kernel()
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    assert image.is_dir()

    await api("DELETE", "kernels", kernel_id, expect=204)

    assert not image.exists()
    assert kernel_id not in [k["id"] for k in await api("GET", "kernels")]


async def test_restarting_a_hibernated_kernel_starts_fresh(
    start_kernel: Any, api: Any, open_channel: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 1")
    await api("POST", "kernels", kernel_id, "hibernate")

    model = await api("POST", "kernels", kernel_id, "restart")

    assert model["id"] == kernel_id
    assert "hibernation" not in model
    assert not image_path(jp_serverapp, kernel_id).exists()
    channel = await open_channel(kernel_id)  # JupyterLab reconnects after a restart too
    result = await channel.execute("'value' in dir()")
    assert result["result"] == "False"


async def test_hibernation_and_wake_are_emitted_on_the_event_bus(
    start_kernel: Any, api: Any, jp_ws_fetch: Any
) -> None:
    kernel_id, _ = await start_kernel()
    events = await jp_ws_fetch("api", "events", "subscribe")
    try:
        await api("POST", "kernels", kernel_id, "hibernate")
        await api("POST", "kernels", kernel_id, "wake")
        model = await api("GET", "kernels", kernel_id)
        assert model["memory_bytes"] > 10 * 2**20, "a running kernel's memory is shown"
        seen = []
        while len(seen) < 4:
            event = json.loads(await asyncio.wait_for(events.read_message(), 10))
            if event.get("schema_id") == EVENT_SCHEMA_ID:
                seen.append(event)
    finally:
        events.close()
    assert [(e["action"], e["state"], e["kernel_id"], e["status"]) for e in seen] == [
        ("hibernate-started", "hibernating", kernel_id, "success"),
        ("hibernate", "hibernated", kernel_id, "success"),
        ("wake-started", "waking", kernel_id, "success"),
        ("wake", "running", kernel_id, "success"),
    ]
    assert seen[1]["image_bytes"] > 0 and seen[1]["engine"] == "criu"


async def test_command_line_driver_works_without_pycriu(
    start_kernel: Any, api: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(criu, "_import_pycriu", lambda binary: None)
    jp_serverapp.kernel_manager.hibernator._criu._driver = None
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'via the command line'")

    await api("POST", "kernels", kernel_id, "hibernate")
    assert isinstance(jp_serverapp.kernel_manager.hibernator._criu.driver, criu._CliDriver)
    await api("POST", "kernels", kernel_id, "wake")

    assert (await channel.execute("value"))["result"] == "'via the command line'"


async def test_pycriu_rpc_driver_is_used_when_importable(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'via RPC'")
    await api("POST", "kernels", kernel_id, "hibernate")
    assert isinstance(jp_serverapp.kernel_manager.hibernator._criu.driver, criu._RpcDriver)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "'via RPC'"
