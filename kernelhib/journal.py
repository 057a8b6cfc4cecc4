"""The image store's journal: what each kernel's process is doing, durable and signed.

A server can die at any instant, SIGKILL included. What its kernels were
doing then must be known to whoever cleans up after it (its watchdog, and the
next server on the same image store), so that each kernel ends up running or
hibernated, never lost and never left behind. One file per kernel with a
process, ``.journal/<kernel id>.json``:

- ``running``: an ordinary kernel. It dies with its server.
- ``hibernating``: being saved. Its process outlives the server until its image
  is committed: kept running for the next server if it was not.
- ``waking``: being restored or started from its image, which is still there.
  The process is unverified until the wake ends: it dies, the image stays.

A kernel with no process (hibernated) has no entry: its image says it all.
Entries are signed with the store's key, like manifests: the next server
adopts a kept kernel's ports and key from them.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .disk_io import fsync
from .kernel_process import process_start
from .paths import private_dir

RUNNING = "running"
HIBERNATING = "hibernating"
WAKING = "waking"
STATES = (RUNNING, HIBERNATING, WAKING)


@dataclass(frozen=True)
class Entry:
    """One kernel's process, as its server last recorded it."""

    kernel_id: str
    server: str  # the id of the server that owns the process (see server_id())
    state: str
    pid: int = 0  # the kernel's host pid, once known
    pid_start: int = 0  # its start time (ticks since boot): a reused pid is not it
    # To adopt a kept kernel: as in an image's manifest.
    facts: dict[str, Any] = field(default_factory=dict)


def server_id(pid: int | None = None) -> str:
    """A server's identity that a later process with the same pid does not share."""
    pid = pid or os.getpid()
    return f"{pid}:{process_start(pid)}"


class Journal:
    """The entries under one image store; blocking, call from a thread."""

    def __init__(self, directory: Path, sign: Callable[[dict[str, Any]], str]) -> None:
        self.directory = directory  # made on the first write: a store may never need one
        self._sign = sign

    def _path(self, kernel_id: str) -> Path:
        return self.directory / f"{kernel_id}.json"

    def write(self, entry: Entry) -> None:
        """Record an entry durably, replacing the kernel's previous one."""
        if entry.state not in STATES:
            raise ValueError(f"unknown journal state {entry.state!r}")
        body = asdict(entry)
        body["signature"] = self._sign(body)
        private_dir(self.directory)
        path = self._path(entry.kernel_id)
        written = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        written.rename(path)
        fsync(self.directory)

    def remove(self, kernel_id: str, owner: str | None = None) -> None:
        """Delete a kernel's entry; with ``owner``, only if that server still owns it.

        Not made durable: an entry that comes back after a power loss names
        processes that are gone, and is removed again by the next server.
        """
        if owner is not None:
            entry = self.read(kernel_id)
            if entry is None or entry.server != owner:
                return
        with contextlib.suppress(FileNotFoundError):
            self._path(kernel_id).unlink()

    def read(self, kernel_id: str) -> Entry | None:
        """A kernel's entry, if it has a signed one."""
        try:
            body = json.loads(self._path(kernel_id).read_text())
            signature = body.pop("signature")
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not isinstance(signature, str) or not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            return Entry(**body)
        except TypeError:
            return None

    def entries(self) -> list[Entry]:
        """Every signed entry; unsigned or unreadable files are not acted on."""
        found = (self.read(p.stem) for p in self.directory.glob("*.json"))
        return [entry for entry in found if entry is not None]
