"""Talking to ``kernelhib-criud``, the root service that lets servers run as their users.

CRIU restores a process only as root. Rather than run every user's Jupyter
server as root, a server may ask the service (``CriuService.socket``) to launch,
dump and restore its kernels: the service acts only on the kernels of the uid
that asks, which the kernel reports for each connection (``SO_PEERCRED``), and
keeps their images where no user can read or write them. See
:mod:`kernelhib.criud` and docs/security.md.

The protocol: one request per connection, a JSON object on one line
(``{"op": ..., ...}``, at most :data:`MAX_REQUEST` bytes); one answer, a JSON
object on one line: ``{"ok": true, ...}`` or ``{"ok": false, "reason": ...,
"error": ...}``, ``reason`` being one of :class:`Refusal`'s codes.
"""

from __future__ import annotations

import asyncio
import json
import socket
from enum import Enum
from typing import Any

from traitlets import Unicode
from traitlets.config import Configurable

from .base import EngineError

MAX_REQUEST = 256 * 1024
# A dump or restore of a big kernel writes or reads gigabytes.
TIMEOUT_S = 900.0


class Refusal(str, Enum):
    """Why the service refused a request: the ``reason`` of its answer."""

    BAD_REQUEST = "bad-request"
    NOT_YOURS = "not-yours"  # no kernel or image of the asking uid by that name
    LIMIT = "limit"  # the uid has as many images as the service keeps for one user
    CHECK_FAILED = "check-failed"  # the kernel or restored process is not what it must be
    FAILED = "failed"  # CRIU or the image store failed; the error says why


class ServiceError(EngineError):
    """The service refused or failed a request; ``reason`` is a :class:`Refusal`."""

    def __init__(self, message: str, reason: Refusal = Refusal.FAILED) -> None:
        super().__init__(message)
        self.reason = reason


class CriuService(Configurable):
    """Where the CRIU service listens (``c.CriuService.socket``); read by the engine and
    the provisioner, which must agree."""

    socket = Unicode(
        "",
        config=True,
        help="Unix socket of kernelhib-criud (e.g. /run/kernelhib/criud.sock). Set, the "
        "server launches, dumps and restores kernels through that root service instead of "
        "running unshare and CRIU itself, so that it need not run as root. Empty: it does "
        "them itself, which needs root.",
    )


def _answer(raw: bytes, op: str) -> dict[str, Any]:
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ServiceError(f"kernelhib-criud gave no answer to {op!r}: is it running?")
    if not answer.get("ok"):
        try:
            reason = Refusal(answer.get("reason"))
        except ValueError:
            reason = Refusal.FAILED
        raise ServiceError(f"kernelhib-criud refused {op!r}: {answer.get('error')}", reason)
    return answer


def _encode(op: str, fields: dict[str, Any]) -> bytes:
    return json.dumps({"op": op, **fields}).encode() + b"\n"


def call(path: str, op: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
    """A request to the service, blocking: for quick ones (``hello``, ``discard``)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(_encode(op, fields))
            raw = sock.makefile("rb").readline()
    except OSError as exc:
        raise ServiceError(f"cannot reach kernelhib-criud at {path}: {exc}") from exc
    return _answer(raw, op)


async def acall(path: str, op: str, **fields: Any) -> dict[str, Any]:
    """A request to the service, without blocking the event loop."""
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REQUEST)
    except OSError as exc:
        raise ServiceError(f"cannot reach kernelhib-criud at {path}: {exc}") from exc
    try:
        writer.write(_encode(op, fields))
        await writer.drain()
        raw = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ServiceError(f"kernelhib-criud failed {op!r}: {exc!r}") from exc
    finally:
        writer.close()
    return _answer(raw, op)
