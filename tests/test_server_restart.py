"""Kernels outlive a server restart: a real ``jupyter server`` process, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kernelhib.recovery import kernel_processes

from .conftest import TRACE_A_CHILD, ServerProcess

pytestmark = pytest.mark.criu


async def start_session(server: ServerProcess, path: str = "demo.ipynb") -> str:
    session = await server.api(
        "POST",
        "sessions",
        body={"path": path, "type": "notebook", "kernel": {"name": "python3"}},
        expect=201,
    )
    return session["kernel"]["id"]


async def listed(server: ServerProcess) -> dict[str, str]:
    """Kernel id -> execution state, as the server lists them."""
    return {k["id"]: k["execution_state"] for k in await server.api("GET", "kernels")}


async def wait_for_state(server: ServerProcess, kernel_id: str, state: str) -> None:
    for _ in range(600):
        if (await listed(server))[kernel_id] == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"kernel {kernel_id} never became {state}")


async def test_stopped_server_hibernates_its_kernel_and_the_next_server_wakes_it(
    launch_server: Any,
) -> None:
    first = await launch_server()
    kernel_id = await start_session(first)
    channel = await first.open_channel(kernel_id)
    assert (await channel.execute("values = {'a': [1, 2, 3]}; n = 41"))["status"] == "ok"

    assert await first.stop() == 0

    assert f"Hibernated kernel {kernel_id} with criu" in first.log_text()
    assert (first.image_dir / kernel_id / "manifest.json").is_file()
    assert kernel_processes(kernel_id) == []

    second = await launch_server()
    assert await listed(second) == {kernel_id: "hibernated"}
    sessions = await second.api("GET", "sessions")
    assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("demo.ipynb", kernel_id)]
    channel = await second.open_channel(kernel_id)
    result = await channel.execute("n += 1; values, n")
    assert result["status"] == "ok", result
    assert result["result"] == "({'a': [1, 2, 3]}, 42)"
    assert (await listed(second))[kernel_id] != "hibernated"


async def test_cell_running_at_stop_finishes_after_the_next_server_wakes_it(
    launch_server: Any,
) -> None:
    first = await launch_server()
    kernel_id = await start_session(first)
    channel = await first.open_channel(kernel_id)
    await channel.execute("import time")
    channel.send("execute_request", {"code": "for i in range(100):\n    time.sleep(0.1)\ndone = i"})
    await wait_for_state(first, kernel_id, "busy")

    assert await first.stop() == 0

    manifest = json.loads((first.image_dir / kernel_id / "manifest.json").read_text())
    assert manifest["execution_state"] == "busy"
    second = await launch_server()
    channel = await second.open_channel(kernel_id)
    # Cells run one at a time: this one is answered once the frozen cell finished.
    assert (await channel.execute("done", timeout=120))["result"] == "99"


async def test_without_hibernate_on_stop_kernels_are_shut_down(launch_server: Any) -> None:
    first = await launch_server("--KernelHibernator.hibernate_on_stop=False")
    kernel_id = await start_session(first)
    channel = await first.open_channel(kernel_id)
    await channel.execute("n = 1")

    assert await first.stop() == 0

    assert "Hibernated kernel" not in first.log_text()
    assert not (first.image_dir / kernel_id).exists()
    assert kernel_processes(kernel_id) == []
    second = await launch_server()
    assert await listed(second) == {}
    assert await second.api("GET", "sessions") == []


async def test_kernel_that_cannot_hibernate_is_shut_down_at_stop_and_others_hibernate(
    launch_server: Any,
) -> None:
    # With 'auto', dill would save what CRIU cannot: only CRIU here.
    first = await launch_server("--KernelHibernator.engine=criu")
    stuck = await start_session(first, "stuck.ipynb")
    fine = await start_session(first, "fine.ipynb")
    assert (await (await first.open_channel(stuck)).execute(TRACE_A_CHILD))["status"] == "ok"
    await (await first.open_channel(fine)).execute("n = 1")

    assert await first.stop() == 0

    log = first.log_text()
    assert f"Kernel {stuck} will be shut down" in log
    assert f"Hibernated kernel {fine}" in log
    assert kernel_processes(stuck) == []
    second = await launch_server()
    assert await listed(second) == {fine: "hibernated"}
    assert [s["path"] for s in await second.api("GET", "sessions")] == ["fine.ipynb"]


async def test_second_server_on_the_same_image_dir_adopts_nothing(launch_server: Any) -> None:
    first = await launch_server()
    kernel_id = await start_session(first)
    await first.api("POST", "kernels", kernel_id, "hibernate")

    second = await launch_server()

    assert f"Another Jupyter server uses {second.image_dir}" in second.log_text()
    assert await listed(second) == {}
    assert await second.api("GET", "sessions") == []
    assert (second.image_dir / kernel_id / "manifest.json").is_file()
    assert await listed(first) == {kernel_id: "hibernated"}


async def test_kernels_raced_by_two_hibernations_all_hibernate_at_stop_in_time(
    launch_server: Any,
) -> None:
    """Two hibernation requests at once used to leave a ghost kernel, which the stop then
    spent its whole stop_timeout on while the kernels queued after it were shut down."""
    first = await launch_server("--KernelHibernator.stop_timeout=60")
    raced = await start_session(first, "raced.ipynb")
    queued = await start_session(first, "queued.ipynb")
    raced_channel = await first.open_channel(raced)
    await raced_channel.execute("n = 1")
    await (await first.open_channel(queued)).execute("n = 2")
    answers = await asyncio.gather(
        *(first.request("POST", "kernels", raced, "hibernate") for _ in range(2))
    )
    assert sorted(status for status, _ in answers) == [200, 409]
    assert (await raced_channel.execute("n += 10; n"))["result"] == "11"

    loop = asyncio.get_running_loop()
    stopping = loop.time()
    assert await first.stop() == 0
    assert loop.time() - stopping < 30

    second = await launch_server()
    assert await listed(second) == {raced: "hibernated", queued: "hibernated"}
    for kernel_id, value in ((raced, "11"), (queued, "2")):
        assert (await (await second.open_channel(kernel_id)).execute("n"))["result"] == value
