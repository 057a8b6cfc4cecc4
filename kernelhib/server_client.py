"""Talk to a running Jupyter server's kernel hibernation REST API.

Only the standard library is used, so the command line works wherever the
server's Python does, with nothing more to install.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

LIST_TIMEOUT_S = 30
# Hibernating or waking a kernel with gigabytes of memory takes a while.
HIBERNATE_TIMEOUT_S = 600


class ServerError(RuntimeError):
    """A request to the Jupyter server failed; the message says why."""


@dataclass(frozen=True)
class Server:
    """A Jupyter server to talk to: base URL (ending in ``/``) and token."""

    url: str
    token: str


def find_server(url: str | None = None, token: str | None = None) -> Server:
    """Pick the server to talk to: ``url``, else the first running one.

    Without a ``token``, the token of the running server at ``url`` is used,
    so ``--url`` alone is enough for a local server.
    """
    from jupyter_server.serverapp import list_running_servers

    running = [
        Server(_with_slash(info["url"]), info.get("token", "")) for info in list_running_servers()
    ]
    if url:
        url = _with_slash(url)
        if token is None:
            token = next((server.token for server in running if server.url == url), "")
        return Server(url, token)
    if not running:
        raise ServerError("no running Jupyter server found: start one, or pass --url and --token")
    first = running[0]
    return Server(first.url, first.token if token is None else token)


def list_kernels(server: Server) -> list[dict[str, Any]]:
    """The server's kernel models, hibernated ones with a ``hibernation`` key."""
    return _request(server, "GET", "api/kernels", timeout=LIST_TIMEOUT_S)


def hibernate(
    server: Server, kernel_id: str, *, engine: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Hibernate a kernel and return its model; no ``engine``: the server's default."""
    body: dict[str, Any] = {"force": force}
    if engine:
        body["engine"] = engine
    return _request(
        server,
        "POST",
        f"api/kernels/{_quote(kernel_id)}/hibernate",
        body,
        timeout=HIBERNATE_TIMEOUT_S,
    )


def wake(server: Server, kernel_id: str) -> dict[str, Any]:
    """Wake a hibernated kernel and return its model."""
    return _request(
        server, "POST", f"api/kernels/{_quote(kernel_id)}/wake", {}, timeout=HIBERNATE_TIMEOUT_S
    )


def _request(
    server: Server, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float
) -> Any:
    """Send one JSON request and decode the JSON reply, or raise ServerError."""
    url = server.url + path
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ServerError(
            f"{method} {url} failed with HTTP {exc.code}: {_error_message(exc)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(
            f"cannot reach the Jupyter server at {server.url} ({reason}): "
            "is it running? Pass --url and --token to pick another"
        ) from exc
    except ValueError as exc:
        raise ServerError(
            f"{method} {url} did not answer with JSON: "
            "is this a Jupyter server with kernelhib enabled?"
        ) from exc


def _error_message(error: urllib.error.HTTPError) -> str:
    """Extract jupyter_server's ``{"message": ...}`` from an error reply."""
    raw = error.read().decode(errors="replace")
    try:
        reply = json.loads(raw)
    except ValueError:
        return raw.strip() or error.reason
    if not isinstance(reply, dict):
        return raw.strip()
    return reply.get("message") or reply.get("reason") or error.reason


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _quote(kernel_id: str) -> str:
    return urllib.parse.quote(kernel_id, safe="")
