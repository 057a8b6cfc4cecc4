"""An image streamer for ``criu dump/restore --stream``: images never land as files.

With ``--stream``, CRIU writes and reads no image file itself. It connects to
``streamer-capture.sock`` (dump) or ``streamer-serve.sock`` (restore) in its
images directory and, for each image file, sends the file's name and one end
of a pipe (SCM_RIGHTS) through which the file's bytes flow (criu/img-streamer.c,
images/img-streamer.proto). On restore the streamer first answers whether the
file exists. So the image store can chunk, hash and compress a dump as it
arrives, and a restore reads each chunk verified as CRIU consumes it, with no
staging copy of the memory on disk or in memory.

The engine knows nothing of how images are stored: it hands each file to an
:class:`ImageSink` and asks an :class:`ImageSource` for it (the image store's
``chunk_store.StreamedImage`` is both).

Wire format (CRIU's ``pb_write_one`` on a bare fd): a little-endian u32 length,
then a protobuf message: ``img_streamer_request_entry {string filename = 1}``
from CRIU, ``img_streamer_reply_entry {bool exists = 1}`` to it. Two fields:
encoded here by hand rather than with a protobuf dependency.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from .base import EngineError

CAPTURE_SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
_PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size by default: fewer, larger transfers
_F_SETPIPE_SZ = 1031
_READ = 1 << 20


class ImageSink(Protocol):
    """Where a dump's image files go."""

    def receive(self, name: str, stream: BinaryIO) -> None:
        """Consume the image file ``name`` from ``stream`` to its end. Called from
        several threads at once: CRIU writes some files side by side."""


class ImageSource(Protocol):
    """Where a restore's image files come from."""

    def open(self, name: str) -> Iterable[bytes | memoryview] | None:
        """The file's bytes in order, each block verified before it is yielded; None
        if the image has no such file (CRIU asks for files that may not exist)."""


class StreamError(EngineError):
    """The streamer failed: a file could not be stored, or one failed verification."""


def _parse_request(body: bytes) -> str:
    """The filename of an ``img_streamer_request_entry``."""
    if not body or body[0] != 0x0A:
        raise StreamError(f"CRIU sent a request the streamer does not understand: {body[:16]!r}")
    length, shift, index = 0, 0, 1
    while index < len(body):
        byte = body[index]
        length |= (byte & 0x7F) << shift
        shift += 7
        index += 1
        if not byte & 0x80:
            break
    name = body[index : index + length]
    if len(name) != length or index + length != len(body):
        raise StreamError(f"CRIU sent a truncated request: {body[:16]!r}")
    return name.decode()


def _reply(exists: bool) -> bytes:
    body = b"\x08" + (b"\x01" if exists else b"\x00")
    return struct.pack("<I", len(body)) + body


def _exactly(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes from CRIU, or None at a clean end of the conversation."""
    data = bytearray()
    while len(data) < size:
        piece = conn.recv(size - len(data))
        if not piece:
            if data:
                raise StreamError("CRIU closed the streamer socket in the middle of a request")
            return None
        data += piece
    return bytes(data)


def _receive_fd(conn: socket.socket) -> int:
    _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    if len(fds) != 1:
        raise StreamError("CRIU sent no pipe with its request")
    with contextlib.suppress(OSError):  # larger than the maximum: keep the default
        fcntl.fcntl(fds[0], _F_SETPIPE_SZ, _PIPE_SIZE)
    return fds[0]


class Streamer:
    """Serves one ``criu dump --stream`` (with a sink) or ``restore --stream`` (with a
    source) through the socket in ``image_dir``.

    Enter before starting CRIU (the socket must exist when it starts), exit after
    CRIU ended: exiting waits for every file, and raises :class:`StreamError`
    with the first failure (a CRIU that failed because the streamer did sees
    a broken pipe; the reason is here).
    """

    def __init__(
        self, image_dir: Path, sink: ImageSink | None = None, source: ImageSource | None = None
    ) -> None:
        if (sink is None) == (source is None):
            raise ValueError("a streamer has either a sink (dump) or a source (restore)")
        self.sink = sink
        self.source = source
        self.path = Path(image_dir) / (CAPTURE_SOCKET if sink else SERVE_SOCKET)
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._main = threading.Thread(
            target=self._guard, args=(self._serve,), name="kernelhib-streamer", daemon=True
        )

    def __enter__(self) -> Streamer:
        self.path.unlink(missing_ok=True)
        # Through the directory's fd: a socket's path is at most 107 bytes, and an
        # image directory's may be longer (CRIU is run in it, and finds the socket at
        # ./streamer-*.sock).
        directory = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            self._listener.bind(f"/proc/self/fd/{directory}/{self.path.name}")
        finally:
            os.close(directory)
        os.chmod(self.path, 0o600)
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self._main.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        if kind is None and self._errors:
            first = self._errors[0]
            raise StreamError(f"the image streamer failed: {first}") from first

    def close(self) -> None:
        """Stop waiting for CRIU (it ended, or never connected); wait for every file."""
        self._stop.set()
        self._main.join()
        for thread in self._threads:
            thread.join()
        self._listener.close()
        self.path.unlink(missing_ok=True)

    def _guard(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except BaseException as exc:  # reported by __exit__
            self._errors.append(exc)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                if self._stop.is_set():
                    return
        with conn:
            conn.settimeout(None)
            while (header := _exactly(conn, 4)) is not None:
                (size,) = struct.unpack("<I", header)
                body = _exactly(conn, size)
                if body is None:
                    raise StreamError("CRIU closed the streamer socket in the middle of a request")
                name = _parse_request(body)
                if self.sink is not None:
                    self._start(self._capture, name, _receive_fd(conn))
                    continue
                assert self.source is not None
                blocks = self.source.open(name)
                conn.sendall(_reply(blocks is not None))
                if blocks is not None:
                    self._start(self._send, name, blocks, _receive_fd(conn))

    def _start(self, work: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(
            target=self._guard,
            args=(work, name, *args),
            name=f"kernelhib-stream {name}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _capture(self, name: str, fd: int) -> None:
        assert self.sink is not None
        with os.fdopen(fd, "rb", buffering=_READ) as stream:
            self.sink.receive(name, stream)

    @staticmethod
    def _send(name: str, blocks: Iterable[bytes | memoryview], fd: int) -> None:
        """Write the file into CRIU's pipe; on a failure, close it: CRIU sees the file
        end early and fails."""
        try:
            for block in blocks:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
        except BrokenPipeError:
            raise StreamError(f"CRIU stopped reading {name} before its end") from None
        finally:
            os.close(fd)
