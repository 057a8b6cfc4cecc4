"""Hibernate and wake real kernels with CRIU through the server's REST API and websockets."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.connect import port_names

from kernelhib.kernel_process import available_memory

from .conftest import (
    alter_chunk,
    image_path,
    page_chunk,
    summarize,
    wait_for_state,
    wait_until_fetched,
)

pytestmark = pytest.mark.criu

STATE = """
import os, tempfile, threading, time, subprocess, numpy as np
numbers = [1, 2, 3]
def double(x):
    return 2 * x
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
point = Point(3, 4)
big = np.random.default_rng(0).random(128 * 1024 * 1024)  # 1 GiB: well above the noise
big_sum = float(big.sum())
handle = open(os.path.join(tempfile.mkdtemp(), 'data.txt'), 'w+')
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


async def memory_returned(available_before: int, expected: float, wait: float = 3) -> bool:
    """Whether the system's available memory grew by ``expected`` bytes (freeing lags a bit)."""
    for _ in range(int(wait / 0.1)):
        if available_memory() - available_before > expected:
            return True
        await asyncio.sleep(0.1)
    return False


def private_memory(pid: int) -> int:
    """The process's anonymous and shared memory, from the kernel's own accounting."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return sum(int(status[key].split()[0]) * 1024 for key in ("RssAnon", "RssShmem"))


def kernel_pid(jp_serverapp: Any, kernel_id: str) -> int:
    return jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.kernel.pid


async def test_hibernate_frees_memory_and_wake_keeps_everything(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(STATE))["status"] == "ok"
    before = await channel.execute("ticks[0], handle.tell(), child.pid, big_sum")
    pid = kernel_pid(jp_serverapp, kernel_id)
    private = private_memory(pid)
    assert private > 2**30
    available_before = available_memory()

    model = await api("POST", "kernels", kernel_id, "hibernate")

    assert model["execution_state"] == "hibernated"
    hibernation = model["hibernation"]
    assert hibernation["engine"] == "criu"
    # The pages as CRIU wrote them; what the store took is less: zero pages cost nothing.
    assert hibernation["logical_bytes"] > 2**30
    assert 0 < hibernation["image_bytes"] <= hibernation["logical_bytes"]
    assert hibernation["freed_bytes"] >= private
    assert not Path(f"/proc/{pid}").exists(), "the kernel process must be gone"
    # 0.7, not 1: other processes on the machine allocate meanwhile.
    assert await memory_returned(available_before, 0.7 * private), (
        f"{(available_memory() - available_before) >> 20} MiB returned of {private >> 20} MiB"
    )
    listed = {k["id"]: k for k in await api("GET", "kernels")}
    assert listed[kernel_id]["execution_state"] == "hibernated"
    assert listed[kernel_id]["hibernation"]["state"] == "hibernated"

    model = await api("POST", "kernels", kernel_id, "wake")
    assert model["execution_state"] != "hibernated"
    # Woken lazily: it answers while its memory still comes in, the image kept till then.
    assert model["hibernation"] == {"state": "running", "fetching": True}
    assert image_path(jp_serverapp, kernel_id).is_dir()
    model = await wait_until_fetched(api, kernel_id)
    assert "hibernation" not in model
    assert not image_path(jp_serverapp, kernel_id).exists()

    after = await channel.execute(
        "(double(21), numbers, point.x + point.y, float(big.sum()) == big_sum, "
        "handle.tell(), handle.read(), ticker.is_alive(), child.poll(), ticks[0] > {t})".format(
            t=int(before["result"].strip("()").split(",")[0])
        )
    )
    assert after["status"] == "ok", after
    assert after["result"] == "(42, [1, 2, 3], 7, True, 6, 'world\\n', True, None, True)"
    assert after["execution_count"] == before["execution_count"] + 1


async def test_message_on_open_websocket_wakes_kernel_and_is_answered_once(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("n = 0")
    # Several rounds: the IOPub subscription comes back late in about half of
    # the wakes, so one lucky round would prove little.
    for round_ in range(1, 6):
        await api("POST", "kernels", kernel_id, "hibernate")
        msg_id = channel.send("execute_request", {"code": "n += 1; print('n is', n)"})
        reply, output = await channel.reply_and_output(msg_id)
        result = summarize(reply, output)
        assert result["status"] == "ok"
        assert result["stdout"] == f"n is {round_}\n", f"output lost in round {round_}"
        assert (await api("GET", "kernels", kernel_id))["execution_state"] != "hibernated"
    await asyncio.sleep(1)
    replies = [m for m in channel.received if m["msg_type"] == "execute_reply"]
    assert len(replies) == len({m["parent_header"]["msg_id"] for m in replies}), "a reply twice"


async def test_new_websocket_opens_without_waking_and_its_message_wakes(
    start_kernel: Any, api: Any, open_channel: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("secret = 'kept'")
    channel.ws.close()
    await api("POST", "kernels", kernel_id, "hibernate")

    fresh = await open_channel(kernel_id)
    # Front ends ask every new connection for kernel info: answered without waking.
    info = await fresh.next_reply(fresh.send("kernel_info_request", {}))
    assert info["content"]["implementation"] == "ipython"
    assert (await api("GET", "kernels", kernel_id))["execution_state"] == "hibernated"
    result = await fresh.execute("print(secret)")
    assert result["stdout"] == "kept\n"


async def test_busy_kernel_is_refused_without_force(start_kernel: Any, api: Any) -> None:
    kernel_id, channel = await start_kernel()
    msg_id = channel.send("execute_request", {"code": "import time; time.sleep(3); done = 1"})
    await wait_for_state(api, kernel_id, "busy")

    error = await api("POST", "kernels", kernel_id, "hibernate", expect=409)
    assert "busy" in error["message"] and "force" in error["message"]

    reply, _ = await channel.reply_and_output(msg_id)
    assert reply["content"]["status"] == "ok"
    assert (await channel.execute("done"))["result"] == "1"


async def test_forced_hibernation_freezes_a_running_cell_that_finishes_after_wake(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    code = "import time\nfor i in range(150):\n    time.sleep(0.1)\nresult = sum(range(10**6))"
    msg_id = channel.send("execute_request", {"code": code})
    await wait_for_state(api, kernel_id, "busy")

    model = await api("POST", "kernels", kernel_id, "hibernate", body={"force": True})
    assert model["execution_state"] == "hibernated"
    await asyncio.sleep(1)
    # The wake does not wait for the cell (its shell answers only after it): the
    # kernel is back, and busy, while the cell runs on.
    woken = await api("POST", "kernels", kernel_id, "wake")
    assert woken["execution_state"] == "busy"
    await asyncio.sleep(1)
    assert (await api("GET", "kernels", kernel_id))["execution_state"] == "busy"

    reply = await channel.next_reply(msg_id)
    assert reply["content"]["status"] == "ok"
    assert (await channel.execute("result, i"))["result"] == "(499999500000, 149)"


async def test_wake_succeeds_when_the_old_pid_was_taken(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'survived'")
    pid = kernel_pid(jp_serverapp, kernel_id)
    await api("POST", "kernels", kernel_id, "hibernate")

    squatter = take_pid(pid)
    try:
        await api("POST", "kernels", kernel_id, "wake")
        assert (await channel.execute("print(value)"))["stdout"] == "survived\n"
        assert kernel_pid(jp_serverapp, kernel_id) != pid
    finally:
        squatter.kill()
        squatter.wait()


def take_pid(pid: int) -> subprocess.Popen[bytes]:
    """Start a process that gets exactly ``pid`` (root only: sets ns_last_pid)."""
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(20):
        last_pid.write_text(str(pid - 1))
        process = subprocess.Popen(["sleep", "600"])
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    raise AssertionError(f"could not take pid {pid}")


def connections_on(port: int) -> bool:
    """Whether any TCP socket that /proc lists (connections, TIME_WAIT) uses ``port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote = line.split()[1:3]
            if port in (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)):
                return True
    return False


