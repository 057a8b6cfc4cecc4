"""Lazy CRIU wake: the kernel runs before its memory is back, and every byte it
gets has been verified first.

``criu restore --lazy-pages`` leaves the memory that CRIU may restore lazily
registered with userfaultfd and hands the descriptors to a ``criu lazy-pages``
daemon. The daemon answers the kernel's page faults and, once the restore has
finished, copies in the rest in address order. Here the daemon reads no page
file: it asks us, over a socketpair it inherits (``--page-server --ps-socket``),
with CRIU's page-server protocol (criu/page-xfer.c):

* request, 32 bytes: ``struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr;
  u64 dst_id}`` with ``cmd = PS_IOV_GET``, ``dst_id`` = the task's pid in the
  image, ``vaddr`` = the address in the image's pagemap;
* reply: the same header with ``cmd = PS_IOV_ADD_F | PE_PRESENT << 16`` and
  ``nr_pages`` at most what was asked, then that many pages. Replies go in
  request order (the daemon matches them first in, first out);
* ``PS_IOV_FORCE_CLOSE`` once every task's memory is in (or the tasks are gone);
  we answer with a zero ``int32`` and the daemon exits.

A socketpair, not a TCP port: a port on loopback would let any local user ask
for the kernel's memory. The daemon and the restore still read the pagemap
images, and the restore the pages it restores eagerly, from the image directory.
Before the restore, each task's pagemap there is rewritten (:func:`prepare_pagemaps`):
runs merged, so that the daemon fetches 4 MiB at a time, and the smallest runs
made eager, so that the kernel's first reply does not wait on thousands of
one-page faults. The eager pages (those, stacks, shared memory) are then written
there, verified (:func:`write_eager_pages`).

A page that fails verification is never sent. The daemon would then close its
userfaultfd, and the kernel would see zero pages where its data was (Linux
fills missing pages of an unregistered anonymous mapping with zeros), so the
server kills the restored tree first, waits for it to be gone, and only then
lets the daemon go.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3

from ..kernel_process import process_tree
from .base import EngineError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# criu/page-xfer.c, criu/include/pagemap.h, criu/include/magic.h (CRIU 4.2).
_PSI = struct.Struct("<I4xQQQ")  # natural alignment: 4 bytes of padding after cmd
_PS_IOV_ADD_F = 6
_PS_IOV_GET = 7
_PS_IOV_CLOSE = 0x1023
_PS_IOV_FORCE_CLOSE = 0x1024
_PS_CMD_BITS = 16
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
_IMG_COMMON_MAGIC = 0x54564319
_PAGEMAP_MAGIC = 0x56084025
_TASK_PAGEMAP = re.compile(r"pagemap-(\d+)\.img")
LAZY_LOG = "lazy-pages.log"
_SEND_BUFFER = 8 << 20
# The longest run the daemon is given (split_long_runs). CRIU 4.2's lazy-pages daemon
# keeps the longest lazy run of a task in an int (criu/uffd.c collect_iovs) and sizes
# its buffer by it: a run of 2 GiB made it fail at once, one of 4 GiB overflow its
# buffer. Its requests stop at 4 MiB anyway (MAX_XFER_LEN): longer runs gain nothing.
MAX_RUN = 64 << 20
# The smallest lazy runs up to this many bytes are restored before the kernel runs.
EAGER_BUDGET = 64 << 20
# Threads that read and verify the eager pages: the kernel waits for them.
EAGER_READERS = 4
# Threads that read and verify ahead of the fetch: one reads while another hashes.
READ_THREADS = 2
# The daemon asks for pages steadily until it is done (it spins between requests):
# this long without a request, the fetch has stalled, and the wake fails.
STALL_S = 120.0
# How long a killed kernel may take to die before its daemon is let go all the same.
KILL_WAIT_S = 2.0


class PageSource(Protocol):
    """One ``pages-<id>.img`` of an image, read through its verification."""

    def read(self, offset: int, length: int) -> bytes:
        """Verified bytes; raises if any block in the range fails verification."""
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
        clipped to its entry; the daemon asks again for the rest."""
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


