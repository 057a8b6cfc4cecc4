"""Hibernate and wake real kernels with CRIU through the server's REST API and websockets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.criu

STATE = """
import os, threading, time, subprocess, numpy as np
numbers = [1, 2, 3]
def double(x):
    return 2 * x
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
point = Point(3, 4)
big = np.random.default_rng(0).random(32 * 1024 * 1024)  # 256 MiB
big_sum = float(big.sum())
handle = open(os.path.join(os.getcwd(), 'data.txt'), 'w+')
handle.write('hello world\\n')
handle.seek(6)
ticks = [0]
def tick():
    while True:
        ticks[0] += 1
        time.sleep(0.05)
ticker = threading.Thread(target=tick, daemon=True)
ticker.start()
child = subprocess.Popen(['sleep', '600'])
print(os.getpid())
"""


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def kernel_pid(jp_serverapp: Any, kernel_id: str) -> int:
    return jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.kernel.pid


async def test_hibernate_frees_memory_and_wake_keeps_everything(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(STATE))["status"] == "ok"
    before = await channel.execute("ticks[0], handle.tell(), child.pid, big_sum")
    pid = kernel_pid(jp_serverapp, kernel_id)
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    available_before = mem_available()

    model = await api("POST", "kernels", kernel_id, "hibernate")

    assert model["execution_state"] == "hibernated"
    hibernation = model["hibernation"]
    assert hibernation["engine"] == "criu"
    assert hibernation["image_bytes"] > 256 * 2**20
    assert hibernation["freed_bytes"] >= rss
    assert not Path(f"/proc/{pid}").exists(), "the kernel process must be gone"
    assert mem_available() - available_before > 0.8 * rss
    listed = {k["id"]: k for k in await api("GET", "kernels")}
    assert listed[kernel_id]["execution_state"] == "hibernated"
    assert listed[kernel_id]["hibernation"]["state"] == "hibernated"

    model = await api("POST", "kernels", kernel_id, "wake")
    assert model["execution_state"] != "hibernated"
    assert "hibernation" not in model

    after = await channel.execute(
        "(double(21), numbers, point.x + point.y, float(big.sum()) == big_sum, "
        "handle.tell(), handle.read(), ticker.is_alive(), child.poll(), ticks[0] > {t})".format(
            t=int(before["result"].strip("()").split(",")[0])
        )
    )
    assert after["status"] == "ok", after
    assert after["result"] == "(42, [1, 2, 3], 7, True, 6, 'world\\n', True, None, True)"
    assert after["execution_count"] == before["execution_count"] + 1
