"""A hibernation whose image would not fit is refused before the kernel is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .conftest import KernelChannel, image_path

pytestmark = pytest.mark.criu


async def assert_runs_untouched(
    api: Any, channel: KernelChannel, serverapp: Any, kernel_id: str
) -> None:
    """The refused kernel runs with its state, and nothing of an image was written."""
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "idle"
    assert (await channel.execute("kept"))["result"] == "[1, 2, 3]"
    assert not image_path(serverapp, kernel_id).exists()
    store = Path(serverapp.kernel_manager.hibernator.image_dir)
    assert not list(store.glob(".partial-*"))


async def hibernate(jp_fetch: Any, kernel_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    """A hibernate request: its status and its JSON answer."""
    response = await jp_fetch(
        "api", "kernels", kernel_id, "hibernate",
        method="POST", body=json.dumps(body), raise_error=False,
    )  # fmt: skip
    return response.code, json.loads(response.body)


@pytest.mark.parametrize("engine", ["criu", "dill"])
@pytest.mark.parametrize("hibernator_config", [{"max_image_bytes": 1 << 20}])
async def test_a_full_store_refuses_the_hibernation_and_the_kernel_runs_on(
    engine: str, start_kernel: Any, api: Any, jp_fetch: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("kept = [1, 2, 3]")

    status, answer = await hibernate(jp_fetch, kernel_id, {"engine": engine})

    assert (status, answer["reason"]) == (507, "store-full")
    message = answer["message"]
    assert "max_image_bytes" in message and "The kernel runs on" in message
    await assert_runs_untouched(api, channel, jp_serverapp, kernel_id)
    model = await api("GET", "kernels", kernel_id)
    assert model["hibernation"]["state"] == "running"
    assert "the image store is full" in model["hibernation"]["error"]


async def test_images_kept_count_against_the_limit_until_their_kernel_goes(
    start_kernel: Any, api: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    first, _ = await start_kernel()
    second, channel = await start_kernel()
    await channel.execute("kept = [1, 2, 3]")
    image = await api("POST", "kernels", first, "hibernate", body={"engine": "criu"})
    memory = (await api("GET", "kernels", second))["memory_bytes"]
    # Room for the second one (its memory is the estimate), and half the first image:
    # what the first stored counts, compressed and deduplicated.
    hibernator = jp_serverapp.kernel_manager.hibernator
    monkeypatch.setattr(
        hibernator, "max_image_bytes", memory + image["hibernation"]["image_bytes"] // 2
    )

    await api("POST", "kernels", second, "hibernate", body={"engine": "criu"}, expect=507)
    await assert_runs_untouched(api, channel, jp_serverapp, second)

    await api("DELETE", "kernels", first, expect=204)
    await api("POST", "kernels", second, "hibernate", body={"engine": "criu"})
    assert (await channel.execute("kept"))["result"] == "[1, 2, 3]"


async def test_too_little_free_space_refuses_the_hibernation_and_the_kernel_runs_on(
    start_kernel: Any, api: Any, jp_fetch: Any, jp_serverapp: Any, monkeypatch: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("kept = [1, 2, 3]")
    store = Path(jp_serverapp.kernel_manager.hibernator.image_dir)
    real_statvfs = os.statvfs

    def nearly_full(path: Any) -> Any:
        if Path(path) == store:
            return SimpleNamespace(f_bavail=1000, f_frsize=4096)  # 4 MB free
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", nearly_full)
    status, answer = await hibernate(jp_fetch, kernel_id, {})

    assert (status, answer["reason"]) == (507, "no-space")
    message = answer["message"]
    assert f"{store} has 4 MB free" in message and "The kernel runs on" in message
    await assert_runs_untouched(api, channel, jp_serverapp, kernel_id)

    monkeypatch.undo()
    await api("POST", "kernels", kernel_id, "hibernate")
    assert (await channel.execute("kept"))["result"] == "[1, 2, 3]"
