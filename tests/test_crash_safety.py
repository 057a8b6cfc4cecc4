"""A server killed outright (SIGKILL) at any step of a hibernation or a wake loses no kernel.

Afterwards the kernel is running with its state, or hibernated in an image that
the next server wakes, and nothing of it is left frozen or half-written. Steps
CRIU itself is in the middle of are hit by timing (the kernel holds enough
memory to take a while); the others by stopping the server there (tests/faults.py).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from kernelhib.kernel_process import traced
from kernelhib.recovery import kernel_processes

from .conftest import ServerProcess

pytestmark = pytest.mark.criu

DATA = "import numpy as np; data = np.random.default_rng(7).random(64 * 1024 * 1024); n = 41"
CHECK = "n += 1; round(float(data.sum()), 3), n"
TESTS = Path(__file__).parent


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


async def until(condition: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(interval)


def criu_holds(kernel_id: str) -> bool:
    """Whether CRIU holds one of the kernel's processes (it is dumping it)."""
    return any(traced(pid) for pid in kernel_processes(kernel_id))


def pages_written(server: ServerProcess, size: int = 64 << 20) -> bool:
    """Whether ``size`` bytes of memory pages of an image being written are in the chunk
    store (its only chunks: the store held none before)."""
    if not any(server.image_dir.glob(".partial-*")):
        return False
    chunks = server.image_dir.glob(".chunks/*/*")
    return sum(p.stat().st_size for p in chunks if p.is_file()) >= size


def use_faults(config_dir: Path, step: str, marker: Path, lazy: bool = True) -> None:
    """Have the next server started with this config stop at ``step``; ``lazy``:
    whether it wakes lazily, as by default (else in full)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "jupyter_server_config.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        f"import faults\nfaults.install({step!r}, {str(marker)!r})\n"
        f"c.KernelHibernator.lazy_wake = {lazy}\n"
    )


async def settled(kernel_id: str) -> list[int]:
    """The kernel's processes once the dead server's watchdog is done with them: none
    frozen (CRIU may still be finishing a dump it started)."""
    await until(
        lambda: not any(process_state(p) in ("T", "t") for p in kernel_processes(kernel_id)),
        60,
        "no process of the kernel is left frozen",
        interval=0.1,
    )
    await asyncio.sleep(0.5)  # the watchdog ends what it ends at once; look again
    pids = kernel_processes(kernel_id)
    assert not any(process_state(p) in ("T", "t") for p in pids)
    return pids


async def until_idle(server: ServerProcess, kernel_id: str) -> None:
    """The server has seen the kernel go idle after a cell (its reply may come first)."""
    for _ in range(200):
        if (await server.api("GET", "kernels", kernel_id))["execution_state"] == "idle":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"kernel {kernel_id} never became idle")


HIBERNATION_STEPS = {
    # step -> what the kernel is afterwards
    "dump": "running",
    "page write": "running",
    "commit": "running",
    "end the process": "hibernated",
}
WAKE_STEPS = ("restore", "verify", "resume", "first reply", "fetch")  # a lazy wake's
FULL_WAKE_STEPS = ("verify", "first reply")  # a full wake's: the pages streamed to CRIU


@pytest.mark.parametrize(
    ("step", "waking", "lazy"),
    [(step, False, True) for step in HIBERNATION_STEPS]
    + [(step, True, True) for step in WAKE_STEPS]
    + [(step, True, False) for step in FULL_WAKE_STEPS],
)
async def test_server_killed_at_each_step_loses_no_kernel(
    step: str, waking: bool, lazy: bool, launch_server: Any, tmp_path: Path
) -> None:
    config_dir = tmp_path / "jupyter" / "config"
    marker = tmp_path / "reached"
    if step not in ("dump", "page write"):
        # Each of these steps is reached only by the request under test.
        use_faults(config_dir, step, marker, lazy)
    first = await launch_server()
    model = await first.api("POST", "kernels", body={"name": "python3"}, expect=201)
    kernel_id = model["id"]
    channel = await first.open_channel(kernel_id)
    assert (await channel.execute(DATA))["status"] == "ok"
    expected = (await channel.execute("round(float(data.sum()), 3), n + 1"))["result"]
    if waking:
        await first.api("POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"})
        await first.stop()
        first = await launch_server()
    action = "wake" if waking else "hibernate"
    pending = asyncio.ensure_future(
        first.api("POST", "kernels", kernel_id, action, body={} if waking else {"engine": "criu"})
    )
    if step == "dump":
        await until(lambda: criu_holds(kernel_id), 30, "CRIU dumps the kernel")
    elif step == "page write":
        await until(lambda: pages_written(first), 30, "CRIU writes memory pages")
    else:
        await until(marker.exists, 60, f"the server reaches {step}")

    first.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.process.wait)
    pending.cancel()
    (config_dir / "jupyter_server_config.py").unlink(missing_ok=True)

    alive = await settled(kernel_id)
    outcome = "hibernated" if waking else HIBERNATION_STEPS[step]
    assert bool(alive) == (outcome == "running"), f"{step}: processes {alive}"
    second = await launch_server()
    listed = {k["id"]: k["execution_state"] for k in await second.api("GET", "kernels")}
    assert (listed[kernel_id] == "hibernated") == (outcome == "hibernated"), listed
    leftovers = [
        p.name for p in second.image_dir.iterdir() if p.name.startswith((".partial", ".restore"))
    ]
    assert not leftovers
    channel = await second.open_channel(kernel_id)
    result = await channel.execute(CHECK)
    assert result["status"] == "ok", result
    assert result["result"] == expected
    await until_idle(second, kernel_id)
    # Hibernating it again works, and then nothing is left of it anywhere.
    await second.api("POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"})
    assert (await channel.execute("n"))["result"] == "42"
    await second.api("DELETE", "kernels", kernel_id, expect=204)
    assert kernel_processes(kernel_id) == []
    assert not (second.image_dir / kernel_id).exists()
    assert not [e for e in (second.image_dir / ".journal").glob("*.json")]
