"""Lazy CRIU wake of a real ipykernel against a full restore, and a cold read.

An ipykernel in its own pid namespace holds SIZE MiB of random bytes in a numpy
array and is dumped with kernelhib's CRIU engine; its pages files are kept apart
with per-256 KiB BLAKE3 hashes, as a store would keep them. Then, each from a
cold page cache (the pages files evicted with POSIX_FADV_DONTNEED, nothing
else): the pages files are read sequentially; the image is restored in full;
and it is restored lazily through kernelhib's verifying page server. For each
restore: the time until ``criu restore`` returned, until the kernel answered
``1+1``, and, lazily, until all memory was in. The kernel's data is checked
after each restore.

Needs root. Run from the repository root::

    .venv/bin/python benchmarks/lazy_wake.py --sizes 256 512 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from kernelhib.engines.criu import CriuEngine
from kernelhib.engines.criu_install import locate_criu
from kernelhib.engines.lazy_pages import BlockHashedPages, LazyPageServer
from kernelhib.kernel_process import namespace_init

RESTORE = ("--tcp-close", "--shell-job", "--ext-unix-sk", "--file-locks")
RESTORE += ("--restore-detached", "--restore-sibling")


def execute(client: BlockingKernelClient, code: str) -> dict[str, Any]:
    msg_id = client.execute(code)
    while True:
        reply = client.get_shell_msg(timeout=300)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Image:
    """A dumped kernel: its image without pages files, and the pages, kept apart."""

    def __init__(self, base: Path, client: BlockingKernelClient) -> None:
        self.base = base
        self.client = client
        self.image = base / "image"
        self.store = base / "store"
        self.hashes: dict[str, list[bytes]] = {}

    def open_pages(self, name: str) -> BlockHashedPages:
        return BlockHashedPages(self.store / name, self.hashes[name])

    def restore_dir(self, pages: bool) -> Path:
        target = self.base / "restore"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.image, target)
        if pages:
            for path in self.store.iterdir():
                os.link(path, target / path.name)
        evict(list(self.store.iterdir()))
        return target


async def dump_kernel(criu: str, base: Path, mib: int) -> Image:
    connection, _ = write_connection_file(str(base / "kernel.json"), ip="127.0.0.1")
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "setsid",
         sys.executable, "-m", "ipykernel_launcher", "-f", connection,
         "--HistoryManager.hist_file=:memory:"],  # the image is restored again and again
        cwd=base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = BlockingKernelClient(connection_file=connection)
    client.load_connection_file()
    client.start_channels()
    image = Image(base, client)
    try:
        pid = await namespace_init(unshare.pid, unshare.poll)
        client.kernel_info()  # not wait_for_ready: its heartbeat check gives up under load
        client.get_shell_msg(timeout=120)
        code = (
            f"import hashlib, os, numpy as np\nx = np.frombuffer(os.urandom({mib} << 20), np.uint8)"
        )
        execute(client, code + "\nh = hashlib.sha256(x).hexdigest()")
        image.image.mkdir()
        await CriuEngine(criu).dump(pid, image.image)
    finally:
        unshare.kill()  # --kill-child: the dumped, stopped kernel dies with it
        unshare.wait()
    image.store.mkdir()
    for pages in image.image.glob("pages-*.img"):
        image.hashes[pages.name] = BlockHashedPages.hash_blocks(pages)
        pages.rename(image.store / pages.name)
    return image


async def restore(criu: str, directory: Path, *extra: str) -> int:
    pidfile = directory / "restored.pid"
    process = await asyncio.create_subprocess_exec(
        criu, "restore", "-D", str(directory), "-o", "restore.log",
        *RESTORE, "--pidfile", str(pidfile), *extra,
    )  # fmt: skip
    assert await process.wait() == 0, (directory / "restore.log").read_text()[-2000:]
    return int(pidfile.read_text())


async def check_and_end(image: Image, pid: int) -> None:
    try:
        content = await asyncio.to_thread(
            execute, image.client, "assert hashlib.sha256(x).hexdigest() == h"
        )
        assert content["status"] == "ok", content
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def full_restore(criu: str, image: Image) -> dict[str, float]:
    directory = image.restore_dir(pages=True)
    start = time.monotonic()
    pid = await restore(criu, directory)
    restored = time.monotonic() - start
    await asyncio.to_thread(execute, image.client, "1+1")
    first = time.monotonic() - start
    await check_and_end(image, pid)
    return {"restored": restored, "first reply": first, "all in": restored}


async def lazy_restore(criu: str, image: Image) -> dict[str, float]:
    directory = image.restore_dir(pages=False)
    start = time.monotonic()
    async with LazyPageServer(criu, directory, image.open_pages) as server:
        pid = await restore(criu, directory, *server.restore_args)
        await server.adopt(pid)
        restored = time.monotonic() - start
        await asyncio.to_thread(execute, image.client, "1+1")
        first = time.monotonic() - start
        await server.wait()
        drained = time.monotonic() - start
        await check_and_end(image, pid)
    return {"restored": restored, "first reply": first, "all in": drained}


def cold_read(image: Image) -> float:
    files = list(image.store.iterdir())
    evict(files)
    start = time.monotonic()
    for path in files:
        with path.open("rb", buffering=0) as file:
            while file.read(4 << 20):
                pass
    return time.monotonic() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    criu = str(locate_criu().path)
    print("| Data | Cold read | Full: restore / 1st reply | Lazy: restore / 1st reply / all in |")
    print("|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            image = await dump_kernel(criu, Path(tmp), size)
            reads, full, lazy = [], [], []
            try:
                for _ in range(args.runs):
                    reads.append(cold_read(image))
                    full.append(await full_restore(criu, image))
                    lazy.append(await lazy_restore(criu, image))
            finally:
                image.client.stop_channels()

        def median(runs: list[dict[str, float]], key: str) -> str:
            return f"{statistics.median(run[key] for run in runs):.2f} s"

        print(
            f"| {size} MiB random | {statistics.median(reads):.2f} s"
            f" | {median(full, 'restored')} / {median(full, 'first reply')}"
            f" | {median(lazy, 'restored')} / {median(lazy, 'first reply')}"
            f" / {median(lazy, 'all in')} |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
