"""Lazy CRIU wake: the kernel runs before its memory is back, and every byte it
gets has been verified first.

``criu restore --lazy-pages`` leaves the memory that CRIU may restore lazily
registered with userfaultfd, and hands the descriptors to whatever listens on
``lazy-pages.socket`` in the image directory. That is :class:`LazyPageServer`,
not ``criu lazy-pages``: it answers the kernel's page faults and, once the
restore has finished, copies in the rest, straight from the verified chunks
(:mod:`.userfaultfd`). CRIU's own daemon would take every page through a socket,
a second process and two more copies, and it spins between requests.

The restore still reads the pagemap images, and the pages it restores eagerly,
from the image directory. Before the restore, each task's pagemap there is
rewritten (:func:`prepare_pagemaps`): runs merged, and the smallest runs made
eager, so that the kernel's first reply does not wait on thousands of faults.
The eager pages (those, stacks, shared memory) are then written there, verified
(:func:`write_eager_pages`).

A page that fails verification is never copied in. Were the kernel's
userfaultfds closed, it would see zero pages where its data was (Linux fills
missing pages of an unregistered anonymous mapping with zeros), so the server
kills the restored tree first, waits for it to be gone, and only then lets
them go.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import itertools
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3

from ..kernel_process import process_tree
from .base import EngineError
from .userfaultfd import (
    EVENT_FORK,
    EVENT_NAMES,
    EVENT_PAGEFAULT,
    EVENT_REMAP,
    EVENT_REMOVE,
    EVENT_UNMAP,
    PAGE_SIZE,
    RESTORE_FINISHED,
    SOCKET_NAME,
    Handoff,
    Retry,
    Run,
    Runs,
    TaskGone,
    Userfaultfd,
)

# criu/include/pagemap.h, criu/include/magic.h (CRIU 4.2).
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
_IMG_COMMON_MAGIC = 0x54564319
_PAGEMAP_MAGIC = 0x56084025
_MM_MAGIC = 0x57492820
_TASK_PAGEMAP = re.compile(r"pagemap-(\d+)\.img")
# The smallest lazy runs up to this many bytes are restored before the kernel runs.
EAGER_BUDGET = 64 << 20
# Threads that read and verify the eager pages: the kernel waits for them.
EAGER_READERS = 4
# Threads that read and verify ahead of the background copy: one reads while another
# hashes.
READ_THREADS = 3
# While the next background copy is being read, faults are waited for this long.
_READ_POLL_MS = 2
# A fault is answered with the pages around it, up to this many bytes, aligned.
FAULT_AROUND = 64 << 10
# ...or with all of what its run still lacks, where that is no more than this: Python's
# allocator arenas are 1 MiB mappings, and an answering kernel touches pages all over
# several of them. A DataFrame kernel whose arenas were 600 runs of their own answered in
# 0.58-0.79 s this way, in 0.91-1.08 s with 64 KiB a fault (alternating wakes).
WHOLE_RUN = 1 << 20
# How long a killed kernel may take to die before its memory is let go all the same.
KILL_WAIT_S = 2.0


class PageSource(Protocol):
    """One ``pages-<id>.img`` of an image, read through its verification."""

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        """Verified bytes, in pieces (not copied into one); raises if any block in the
        range fails verification."""
        ...

    def zeros(self) -> list[tuple[int, int]]:
        """(offset, length) of what is known to be zeros, sorted: nothing to read."""
        ...


class LazyPageError(EngineError):
    """The lazy wake failed: the restored kernel has been ended; its image is kept."""


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int
    offset: int  # in the pages file; meaningful where PE_PRESENT

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass(frozen=True)
class Pagemap:
    """A pagemap image: where each present run of pages lies in its pages file."""

    pages_name: str
    entries: tuple[PagemapEntry, ...]

    @property
    def size(self) -> int:
        """The length of its pages file."""
        return sum(e.nr_pages * PAGE_SIZE for e in self.entries if e.flags & PE_PRESENT)

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [entry.vaddr for entry in self.entries]

    def locate(self, vaddr: int, nr_pages: int) -> tuple[int, int]:
        """(offset in the pages file, pages) of the present run starting at ``vaddr``,
        clipped to its entry."""
        index = bisect.bisect_right(self._starts, vaddr) - 1
        entry = self.entries[index] if index >= 0 else None
        if entry and vaddr < entry.end and entry.flags & PE_PRESENT:
            available = (entry.end - vaddr) // PAGE_SIZE
            return entry.offset + vaddr - entry.vaddr, min(nr_pages, available)
        raise LazyPageError(f"no present page at {vaddr:#x} in the pagemap of {self.pages_name}")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """The fields of a protobuf message: varints as ints, embedded messages as bytes;
    fixed-size ones skipped."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
            yield key >> 3, value
        elif wire == 2:
            length, pos = _varint(message, pos)
            yield key >> 3, message[pos : pos + length]
            pos += length
        else:
            pos += {1: 8, 5: 4}[wire]


