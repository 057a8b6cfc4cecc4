"""Through the server, a chunked CRIU image wakes lazily: the kernel answers before its
memory is back, and the image stays until every page is in and verified. A
hibernation waits for the fetch, a shutdown cancels it, and a page that fails
verification late ends the kernel and keeps the image (docs/lazy-wake.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelhib import journal
from kernelhib.chunk_store import ChunkStore
from kernelhib.engines import lazy_pages
from kernelhib.kernel_process import HELPER_VAR
from kernelhib.recovery import kernel_processes
from kernelhib.testing import wait_until_fetched

from .conftest import image_path, wait_for_state
from .test_crash_safety import until

pytestmark = pytest.mark.criu

SIZE = 96 << 20
# Random bytes, which the test can make too: it finds their chunks in the store.
DATA = (
    "import hashlib, json, numpy as np\n"
    f"data = np.random.default_rng(5).bytes({SIZE})\n"
    "digest = hashlib.sha256(data).hexdigest()"
)
WINDOW_DELAY_S = 0.1  # per MiB window of the background fetch: about 5 s for the data


def helpers(kernel_id: str) -> list[int]:
    """The processes that keep the kernel's memory from it (the userfaultfd holder)."""
    return [
        pid
        for pid in kernel_processes(kernel_id)
        if f"{HELPER_VAR}=".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    ]


@pytest.fixture
def slow_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every window the fetch reads takes a while: the wake's end can be watched."""
    read = lazy_pages._ReadAhead._read_window

    def slow(self: Any, index: int) -> bytes:
        time.sleep(WINDOW_DELAY_S)
        return read(self, index)

    monkeypatch.setattr(lazy_pages._ReadAhead, "_read_window", slow)


async def hibernated_with_data(start_kernel: Any, api: Any) -> tuple[str, Any, str]:
    kernel_id, channel = await start_kernel()
    await channel.run(DATA)
    digest = await channel.evaluate("json.dumps(digest)")
    await api("POST", "kernels", kernel_id, "hibernate")
    return kernel_id, channel, digest


def journal_state(serverapp: Any, kernel_id: str) -> str | None:
    entry = serverapp.kernel_manager.hibernator.store.journal.read(kernel_id)
    return entry.state if entry else None


async def test_the_kernel_answers_before_its_memory_is_back_and_the_image_stays_until_it_is(
    start_kernel: Any, api: Any, jp_serverapp: Any, slow_fetch: None
) -> None:
    kernel_id, channel, digest = await hibernated_with_data(start_kernel, api)
    image = image_path(jp_serverapp, kernel_id)

    model = await api("POST", "kernels", kernel_id, "wake")

    assert model["execution_state"] == "idle"
    assert model["hibernation"] == {"state": "running", "fetching": True}
    assert await channel.evaluate("json.dumps(1 + 1)") == 2  # while the data is still coming in
    # Until then the image is the kernel's only whole copy.
    assert image.exists()
    assert journal_state(jp_serverapp, kernel_id) == journal.WAKING
    assert helpers(kernel_id)
    await until(lambda: not image.exists(), 120, "the image is retired", interval=0.1)
    assert "hibernation" not in await api("GET", "kernels", kernel_id)
    assert journal_state(jp_serverapp, kernel_id) == journal.RUNNING
    assert helpers(kernel_id) == []
    assert await channel.evaluate("json.dumps(hashlib.sha256(data).hexdigest())") == digest


async def test_a_hibernation_during_the_fetch_waits_for_it(
    start_kernel: Any, api: Any, jp_serverapp: Any, slow_fetch: None
) -> None:
    kernel_id, channel, digest = await hibernated_with_data(start_kernel, api)
    await api("POST", "kernels", kernel_id, "wake")
    assert (await api("GET", "kernels", kernel_id))["hibernation"]["fetching"]

    model = await api("POST", "kernels", kernel_id, "hibernate")

    # Dumped only once all memory was back: the new image holds all of the data.
    assert model["execution_state"] == "hibernated"
    assert helpers(kernel_id) == []
    await api("POST", "kernels", kernel_id, "wake")
    assert await channel.evaluate("json.dumps(hashlib.sha256(data).hexdigest())") == digest


async def test_a_shutdown_during_the_fetch_ends_everything(
    start_kernel: Any, api: Any, jp_serverapp: Any, slow_fetch: None
) -> None:
    kernel_id, _, _ = await hibernated_with_data(start_kernel, api)
    image = image_path(jp_serverapp, kernel_id)
    await api("POST", "kernels", kernel_id, "wake")
    assert helpers(kernel_id)

    await api("DELETE", "kernels", kernel_id, expect=204)

    assert kernel_processes(kernel_id) == []  # the kernel, and the daemon serving it
    assert not image.exists()
    assert journal_state(jp_serverapp, kernel_id) is None


