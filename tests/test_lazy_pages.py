"""Lazy CRIU wake with real CRIU: a process dumped, then restored with its memory
served page by page through kernelhib's verifying page server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernelhib.engines.criu import CriuEngine
from kernelhib.engines.lazy_pages import (
    EAGER_BUDGET,
    PAGE_SIZE,
    PE_LAZY,
    PE_PRESENT,
    BlockHashedPages,
    LazyPageError,
    LazyPageServer,
    Pagemap,
    PagemapEntry,
    PageSource,
    _ReadAhead,
    coalesce,
    encode_pagemap,
    lazy_pages_unavailable,
    lazy_runs,
    parse_pagemap,
    prepare_pagemaps,
    restore_small_runs_eagerly,
    write_eager_pages,
)
from kernelhib.kernel_process import namespace_init

from .conftest import REQUIRE_CRIU

# A process holding random data; it hashes parts of it when a file asks it to.
HOLDER = r"""
import ctypes, hashlib, json, mmap, os, sys, time
work, mib = sys.argv[1], int(sys.argv[2])
# Private anonymous memory that the test moves and drops while it is still lazy. Mapped
# before the data, so above it: the background copy, in address order, comes later.
private = lambda: mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
moved, dropped, guarded = private(), private(), private()
for area in (moved, dropped, guarded):
    area.write(os.urandom(4 << 20))
# 1 MiB mapped alone, like an allocator arena: the MiB on each side unmapped.
libc = ctypes.CDLL(None)
spaced = mmap.mmap(-1, 3 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
arena_at = ctypes.addressof(ctypes.c_char.from_buffer(spaced)) + (1 << 20)
for gap in (arena_at - (1 << 20), arena_at + (1 << 20)):
    assert libc.munmap(ctypes.c_void_p(gap), ctypes.c_size_t(1 << 20)) == 0
ctypes.memmove(arena_at, os.urandom(1 << 20), 1 << 20)
data = os.urandom(mib << 20)
shared = mmap.mmap(-1, 1 << 20)  # MAP_SHARED: CRIU restores it eagerly, from files
shared.write(os.urandom(1 << 20))
block = 256 << 10
ranges = {"early": (0, 64 << 10), "late": (len(data) - block, len(data)), "all": (0, len(data))}
names = [*ranges, "shared"]
def digest(name):
    view = shared if name == "shared" else memoryview(data)[slice(*ranges[name])]
    return hashlib.sha256(view).hexdigest()
def forked():  # a child hashes the data: its faults come on a userfaultfd of its own
    r, w = os.pipe()
    if (child := os.fork()) == 0:
        os.write(w, digest("all").encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 64).decode()
    os.waitpid(child, 0)
    return answer
def remapped():  # mremap, most likely to a new address
    moved.resize(16 << 20)
    return hashlib.sha256(moved).hexdigest()
def madvised():  # dropped: zeros from now on, not the image's bytes
    dropped.madvise(mmap.MADV_DONTNEED, 0, 1 << 20)
    return hashlib.sha256(dropped).hexdigest()
def mprotected():  # three areas where there was one, and no event says so
    start = ctypes.addressof(ctypes.c_char.from_buffer(guarded)) + (1 << 20) + 8192
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start), 3 * 4096, mmap.PROT_READ) == 0
    return hashlib.sha256(guarded).hexdigest()
def arena():
    return hashlib.sha256(ctypes.string_at(arena_at, 1 << 20)).hexdigest()
events = {"forked": forked, "remapped": remapped, "madvised": madvised, "mprotected": mprotected,
          "arena": arena}
facts = {name: digest(name) for name in names}
facts["forked"] = facts["all"]
facts["remapped"] = hashlib.sha256(moved[:] + bytes(12 << 20)).hexdigest()
facts["madvised"] = hashlib.sha256(bytes(1 << 20) + dropped[1 << 20 :]).hexdigest()
facts["mprotected"] = hashlib.sha256(guarded).hexdigest()
facts["arena"] = arena()
facts["late_marker"] = memoryview(data)[-block:][:64].hex()  # no copy of the bytes
with open(os.path.join(work, "expected.json"), "w") as f:
    json.dump(facts, f)