def _fields(message: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (all a pagemap holds)."""
    return {number: value for number, value in _walk(message) if isinstance(value, int)}


def _messages(data: bytes) -> Iterator[bytes]:
    pos = 8
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        yield data[pos + 4 : pos + 4 + size]
        pos += 4 + size


def parse_pagemap(data: bytes, name: str = "pagemap") -> Pagemap:
    """Decode a pagemap image: two magics, then size-prefixed PagemapHead and
    PagemapEntry messages (images/pagemap.proto)."""
    try:
        if struct.unpack_from("<II", data) != (_IMG_COMMON_MAGIC, _PAGEMAP_MAGIC):
            raise ValueError("not a pagemap image")
        messages = _messages(data)
        pages_id = _fields(next(messages))[1]
        entries, offset = [], 0
        for message in messages:
            fields = _fields(message)
            flags = fields.get(4, PE_PARENT if fields.get(3) else PE_PRESENT)
            nr_pages = fields.get(5, fields[2])
            entries.append(PagemapEntry(fields[1], nr_pages, flags, offset))
            if flags & PE_PRESENT:
                offset += nr_pages * PAGE_SIZE
    except (ValueError, KeyError, IndexError, StopIteration, struct.error) as exc:
        raise LazyPageError(f"{name} is not a readable CRIU pagemap image ({exc})") from exc
    if any(entry.flags & PE_PARENT for entry in entries):
        raise LazyPageError(f"{name} refers to a parent image; kernelhib writes none")
    return Pagemap(f"pages-{pages_id}.img", tuple(entries))


def read_pagemap(path: Path) -> Pagemap:
    return parse_pagemap(path.read_bytes(), str(path))


def read_vma_bounds(path: Path) -> list[int]:
    """Where the memory areas of a task's ``mm-<pid>.img`` start and end, sorted: a
    userfaultfd copy cannot cross one (MmEntry.vmas = 14; VmaEntry start = 1,
    end = 2, images/mm.proto)."""
    data = path.read_bytes()
    try:
        if struct.unpack_from("<II", data) != (_IMG_COMMON_MAGIC, _MM_MAGIC):
            raise ValueError("not an mm image")
        bounds = set()
        for number, vma in _walk(next(_messages(data))):
            if number == 14 and isinstance(vma, bytes):
                fields = _fields(vma)
                bounds |= {fields[1], fields[2]}
    except (ValueError, KeyError, IndexError, StopIteration, struct.error) as exc:
        raise LazyPageError(f"{path} is not a readable CRIU mm image ({exc})") from exc
    return sorted(bounds)


def lazy_runs(pagemap: Pagemap, bounds: list[int], zeros: list[tuple[int, int]]) -> list[Run]:
    """A task's lazy runs, cut where its memory areas end (``bounds``, from
    :func:`read_vma_bounds`), without the pages its pages file holds as zeros
    (``zeros``, from :meth:`PageSource.zeros`): a fault there gets a zero page, and
    nothing is read or copied for them."""
    pages = [(-(-offset // PAGE_SIZE) * PAGE_SIZE, (offset + length) // PAGE_SIZE * PAGE_SIZE)
             for offset, length in zeros]  # fmt: skip
    starts = [start for start, _ in pages]
    runs = []
    for entry in pagemap.entries:
        if not (entry.flags & PE_LAZY and entry.flags & PE_PRESENT):
            continue
        for start, end in split_at(entry.vaddr, entry.end, bounds):
            offset = entry.offset + start - entry.vaddr
            cursor, stop = offset, offset + end - start
            first = max(bisect.bisect_right(starts, cursor) - 1, 0)
            for zero_start, zero_end in itertools.islice(pages, first, None):
                if zero_start >= stop:
                    break
                if zero_start > cursor:
                    runs.append(Run(start + cursor - offset, start + zero_start - offset,
                                    start + cursor - offset))  # fmt: skip
                cursor = max(cursor, zero_end)
            if cursor < stop:
                runs.append(Run(start + cursor - offset, end, start + cursor - offset))
    return runs


def split_at(start: int, end: int, bounds: list[int]) -> list[tuple[int, int]]:
    """``start``-``end`` cut where it crosses one of ``bounds`` (sorted)."""
    inside = bounds[bisect.bisect_right(bounds, start) : bisect.bisect_left(bounds, end)]
    cuts = [start, *inside, end]
    return list(itertools.pairwise(cuts))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode(*fields: tuple[int, int]) -> bytes:
    body = b"".join(_encode_varint(number << 3) + _encode_varint(v) for number, v in fields)
    return struct.pack("<I", len(body)) + body


def encode_pagemap(pagemap: Pagemap, pages_id: int) -> bytes:
    """A pagemap image CRIU reads back as ``pagemap``."""
    data = struct.pack("<II", _IMG_COMMON_MAGIC, _PAGEMAP_MAGIC) + _encode((1, pages_id))
    for e in pagemap.entries:
        data += _encode((1, e.vaddr), (2, e.nr_pages & 0xFFFFFFFF), (4, e.flags), (5, e.nr_pages))
    return data


def coalesce(pagemap: Pagemap) -> Pagemap:
    """The same pages in fewer entries: runs that follow each other with the same
    flags merged. CRIU writes at most a pipe's worth (1 MiB) per entry: merged, a
    big array is one run, which :func:`restore_small_runs_eagerly` leaves lazy."""
    merged: list[PagemapEntry] = []
    for entry in pagemap.entries:
        last = merged[-1] if merged else None
        if last and last.end == entry.vaddr and last.flags == entry.flags:
            merged[-1] = dataclasses.replace(last, nr_pages=last.nr_pages + entry.nr_pages)
        else:
            merged.append(entry)
    return Pagemap(pagemap.pages_name, tuple(merged))


def restore_small_runs_eagerly(pagemap: Pagemap, budget: int) -> Pagemap:
    """The smallest lazy runs, up to ``budget`` bytes in all, made eager.

    Each page fault is a round trip through the server, behind the copy in
    flight: a woken ipykernel faulted about 2,500 pages before its first reply,
    which took 7-12 s. What it needs to answer is the interpreter's own state,
    spread over many small runs; the user's data sits in a few big ones. CRIU
    restores eager pages from the (verified, local) pages file before the kernel
    runs, even in a region that is otherwise lazy (stacks are restored so).
    """
    lazy = sorted(
        (entry for entry in pagemap.entries if entry.flags & PE_LAZY), key=lambda e: e.nr_pages
    )
    eager, total = set(), 0
    for entry in lazy:
        total += entry.nr_pages * PAGE_SIZE
        if total > budget:
            break
        eager.add(entry.vaddr)
    return Pagemap(
        pagemap.pages_name,
        tuple(
            dataclasses.replace(entry, flags=entry.flags & ~PE_LAZY)
            if entry.vaddr in eager
            else entry
            for entry in pagemap.entries
        ),
    )


def prepare_pagemaps(image_dir: Path, eager_budget: int) -> None:
    """Rewrite each task's pagemap in ``image_dir`` coalesced, its smallest runs made
    eager. Each is replaced by rename, never written in place: the file may be a
    link to the stored image."""
    for path in image_dir.glob("pagemap-*.img"):
        if _TASK_PAGEMAP.fullmatch(path.name):
            pagemap = coalesce(read_pagemap(path))
            pagemap = restore_small_runs_eagerly(pagemap, eager_budget)
            pages_id = int(pagemap.pages_name.removeprefix("pages-").removesuffix(".img"))
            temporary = path.with_suffix(".new")
            temporary.write_bytes(encode_pagemap(pagemap, pages_id))
            temporary.rename(path)


def write_eager_pages(image_dir: Path, open_pages: Callable[[str], PageSource]) -> int:
    """Write into ``image_dir`` the pages a lazy restore reads from files: every
    present page of shared memory and the non-lazy ones of each task (its stacks
    and the runs :func:`prepare_pagemaps` made eager). The lazy runs stay holes.
    Returns the bytes written. Blocking.

    The pages files must not exist yet: one there may be the stored image itself
    (a hard link), and this would write into it.
    """
    files: dict[str, int] = {}
    copies: list[tuple[int, PageSource, PagemapEntry]] = []
    try:
        for path in sorted(image_dir.glob("pagemap-*.img")):
            pagemap = read_pagemap(path)
            task = _TASK_PAGEMAP.fullmatch(path.name) is not None
            eager = [
                entry
                for entry in pagemap.entries
                if entry.flags & PE_PRESENT and not (task and entry.flags & PE_LAZY)
            ]
            if pagemap.pages_name not in files:
                target = image_dir / pagemap.pages_name
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                try:
                    files[pagemap.pages_name] = os.open(target, flags, 0o600)
                except FileExistsError:
                    raise LazyPageError(
                        f"{target} exists: a lazy wake writes the pages it restores eagerly"
                        " itself; give it a restore directory without pages-*.img"
                    ) from None
            if eager:
                source = open_pages(pagemap.pages_name)
                copies += [(files[pagemap.pages_name], source, entry) for entry in eager]
        # Read in parallel: the disk serves several reads at once, and the kernel waits.
        with ThreadPoolExecutor(EAGER_READERS, thread_name_prefix="lazy-pages-eager") as pool:
            return sum(pool.map(_copy_verified, copies))
    finally:
        for fd in files.values():
            os.close(fd)


def _copy_verified(copy: tuple[int, PageSource, PagemapEntry]) -> int:
    """Copy one run of pages from its source (which verifies them) into its file."""
    fd, source, entry = copy
    return os.pwritev(fd, source.pieces(entry.offset, entry.nr_pages * PAGE_SIZE), entry.offset)


def lazy_pages_unavailable(criu: Path | str) -> str | None:
    """Why this machine cannot restore lazily, or None: ``--lazy-pages`` needs
    userfaultfd with non-cooperative events (``criu check --feature uffd-noncoop``).
    Blocking."""
    try:
        check = subprocess.run(
            [str(criu), "check", "--feature", "uffd-noncoop"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"criu check could not run: {exc}"
    if check.returncode != 0:
        return f"criu check --feature uffd-noncoop failed: {(check.stdout + check.stderr).strip()}"
    return None


class BlockHashedPages:
    """A plain pages file checked against BLAKE3 hashes of its fixed-size blocks:
    the page source of an image kept as files with a signed list of block hashes."""

    BLOCK = 256 << 10

    def __init__(self, path: Path, hashes: list[bytes]) -> None:
        self.path = path
        self.hashes = hashes
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def hash_blocks(cls, path: Path) -> list[bytes]:
        """The block hashes to keep, signed, with the image when it is written."""
        hashes = []
        with path.open("rb") as file:
            while block := file.read(cls.BLOCK):
                hashes.append(blake3.blake3(block).digest())
        return hashes

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        first, last = offset // self.BLOCK, (offset + length - 1) // self.BLOCK
        data = os.pread(self._fd, (last + 1 - first) * self.BLOCK, first * self.BLOCK)
        for index in range(first, last + 1):
            start = (index - first) * self.BLOCK
            block = data[start : start + self.BLOCK]
            if index >= len(self.hashes) or blake3.blake3(block).digest() != self.hashes[index]:
                raise LazyPageError(
                    f"block {index} of {self.path.name} (bytes {index * self.BLOCK}"
                    f"..{index * self.BLOCK + len(block)}) failed verification"
                )
        skip = offset - first * self.BLOCK
        return [memoryview(data)[skip : skip + length]]

    def zeros(self) -> list[tuple[int, int]]:
        return []  # not known without reading

    def close(self) -> None:
        os.close(self._fd)


class _ReadAhead:
    """Verified windows of one pages file. A background copy has a worker read and
    verify the windows after it, so that the disk and the hashing run while the
    pages are copied in. A fault waits for no window queued behind the read-ahead:
    it reads just the chunks it needs (whole 1 MiB windows, decompressed and
    hashed, cost a DataFrame's kernel about 1.5 ms a fault, for about 400 faults
    before its first answer); the chunk store's small cache serves the faults
    next to it.

    Only what ``source.pieces`` returned is kept, so only verified bytes. A window
    that failed keeps its error, raised when a page in it is needed: a corrupt
    block fails the wake only once the kernel needs it.
    """

    WINDOW = 1 << 20
    AHEAD = 16
    KEEP = 2 * AHEAD

    def __init__(self, source: PageSource, size: int, worker: ThreadPoolExecutor) -> None:
        self.source = source
        self.size = size
        self.worker = worker
        self._windows: dict[int, Future[list[bytes | memoryview]]] = {}

    def _read_window(self, index: int) -> list[bytes | memoryview]:
        start = index * self.WINDOW
        return self.source.pieces(start, min(self.WINDOW, self.size - start))

    def _window(self, index: int) -> Future[list[bytes | memoryview]]:
        """The window, read or being read; asked for if not."""
        window = self._windows.get(index)
        if window is None:
            window = self._windows[index] = self.worker.submit(self._read_window, index)
            while len(self._windows) > self.KEEP:
                oldest = next(iter(self._windows))
                self._windows.pop(oldest).cancel()
        return window

    def ready(self, offset: int, length: int) -> bool:
        """Whether the bytes at ``offset`` have been read (failed too); if not, they
        are being read."""
        first, last = offset // self.WINDOW, (offset + length - 1) // self.WINDOW
        return all(self._window(index).done() for index in range(first, last + 1))

    def pieces(self, offset: int, length: int, ahead: bool) -> list[memoryview]:
        """The verified bytes at ``offset``, as views of what was read (no copy):
        ``ahead``, a background copy, from whole windows, reading on after them; else
        a fault, from its windows if they are read or being read, else from just the
        chunks it needs, read at once."""
        first, last = offset // self.WINDOW, (offset + length - 1) // self.WINDOW
        if not ahead:
            known = [self._windows.get(index) for index in range(first, last + 1)]
            if not all(window and (window.done() or window.running()) for window in known):
                return [memoryview(piece) for piece in self.source.pieces(offset, length)]
        windows = [self._window(index) for index in range(first, last + 1)]
        if ahead:
            end = min(last + 1 + self.AHEAD, -(-self.size // self.WINDOW))
            for index in range(last + 1, end):
                self._window(index)
        views, skip = [], offset - first * self.WINDOW
        for window in windows:
            for piece in window.result():
                view = memoryview(piece)[skip : skip + length]
                skip = max(skip - len(piece), 0)
                if view:
                    views.append(view)
                    length -= len(view)
        return views


@dataclass
class LazyStats:
    """What a lazy wake moved, and when (seconds since the server started)."""

    faults: int = 0
    events: Counter[str] = field(default_factory=Counter)  # fork, remap, remove, unmap
    bytes_copied: int = 0
    drained: float | None = None  # all memory in, or the tasks gone
    started: float = field(default_factory=time.monotonic, repr=False)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class _Task:
    """A restored task (or a child it forked) and the memory it still lacks."""

    pid: int  # in the image: its pagemap's
    uffd: Userfaultfd
    runs: Runs


class LazyPageServer:
    """Serves one lazy restore its memory, verified, through userfaultfd.

    ::

        async with LazyPageServer(restore_dir, open_pages) as server:
            # criu restore -D restore_dir ... *server.restore_args
            await server.adopt(pid)   # the restored root's host pid
            await server.wait()       # all memory in; LazyPageError if a page failed

    ``restore_dir`` holds the image without its ``pages-*.img`` (the server
    writes the eagerly restored pages there); ``open_pages(name)`` gives the
    verified source of each. The server listens where ``criu restore
    --lazy-pages`` looks for its lazy-pages daemon, takes each task's
    userfaultfd, answers its faults, and copies the rest in, in the background,
    once the restore has finished. A fault gets the :data:`FAULT_AROUND` bytes
    around its page: a kernel's first reply faults thousands of pages of its
    heap, near each other.

    If a page fails verification, or the wake is closed before all memory is
    in, the adopted root is SIGKILLed (and with it its pid namespace) before
    anything lets go of its memory. A holder process (``uffd_holder.py``) keeps
    every userfaultfd open too, so that the server's own death leaves the kernel
    waiting, never running on zeros. Re-dump the kernel only after ``wait``
    returned: pages not yet in are not in its memory.
    """

    restore_args = ("--lazy-pages",)

    def __init__(
        self,
        image_dir: Path,
        open_pages: Callable[[str], PageSource],
        eager_budget: int = EAGER_BUDGET,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = env or {}
        self.eager_budget = eager_budget
        self.image_dir = image_dir
        self.open_pages = open_pages
        self.stats = LazyStats()
        self.error: LazyPageError | None = None
        self._sources: dict[str, PageSource] = {}
        self._pagemaps: dict[int, Pagemap] = {}
        self._readers: dict[str, _ReadAhead] = {}
        self._worker = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lazy-pages-read")
        self._listener: socket.socket | None = None
        self._holder: asyncio.subprocess.Process | None = None
        self._to_holder: socket.socket | None = None
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future[None] | None = None
        self._pidfd: int | None = None
        self._root = 0
        self._lock = threading.Lock()

    async def __aenter__(self) -> LazyPageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Write the eager pages, start the holder and listen for the restore."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        await asyncio.to_thread(prepare_pagemaps, self.image_dir, self.eager_budget)
        try:
            await asyncio.to_thread(write_eager_pages, self.image_dir, self._source)
        except LazyPageError:
            raise
        except Exception as exc:  # a source's own verification error, a full disk
            raise LazyPageError(f"writing the pages restored eagerly failed: {exc}") from exc
        self._to_holder, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._holder = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(Path(__file__).with_name("uffd_holder.py")),
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                env={**os.environ, **self.env},
                start_new_session=True,  # not ended by a ^C meant for the server
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
        self._listener = await asyncio.to_thread(_listen, self.image_dir / SOCKET_NAME)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self._thread = threading.Thread(
            target=self._serve, args=(loop, self._finished), name="lazy-pages", daemon=True
        )
        self._thread.start()

    async def adopt(self, pid: int) -> None:
        """The restored root, to kill if a page fails verification (now, if one has)."""
        self._pidfd = os.pidfd_open(pid)
        self._root = pid
        if self.error is not None:
            await asyncio.to_thread(self._fail, self.error)

    async def wait(self) -> LazyStats:
        """Return once all memory is in (or the tasks are gone); raise if a page failed."""
        assert self._finished is not None, "the server was not started"
        await asyncio.shield(self._finished)
        if self.error:
            raise self.error
        return self.stats

    async def close(self) -> None:
        """Stop serving and release everything; safe at any point, twice too.

        Closed before all memory is in, the kernel is killed first: without its
        memory served it would read zeros where its memory was not yet back.
        """
        if self._thread is not None:
            if self.stats.drained is None and self.error is None:
                error = LazyPageError("the lazy wake was closed before all memory was in")
                await asyncio.to_thread(self._fail, error)
            os.write(self._stop_w, b"x")
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        # The kernel has all its memory, or is dead (or was never adopted).
        self._let_go()
        if self._holder is not None:
            if self._holder.returncode is None:
                await self._holder.wait()
            self._holder = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._worker.shutdown(cancel_futures=True)
        self._readers.clear()
        for source in self._sources.values():
            if closer := getattr(source, "close", None):
                closer()
        self._sources.clear()

    def _let_go(self) -> None:
        """Have the holder close its userfaultfds and exit."""
        with self._lock:
            if self._to_holder is not None:
                with contextlib.suppress(OSError):
                    self._to_holder.sendall(b"r")
                self._to_holder.close()
                self._to_holder = None

    def _source(self, name: str) -> PageSource:
        if name not in self._sources:
            self._sources[name] = self.open_pages(name)
        return self._sources[name]

    def _pagemap(self, pid: int) -> Pagemap:
        if pid not in self._pagemaps:
            path = self.image_dir / f"pagemap-{pid}.img"
            if not _TASK_PAGEMAP.fullmatch(path.name) or not path.is_file():
                raise LazyPageError(f"the restore handed over task {pid}, not in the image")
            self._pagemaps[pid] = read_pagemap(path)
        return self._pagemaps[pid]

    def _reader(self, pagemap: Pagemap) -> _ReadAhead:
        name = pagemap.pages_name
        if name not in self._readers:
            self._readers[name] = _ReadAhead(self._source(name), pagemap.size, self._worker)
        return self._readers[name]

    def _serve(self, loop: asyncio.AbstractEventLoop, finished: asyncio.Future[None]) -> None:
        """The restore's hand-over, then every task's faults and events, and the
        background copy between them, until all memory is in, a page fails, or the
        server is closed. Owns the userfaultfds it was given."""
        tasks: dict[int, _Task] = {}
        try:
            self._serving(tasks)
        except LazyPageError as exc:
            self._fail(exc)
        except Exception as exc:  # a source's own verification error, an ioctl's
            self._fail(LazyPageError(f"serving the kernel's memory failed: {exc}"))
        finally:
            for task in tasks.values():
                task.uffd.close()
            if self.stats.drained is not None:
                # Every page is in: its memory is the kernel's own now. Faults where the
                # image held nothing (memory it never wrote, or grew since) are Linux's
                # to fill, once no one holds the userfaultfds.
                self._let_go()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, finished)

    def _serving(self, tasks: dict[int, _Task]) -> None:
        assert self._listener is not None
        poll = select.poll()
        poll.register(self._stop_r, select.POLLIN)
        poll.register(self._listener, select.POLLIN)
        handoff: Handoff | None = None
        restored = False
        try:
            while True:
                copying = restored and any(task.runs for task in tasks.values())
                if restored and not copying:
                    self.stats.drained = self.stats.elapsed()
                    return
                # Faults never wait behind a background read: it is copied once read.
                ready = copying and self._next_ready(tasks)
                for fd, _ in poll.poll(None if not copying else 0 if ready else _READ_POLL_MS):
                    if fd == self._stop_r:
                        return
                    if fd == self._listener.fileno():
                        poll.unregister(fd)
                        handoff = Handoff(self._listener.accept()[0])
                        poll.register(handoff.sock, select.POLLIN)
                    elif handoff is not None and fd == handoff.sock.fileno():
                        messages = handoff.read()
                        if messages is None:
                            poll.unregister(fd)
                            if not restored:
                                raise LazyPageError("the restore ended before it finished")
                            continue
                        for pid, uffd in messages:
                            if pid == RESTORE_FINISHED:
                                restored = True
                            elif uffd is not None:
                                self._add(poll, tasks, pid, Userfaultfd(uffd), None)
                    elif fd in tasks:
                        self._events(poll, tasks, tasks[fd])
                if ready:
                    self._copy_next(poll, tasks)
        finally:
            if handoff is not None:
                handoff.close()

    def _add(
        self, poll: select.poll, tasks: dict[int, _Task], pid: int, uffd: Userfaultfd,
        runs: Runs | None,
    ) -> None:  # fmt: skip
        """A task to serve: handed over by the restore (all its lazy runs) or forked
        (what its parent lacked)."""
        assert self._to_holder is not None
        socket.send_fds(self._to_holder, [b"f"], [uffd.fd])
        if runs is None:
            pagemap = self._pagemap(pid)
            bounds = read_vma_bounds(self.image_dir / f"mm-{pid}.img")
            zeros = self._source(pagemap.pages_name).zeros()
            runs = Runs(lazy_runs(pagemap, bounds, zeros))
        tasks[uffd.fd] = _Task(pid, uffd, runs)
        poll.register(uffd.fd, select.POLLIN)

    def _events(self, poll: select.poll, tasks: dict[int, _Task], task: _Task) -> None:
        for event in task.uffd.events():
            if event.kind != EVENT_PAGEFAULT:
                self.stats.events[EVENT_NAMES[event.kind]] += 1
            try:
                if event.kind == EVENT_PAGEFAULT:
                    self._fault(task, event.start)
                elif event.kind == EVENT_FORK:
                    self._add(poll, tasks, task.pid, Userfaultfd(event.fd), task.runs.copy())
                elif event.kind == EVENT_REMAP:
                    task.runs.move(event.start, event.end, event.to)
                elif event.kind == EVENT_REMOVE:
                    task.uffd.unregister(event.start, event.end)
                    task.runs.take(event.start, event.end)
                elif event.kind == EVENT_UNMAP:
                    task.runs.take(event.start, event.end)
            except TaskGone:
                self._drop(poll, tasks, task)
                return

    def _drop(self, poll: select.poll, tasks: dict[int, _Task], task: _Task) -> None:
        """A task whose memory is gone: nothing more to serve it."""
        poll.unregister(task.uffd.fd)
        tasks.pop(task.uffd.fd)
        task.uffd.close()

    def _fault(self, task: _Task, address: int) -> None:
        self.stats.faults += 1
        run = task.runs.find(address)
        try:
            if run is None:  # never written before the dump, or already copied in
                task.uffd.zero(address)
            elif run.end - run.start <= WHOLE_RUN:
                self._copy(task, run.start, run.end, ahead=False)
            else:
                block = address - address % FAULT_AROUND
                end = min(run.end, block + FAULT_AROUND)
                self._copy(task, max(run.start, block), end, ahead=False)
        except Retry:
            pass
        # If the copy had to stop short, the thread faults again, once the events are read.
        task.uffd.wake(address, address + PAGE_SIZE)

    def _next(self, tasks: dict[int, _Task]) -> tuple[_Task, int, int, int]:
        """The next background copy: (task, start, end, offset in the pages file), up
        to the end of the window it begins in."""
        task = next(task for task in tasks.values() if task.runs)
        run = task.runs.first()
        assert run is not None
        offset, _ = self._pagemap(task.pid).locate(run.image, 1)
        length = min(run.end - run.start, _ReadAhead.WINDOW - offset % _ReadAhead.WINDOW)
        return task, run.start, run.start + length, offset

    def _next_ready(self, tasks: dict[int, _Task]) -> bool:
        """Whether the next background copy's pages have been read (asked for if not)."""
        task, start, end, offset = self._next(tasks)
        return self._reader(self._pagemap(task.pid)).ready(offset, end - start)

    def _copy_next(self, poll: select.poll, tasks: dict[int, _Task]) -> None:
        """Copy in the next window's worth of what the first task lacks: found again
        after the events just read, which may have moved, taken or ended it (a fault
        may have taken the last of it: then there is nothing left to copy)."""
        if not any(task.runs for task in tasks.values()):
            return
        task, start, end, _ = self._next(tasks)
        try:
            self._copy(task, start, end, ahead=True)
        except TaskGone:
            self._drop(poll, tasks, task)

    def _copy(self, task: _Task, start: int, end: int, ahead: bool) -> None:
        """Copy in what ``task`` lacks in ``start``-``end``, verified. If the task's
        memory is changing, what is left goes back to be copied after its events."""
        pagemap = self._pagemap(task.pid)
        runs = task.runs.take(start, end)
        for index, run in enumerate(runs):
            offset, count = pagemap.locate(run.image, (run.end - run.start) // PAGE_SIZE)
            pieces = self._reader(pagemap).pieces(offset, count * PAGE_SIZE, ahead)
            at = run.start
            for piece in pieces:
                try:
                    task.uffd.copy(at, piece)
                except Retry as retry:
                    for left in [run.part(at + retry.done, run.end), *runs[index + 1 :]]:
                        task.runs.put(left)
                    self.stats.bytes_copied += at + retry.done - run.start
                    return
                at += len(piece)
            if at < run.end:  # the pagemap ends the run sooner: not an image we wrote
                raise LazyPageError(f"task {task.pid}'s pagemap is shorter than its runs")
            self.stats.bytes_copied += run.end - run.start

    def _fail(self, error: LazyPageError) -> None:
        """Record the first error, and end the kernel (if adopted) and wait until it
        is gone: only then may its memory be let go of. Blocking."""
        with self._lock:
            if self.error is None:
                self.error = error
            if self._pidfd is None:
                # Still restoring: the serving thread's hang-up makes the restore fail,
                # and CRIU ends what it restored; the holder keeps the rest until then.
                return
            # Its children too: they die with the init of their pid namespace, but
            # only once it has exited, and they have lazy memory of their own.
            for pid in process_tree(self._root)[1:]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            # Readable once it has exited with every thread (and, as the init of its
            # pid namespace, every process in it). A task that faulted inside a system
            # call may wait for its page without heeding the SIGKILL: then its memory
            # must go first, and the task dies on its way out of the kernel, before
            # any more of its code runs.
            select.select([self._pidfd], [], [], KILL_WAIT_S)
            if self._stop_w >= 0:
                os.write(self._stop_w, b"x")


def _listen(path: Path) -> socket.socket:
    """Listen at ``path`` (replacing a stale socket), however long the path: it is
    reached through the directory's descriptor. Blocking."""
    directory = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=directory)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"/proc/self/fd/{directory}/{path.name}")
        listener.listen(1)
        return listener
    finally:
        os.close(directory)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
