"""One operation per kernel at a time: concurrent requests never leave a kernel inconsistent.

Each test starts one operation, holds it in flight at a known step (a fault
injection that only slows it down), sends a second request, and checks both
answers and the kernel afterwards: running with its state, hibernated with
exactly one image, or gone with no image and no process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kernelhib.engines.criu import CriuEngine
from kernelhib.hibernator import KernelHibernator
from kernelhib.provisioner import HibernatingProvisioner
from kernelhib.recovery import kernel_processes

from .conftest import image_path, wait_for_state, wait_until_fetched

pytestmark = pytest.mark.criu

# How each operation is asked for over REST, and its success status.
REQUESTS = {
    "hibernate": ("POST", "hibernate", 200),
    "wake": ("POST", "wake", 200),
    "shutdown": ("DELETE", "", 204),
    "restart": ("POST", "restart", 200),
    "interrupt": ("POST", "interrupt", 204),
}
# The answer to the second request while the first is in flight: a refusal with
# the first's reason, or success once the first is done.
SECOND = {
    ("hibernate", "hibernate"): (409, "hibernating"),
    ("hibernate", "wake"): (200, None),
    ("hibernate", "shutdown"): (204, None),
    ("hibernate", "restart"): (200, None),
    ("hibernate", "interrupt"): (204, None),
    ("wake", "hibernate"): (409, "waking"),
    ("wake", "wake"): (200, None),
    ("wake", "shutdown"): (204, None),
    ("wake", "restart"): (200, None),
    ("wake", "interrupt"): (204, None),
    ("shutdown", "hibernate"): (409, "shutting-down"),
    ("shutdown", "wake"): (404, None),
    ("shutdown", "shutdown"): (404, None),
    # jupyter_server answers any failed restart with 500, an unknown kernel's too.
    ("shutdown", "restart"): (500, None),
    ("shutdown", "interrupt"): (404, None),
    ("restart", "hibernate"): (409, "restarting"),
    ("restart", "wake"): (200, None),
    ("restart", "shutdown"): (204, None),
    ("restart", "restart"): (200, None),
    ("restart", "interrupt"): (204, None),
    ("interrupt", "hibernate"): (409, "interrupting"),
    ("interrupt", "wake"): (200, None),
    ("interrupt", "shutdown"): (204, None),
    ("interrupt", "restart"): (200, None),
    ("interrupt", "interrupt"): (204, None),
}
HOLD_S = 1.0


def slowed(method: Any) -> Any:
    """``method``, started HOLD_S seconds late: the operation stays in flight meanwhile."""

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(HOLD_S)
        return await method(*args, **kwargs)

    return slow


def hold_in_flight(monkeypatch: Any, operation: str) -> None:
    """Slow the first operation down at a step where it has started but not finished."""
    target, name = {
        "hibernate": (CriuEngine, "dump"),
        "wake": (CriuEngine, "restore"),
        "shutdown": (KernelHibernator, "forget"),
        "restart": (KernelHibernator, "forget"),
        "interrupt": (HibernatingProvisioner, "send_signal"),
    }[operation]
    monkeypatch.setattr(target, name, slowed(getattr(target, name)))


@pytest.fixture
def request_(jp_fetch: Any):
    """Send one operation's REST request: ``status, body = await request_(op, kernel_id)``."""

    async def _send(operation: str, kernel_id: str, body: Any = None) -> tuple[int, Any]:
        method, action, _ = REQUESTS[operation]
        parts = ["api", "kernels", kernel_id, *([action] if action else [])]
        kwargs: dict[str, Any] = {"method": method, "raise_error": False}
        if method == "POST":
            kwargs["body"] = json.dumps(body or {})
        response = await jp_fetch(*parts, **kwargs)
        text = response.body.decode() if response.body else ""
        return response.code, json.loads(text) if text else None

    return _send


async def check_consistent(api: Any, jp_serverapp: Any, kernel_id: str) -> str:
    """The kernel's state, after checking that process, model and image agree on it."""
    hibernator = jp_serverapp.kernel_manager.hibernator
    assert hibernator.operation_of(kernel_id) is None
    if kernel_id not in jp_serverapp.kernel_manager:
        assert not image_path(jp_serverapp, kernel_id).exists()
        for _ in range(50):  # a shutdown reaps its processes just after answering
            if not kernel_processes(kernel_id):
                break
            await asyncio.sleep(0.1)
        assert kernel_processes(kernel_id) == []
        return "gone"
    model = await wait_until_fetched(api, kernel_id)  # a lazy wake keeps its image till then
    hibernated = model["execution_state"] == "hibernated"
    assert image_path(jp_serverapp, kernel_id).is_dir() == hibernated, model
    assert hibernator.is_hibernated(kernel_id) == hibernated
    if hibernated:
        assert kernel_processes(kernel_id) == []
        return "hibernated"
    # An interrupt that lands while a restarted kernel starts can end it, even
    # after it reported idle; jupyter_server's restarter then starts it again.
    for _ in range(600):
        model = await api("GET", "kernels", kernel_id)
        if model["execution_state"] == "idle" and kernel_processes(kernel_id):
            return "running"
        await asyncio.sleep(0.1)
    raise AssertionError(f"no running, idle kernel after 60 s: {model}")