async def test_a_restart_during_the_fetch_starts_afresh(
    start_kernel: Any, api: Any, jp_serverapp: Any, slow_fetch: None, open_channel: Any
) -> None:
    kernel_id, _, _ = await hibernated_with_data(start_kernel, api)
    image = image_path(jp_serverapp, kernel_id)
    await api("POST", "kernels", kernel_id, "wake")
    assert helpers(kernel_id)

    await api("POST", "kernels", kernel_id, "restart")

    channel = await open_channel(kernel_id)
    assert await channel.evaluate("str('data' in globals()).lower()") is False
    assert helpers(kernel_id) == []
    assert not image.exists()
    assert "hibernation" not in await api("GET", "kernels", kernel_id)
    assert journal_state(jp_serverapp, kernel_id) == journal.RUNNING


async def test_an_image_still_being_fetched_counts_against_max_image_bytes(
    start_kernel: Any, api: Any, jp_serverapp: Any, slow_fetch: None, monkeypatch: Any
) -> None:
    woken, _, _ = await hibernated_with_data(start_kernel, api)
    other, channel = await start_kernel()
    await channel.execute("kept = [1, 2, 3]")
    stored = (await api("GET", "kernels", woken))["hibernation"]["image_bytes"]
    await api("POST", "kernels", woken, "wake")
    memory = (await api("GET", "kernels", other))["memory_bytes"]
    hibernator = jp_serverapp.kernel_manager.hibernator
    monkeypatch.setattr(hibernator, "max_image_bytes", memory + stored // 2)

    # The woken kernel's image is still on disk while its memory comes in.
    await api("POST", "kernels", other, "hibernate", expect=507)

    await wait_until_fetched(api, woken)
    await api("POST", "kernels", other, "hibernate")
    assert (await channel.execute("kept"))["result"] == "[1, 2, 3]"


def late_chunk(image: Path) -> Path:
    """A stored chunk of the data's second half: only the background fetch reads it."""
    data = np.random.default_rng(5).bytes(SIZE)
    manifest = json.loads((image / "manifest.json").read_text())
    store = ChunkStore(image.parent)
    for name, entry in manifest["files"].items():
        if not name.startswith("pages-"):
            continue
        for digest, length in entry.get("chunks", []):
            if digest == "zero" or length < 64 << 10:
                continue
            where = data.find(store.get(digest, length)[:256])
            if where > SIZE // 2:
                return image.parent / ".chunks" / digest[:2] / digest[2:]
    raise AssertionError("no chunk of the data's second half found")


async def test_a_page_that_fails_verification_late_ends_the_kernel_and_keeps_the_image(
    start_kernel: Any, api: Any, jp_serverapp: Any, open_channel: Any
) -> None:
    kernel_id, _, digest = await hibernated_with_data(start_kernel, api)
    image = image_path(jp_serverapp, kernel_id)
    chunk = late_chunk(image)
    stored = chunk.read_bytes()
    chunk.write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))

    model = await api("POST", "kernels", kernel_id, "wake")
    assert model["execution_state"] == "idle"  # it answered: its own pages were all good

    # The fetch reaches the bad chunk: the kernel is ended before it can read a zero.
    await wait_for_state(api, kernel_id, "hibernated", timeout=120)
    hibernation = (await api("GET", "kernels", kernel_id))["hibernation"]
    assert hibernation["state"] == "hibernated"
    assert "did not all come back" in hibernation["error"]
    assert "image is kept" in hibernation["error"]
    assert kernel_processes(kernel_id) == []
    assert image.exists()
    assert journal_state(jp_serverapp, kernel_id) is None
    # Repaired, the same image wakes, all of it.
    chunk.write_bytes(stored)
    await api("POST", "kernels", kernel_id, "wake")
    channel = await open_channel(kernel_id)
    assert await channel.evaluate("json.dumps(hashlib.sha256(data).hexdigest())") == digest


def anonymous_rss(kernel_id: str) -> int:
    """The kernel's anonymous memory in bytes: its biggest process's (the kernel's, not
    the holder's or a launcher's)."""

    def rss_anon(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("RssAnon:"))

    return max(rss_anon(pid) for pid in kernel_processes(kernel_id))


async def test_zeros_are_left_to_fault_as_zero_pages_not_copied_in(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.run(
        "import hashlib, json, numpy as np\n"
        "zeros = np.empty(128 << 20, dtype=np.uint8)\n"
        "zeros.fill(0)  # written: real pages, stored as zero chunks\n"
        "data = np.random.default_rng(2).bytes(16 << 20)\n"
        "digest = hashlib.sha256(data).hexdigest()"
    )
    before = anonymous_rss(kernel_id)
    await api("POST", "kernels", kernel_id, "hibernate")
    await api("POST", "kernels", kernel_id, "wake")
    await wait_until_fetched(api, kernel_id)

    # Nothing was copied in for them: the kernel holds 128 MiB less.
    assert anonymous_rss(kernel_id) < before - (96 << 20)
    check = "json.dumps([int(zeros.any()), hashlib.sha256(data).hexdigest() == digest])"
    assert await channel.evaluate(check) == [0, True]
    await channel.run("zeros[::4096] = 1")  # and they are the kernel's to write
    assert await channel.evaluate("json.dumps(int(zeros.sum()))") == (128 << 20) // 4096
