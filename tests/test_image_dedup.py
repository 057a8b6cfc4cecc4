"""Through the server, images share their chunks: a re-hibernation writes only what
changed, kernels share what is identical, and chunks no image needs any more are
deleted (and only those)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kernelhib.testing import wait_until_fetched

from .conftest import image_path
from .test_server_restart import listed, start_session

pytestmark = pytest.mark.criu

# 64 MiB of random data: the interpreter's own pages, which any cell touches, are
# then a small part of the image (docs/image-format.md).
DATA = "import numpy as np; data = np.random.default_rng({seed}).random(8 << 20)"


def chunks_of(image: Path) -> set[str]:
    """The stored chunks a committed image refers to."""
    manifest = json.loads((image / "manifest.json").read_text())
    return {
        digest
        for entry in manifest["files"].values()
        for digest, _ in entry.get("chunks", [])
        if digest != "zero"
    }


def stored(root: Path) -> set[str]:
    """The chunks in the image store."""
    return {p.parent.name + p.name for p in root.glob(".chunks/??/*") if p.is_file()}


async def test_a_rehibernation_after_a_small_change_writes_only_what_changed(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    """The issue's target: at most 5 % of the bytes the first hibernation wrote. A woken
    kernel that runs a cell rewrites about 40 MiB of the interpreter's own heap (most
    likely the cyclic garbage collector, writing into tracked objects' headers), about
    11 MB stored: the kernel holds 384 MiB so that this fixed cost stays under 5 %."""
    kernel_id, channel = await start_kernel()
    cell = "import numpy as np; data = np.random.default_rng(1).random(48 << 20)"
    assert (await channel.execute(cell))["status"] == "ok"
    first = (await api("POST", "kernels", kernel_id, "hibernate"))["hibernation"]
    assert first["image_bytes"] > 300 << 20  # floats in [0, 1) compress a little
    await api("POST", "kernels", kernel_id, "wake")
    # A cell rewrites 512 KiB of the data.
    await channel.execute("data[: 1 << 16] = np.random.default_rng(2).random(1 << 16)")

    second = (await api("POST", "kernels", kernel_id, "hibernate"))["hibernation"]

    assert second["logical_bytes"] >= first["logical_bytes"] * 0.95
    assert second["image_bytes"] <= 0.05 * first["image_bytes"], (first, second)
    await api("POST", "kernels", kernel_id, "wake")
    original = "np.random.default_rng(1).random(48 << 20)"
    result = await channel.execute(f"bool((data[1 << 16 :] == {original}[1 << 16 :]).all())")
    assert result["result"] == "True"


async def test_a_kernel_holding_only_imports_stores_under_a_third_of_its_image(
    start_kernel: Any, api: Any
) -> None:
    """By compression and zero runs. Not by sharing: a second kernel with the same
    imports shares almost none of its chunks with the first (docs/performance.md)."""
    kernel_id, channel = await start_kernel()
    assert (await channel.execute("import numpy, pandas, json, asyncio"))["status"] == "ok"

    model = (await api("POST", "kernels", kernel_id, "hibernate"))["hibernation"]

    assert model["image_bytes"] <= 0.3 * model["logical_bytes"], model


async def test_shutdown_deletes_an_images_own_chunks_and_keeps_shared_ones(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    cell = DATA.format(seed=5) + "; import os; own = os.urandom(16 << 20)"
    first, channel = await start_kernel()
    assert (await channel.execute(cell))["status"] == "ok"
    second, other = await start_kernel()
    assert (await other.execute(cell))["status"] == "ok"
    await api("POST", "kernels", first, "hibernate")
    await api("POST", "kernels", second, "hibernate")
    root = image_path(jp_serverapp, first).parent
    mine, theirs = chunks_of(root / first), chunks_of(root / second)
    shared = mine & theirs
    assert len(shared) > 100, "the same data in both kernels is stored once"
    assert len(mine - theirs) > 30, "each holds random bytes of its own"
    assert mine | theirs <= stored(root)

    await api("DELETE", "kernels", first, expect=204)

    assert stored(root) == theirs
    await api("POST", "kernels", second, "wake")
    assert (await other.execute("len(own), float(data[7]) > 0"))["result"] == "(16777216, True)"


async def test_a_woken_kernels_chunks_stay_until_it_hibernates_again_or_goes(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute(DATA.format(seed=3))
    await api("POST", "kernels", kernel_id, "hibernate")
    root = image_path(jp_serverapp, kernel_id).parent
    woken_from = chunks_of(root / kernel_id)
    await api("POST", "kernels", kernel_id, "wake")
    # Another kernel's shutdown collects garbage: the woken kernel's chunks are not.
    other, _ = await start_kernel()
    # Forced: it may still be answering its first requests (seen busy after idle in CI).
    await api("POST", "kernels", other, "hibernate", body={"force": True})
    await api("DELETE", "kernels", other, expect=204)
    assert woken_from <= stored(root)

    await api("DELETE", "kernels", kernel_id, expect=204)

    assert stored(root) == set()


async def test_a_wake_does_not_wait_for_a_chunk_collection_and_a_hibernation_does(
    start_kernel: Any, api: Any, jp_serverapp: Any
) -> None:
    """A collection deletes only chunks no committed image refers to: a wake reads its
    image at once; a hibernation, which may find a chunk the collection is deleting,
    waits until it is over."""
    kernel_id, channel = await start_kernel()
    await channel.execute(DATA.format(seed=4))
    await api("POST", "kernels", kernel_id, "hibernate")
    lock = image_path(jp_serverapp, kernel_id).parent / ".chunks" / "lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a collection under way holds it

        await asyncio.wait_for(api("POST", "kernels", kernel_id, "wake"), 60)
        assert (await channel.execute("float(data[3]) > 0"))["result"] == "True"
        await wait_until_fetched(api, kernel_id, timeout=60)

        hibernating = asyncio.ensure_future(api("POST", "kernels", kernel_id, "hibernate"))
        await asyncio.sleep(2)
        assert not hibernating.done()
    finally:
        os.close(fd)
    assert (await hibernating)["hibernation"]["state"] == "hibernated"


async def test_a_starting_server_deletes_chunks_no_image_refers_to(launch_server: Any) -> None:
    first = await launch_server()
    kernel_id = await start_session(first)
    await (await first.open_channel(kernel_id)).execute("n = 41")
    assert await first.stop() == 0  # hibernates the kernel
    kept = chunks_of(first.image_dir / kernel_id)
    orphan = first.image_dir / ".chunks" / "00" / ("0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"\0left by a crashed hibernation")

    second = await launch_server()

    assert await listed(second) == {kernel_id: "hibernated"}
    for _ in range(100):
        if not orphan.exists():
            break
        await asyncio.sleep(0.1)
    assert not orphan.exists()
    assert kept <= stored(second.image_dir)
    result = await (await second.open_channel(kernel_id)).execute("n + 1")
    assert result["result"] == "42"