@pytest.mark.parametrize(("first", "second"), list(SECOND))
async def test_second_request_during_an_operation_is_refused_or_waits(
    first: str,
    second: str,
    start_kernel: Any,
    open_channel: Any,
    api: Any,
    request_: Any,
    jp_serverapp: Any,
    monkeypatch: Any,
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = [1, 2, 3]")
    if first == "wake":
        await api("POST", "kernels", kernel_id, "hibernate")
    hold_in_flight(monkeypatch, first)
    hibernator = jp_serverapp.kernel_manager.hibernator

    first_request = asyncio.ensure_future(request_(first, kernel_id))
    for _ in range(100):
        if hibernator.operation_of(kernel_id) is not None:
            break
        await asyncio.sleep(0.01)
    assert hibernator.operation_of(kernel_id) is not None, f"{first} never started"
    second_status, second_body = await request_(second, kernel_id)
    first_status, first_body = await first_request

    assert first_status == REQUESTS[first][2], first_body
    status, reason = SECOND[first, second]
    assert second_status == status, second_body
    if reason:
        assert second_body["reason"] == reason
    state = await check_consistent(api, jp_serverapp, kernel_id)
    if "shutdown" in (first, second) and status != 404:
        assert state == "gone"
        return
    if state == "gone":
        return
    # Whatever is left of the kernel runs its next cell, with its state unless restarted.
    monkeypatch.undo()
    channel = await open_channel(kernel_id)
    result = await channel.execute("value" if "restart" not in (first, second) else "1 + 1")
    assert result["result"] in ("[1, 2, 3]", "2"), result


async def test_two_hibernations_at_once_hibernate_once_and_wake_intact(
    start_kernel: Any, api: Any, request_: Any, jp_serverapp: Any
) -> None:
    """Without any slowing down: the race as the UI and %hibernate would run it."""
    kernel_id, channel = await start_kernel()
    await channel.execute("import numpy as np; data = np.arange(20_000_000)")

    answers = await asyncio.gather(*(request_("hibernate", kernel_id) for _ in range(2)))

    assert sorted(status for status, _ in answers) == [200, 409]
    assert [body["reason"] for status, body in answers if status == 409] == ["hibernating"]
    assert await check_consistent(api, jp_serverapp, kernel_id) == "hibernated"
    assert (await channel.execute("int(data.sum())"))["result"] == str(sum(range(20_000_000)))
    await api("DELETE", "kernels", kernel_id, expect=204)
    assert await check_consistent(api, jp_serverapp, kernel_id) == "gone"


async def test_shutdown_during_hibernation_leaves_no_image_to_resurrect(
    start_kernel: Any, api: Any, request_: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    kernel_id, _ = await start_kernel()
    hold_in_flight(monkeypatch, "hibernate")
    hibernation = asyncio.ensure_future(request_("hibernate", kernel_id))
    await asyncio.sleep(HOLD_S / 2)

    await api("DELETE", "kernels", kernel_id, expect=204)

    assert (await hibernation)[0] == 200
    await api("GET", "kernels", kernel_id, expect=404)
    store = jp_serverapp.kernel_manager.hibernator.store
    assert kernel_id not in store.kernel_ids()
    assert not [p for p in Path(store.root).iterdir() if kernel_id in p.name]


@pytest.mark.parametrize("hibernator_config", [{"idle_timeout": 0.1}])
async def test_idle_policy_firing_during_a_users_hibernation_changes_nothing(
    start_kernel: Any, api: Any, request_: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = [1, 2, 3]")
    await wait_for_state(api, kernel_id, "idle")
    hold_in_flight(monkeypatch, "hibernate")
    users = asyncio.ensure_future(request_("hibernate", kernel_id))
    await asyncio.sleep(HOLD_S / 2)

    await jp_serverapp.kernel_manager.hibernator.idle.check()

    assert (await users)[0] == 200
    assert await check_consistent(api, jp_serverapp, kernel_id) == "hibernated"
    assert (await channel.execute("value"))["result"] == "[1, 2, 3]"
