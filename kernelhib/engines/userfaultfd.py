"""Userfaultfd, as a lazy wake's page server uses it: the restored kernel's faults
and memory events read, and its missing pages copied in.

``criu restore --lazy-pages`` opens one userfaultfd per restored task, registers
the memory it leaves lazy, and hands the descriptor over a unix socket
(criu/uffd.c, CRIU 4.2): for each task an ``int`` pid (negative for a zombie,
which brings no descriptor), then one byte carrying the descriptor; once every
task is restored, :data:`RESTORE_FINISHED`. Each descriptor then reports the
task's page faults, and the events that change where its lazy memory is (fork,
mremap, madvise, munmap: ``UFFD_FEATURE_EVENT_*``, which CRIU asks for). A
task that forks, moves or drops memory is held in the kernel until its event
has been read, so the events are read as promptly as the faults.

Only this module knows the kernel ABI (linux/userfaultfd.h); :class:`Runs` keeps
what a task still lacks, where it lies now and where it lay in the image.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SOCKET_NAME = "lazy-pages.socket"  # in CRIU's work directory, the image directory
RESTORE_FINISHED = 0x52535446  # "ReSTore Finished", after the last task's descriptor

# linux/userfaultfd.h
_UFFDIO = 0xAA
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16
EVENT_NAMES = {
    EVENT_PAGEFAULT: "fault",
    EVENT_FORK: "fork",
    EVENT_REMAP: "remap",
    EVENT_REMOVE: "remove",
    EVENT_UNMAP: "unmap",
}
_MSG = struct.Struct("<B7x24s")  # struct uffd_msg: event, then a union of 24 bytes
_PAGEFAULT = struct.Struct("<QQ8x")  # flags, address
_FORK = struct.Struct("<I20x")  # ufd
_REMAP = struct.Struct("<QQQ")  # from, to, len
_REMOVE = struct.Struct("<QQ8x")  # start, end


class _Copy(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("dst", "src", "len", "mode")] + [
        ("copy", ctypes.c_int64)
    ]


class _ZeroPage(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("start", "len", "mode")] + [
        ("zeropage", ctypes.c_int64)
    ]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    direction = 2 if read_only else 3  # _IOR, _IOWR
    return direction << 30 | size << 16 | _UFFDIO << 8 | nr


_UFFDIO_UNREGISTER = _iowr(0x01, ctypes.sizeof(_Range), read_only=True)
_UFFDIO_WAKE = _iowr(0x02, ctypes.sizeof(_Range), read_only=True)
_UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(_Copy))
_UFFDIO_ZEROPAGE = _iowr(0x04, ctypes.sizeof(_ZeroPage))

_libc = ctypes.CDLL(None, use_errno=True)  # ioctl through ctypes releases the GIL
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class _Buffer(ctypes.Structure):
    """Py_buffer: how a read-only buffer's address is had without copying it."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Buffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Buffer)]


@dataclass(frozen=True)
class Event:
    """One message of a userfaultfd. ``start``/``end``: the page range it concerns
    (a fault's page; a removed or unmapped range; a remap's source); ``to`` where a
    remap moved it; ``fd`` a forked child's new userfaultfd."""

    kind: int
    start: int = 0
    end: int = 0
    to: int = 0
    fd: int = -1


class TaskGone(Exception):
    """The task's memory is gone (it exited or exec'd): nothing more to copy."""


class Retry(Exception):
    """The task's memory is changing (an event waits to be read: EAGAIN): read the
    events, then try again. ``done``: bytes copied before it stopped."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


class Userfaultfd:
    """One task's userfaultfd, owned: :meth:`close` it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def events(self) -> Iterator[Event]:
        """The messages waiting now; none if there are none."""
        while True:
            try:
                data = os.read(self.fd, _MSG.size * 64)
            except BlockingIOError:
                return
            for at in range(0, len(data), _MSG.size):
                yield _event(*_MSG.unpack_from(data, at))
            if len(data) < _MSG.size * 64:
                return

    def copy(self, address: int, data: bytes | memoryview) -> None:
        """Fill the missing pages at ``address`` with ``data`` and wake who waits on
        them. Skipped: a page already there (filled by an earlier copy that woke a
        thread whose fault message came late), and one no longer in a registered
        area. A copy that crosses the end of an area (one the task split since,
        with mprotect, which sends no event) goes on page by page."""
        view = _Buffer()
        _get_buffer(data, ctypes.byref(view), 0)
        try:
            done, length, step = 0, view.len, view.len
            while done < length:
                size = min(step, length - done)
                args = _Copy(address + done, view.buf + done, size, 0, 0)
                if self._ioctl(_UFFDIO_COPY, args) == 0:
                    done += size
                    continue
                error = ctypes.get_errno()
                done += max(args.copy, 0)
                if error == errno.EEXIST or (error == errno.ENOENT and size == PAGE_SIZE):
                    done += PAGE_SIZE if args.copy <= 0 else 0
                elif error == errno.ENOENT:
                    step = PAGE_SIZE
                else:
                    self._raise(error, done)
        finally:
            _release_buffer(ctypes.byref(view))

    def zero(self, address: int, length: int = PAGE_SIZE) -> None:
        """Map zero pages where the image holds none (the task never wrote there)."""
        args = _ZeroPage(address, length, 0, 0)
        if self._ioctl(_UFFDIO_ZEROPAGE, args) != 0:
            error = ctypes.get_errno()
            if error not in (errno.EEXIST, errno.ENOENT):  # there already; not ours any more
                self._raise(error, max(args.zeropage, 0))

    def unregister(self, start: int, end: int) -> None:
        """Leave ``start``-``end`` to the kernel: the task dropped it (madvise), and a
        fault there must now get a fresh zero page, not the image's."""
        if self._ioctl(_UFFDIO_UNREGISTER, _Range(start, end - start)) != 0:
            error = ctypes.get_errno()
            raise TaskGone() if error == errno.ENOMEM else OSError(error, os.strerror(error))

    def wake(self, start: int, end: int) -> None:
        """Wake the threads waiting on ``start``-``end``: they fault again if a page
        is still missing (after a copy that had to stop for an event)."""
        self._ioctl(_UFFDIO_WAKE, _Range(start, end - start))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, request: int, args: ctypes.Structure) -> int:
        return _libc.ioctl(self.fd, request, ctypes.byref(args))

    @staticmethod
    def _raise(error: int, done: int) -> None:
        if error in (errno.ESRCH, errno.ENOSPC):
            raise TaskGone()
        if error == errno.EAGAIN:
            raise Retry(done)
        raise OSError(error, os.strerror(error))


