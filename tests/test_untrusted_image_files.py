"""An image directory is loaded only as far as its signed manifest vouches for it.

Someone who can write into the image directory may add files there, or edit a
manifest: CRIU must see only the signed files, and a server must act on no
manifest it did not sign.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import alter_chunk, image_path, page_chunk
from .test_server_restart import listed, start_session

pytestmark = pytest.mark.criu


def restore_dirs(image: Path) -> list[Path]:
    return list(image.parent.glob(".restore-*"))


@pytest.mark.parametrize(
    "hibernator_config", [{}, {"chunked_images": False}], ids=["chunks", "plain-files"]
)
async def test_crius_wake_never_reads_files_the_manifest_does_not_list(
    start_kernel: Any, api: Any, jp_serverapp: Any, hibernator_config: dict[str, Any]
) -> None:
    kernel_id, channel = await start_kernel()
    await channel.execute("import os; value = {'kept': list(range(5))}; pid = os.getpid()")
    await api("POST", "kernels", kernel_id, "hibernate")
    image = image_path(jp_serverapp, kernel_id)
    # Images CRIU reads whenever they are there, garbage and well-formed alike.
    (image / "remap-fpath.img").write_bytes(b"\x00" * 64)
    (image / "sk-queues.img").write_bytes(b"\x00" * 64)
    shutil.copy(image / "files.img", image / "fifo-data.img")
    shutil.copy(image / "pagemap-1.img", image / "pagemap-9.img")
    if hibernator_config:  # plain files
        shutil.copy(image / "pages-1.img", image / "pages-9.img")
        # A failed wake (a page altered) leaves nothing of CRIU's in the image.
        pages = image / "pages-1.img"
        original = pages.read_bytes()
        pages.write_bytes(original[:4096] + bytes([original[4096] ^ 1]) + original[4097:])
        mismatch = "does not match its signed hash"
    else:
        # The pages are chunks: page files beside them must never be read.
        (image / "pages-1.img").write_bytes(b"\xff" * (64 << 20))
        (image / "pages-9.img").write_bytes(b"\xff" * (64 << 20))
        pages = page_chunk(image)
        original = alter_chunk(pages)
        mismatch = "does not match its hash"
    error = await api("POST", "kernels", kernel_id, "wake", expect=500)
    assert mismatch in error["message"]
    assert not (image / "restore.log").exists() and not (image / "restored.pid").exists()
    assert restore_dirs(image) == []

    pages.write_bytes(original)
    await api("POST", "kernels", kernel_id, "wake")

    result = await channel.execute("value, os.getpid() == pid")
    assert result["status"] == "ok", result
    assert result["result"] == "({'kept': [0, 1, 2, 3, 4]}, True)"
    assert restore_dirs(image) == []


async def test_a_server_adopts_no_kernel_whose_manifest_was_altered(launch_server: Any) -> None:
    first = await launch_server()
    kernel_id = await start_session(first)
    await (await first.open_channel(kernel_id)).execute("n = 41")
    assert await first.stop() == 0
    manifest_path = first.image_dir / kernel_id / "manifest.json"
    signed = manifest_path.read_text()
    manifest = json.loads(signed)
    manifest["cwd"] = "/"  # where the kernel would be started on a dill wake
    manifest_path.write_text(json.dumps(manifest))

    second = await launch_server()

    assert await listed(second) == {}
    assert f"Cannot adopt hibernated kernel {kernel_id}: the manifest" in second.log_text()
    assert "not signed by this server's key" in second.log_text()
    assert await second.stop() == 0
    # Kept, not deleted: with its signed manifest back, the kernel is adopted and wakes.
    manifest_path.write_text(signed)
    third = await launch_server()
    assert await listed(third) == {kernel_id: "hibernated"}
    result = await (await third.open_channel(kernel_id)).execute("n + 1")
    assert result["result"] == "42"
