"""A real jupyter_server on loopback with kernelhib, real kernels, real CRIU.

CRIU tests skip where CRIU cannot run, unless KERNELHIB_REQUIRE_CRIU=1 (set by
CI), under which a missing or broken CRIU fails them instead.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kernelhib.engines.criu import CriuEngine
from kernelhib.testing import (
    KernelChannel,
    ServerProcess,
    expect_status,
    launch,
)
from kernelhib.testing import start_kernel as start_kernel_with

# Re-exported: the tests import these from here.
from kernelhib.testing import summarize as summarize
from kernelhib.testing import wait_for_state as wait_for_state
from kernelhib.testing import wait_until_fetched as wait_until_fetched

pytest_plugins = ["pytest_jupyter.jupyter_server"]

REQUIRE_CRIU = os.environ.get("KERNELHIB_REQUIRE_CRIU") == "1"

# Kernel code that makes CRIU refuse a dump for real: the kernel ptrace-attaches
# to (debugs) its child, and CRIU cannot seize a task that is already traced.
TRACE_A_CHILD = (
    "import ctypes, subprocess, time\n"
    "traced = subprocess.Popen(['sleep', '600'])\n"
    "assert ctypes.CDLL(None).ptrace(16, traced.pid, 0, 0) == 0\n"
    "time.sleep(0.2)\n"
)


@pytest.fixture(scope="session")
def criu_path() -> str:
    """The working criu binary, located before the tests move HOME elsewhere."""
    availability = CriuEngine().availability()
    if not availability.ok:
        message = f"CRIU cannot run here: {availability.detail}; {availability.remedy}"
        if REQUIRE_CRIU:
            pytest.fail(message)
        pytest.skip(message)
    from kernelhib.engines.criu_install import locate_criu

    return str(locate_criu().path)


@pytest.fixture
def hibernator_config() -> dict[str, Any]:
    """Extra ``KernelHibernator`` settings for a test; override to change them."""
    return {}


@pytest.fixture
def server_config() -> dict[str, Any]:
    """Extra server settings for a test, by class; override to change them."""
    return {}


@pytest.fixture
def jp_server_config(
    criu_path: str, hibernator_config: dict[str, Any], server_config: dict[str, Any]
) -> dict[str, Any]:
    return {
        **server_config,
        "ServerApp": {"jpserver_extensions": {"kernelhib": True}}
        | server_config.get("ServerApp", {}),
        # The test server's teardown stops extensions: hibernating every kernel
        # there would only slow the tests down (test_server_restart covers it).
        "KernelHibernator": {"criu_path": criu_path, "hibernate_on_stop": False}
        | hibernator_config,
    }


@pytest.fixture
def started_extensions(jp_serverapp: Any, jp_asyncio_loop: Any) -> Any:
    """The test server with its extensions started, as a real server's event loop does:
    kernelhib's idle watcher runs."""
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    return jp_serverapp


@pytest.fixture
def open_channel(jp_ws_fetch: Any):
    """Open a kernel websocket: ``await open_channel(kernel_id)``."""
    opened: list[Any] = []

    async def _open(kernel_id: str) -> KernelChannel:
        ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        opened.append(ws)
        return KernelChannel(ws)

    yield _open
    for ws in opened:
        ws.close()


@pytest.fixture
def api(jp_fetch: Any):
    """JSON REST calls: ``await api("POST", "kernels", kid, "hibernate", body={...})``."""

    async def _call(method: str, *parts: str, body: Any = None, expect: int = 200) -> Any:
        kwargs: dict[str, Any] = {"method": method, "raise_error": False}
        if method == "POST":
            kwargs["body"] = json.dumps(body) if body is not None else ""
        response = await jp_fetch("api", *parts, **kwargs)
        text = response.body.decode() if response.body else ""
        answer = json.loads(text) if text else None
        return expect_status(f"{method} {parts}", response.code, answer, expect)

    return _call


@pytest.fixture
def start_kernel(api: Any, open_channel: Any, jp_serverapp: Any):
    """Start a python3 kernel and open a channel: ``kernel_id, channel = await start_kernel()``.

    The server's teardown shuts the kernels down.
    """
    return functools.partial(start_kernel_with, api, open_channel)


def image_path(serverapp: Any, kernel_id: str) -> Path:
    """Where the in-process test server keeps a kernel's image."""
    return Path(serverapp.kernel_manager.hibernator.image_dir) / kernel_id


def page_chunk(image: Path, index: int = 0) -> Path:
    """The ``index``-th stored chunk of a chunked (format 2) image's largest page file."""
    manifest = json.loads((image / "manifest.json").read_text())
    pages = [e for n, e in manifest["files"].items() if n.startswith("pages-") and "chunks" in e]
    refs = max(pages, key=lambda e: e["size"])["chunks"]
    digest = [d for d, _ in refs if d != "zero"][index]
    return image.parent / ".chunks" / digest[:2] / digest[2:]


def alter_chunk(chunk: Path) -> bytes:
    """Flip one bit of a chunk's data, stored raw (a well-formed chunk that only its hash
    can tell from the original); return the chunk file as it was."""
    original = chunk.read_bytes()
    data = original[1:]
    if original[0] == 1:  # zstd
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    chunk.write_bytes(b"\0" + data[:100] + bytes([data[100] ^ 1]) + data[101:])
    return original


@pytest.fixture
def launch_server(criu_path: str, tmp_path: Path):
    """Start ``jupyter server`` processes sharing one Jupyter home: ``await launch_server(*args)``.

    Each one is up when returned. Servers still running at the end are
    discarded with their kernels.
    """
    servers: list[ServerProcess] = []

    async def _launch(*args: str) -> ServerProcess:
        log = tmp_path / f"server-{len(servers) + 1}.log"
        servers.append(await launch(tmp_path / "jupyter", *args, log=log, criu_path=criu_path))
        return servers[-1]

    yield _launch
    for server in servers:
        server.discard()