os.rename(os.path.join(work, "expected.json"), os.path.join(work, "ready.json"))
while True:
    for name in [*names, *events]:
        ask = os.path.join(work, name)
        if os.path.exists(ask):
            os.unlink(ask)
            with open(ask + ".tmp", "w") as f:
                f.write(events[name]() if name in events else digest(name))
            os.rename(ask + ".tmp", ask + ".out")
    time.sleep(0.002)
"""


@pytest.fixture(scope="module")
def lazy_criu(criu_path: str) -> str:
    """CRIU, where it can restore lazily here."""
    reason = lazy_pages_unavailable(criu_path)
    if reason:
        if REQUIRE_CRIU:
            pytest.fail(reason)
        pytest.skip(reason)
    return criu_path


@dataclass
class DumpedHolder:
    """A dumped holder: its restore directory (no pages files) and its pages, kept
    apart with their block hashes as a store would keep them."""

    work: Path
    restore_dir: Path
    store: Path
    expected: dict[str, str]
    hashes: dict[str, list[bytes]]

    def open_pages(self, name: str) -> BlockHashedPages:
        return BlockHashedPages(self.store / name, self.hashes[name])


async def dump_holder(criu_path: str, tmp_path: Path, mib: int) -> DumpedHolder:
    work, image = tmp_path / "work", tmp_path / "image"
    work.mkdir()
    image.mkdir()
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "setsid",
         sys.executable, "-c", HOLDER, str(work), str(mib)],
        cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        pid = await namespace_init(unshare.pid, unshare.poll)
        deadline = time.monotonic() + 60
        while not (work / "ready.json").exists():
            assert time.monotonic() < deadline, "the holder never got ready"
            await asyncio.sleep(0.05)
        await CriuEngine(criu_path).dump(pid, image)
    finally:
        unshare.kill()  # --kill-child: the dumped, stopped tree dies with it
        unshare.wait()
    store = tmp_path / "store"
    store.mkdir()
    hashes = {}
    for pages in image.glob("pages-*.img"):
        hashes[pages.name] = BlockHashedPages.hash_blocks(pages)
        pages.rename(store / pages.name)
    expected = json.loads((work / "ready.json").read_text())
    return DumpedHolder(work, image, store, expected, hashes)


@dataclass
class Restored:
    pid: int
    server: LazyPageServer

    def alive(self) -> bool:
        return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


@contextlib.asynccontextmanager
async def lazy_restore(
    criu_path: str,
    holder: DumpedHolder,
    open_pages: Callable[[str], PageSource],
    *extra: str,
    eager_budget: int = EAGER_BUDGET,
) -> AsyncIterator[Restored]:
    async with LazyPageServer(holder.restore_dir, open_pages, eager_budget) as server:
        pidfile = holder.restore_dir / "restored.pid"
        restore = await asyncio.create_subprocess_exec(
            criu_path, "restore", "-D", str(holder.restore_dir), "-o", "restore.log", "-v2",
            "--tcp-close", "--shell-job", "--ext-unix-sk", "--file-locks",
            "--restore-detached", "--restore-sibling", "--pidfile", str(pidfile),
            *server.restore_args, *extra,
        )  # fmt: skip
        assert await restore.wait() == 0, (holder.restore_dir / "restore.log").read_text()[-3000:]
        pid = int(pidfile.read_text())
        await server.adopt(pid)
        try:
            yield Restored(pid, server)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def ask(holder: DumpedHolder, name: str, timeout: float = 60) -> str:
    """Have the restored holder hash part of its data; its answer."""
    (holder.work / name).touch()
    answer = holder.work / f"{name}.out"
    deadline = time.monotonic() + timeout
    while not answer.exists():
        assert time.monotonic() < deadline, f"the holder did not answer {name!r}"
        await asyncio.sleep(0.005)
    return answer.read_text()


def test_pagemap_decodes_entries_and_their_offsets_in_the_pages_file() -> None:
    def varint(value: int) -> bytes:
        out = bytearray()
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out) + bytes([value])

    def message(*fields: tuple[int, int]) -> bytes:
        body = b"".join(varint(number << 3) + varint(value) for number, value in fields)
        return struct.pack("<I", len(body)) + body

    data = struct.pack("<II", 0x54564319, 0x56084025) + message((1, 7))
    data += message((1, 0x7F0000000000), (2, 3), (4, PE_PRESENT | PE_LAZY))
    data += message((1, 0x7F0000010000), (2, 0), (4, PE_PRESENT), (5, 2))
    pagemap = parse_pagemap(data)
    assert pagemap.pages_name == "pages-7.img"
    assert [(e.vaddr, e.nr_pages, e.offset) for e in pagemap.entries] == [
        (0x7F0000000000, 3, 0),
        (0x7F0000010000, 2, 3 * PAGE_SIZE),
    ]
    # A request running past its entry gets what that entry holds; the daemon asks again.
    assert pagemap.locate(0x7F0000000000 + PAGE_SIZE, 8) == (PAGE_SIZE, 2)
    with pytest.raises(LazyPageError, match="no present page"):
        pagemap.locate(0x7F0000005000, 1)


def test_coalesced_pagemap_merges_only_adjacent_runs_of_equal_flags() -> None:
    lazy = PE_PRESENT | PE_LAZY
    entries = [(0x10000, 2, lazy), (0x12000, 3, lazy), (0x15000, 1, PE_PRESENT), (0x20000, 1, lazy)]
    offsets = [0, 2, 5, 6]
    pagemap = Pagemap(
        "pages-3.img",
        tuple(
            PagemapEntry(vaddr, n, flags, offset * PAGE_SIZE)
            for (vaddr, n, flags), offset in zip(entries, offsets, strict=True)
        ),
    )
    merged = parse_pagemap(encode_pagemap(coalesce(pagemap), 3))
    assert merged.pages_name == "pages-3.img"
    assert [(e.vaddr, e.nr_pages, e.flags, e.offset // PAGE_SIZE) for e in merged.entries] == [
        (0x10000, 5, lazy, 0),
        (0x15000, 1, PE_PRESENT, 5),
        (0x20000, 1, lazy, 6),
    ]


def test_a_task_s_runs_end_with_its_memory_areas_and_leave_out_zeros() -> None:
    lazy = PE_PRESENT | PE_LAZY
    entries = (PagemapEntry(0x10000, 8, lazy, 0), PagemapEntry(0x40000, 4, PE_PRESENT, 0x8000))
    pagemap = Pagemap("pages-1.img", entries)
    runs = lazy_runs(pagemap, bounds=[0x10000, 0x16000, 0x18000], zeros=[(0x2000, 0x3000)])
    assert [(r.start, r.end, r.image) for r in runs] == [
        (0x10000, 0x12000, 0x10000),
        (0x15000, 0x16000, 0x15000),
        (0x16000, 0x18000, 0x16000),
    ]


def test_a_big_array_stays_one_lazy_run(tmp_path: Path) -> None:
    """CRIU writes 1 MiB entries; merged first, none of a big array's is made eager."""
    run = 1 << 20
    entries = tuple(
        PagemapEntry(0x10000000 + i * run, run // PAGE_SIZE, PE_PRESENT | PE_LAZY, i * run)
        for i in range(64)
    )
    (tmp_path / "pagemap-1.img").write_bytes(encode_pagemap(Pagemap("pages-1.img", entries), 1))
    prepare_pagemaps(tmp_path, eager_budget=2 * run)

    merged = parse_pagemap((tmp_path / "pagemap-1.img").read_bytes())
    assert [(e.vaddr, e.nr_pages, e.offset) for e in merged.entries] == [
        (0x10000000, 64 * run // PAGE_SIZE, 0)
    ]
    assert merged.entries[0].flags & PE_LAZY


class RecordingPages:
    """Bytes that say where they came from; records what was read."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        self.reads.append((offset, length))
        return [bytes([offset // PAGE_SIZE + 1]) * length]


def test_eager_pages_are_written_and_lazy_runs_left_as_holes(tmp_path: Path) -> None:
    lazy = PE_PRESENT | PE_LAZY
    entries = (
        PagemapEntry(0x10000, 2, lazy, 0),
        PagemapEntry(0x20000, 1, PE_PRESENT, 2 * PAGE_SIZE),
    )
    (tmp_path / "pagemap-1.img").write_bytes(encode_pagemap(Pagemap("pages-4.img", entries), 4))
    source = RecordingPages()
    assert write_eager_pages(tmp_path, lambda name: source) == PAGE_SIZE
    assert source.reads == [(2 * PAGE_SIZE, PAGE_SIZE)]
    written = (tmp_path / "pages-4.img").read_bytes()
    assert written == bytes(2 * PAGE_SIZE) + bytes([3]) * PAGE_SIZE


def test_eager_pages_refuse_to_write_into_an_existing_pages_file(tmp_path: Path) -> None:
    entries = (PagemapEntry(0x10000, 1, PE_PRESENT, 0),)
    (tmp_path / "pagemap-1.img").write_bytes(encode_pagemap(Pagemap("pages-1.img", entries), 1))
    stored = tmp_path / "pages-1.img"
    stored.write_bytes(b"x" * PAGE_SIZE)  # say, a hard link to the stored image
    with pytest.raises(LazyPageError, match="without pages-"):
        write_eager_pages(tmp_path, lambda name: RecordingPages())
    assert stored.read_bytes() == b"x" * PAGE_SIZE


def test_block_hashed_pages_names_the_block_that_fails(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(os.urandom(3 * BlockHashedPages.BLOCK))
    source = BlockHashedPages(path, BlockHashedPages.hash_blocks(path))
    whole = path.read_bytes()
    near_the_end_of_a_block = BlockHashedPages.BLOCK - 10
    assert (
        b"".join(source.pieces(near_the_end_of_a_block, 20)) == whole[near_the_end_of_a_block:][:20]
    )
    with path.open("r+b") as file:
        file.seek(2 * BlockHashedPages.BLOCK + 5)
        file.write(b"\0")
    assert b"".join(source.pieces(0, 100)) == whole[:100]
    with pytest.raises(LazyPageError, match=r"block 2 of pages-1\.img"):
        source.pieces(2 * BlockHashedPages.BLOCK - 1, 2)
    source.close()


def test_the_smallest_lazy_runs_up_to_the_budget_are_made_eager() -> None:
    lazy = PE_PRESENT | PE_LAZY
    sizes = [(0x10000, 8), (0x30000, 1), (0x50000, 2), (0x70000, 4)]
    pagemap = Pagemap("pages-1.img", tuple(PagemapEntry(v, n, lazy, 0) for v, n in sizes))
    chosen = restore_small_runs_eagerly(pagemap, budget=3 * PAGE_SIZE)
    assert [e.flags for e in chosen.entries] == [lazy, PE_PRESENT, PE_PRESENT, lazy]
    assert restore_small_runs_eagerly(pagemap, budget=0) == pagemap


@pytest.mark.criu
async def test_lazily_restored_process_has_all_its_data(lazy_criu: str, tmp_path: Path) -> None:
    holder = await dump_holder(lazy_criu, tmp_path, 64)
    async with lazy_restore(lazy_criu, holder, holder.open_pages) as process:
        assert await ask(holder, "early") == holder.expected["early"]
        stats = await process.server.wait()
        assert await ask(holder, "all") == holder.expected["all"]
        assert await ask(holder, "shared") == holder.expected["shared"]
        # Its data came through the server, not from a file in the restore directory.
        assert stats.drained is not None and stats.bytes_copied >= 64 << 20


def flip_byte(path: Path, at: int) -> int:
    """Corrupt one byte of a stored pages file; the index of its block."""
    with path.open("r+b") as file:
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))
    return at // BlockHashedPages.BLOCK


def corrupt_late_block(holder: DumpedHolder) -> tuple[str, int]:
    """Flip a byte in the pages-file block that holds the holder's last data (a copy of
    it left in freed heap memory, restored eagerly, would make the restore itself fail)."""
    marker = bytes.fromhex(holder.expected["late_marker"])
    found = [
        (pages, match.start())
        for pages in holder.store.glob("pages-*.img")
        for match in re.finditer(re.escape(marker), pages.read_bytes())
    ]
    assert len(found) == 1, f"the holder's last data is in {len(found)} places, not one"
    pages, at = found[0]
    return pages.name, flip_byte(pages, at + 100)


@pytest.mark.criu
async def test_a_late_corrupt_block_ends_the_process_and_is_named(
    lazy_criu: str, tmp_path: Path
) -> None:
    holder = await dump_holder(lazy_criu, tmp_path, 64)
    name, block = corrupt_late_block(holder)
    async with lazy_restore(lazy_criu, holder, holder.open_pages) as process:
        # It runs, and what it reads first is intact.
        assert await ask(holder, "early") == holder.expected["early"]
        with pytest.raises(LazyPageError, match=re.escape(f"block {block} of {name}")):
            await process.server.wait()
        # Killed before the daemon let go of its memory: it never read zeros.
        assert not process.alive()
        assert not (holder.work / "late.out").exists()
        assert not (holder.work / "all.out").exists()


class RecordedPages:
    """Pages of zeros that record each read."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        self.reads.append((offset, length))
        return [bytes(length)]

    def zeros(self) -> list[tuple[int, int]]:
        return []


def test_a_fault_reads_only_what_it_needs_unless_its_window_is_read_already() -> None:
    """A whole window (1 MiB: decompressed and hashed) for each fault cost a DataFrame's
    kernel about 1.5 ms a fault, hundreds of them before its first answer."""
    source = RecordedPages()
    window = _ReadAhead.WINDOW
    with ThreadPoolExecutor(1) as worker:
        ahead = _ReadAhead(source, 8 * window, worker)
        fault = 3 * window + 5 * PAGE_SIZE
        assert b"".join(ahead.pieces(fault, 64 << 10, ahead=False)) == bytes(64 << 10)
        assert source.reads == [(fault, 64 << 10)]
        # A background copy reads whole windows, and on after them.
        ahead.pieces(0, window, ahead=True)
        while not ahead.ready(window, window):
            time.sleep(0.01)
        assert (0, window) in source.reads and (window, window) in source.reads
        source.reads.clear()
        assert b"".join(ahead.pieces(window + PAGE_SIZE, 64 << 10, ahead=False)) == bytes(64 << 10)
        assert source.reads == []  # served from the window read already


class SlowPages:
    """Verified pages read slowly, so that the drain is still running when the test
    acts; records whether the server closed it."""

    def __init__(
        self, source: BlockHashedPages, delay: float, background_only: bool = False
    ) -> None:
        self.source = source
        self.delay = delay
        self.background_only = background_only  # faults are served at full speed
        self.closed = False

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        reader = threading.current_thread().name.startswith("lazy-pages-read")
        if reader or not self.background_only:
            time.sleep(self.delay)
        return self.source.pieces(offset, length)

    def zeros(self) -> list[tuple[int, int]]:
        return self.source.zeros()

    def close(self) -> None:
        self.source.close()
        self.closed = True


def open_fds_to(directory: Path) -> list[str]:
    links = (os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())
    return [link for link in links if link.startswith(str(directory))]


@pytest.mark.criu
async def test_killing_the_process_mid_drain_releases_the_server(
    lazy_criu: str, tmp_path: Path
) -> None:
    holder = await dump_holder(lazy_criu, tmp_path, 64)
    opened: list[SlowPages] = []

    def open_slowly(name: str) -> SlowPages:
        opened.append(SlowPages(holder.open_pages(name), delay=0.05))
        return opened[-1]

    async with lazy_restore(lazy_criu, holder, open_slowly) as process:
        assert await ask(holder, "early") == holder.expected["early"]
        os.kill(process.pid, signal.SIGKILL)
        # The server sees its task gone and lets go: the wait ends either way.
        with contextlib.suppress(LazyPageError):
            stats = await asyncio.wait_for(process.server.wait(), 20)
            assert stats.bytes_copied < 64 << 20  # it did stop mid-drain
        uffd_holder = process.server._holder
        await process.server.close()
        assert uffd_holder is not None and uffd_holder.returncode is not None
        assert opened and all(source.closed for source in opened)
        assert open_fds_to(holder.store) == []
        assert not [t for t in threading.enumerate() if t.name.startswith("lazy-pages")]


@pytest.mark.criu
async def test_a_process_that_forks_moves_and_drops_lazy_memory_keeps_what_it_holds(
    lazy_criu: str, tmp_path: Path
) -> None:
    """Served while its memory changes under the copy: a forked child faults on a
    userfaultfd of its own, mremap moves what is still missing, memory dropped with
    madvise reads as zeros, not as the image's bytes, and an area that mprotect split
    (no event) is filled page by page where a copy would cross its new ends."""
    holder = await dump_holder(lazy_criu, tmp_path, 64)

    def open_slowly(name: str) -> SlowPages:
        return SlowPages(holder.open_pages(name), delay=0.2, background_only=True)

    # Nothing eager: the maps the holder changes are still lazy when it does.
    async with lazy_restore(lazy_criu, holder, open_slowly, eager_budget=0) as process:
        for name in ("remapped", "madvised", "mprotected"):
            assert await ask(holder, name) == holder.expected[name], name
        assert process.server.stats.drained is None  # before the copy came to them
        events = process.server.stats.events
        assert events["remap"] >= 1 and events["remove"] >= 1
        assert process.server.stats.faults > 0  # the maps it changed came in by faults
        assert await ask(holder, "forked") == holder.expected["forked"]
        assert events["fork"] == 1
        await process.server.wait()
        assert await ask(holder, "all") == holder.expected["all"]


@pytest.mark.criu
async def test_a_fault_in_a_small_run_brings_all_of_it(lazy_criu: str, tmp_path: Path) -> None:
    """A run of 1 MiB at most (an allocator arena) comes in at its first fault, not 64 KiB
    a fault: a kernel answering touches pages all over several of them."""
    holder = await dump_holder(lazy_criu, tmp_path, 64)

    def open_slowly(name: str) -> SlowPages:
        return SlowPages(holder.open_pages(name), delay=0.2, background_only=True)

    async with lazy_restore(lazy_criu, holder, open_slowly, eager_budget=0) as process:
        assert await ask(holder, "early") == holder.expected["early"]
        faults = process.server.stats.faults
        assert await ask(holder, "arena") == holder.expected["arena"]
        assert process.server.stats.drained is None  # before the copy came to it
        # 16 faults of 64 KiB each, else; the rest is the holder's own code and heap.
        assert process.server.stats.faults - faults < 8


@pytest.mark.criu
async def test_closing_the_wake_mid_drain_kills_the_process_first(
    lazy_criu: str, tmp_path: Path
) -> None:
    holder = await dump_holder(lazy_criu, tmp_path, 64)

    def open_slowly(name: str) -> SlowPages:
        return SlowPages(holder.open_pages(name), delay=0.05)

    async with lazy_restore(lazy_criu, holder, open_slowly) as process:
        assert await ask(holder, "early") == holder.expected["early"]
        await process.server.close()
        # Dead, not left running on zeros where its memory was not yet back.
        assert not process.alive()
        with pytest.raises(LazyPageError, match="closed before all memory was in"):
            await process.server.wait()
        assert not (holder.work / "all.out").exists()


@pytest.mark.criu
async def test_an_eagerly_restored_page_that_fails_stops_the_wake_before_it_starts(
    lazy_criu: str, tmp_path: Path
) -> None:
    holder = await dump_holder(lazy_criu, tmp_path, 8)
    pagemap = next(holder.restore_dir.glob("pagemap-[0-9]*.img"))
    entries = parse_pagemap(pagemap.read_bytes()).entries
    eager = next(e for e in entries if e.flags & PE_PRESENT and not e.flags & PE_LAZY)
    name = parse_pagemap(pagemap.read_bytes()).pages_name
    block = flip_byte(holder.store / name, eager.offset)
    server = LazyPageServer(holder.restore_dir, holder.open_pages)
    with pytest.raises(LazyPageError, match=re.escape(f"block {block} of {name}")):
        await server.start()
    assert server._holder is None  # nothing was started
    assert open_fds_to(holder.store) == []


@pytest.mark.criu
async def test_the_fetch_fills_a_kernel_restored_stopped(lazy_criu: str, tmp_path: Path) -> None:
    """The engine restores with --leave-stopped and continues the kernel later."""
    holder = await dump_holder(lazy_criu, tmp_path, 64)
    async with lazy_restore(lazy_criu, holder, holder.open_pages, "--leave-stopped") as process:
        stats = await asyncio.wait_for(process.server.wait(), 60)
        assert stats.bytes_copied >= 64 << 20
        assert not (holder.work / "early.out").exists()  # it has not run yet
        os.kill(process.pid, signal.SIGCONT)
        assert await ask(holder, "all") == holder.expected["all"]


def test_a_criu_that_cannot_restore_lazily_is_reported_with_the_reason(tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'UFFD is not supported' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert "UFFD is not supported" in (lazy_pages_unavailable(fake) or "")
    assert "could not run" in (lazy_pages_unavailable(tmp_path / "missing") or "")