def bind(ip: str, port: int) -> None:
    with socket.socket() as squatter:  # no SO_REUSEADDR: as an outgoing connection binds
        squatter.bind((ip, port))


async def test_a_hibernated_kernels_ports_are_held_until_it_wakes(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    """Its ports are ephemeral ones: one taken by a connection meanwhile made the wake
    fail ("Address already in use"). Ports its old connections left in TIME_WAIT are
    kept from new ones anyway; the others (the heartbeat's: the server never connects
    to it) are what this checks."""
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 'survived'")
    info = jp_serverapp.kernel_manager.get_kernel(kernel_id).get_connection_info()
    await api("POST", "kernels", kernel_id, "hibernate")
    idle = [info[name] for name in port_names if not connections_on(info[name])]
    assert idle, "every port of the kernel is still in use by its old connections"

    for port in idle:
        with pytest.raises(OSError, match="in use"):
            bind(info["ip"], port)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("print(value)"))["stdout"] == "survived\n"

    await api("POST", "kernels", kernel_id, "hibernate")
    await api("DELETE", "kernels", kernel_id, expect=204)  # shut down hibernated
    for port in idle:
        bind(info["ip"], port)  # let go of


async def test_image_is_private_while_hibernated(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, _ = await start_kernel()
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    assert stat.S_IMODE(image.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(image.stat().st_mode) == 0o700
    files = [p for p in image.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    await api("POST", "kernels", kernel_id, "wake")
    await wait_until_fetched(api, kernel_id)
    assert not image.exists(), "a woken kernel's image (all its secrets) must be deleted"


@pytest.mark.parametrize(
    "hibernator_config", [{}, {"chunked_images": False}], ids=["chunks", "plain-files"]
)
async def test_tampered_image_is_refused_and_kept(
    start_kernel: Any, api: Any, jp_serverapp: Any, hibernator_config: dict[str, Any]
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 42")
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    if hibernator_config:
        pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        original = pages.read_bytes()
        pages.write_bytes(original[:4096] + bytes([original[4096] ^ 1]) + original[4097:])
        mismatch = "does not match its signed hash"
    else:
        pages = page_chunk(image)
        original = alter_chunk(pages)
        mismatch = "does not match its hash"

    error = await api("POST", "kernels", kernel_id, "wake", expect=500)
    assert mismatch in error["message"]
    assert error["reason"] == "wake-failed"
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    assert "does not match" in model["hibernation"]["error"]
    assert pages.exists()

    manifest = json.loads((image / "manifest.json").read_text())
    manifest["engine"] = "criu "
    (image / "manifest.json").write_text(json.dumps(manifest))
    pages.write_bytes(original)
    error = await api("POST", "kernels", kernel_id, "wake", expect=500)
    assert "not signed by this server's key" in error["message"]

    manifest["engine"] = "criu"
    (image / "manifest.json").write_text(json.dumps(manifest))
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "42"


async def test_kernels_sharing_a_directory_hibernate_at_once(
    start_kernel: Any, api: Any, jp_root_dir: Path
) -> None:
    """CRIU mounts a proc in the kernel's directory; a stale one must not block dumps."""
    (jp_root_dir / "proc.crtools").mkdir()  # left by an interrupted dump
    kernels = [await start_kernel() for _ in range(3)]
    for index, (_, channel) in enumerate(kernels):
        await channel.execute(f"import os; here = os.getcwd(); index = {index}")

    models = await asyncio.gather(
        *(api("POST", "kernels", kernel_id, "hibernate") for kernel_id, _ in kernels)
    )

    assert [m["execution_state"] for m in models] == ["hibernated"] * 3
    assert not (jp_root_dir / "proc.crtools").exists()
    for index, (_, channel) in enumerate(kernels):
        result = await channel.execute("index, here")
        assert result["result"] == repr((index, str(jp_root_dir)))


SEEDED = (
    "import random, numpy as np\n"
    "random.seed(1234); np.random.seed(1234)\n"
    "before = (random.getstate(), np.random.get_state())\n"
)
SAME_RANDOM_STATE = (
    "after = (random.getstate(), np.random.get_state())\n"
    "before[0] == after[0] and all(\n"
    "    np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b\n"
    "    for a, b in zip(before[1], after[1])\n"
    ")"
)


async def test_a_wake_changes_no_random_state(start_kernel: Any, api: Any) -> None:
    """A seeded experiment goes on as if there had been no hibernation: the wake asks the
    kernel nothing that draws from its random generators (IPython's kernel_info does)."""
    kernel_id, channel = await start_kernel()
    assert (await channel.execute(SEEDED))["status"] == "ok"
    assert (await channel.execute(SAME_RANDOM_STATE))["result"] == "True"

    await api("POST", "kernels", kernel_id, "hibernate", body={"engine": "criu"})
    # The connected client's next cell wakes the kernel.
    assert (await channel.execute(SAME_RANDOM_STATE))["result"] == "True"


async def test_an_image_stores_its_pages_as_chunks_and_wakes_verified(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("import numpy as np; data = np.random.default_rng(1).random(1 << 21)")
    await wait_for_state(api, kernel_id, "idle")  # its server may not have seen the reply yet
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    manifest = json.loads((image / "manifest.json").read_text())
    assert manifest["format"] == 2
    pages = {n: e for n, e in manifest["files"].items() if n.startswith("pages-")}
    assert pages and all("chunks" in e and "blake3" not in e for e in pages.values())
    assert not list(image.glob("pages-*.img")), "page files go to the chunk store only"
    assert all("blake3" in e for n, e in manifest["files"].items() if n not in pages)
    assert page_chunk(image).is_file()

    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("float(data.sum())"))["status"] == "ok"


@pytest.mark.parametrize("hibernator_config", [{"chunked_images": False}])
async def test_an_image_of_plain_files_wakes_where_chunks_are_written(
    start_kernel: Any, api: Any, jp_serverapp: Any, hibernator_config: dict[str, Any]
) -> None:
    """What earlier releases wrote (format 1) still wakes."""
    kernel_id, channel = await start_kernel()
    await channel.execute("value = list(range(7))")
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    manifest = json.loads((image / "manifest.json").read_text())
    assert manifest.get("format", 1) == 1
    assert all("blake3" in e for e in manifest["files"].values())
    assert list(image.glob("pages-*.img"))

    jp_serverapp.kernel_manager.hibernator.chunked_images = True
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "[0, 1, 2, 3, 4, 5, 6]"


async def test_an_image_in_a_newer_format_is_refused_and_kept(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("value = 42")
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    written = (image / "manifest.json").read_text()
    manifest = json.loads(written)
    manifest["format"] = 3
    manifest["signature"] = jp_serverapp.kernel_manager.hibernator.store._sign(manifest)
    (image / "manifest.json").write_text(json.dumps(manifest))

    error = await api("POST", "kernels", kernel_id, "wake", expect=500)
    assert error["reason"] == "image-format"
    assert "newer than this kernelhib reads" in error["message"]
    assert "upgrade kernelhib" in error["message"]
    model = await api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    assert "format 3" in model["hibernation"]["error"]

    (image / "manifest.json").write_text(written)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await channel.execute("value"))["result"] == "42"
