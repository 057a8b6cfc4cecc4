"""kernelhib on jupyter_server's /metrics, scraped from real servers.

The registry is the process's own: histograms and counters are compared
before and after, gauges are read as they are.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from kernelhib.hibernator import EVENT_SCHEMA_ID
from kernelhib.testing import wait_until_fetched

from .conftest import ServerProcess
from .test_crash_safety import settled, until, use_faults

pytestmark = pytest.mark.criu


class Metrics:
    """One scrape of /metrics."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def running(self) -> float:
        return self("kernel_currently_running_total", type="python3")

    def hibernated(self, engine: str = "criu") -> float:
        return self("kernelhib_hibernated_kernels", engine=engine)


@pytest.fixture
def scrape(jp_fetch: Any):
    """``await scrape()``: the in-process test server's /metrics, as its token holder sees it."""

    async def _scrape() -> Metrics:
        response = await jp_fetch("metrics")
        return Metrics(response.body.decode())

    return _scrape


async def scrape_process(server: ServerProcess) -> Metrics:
    headers = {"Authorization": f"token {server.token}"}
    request = HTTPRequest(server.url + "metrics", headers=headers)
    response = await AsyncHTTPClient().fetch(request)
    return Metrics(response.body.decode())


async def test_hibernated_kernels_are_counted_apart_from_running_ones(
    start_kernel: Any, api: Any, scrape: Any
) -> None:
    first, _ = await start_kernel()
    second, channel = await start_kernel()
    before = await scrape()
    assert before.running() == 2
    assert before.hibernated() == 0

    model = await api("POST", "kernels", second, "hibernate", body={"engine": "criu"})
    hibernated = await scrape()
    assert hibernated.running() == 1
    assert hibernated.hibernated() == 1
    assert hibernated("kernelhib_image_bytes") == model["hibernation"]["image_bytes"] > 0
    assert hibernated("kernelhib_freed_bytes", memory="ram") == model["hibernation"]["freed_bytes"]
    success = {"engine": "criu", "outcome": "success"}
    count = "kernelhib_hibernate_duration_seconds_count"
    assert hibernated(count, **success) == before(count, **success) + 1

    await api("POST", "kernels", second, "wake")
    await wait_until_fetched(api, second)  # a lazy wake's image stays until then
    woken = await scrape()
    assert (woken.running(), woken.hibernated(), woken("kernelhib_image_bytes")) == (2, 0, 0)
    count = "kernelhib_wake_duration_seconds_count"
    assert woken(count, **success) == before(count, **success) + 1
    assert (await channel.execute("1 + 1"))["result"] == "2"

    # A hibernated kernel shut down was not running: it is not counted down again.
    await api("POST", "kernels", second, "hibernate", body={"engine": "criu"})
    await api("DELETE", "kernels", second, expect=204)
    after_shutdown = await scrape()
    assert (after_shutdown.running(), after_shutdown.hibernated()) == (1, 0)
    await api("DELETE", "kernels", first, expect=204)
    assert (await scrape()).running() == 0


async def test_a_refused_hibernation_counts_as_a_failure_and_is_an_error_event(
    start_kernel: Any, api: Any, scrape: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    kernel_id, _ = await start_kernel()
    events: list[dict[str, Any]] = []

    async def listener(logger: Any, schema_id: str, data: Any) -> None:
        events.append(dict(data))

    jp_serverapp.event_logger.add_listener(schema_id=EVENT_SCHEMA_ID, listener=listener)
    failures = {"operation": "hibernate", "reason": "store-full"}
    before = (await scrape())("kernelhib_failures_total", **failures)
    monkeypatch.setattr(jp_serverapp.kernel_manager.hibernator, "max_image_bytes", 1)

    await api("POST", "kernels", kernel_id, "hibernate", expect=507)
    await asyncio.sleep(0.1)  # listeners run as tasks

    assert (await scrape())("kernelhib_failures_total", **failures) == before + 1
    assert [(e["action"], e["status"], e.get("reason")) for e in events] == [
        ("hibernate-failed", "error", "store-full")
    ]
    monkeypatch.undo()
    await api("POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"})
    await asyncio.sleep(0.1)
    assert [(e["action"], e["status"]) for e in events[-2:]] == [
        ("hibernate-started", "success"),
        ("hibernate", "success"),
    ]


async def test_kernels_adopted_by_the_next_server_are_counted_as_they_are(
    launch_server: Any,
) -> None:
    first = await launch_server()
    model = await first.api("POST", "kernels", body={"name": "python3"}, expect=201)
    kernel_id = model["id"]
    assert (await scrape_process(first)).running() == 1
    assert await first.stop() == 0  # it hibernates the kernel

    second = await launch_server()
    adopted = await scrape_process(second)
    assert (adopted.running(), adopted.hibernated()) == (0, 1)
    await second.api("POST", "kernels", kernel_id, "wake")
    woken = await scrape_process(second)
    assert (woken.running(), woken.hibernated()) == (1, 0)
    await second.api("DELETE", "kernels", kernel_id, expect=204)
    assert (await scrape_process(second)).running() == 0


async def test_a_running_kernel_adopted_after_a_crash_counts_and_its_shutdown_does_not_drift(
    launch_server: Any, tmp_path: Path
) -> None:
    config_dir = tmp_path / "jupyter" / "config"
    marker = tmp_path / "reached"
    use_faults(config_dir, "commit", marker)
    first = await launch_server()
    model = await first.api("POST", "kernels", body={"name": "python3"}, expect=201)
    kernel_id = model["id"]
    pending = asyncio.ensure_future(
        first.api("POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"})
    )
    await until(marker.exists, 60, "the server reaches the commit")
    first.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.process.wait)
    pending.cancel()
    (config_dir / "jupyter_server_config.py").unlink()
    assert await settled(kernel_id), "the kernel runs on for the next server"

    second = await launch_server()
    adopted = await scrape_process(second)
    assert (adopted.running(), adopted.hibernated()) == (1, 0)
    await second.api("DELETE", "kernels", kernel_id, expect=204)
    assert (await scrape_process(second)).running() == 0
