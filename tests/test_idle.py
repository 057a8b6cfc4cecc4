"""Idle hibernation: kernels idle past their timeout hibernate by themselves, others are left be."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import TRACE_A_CHILD, image_path, wait_for_state

pytestmark = [pytest.mark.criu, pytest.mark.usefixtures("started_extensions")]

FAST = {"idle_timeout": 2, "check_interval": 0.5}
# Longer than the timeout plus a few checks: time enough to hibernate a kernel.
PAST_TIMEOUT_S = 4


async def state(api: Any, kernel_id: str) -> str:
    return (await api("GET", "kernels", kernel_id))["execution_state"]


@pytest.mark.parametrize("hibernator_config", [FAST])
async def test_idle_kernel_hibernates_and_its_next_message_wakes_it(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'kept'")

    await wait_for_state(api, kernel_id, "hibernated")

    assert (await channel.execute("print(value)"))["stdout"] == "kept\n"
    assert await state(api, kernel_id) != "hibernated"


@pytest.mark.parametrize("hibernator_config", [FAST])
async def test_woken_kernel_gets_a_whole_idle_timeout_again(start_kernel: Any, api: Any) -> None:
    kernel_id, _ = await start_kernel()
    await wait_for_state(api, kernel_id, "hibernated")

    await api("POST", "kernels", kernel_id, "wake")

    await asyncio.sleep(FAST["idle_timeout"] / 2)
    assert await state(api, kernel_id) == "idle"


@pytest.mark.parametrize("hibernator_config", [FAST])
async def test_busy_kernel_is_not_hibernated_past_the_timeout(start_kernel: Any, api: Any) -> None:
    kernel_id, channel = await start_kernel()
    msg_id = channel.send("execute_request", {"code": f"import time; time.sleep({PAST_TIMEOUT_S})"})
    await wait_for_state(api, kernel_id, "busy")

    await asyncio.sleep(PAST_TIMEOUT_S - 1)

    assert await state(api, kernel_id) == "busy"
    reply, _ = await channel.reply_and_output(msg_id)
    assert reply["content"]["status"] == "ok"


@pytest.mark.parametrize("hibernator_config", [{**FAST, "hibernate_connected": False}])
async def test_without_hibernate_connected_an_open_websocket_keeps_the_kernel_awake(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()

    await asyncio.sleep(PAST_TIMEOUT_S)
    assert await state(api, kernel_id) == "idle"

    channel.ws.close()
    await wait_for_state(api, kernel_id, "hibernated")


@pytest.mark.parametrize("hibernator_config", [{"check_interval": 0.5}])
async def test_kernelspec_idle_timeout_overrides_the_server_default(
    start_kernel: Any, api: Any, open_channel: Any, jp_serverapp: Any, jp_kernel_dir: Path
) -> None:
    python3 = jp_serverapp.kernel_spec_manager.get_kernel_spec("python3")
    spec = {
        "argv": python3.argv,
        "display_name": "Python 3, hibernates after 2 s idle",
        "language": "python",
        "metadata": {"kernelhib": {"idle_timeout": 2}},
    }
    (jp_kernel_dir / "sleepy").mkdir()
    (jp_kernel_dir / "sleepy" / "kernel.json").write_text(json.dumps(spec))
    default_id, _ = await start_kernel()
    model = await api("POST", "kernels", body={"name": "sleepy"}, expect=201)
    await (await open_channel(model["id"])).execute("pass")

    await wait_for_state(api, model["id"], "hibernated")

    assert await state(api, default_id) == "idle"


@pytest.mark.parametrize("hibernator_config", [{"discard_after": 1, "check_interval": 0.5}])
async def test_kernel_hibernated_past_discard_after_is_shut_down_with_its_image(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, _ = await start_kernel()
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    assert image.is_dir()

    for _ in range(100):
        if kernel_id not in [k["id"] for k in await api("GET", "kernels")]:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the kernel was never discarded")
    assert not image.exists()


# 'criu' only: with 'auto', dill would save what CRIU cannot.
@pytest.mark.parametrize("hibernator_config", [{**FAST, "engine": "criu"}])
async def test_failed_idle_hibernation_is_retried_only_after_new_activity(
    start_kernel: Any, api: Any, jp_ws_fetch: Any
) -> None:
    kernel_id, channel = await start_kernel()
    events = await jp_ws_fetch("api", "events", "subscribe")
    try:
        assert (await channel.execute(TRACE_A_CHILD))["status"] == "ok"
        assert await failures(events, PAST_TIMEOUT_S * 2) == 1

        # No retry while nothing happens; one more once new activity went idle again.
        assert await failures(events, PAST_TIMEOUT_S) == 0
        await channel.execute("pass")
        assert await failures(events, PAST_TIMEOUT_S * 2) == 1
    finally:
        events.close()
    assert await state(api, kernel_id) == "idle"


async def failures(events: Any, seconds: float) -> int:
    """How many failed hibernations the event bus reports within ``seconds``."""
    count = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            event = json.loads(await asyncio.wait_for(events.read_message(), left))
        except asyncio.TimeoutError:
            break
        count += event.get("action") == "hibernate-failed"
    return count


@pytest.mark.parametrize("server_config", [{"ServerApp": {"shutdown_no_activity_timeout": 1}}])
async def test_server_whose_kernels_all_hibernated_may_stop_for_inactivity(
    start_kernel: Any, api: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    """shutdown_no_activity_timeout counts running kernels only: hibernated ones are
    adopted by the next server (tests/test_server_restart.py)."""
    stops: list[bool] = []
    # A spy: the test server's own event loop must keep running.
    monkeypatch.setattr(jp_serverapp, "stop", lambda *args, **kwargs: stops.append(True))
    first, _ = await start_kernel()
    second, _ = await start_kernel()
    await api("POST", "kernels", first, "hibernate")
    await asyncio.sleep(1.5)

    jp_serverapp.shutdown_no_activity()
    assert stops == [], "a running kernel keeps the server up"

    await api("POST", "kernels", second, "hibernate")
    await asyncio.sleep(1.5)
    jp_serverapp.shutdown_no_activity()
    assert stops == [True]
