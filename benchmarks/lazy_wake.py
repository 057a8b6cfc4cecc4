"""Lazy CRIU wake against a full restore of the same image, and a cold read.

A plain Python process holds SIZE MiB of random data (tests/test_lazy_pages.py's
holder) and is dumped with kernelhib's CRIU engine. Then, each from a cold page
cache (the image's files are evicted with POSIX_FADV_DONTNEED, nothing else):
the pages files are read sequentially; the image is restored in full; and it is
restored lazily through kernelhib's verifying page server. For each restore:
the time until ``criu restore`` returned, until the process answered its first
request (a hash of its first 64 KiB), and, lazily, until all memory was in.

Needs root. Run from the repository root::

    .venv/bin/python benchmarks/lazy_wake.py --sizes 256 512 --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernelhib.engines.criu_install import locate_criu
from tests.test_lazy_pages import DumpedHolder, ask, dump_holder, lazy_restore


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fresh_restore_dir(holder: DumpedHolder, base: Path, name: str, pages: bool) -> Path:
    """A copy of the image's small files, with hard links to its pages if ``pages``."""
    target = base / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(holder.restore_dir, target, ignore=shutil.ignore_patterns("*.log", "*.pid"))
    for path in target.glob("pages-*.img"):  # left there by an earlier lazy run
        path.unlink()
    if pages:
        for path in holder.store.iterdir():
            os.link(path, target / path.name)
    for answer in holder.work.glob("*.out"):
        answer.unlink()
    return target


async def full_restore(criu: str, holder: DumpedHolder, base: Path) -> dict[str, float]:
    directory = fresh_restore_dir(holder, base, "full", pages=True)
    evict(list(holder.store.iterdir()))
    start = time.monotonic()
    restore = await asyncio.create_subprocess_exec(
        criu, "restore", "-D", str(directory), "-o", "restore.log",
        "--tcp-close", "--shell-job", "--ext-unix-sk", "--file-locks",
        "--restore-detached", "--restore-sibling", "--pidfile", str(directory / "restored.pid"),
    )  # fmt: skip
    assert await restore.wait() == 0, (directory / "restore.log").read_text()[-2000:]
    restored = time.monotonic() - start
    pid = int((directory / "restored.pid").read_text())
    try:
        assert await ask(holder, "early") == holder.expected["early"]
        first = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"restored": restored, "first reply": first, "all in": restored}


async def lazy(criu: str, holder: DumpedHolder, base: Path) -> dict[str, float]:
    directory = fresh_restore_dir(holder, base, "lazy", pages=False)
    evict(list(holder.store.iterdir()))
    original, holder.restore_dir = holder.restore_dir, directory
    start = time.monotonic()
    try:
        async with lazy_restore(criu, holder, holder.open_pages) as process:
            restored = time.monotonic() - start
            assert await ask(holder, "early") == holder.expected["early"]
            first = time.monotonic() - start
            await process.server.wait()
            drained = time.monotonic() - start
            assert await ask(holder, "all") == holder.expected["all"]
    finally:
        holder.restore_dir = original
    return {"restored": restored, "first reply": first, "all in": drained}


def cold_read(holder: DumpedHolder) -> float:
    files = list(holder.store.iterdir())
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
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    criu = str(locate_criu().path)
    print("| Data | Cold read | Full: restore / 1st reply | Lazy: restore / 1st reply / all in |")
    print("|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            base = Path(tmp)
            holder = await dump_holder(criu, base, size)
            results: dict[str, list[dict[str, float]]] = {"full": [], "lazy": []}
            reads = []
            for _ in range(args.runs):
                reads.append(cold_read(holder))
                results["full"].append(await full_restore(criu, holder, base))
                results["lazy"].append(await lazy(criu, holder, base))

        def median(kind: str, key: str, results: dict = results) -> str:
            return f"{statistics.median(run[key] for run in results[kind]):.2f} s"

        print(
            f"| {size} MiB random | {statistics.median(reads):.2f} s"
            f" | {median('full', 'restored')} / {median('full', 'first reply')}"
            f" | {median('lazy', 'restored')} / {median('lazy', 'first reply')}"
            f" / {median('lazy', 'all in')} |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