def _fields(message: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (all a pagemap holds); others skipped."""
    fields: dict[int, int] = {}
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        wire = key & 7
        if wire == 0:
            fields[key >> 3], pos = _varint(message, pos)
        elif wire == 2:
            length, pos = _varint(message, pos)
            pos += length
        else:
            pos += {1: 8, 5: 4}[wire]
    return fields


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
    flags merged. CRIU writes at most a pipe's worth (1 MiB) per entry, and the
    lazy-pages daemon never asks for more than one entry at a time: merged, it
    drains in requests of up to 4 MiB instead of 1 MiB."""
    merged: list[PagemapEntry] = []
    for entry in pagemap.entries:
        last = merged[-1] if merged else None
        if last and last.end == entry.vaddr and last.flags == entry.flags:
            merged[-1] = dataclasses.replace(last, nr_pages=last.nr_pages + entry.nr_pages)
        else:
            merged.append(entry)
    return Pagemap(pagemap.pages_name, tuple(merged))


def split_long_runs(pagemap: Pagemap, max_run: int = MAX_RUN) -> Pagemap:
    """The same pages with no entry longer than ``max_run`` bytes: CRIU 4.2's daemon
    cannot take a lazy run of 2 GiB or more (see ``MAX_RUN``)."""
    pages = max_run // PAGE_SIZE
    return Pagemap(
        pagemap.pages_name,
        tuple(
            dataclasses.replace(
                entry,
                vaddr=entry.vaddr + start * PAGE_SIZE,
                nr_pages=min(pages, entry.nr_pages - start),
                offset=entry.offset + start * PAGE_SIZE,
            )
            for entry in pagemap.entries
            for start in range(0, entry.nr_pages, pages)
        ),
    )


def restore_small_runs_eagerly(pagemap: Pagemap, budget: int) -> Pagemap:
    """The smallest lazy runs, up to ``budget`` bytes in all, made eager.

    Each page fault is a round trip through the daemon, behind the fetch request
    in flight: a woken ipykernel faulted about 2,500 pages before its first reply,
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
    eager, and then its long runs split (which makes no run eager). Each is replaced
    by rename, never written in place: the file may be a link to the stored image."""
    for path in image_dir.glob("pagemap-*.img"):
        if _TASK_PAGEMAP.fullmatch(path.name):
            pagemap = coalesce(read_pagemap(path))
            pagemap = split_long_runs(restore_small_runs_eagerly(pagemap, eager_budget))
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
    data = source.read(entry.offset, entry.nr_pages * PAGE_SIZE)
    os.pwrite(fd, data, entry.offset)
    return len(data)


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

    def read(self, offset: int, length: int) -> bytes:
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
        return data[skip : skip + length]

    def close(self) -> None:
        os.close(self._fd)


class _ReadAhead:
    """Verified windows of one pages file. A drain request (more than a page) has
    a worker read and verify the windows after it, so that the disk and the
    hashing run while the daemon copies; a fault (one page) gets its whole
    window, which serves the faults next to it.

    Only what ``source.read`` returned is kept, so only verified bytes. A window
    that failed keeps its error, raised when the daemon asks for a page in it:
    a corrupt block fails the wake only once the kernel needs it.
    """

    WINDOW = 1 << 20
    AHEAD = 16
    KEEP = 2 * AHEAD

    def __init__(self, source: PageSource, size: int, worker: ThreadPoolExecutor) -> None:
        self.source = source
        self.size = size
        self.worker = worker
        self._windows: dict[int, Future[bytes]] = {}

    def _read_window(self, index: int) -> bytes:
        start = index * self.WINDOW
        return self.source.read(start, min(self.WINDOW, self.size - start))

    def _window(self, index: int, ahead: bool) -> Future[bytes]:
        window = self._windows.get(index)
        if window is None:
            if ahead:
                window = self.worker.submit(self._read_window, index)
            else:
                window = Future()
                try:
                    window.set_result(self._read_window(index))
                except Exception as exc:
                    window.set_exception(exc)
            self._windows[index] = window
            while len(self._windows) > self.KEEP:
                oldest = next(iter(self._windows))
                self._windows.pop(oldest).cancel()
        return window

    def pieces(self, offset: int, length: int) -> list[memoryview]:
        """The verified bytes at ``offset``, as views into the windows (no copy)."""
        first, last = offset // self.WINDOW, (offset + length - 1) // self.WINDOW
        windows = [self._window(index, ahead=False) for index in range(first, last + 1)]
        if length > PAGE_SIZE:
            end = min(last + 1 + self.AHEAD, -(-self.size // self.WINDOW))
            for index in range(last + 1, end):
                self._window(index, ahead=True)
        views = [memoryview(window.result()) for window in windows]
        views[0] = views[0][offset - first * self.WINDOW :]
        views[-1] = views[-1][: len(views[-1]) - (sum(map(len, views)) - length)]
        return views


@dataclass
class LazyStats:
    """What a lazy wake moved, and when (seconds since the server started)."""

    requests: int = 0
    bytes_sent: int = 0
    first_request: float | None = None
    drained: float | None = None  # the daemon said it is done: all memory in, or tasks gone
    started: float = field(default_factory=time.monotonic, repr=False)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class LazyPageServer:
    """Runs ``criu lazy-pages`` for one restore and serves it verified pages.

    ::

        async with LazyPageServer(criu, restore_dir, open_pages) as server:
            # criu restore -D restore_dir ... *server.restore_args
            await server.adopt(pid)   # the restored root's host pid
            await server.wait()       # all memory in; LazyPageError if a page failed

    ``restore_dir`` holds the image without its ``pages-*.img`` (the server
    writes the eagerly restored pages there); ``open_pages(name)`` gives the
    verified source of each. If a page fails verification, or the wake is
    closed before all memory is in, the adopted root is SIGKILLed (and with it
    its pid namespace) before the daemon may let go of its memory. Re-dump the
    kernel only after ``wait`` returned: pages not yet in are not in its memory.
    """

    restore_args = ("--lazy-pages",)

    def __init__(
        self,
        criu: Path | str,
        image_dir: Path,
        open_pages: Callable[[str], PageSource],
        eager_budget: int = EAGER_BUDGET,
        env: dict[str, str] | None = None,
    ) -> None:
        self.criu = str(criu)
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
        self._sock: socket.socket | None = None
        self._daemon: asyncio.subprocess.Process | None = None
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
        """Write the eager pages, start the daemon and wait until it listens."""
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
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Room for a whole 4 MiB reply: the daemon then takes it in a few reads.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        ready_r, ready_w = os.pipe()
        try:
            # criu lazy-pages writes one byte to --status-fd once it listens on
            # lazy-pages.socket (replacing a stale one): the restore must not
            # start before, or it finds no socket, or an old one. The daemon also
            # holds our end, unused: if we die, it sees no hangup and keeps the
            # kernel waiting on its faults, rather than letting Linux fill them
            # with zeros, until our cleanup kills the kernel, then the daemon.
            self._daemon = await asyncio.create_subprocess_exec(
                self.criu, "lazy-pages", "-D", str(self.image_dir), "-o", LAZY_LOG, "-v2",
                "--page-server", "--ps-socket", str(theirs.fileno()),
                "--status-fd", str(ready_w),
                pass_fds=(theirs.fileno(), ready_w, self._sock.fileno()),
                env={**os.environ, **self.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
            os.close(ready_w)
        try:
            ready = await asyncio.to_thread(os.read, ready_r, 1)
        finally:
            os.close(ready_r)
        if not ready:
            await self._daemon.wait()
            raise LazyPageError(f"criu lazy-pages did not start:\n{self._log_tail()}")
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
        """Return once the daemon is done; raise if a page failed."""
        assert self._finished is not None, "the server was not started"
        await asyncio.shield(self._finished)
        if self.error:
            raise self.error
        return self.stats

    async def close(self) -> None:
        """End the daemon and release everything; safe at any point, twice too.

        Closed before all memory is in, the kernel is killed first: without the
        daemon it would read zeros where its memory was not yet back.
        """
        if self._thread is not None:
            # Not whether the thread still runs: it may be on its way out after the
            # daemon said it is done, and the kernel must not be killed then.
            if self.stats.drained is None and self.error is None:
                error = LazyPageError("the lazy wake was closed before all memory was in")
                await asyncio.to_thread(self._fail, error)
                if self._pidfd is None:  # no restored kernel was adopted: none to protect
                    self._hang_up()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._daemon is not None and self._daemon.returncode is None:
            if self.error is not None:  # its kernel is gone: nothing left to wait for
                self._daemon.kill()
            await self._daemon.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._worker.shutdown(cancel_futures=True)
        self._readers.clear()
        for source in self._sources.values():
            if closer := getattr(source, "close", None):
                closer()
        self._sources.clear()

    def _source(self, name: str) -> PageSource:
        if name not in self._sources:
            self._sources[name] = self.open_pages(name)
        return self._sources[name]

    def _reader(self, pagemap: Pagemap) -> _ReadAhead:
        name = pagemap.pages_name
        if name not in self._readers:
            self._readers[name] = _ReadAhead(self._source(name), pagemap.size, self._worker)
        return self._readers[name]

    def _pagemap(self, pid: int) -> Pagemap:
        if pid not in self._pagemaps:
            path = self.image_dir / f"pagemap-{pid}.img"
            if not _TASK_PAGEMAP.fullmatch(path.name) or not path.is_file():
                raise LazyPageError(f"the lazy-pages daemon asked for task {pid}, not in the image")
            self._pagemaps[pid] = read_pagemap(path)
        return self._pagemaps[pid]

    def _serve(self, loop: asyncio.AbstractEventLoop, finished: asyncio.Future[None]) -> None:
        """The daemon's requests, one at a time, until it is done or a page fails."""
        assert self._sock is not None
        sock = self._sock
        sock.settimeout(STALL_S)
        try:
            while True:
                header = _recv_exact(sock, _PSI.size)
                if header is None:
                    raise LazyPageError(f"criu lazy-pages hung up:\n{self._log_tail()}")
                cmd, nr_pages, vaddr, pid = _PSI.unpack(header)
                if cmd in (_PS_IOV_CLOSE, _PS_IOV_FORCE_CLOSE):
                    sock.sendall(struct.pack("<i", 0))
                    self.stats.drained = self.stats.elapsed()
                    return
                if cmd != _PS_IOV_GET:
                    raise LazyPageError(f"criu lazy-pages sent an unknown command {cmd:#x}")
                if self.stats.first_request is None:
                    self.stats.first_request = self.stats.elapsed()
                pagemap = self._pagemap(pid)
                offset, count = pagemap.locate(vaddr, nr_pages)
                pages = self._reader(pagemap).pieces(offset, count * PAGE_SIZE)
                reply = _PSI.pack(_PS_IOV_ADD_F | PE_PRESENT << _PS_CMD_BITS, count, vaddr, pid)
                _send_all(sock, [memoryview(reply), *pages])
                self.stats.requests += 1
                self.stats.bytes_sent += count * PAGE_SIZE
        except LazyPageError as exc:
            self._fail(exc)
        except TimeoutError:
            self._fail(
                LazyPageError(
                    f"criu lazy-pages asked for no page in {STALL_S:.0f} s: the fetch stalled\n"
                    + self._log_tail()
                )
            )
        except Exception as exc:  # a source's own verification error, a broken socket
            self._fail(LazyPageError(f"serving a page failed: {exc}"))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, finished)

    def _fail(self, error: LazyPageError) -> None:
        """Record the first error; end the kernel, and only then the daemon. Blocking."""
        with self._lock:
            if self.error is None:
                self.error = error
            if self._pidfd is None:
                # Still restoring, and stopped: without the daemon the restore fails and
                # CRIU ends what it restored. Left waiting for a page, it would hang.
                self._hang_up()
                return
            # Its children too: they die with the init of their pid namespace, but
            # only once it has exited, and they have lazy memory of their own.
            for pid in process_tree(self._root)[1:]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            # Readable once it has exited with every thread (and, as the init of its
            # pid namespace, every process in it): only then may the daemon go. A
            # task that faulted inside a system call may wait for its page without
            # heeding the SIGKILL: then the daemon must go first, and the task dies
            # at its way out of the kernel, before any more of its code runs.
            select.select([self._pidfd], [], [], KILL_WAIT_S)
            self._hang_up()

    def _hang_up(self) -> None:
        """Wake the serving thread; the daemon sees the hangup and exits."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _log_tail(self, limit: int = 6) -> str:
        try:
            lines = (self.image_dir / LAZY_LOG).read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.image_dir / LAZY_LOG})"
        errors = [line for line in lines if "Error" in line or "error" in line]
        return "\n".join((errors or lines)[-limit:])


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    while buffers:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        if sent:
            buffers[0] = buffers[0][sent:]


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(size - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)