def _event(kind: int, arg: bytes) -> Event:
    if kind == EVENT_PAGEFAULT:
        _, address = _PAGEFAULT.unpack(arg)
        start = address & ~(PAGE_SIZE - 1)
        return Event(kind, start, start + PAGE_SIZE)
    if kind == EVENT_FORK:
        return Event(kind, fd=_FORK.unpack(arg)[0])
    if kind == EVENT_REMAP:
        source, target, length = _REMAP.unpack(arg)
        return Event(kind, source, source + length, to=target)
    if kind in (EVENT_REMOVE, EVENT_UNMAP):
        start, end = _REMOVE.unpack(arg)
        return Event(kind, start, end)
    raise OSError(errno.EPROTO, f"unknown userfaultfd event {kind:#x}")


@dataclass(frozen=True)
class Run:
    """Pages a task still lacks: at ``start``-``end`` now, at ``image`` in its image."""

    start: int
    end: int
    image: int

    def part(self, start: int, end: int) -> Run:
        return Run(start, end, self.image + start - self.start)


class Runs:
    """What a task still lacks, sorted by address, never overlapping."""

    def __init__(self, runs: list[Run] | None = None) -> None:
        self._runs = sorted(runs or [], key=lambda run: run.start)
        self._starts = [run.start for run in self._runs]

    def __bool__(self) -> bool:
        return bool(self._runs)

    def copy(self) -> Runs:
        return Runs(self._runs)

    def find(self, address: int) -> Run | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self._runs[index].end:
            return self._runs[index]
        return None

    def first(self) -> Run | None:
        return self._runs[0] if self._runs else None

    def take(self, start: int, end: int) -> list[Run]:
        """Remove ``start``-``end``; the parts of runs that lay there."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, end)
        kept, taken = [], []
        for run in self._runs[first:last]:
            if run.end <= start or run.start >= end:
                kept.append(run)
                continue
            if run.start < start:
                kept.append(run.part(run.start, start))
            taken.append(run.part(max(run.start, start), min(run.end, end)))
            if run.end > end:
                kept.append(run.part(end, run.end))
        self._runs[first:last] = kept
        self._starts[first:last] = [run.start for run in kept]
        return taken

    def put(self, run: Run) -> None:
        """Add back a run (its range must be free)."""
        index = bisect.bisect_left(self._starts, run.start)
        self._runs.insert(index, run)
        self._starts.insert(index, run.start)

    def move(self, start: int, end: int, to: int) -> None:
        """The task moved ``start``-``end`` to ``to`` (mremap), with what it lacks there."""
        moved = self.take(start, end)
        self.take(to, to + end - start)  # what was mapped there before is gone
        for run in moved:
            self.put(Run(run.start - start + to, run.end - start + to, run.image))


class Handoff:
    """CRIU's end of the lazy-pages socket: each task's pid and userfaultfd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._data = b""
        self._fds: list[int] = []

    def read(self) -> list[tuple[int, int | None]] | None:
        """What CRIU sent since, as (pid, userfaultfd): the descriptor is None for a
        zombie, and the pid :data:`RESTORE_FINISHED` comes last. None once CRIU has
        hung up. Call when the socket is readable."""
        data, fds, _, _ = socket.recv_fds(self.sock, 4096, 64)
        self._fds += fds
        if not data:
            return None
        self._data += data
        messages: list[tuple[int, int | None]] = []
        while len(self._data) >= 4:
            (pid,) = struct.unpack_from("<i", self._data)
            if 0 < pid != RESTORE_FINISHED:
                if len(self._data) < 5 or not self._fds:
                    break
                self._data = self._data[5:]
                messages.append((pid, self._fds.pop(0)))
            else:
                self._data = self._data[4:]
                messages.append((pid, None))
        return messages

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()
