"""Moving multi-GiB images between memory and disk at the disk's speed.

Hibernating writes a kernel's whole memory and waking reads it back, so these
few file operations decide how long both take. Each one keeps the disk busy
while the CPU does something else: hashing overlaps reading, and the disk
starts writing an image while the engine is still producing it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

_CHUNK = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back, do not wait for it


@dataclass
class Partial:
    """The hash of a file's first ``length`` bytes, taken while it was written."""

    inode: int
    length: int
    hasher: Any


def digest(path: Path, chunk: int = _CHUNK, depth: int = 4, partial: Partial | None = None) -> str:
    """BLAKE3 of a file (five times faster than SHA-256 here), read as fast as the disk goes.

    One thread reads ahead into a few buffers while this one hashes: hashing
    each chunk between two reads would leave the disk idle meanwhile, which
    made a cold 4 GiB hash take 1.8x as long as a plain read. Small files are
    hashed in one read. A ``partial`` hash of the file's start, taken by
    :class:`WriteBehind`, is carried on if the file is still the one it hashed.
    """
    stat = path.stat()
    if partial and partial.inode == stat.st_ino and partial.length <= stat.st_size:
        hasher, offset = partial.hasher, partial.length
    else:
        hasher, offset = blake3(max_threads=blake3.AUTO), 0
    if stat.st_size - offset <= chunk:
        with path.open("rb") as f:
            f.seek(offset)
            hasher.update(f.read())
        return hasher.hexdigest()
    free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()  # None: stop reading
    full: queue.SimpleQueue[tuple[memoryview, int] | BaseException] = queue.SimpleQueue()
    for _ in range(depth):
        free.put(memoryview(bytearray(chunk)))

    def read_ahead() -> None:
        try:
            with path.open("rb", buffering=0) as f:
                f.seek(offset)
                while (buffer := free.get()) is not None:
                    size = f.readinto(buffer) or 0
                    full.put((buffer, size))
                    if not size:
                        return
        except BaseException as exc:  # handed to the hashing thread, which raises it
            full.put(exc)

    reader = threading.Thread(target=read_ahead, name=f"kernelhib-read {path.name}", daemon=True)
    reader.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buffer, size = item
            if not size:
                return hasher.hexdigest()
            hasher.update(buffer[:size])
            free.put(buffer)
    finally:
        free.put(None)  # a reader still waiting for a buffer: the hash failed or is done
        reader.join()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop a durable file from the page cache (:func:`uncache`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        uncache(fd)
    finally:
        os.close(fd)


def uncache(fd: int) -> None:
    """Drop an open, durable file's pages from the page cache: a hibernated kernel's
    image must not take back, as cache, the memory that hibernating it just freed, and
    what a wake reads once it will not read again."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _sync_file_range() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_start_writeback = _sync_file_range()


@dataclass
class _Watched:
    fd: int
    inode: int
    kicked: int = 0  # bytes whose write-back has been started
    partial: Partial | None = None  # for files hashed as they are written


class WriteBehind:
    """Starts the disk writing the files under a directory while they are being written.

    Left alone, the kernel writes dirty pages back only once gigabytes have
    piled up (or after 30 s), so a dump into the page cache followed by fsync
    costs a memory copy *plus* the whole disk write. Kicking write-back every
    ``step`` bytes overlaps the two: a 1 GiB CRIU dump and its fsync went from
    0.9 s to 0.6 s here, the time of a plain write. Only starts write-back
    (``sync_file_range``): durability is still the committer's fsync.

    Files for which ``appended(name)`` is true, which their writer only ever
    appends to, are also hashed as they grow, while the data is still in the
    page cache and the CPU would otherwise wait for the disk: :meth:`stop`
    hands over those partial hashes for :func:`digest` to finish.
    """

    def __init__(
        self,
        directory: Path,
        appended: Callable[[str], bool] | None = None,
        step: int = 32 << 20,
        interval: float = 0.01,
    ) -> None:
        self.directory = directory
        self.appended = appended
        self.step = step
        self.interval = interval
        self._done = threading.Event()
        self._files: dict[str, _Watched] = {}
        self._buffer = bytearray(_CHUNK)
        self._thread = threading.Thread(
            target=self._run, name=f"kernelhib-write-behind {directory.name}", daemon=True
        )
        if _start_writeback is not None:
            self._thread.start()

    def stop(self) -> dict[Path, Partial]:
        """Stop watching (the files' remaining write-back is left to fsync); return the
        partial hashes of the appended files."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        return {Path(path): w.partial for path, w in self._files.items() if w.partial}

    def _run(self) -> None:
        try:
            while not self._done.wait(self.interval):
                for root, _, names in os.walk(self.directory):
                    for name in names:
                        with contextlib.suppress(OSError):
                            self._kick(os.path.join(root, name))
        finally:
            for watched in self._files.values():
                os.close(watched.fd)

    def _kick(self, path: str) -> None:
        watched = self._files.get(path)
        if watched is None or os.stat(path).st_ino != watched.inode:  # new, or replaced
            if watched is not None:
                os.close(self._files.pop(path).fd)
            fd = os.open(path, os.O_RDONLY)
            watched = self._files[path] = _Watched(fd, os.fstat(fd).st_ino)
            if self.appended and self.appended(os.path.relpath(path, self.directory)):
                watched.partial = Partial(watched.inode, 0, blake3())
        size = os.fstat(watched.fd).st_size
        if size - watched.kicked < self.step:
            return
        _start_writeback(watched.fd, watched.kicked, size - watched.kicked, _SYNC_FILE_RANGE_WRITE)
        watched.kicked = size
        # On this one thread (the engine has the other cores), the data fresh in the cache.
        partial = watched.partial
        while partial and partial.length < size:
            read = os.preadv(watched.fd, [self._buffer], partial.length)
            if not read:
                break
            partial.hasher.update(memoryview(self._buffer)[:read])
            partial.length += read
