"""Soak: many kernels, many hibernate/wake cycles, mixed engines, concurrent requests.

Nothing may be lost, and once the kernels are shut down nothing may be left:
no process, no image, no journal entry. ``KERNELHIB_SOAK_KERNELS`` and
``KERNELHIB_SOAK_CYCLES`` size it (CI runs 12 x 3; docs/reliability.md has the
figures of a 12 x 10 run). It prints its figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from kernelhib.recovery import kernel_processes

pytestmark = pytest.mark.criu

KERNELS = int(os.environ.get("KERNELHIB_SOAK_KERNELS", "12"))
CYCLES = int(os.environ.get("KERNELHIB_SOAK_CYCLES", "3"))


async def test_soak_loses_nothing_and_leaves_nothing(launch_server: Any) -> None:
    server = await launch_server()
    kernels = []
    for _ in range(KERNELS):
        model = await server.api("POST", "kernels", body={"name": "python3"}, expect=201)
        channel = await server.open_channel(model["id"])
        setup = "import numpy as np; data = np.arange(2_000_000); count = 0"
        assert (await channel.execute(setup))["status"] == "ok"
        kernels.append((model["id"], channel))
    answers: dict[int, int] = {}
    started = time.monotonic()

    async def hibernate(kernel_id: str, engine: str) -> None:
        body = {"engine": engine}
        status = (await server.request("POST", "kernels", kernel_id, "hibernate", body=body))[0]
        answers[status] = answers.get(status, 0) + 1

    async def cycle(index: int, kernel_id: str, channel: Any, round_: int) -> None:
        engine = ("criu", "dill")[(index + round_) % 2]
        # Two front ends ask at once (the UI and the idle policy, say): one hibernates.
        await asyncio.gather(hibernate(kernel_id, engine), hibernate(kernel_id, engine))
        # A cell and an explicit wake race each other: one wake serves both.
        wake = server.request("POST", "kernels", kernel_id, "wake")
        result, (status, _) = await asyncio.gather(channel.execute("count += 1; count"), wake)
        answers[status] = answers.get(status, 0) + 1
        assert result["result"] == str(round_ + 1), (kernel_id, engine, result)

    for round_ in range(CYCLES):
        await asyncio.gather(
            *(
                cycle(i, kernel_id, channel, round_)
                for i, (kernel_id, channel) in enumerate(kernels)
            )
        )
    seconds = time.monotonic() - started

    for kernel_id, channel in kernels:
        assert (await channel.execute("int(data.sum()), count"))["result"] == (
            f"({sum(range(2_000_000))}, {CYCLES})"
        )
        await server.api("DELETE", "kernels", kernel_id, expect=204)
    assert set(answers) <= {200, 409}, answers
    own = (".journal", ".chunks")
    leftovers = [p.name for p in server.image_dir.iterdir() if p.is_dir() and p.name not in own]
    # Every image is gone, and with it every chunk (collected after each delete).
    leftovers += [p.name for p in server.image_dir.glob(".chunks/??/*")]
    assert leftovers == []
    assert list((server.image_dir / ".journal").glob("*.json")) == []
    assert [k for k, _ in kernels if kernel_processes(k)] == []
    print(
        f"\nsoak: {KERNELS} kernels x {CYCLES} cycles, criu and dill alternating, in "
        f"{seconds:.0f} s; answers {answers}; nothing lost, nothing left"
    )
