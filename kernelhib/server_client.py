"""Talk to a running Jupyter server's kernel hibernation REST API.

Only the standard library is used, so the command line works wherever the
server's Python does, with nothing more to install.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LIST_TIMEOUT_S = 30
# Hibernating or waking a kernel with gigabytes of memory takes a while.
HIBERNATE_TIMEOUT_S = 600


class ServerError(RuntimeError):
    """A request to the Jupyter server failed; the message says why.

    ``reason`` is the server's code for a refusal (a ``Reason`` of
    :mod:`kernelhib.hibernator`), for callers to decide on; "" if it gave none
    or was not reached.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Server:
    """A Jupyter server to talk to: base URL (ending in ``/``) and token."""

    url: str
    token: str


def find_server(
    url: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Server:
    """Pick the server to talk to: ``url``, else this JupyterHub server's, else the first running.

    Inside a JupyterHub single-user server (a terminal, a kernel) the hub's
    ``JUPYTERHUB_SERVICE_URL`` names the server and ``JUPYTERHUB_API_TOKEN``
    is accepted by it. Without a ``token``, the token of the running server
    at the URL is used, so ``--url`` alone is enough for a local server.
    """
    from jupyter_server.serverapp import list_running_servers

    running = {_with_slash(info["url"]): info.get("token", "") for info in list_running_servers()}
    url = url or _hub_url(environ)
    if url:
        url = _with_slash(url)
        if token is None:
            token = running.get(url) or environ.get("JUPYTERHUB_API_TOKEN", "")
        return Server(url, token)
    if not running:
        raise ServerError("no running Jupyter server found: start one, or pass --url and --token")
    first, first_token = next(iter(running.items()))
    return Server(first, first_token if token is None else token)


def _hub_url(environ: Mapping[str, str]) -> str:
    """Where this JupyterHub single-user server listens, reachable from here; "" outside one.

    The hub gives the address it told the server to bind, which may be every
    interface (``http://:8888/user/ada/``, ``0.0.0.0``): this machine's own is used.
    """
    url = environ.get("JUPYTERHUB_SERVICE_URL", "")
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme or "http", netloc, parts.path, "", ""))


def list_kernels(server: Server) -> list[dict[str, Any]]:
    """The server's kernel models, hibernated ones with a ``hibernation`` key."""
    return _request(server, "GET", "api/kernels", timeout=LIST_TIMEOUT_S)


def get_kernel(server: Server, kernel_id: str) -> dict[str, Any]:
    """One kernel's model."""
    return _request(server, "GET", f"api/kernels/{_quote(kernel_id)}", timeout=LIST_TIMEOUT_S)


def notebook_paths(server: Server) -> dict[str, list[str]]:
    """Kernel id -> the paths of the sessions (notebooks, consoles) that use it."""
    paths: dict[str, list[str]] = {}
    for session in _request(server, "GET", "api/sessions", timeout=LIST_TIMEOUT_S):
        kernel = session.get("kernel") or {}
        if kernel.get("id") and session.get("path"):
            paths.setdefault(kernel["id"], []).append(session["path"])
    return paths


def state_of(kernel: dict[str, Any]) -> str:
    """What a kernel is doing: ``hibernating``, ``hibernated``, ``waking``, or its execution state.

    A ``hibernation`` object alone does not mean hibernated: a kernel whose
    hibernation failed keeps one, with ``state: running`` and the ``error``.
    """
    hibernation = kernel.get("hibernation") or {}
    state = hibernation.get("state", "running")
    if state != "running":
        return state
    return kernel.get("execution_state") or "unknown"


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
    return _action(server, kernel_id, "wake")


def recompute(server: Server, kernel_id: str) -> dict[str, Any]:
    """Run the cells that re-create what the kernel's last dill wake lost; return its model."""
    return _action(server, kernel_id, "recompute")


def _action(server: Server, kernel_id: str, action: str) -> dict[str, Any]:
    path = f"api/kernels/{_quote(kernel_id)}/{action}"
    return _request(server, "POST", path, {}, timeout=HIBERNATE_TIMEOUT_S)


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
        message, reason = _error_of(exc)
        raise ServerError(f"{method} {url} failed with HTTP {exc.code}: {message}", reason) from exc
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


def _error_of(error: urllib.error.HTTPError) -> tuple[str, str]:
    """jupyter_server's error reply ``{"message": ..., "reason": ...}``: message and reason."""
    raw = error.read().decode(errors="replace")
    try:
        reply = json.loads(raw)
    except ValueError:
        return raw.strip() or error.reason, ""
    if not isinstance(reply, dict):
        return raw.strip(), ""
    reason = reply.get("reason")
    reason = reason if isinstance(reason, str) else ""
    return reply.get("message") or reason or error.reason, reason


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _quote(kernel_id: str) -> str:
    return urllib.parse.quote(kernel_id, safe="")
