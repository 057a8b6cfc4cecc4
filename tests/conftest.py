"""A real jupyter_server on loopback with kernelhib, real kernels, real CRIU.

CRIU tests skip where CRIU cannot run, unless KERNELHIB_REQUIRE_CRIU=1 (set by
CI), under which a missing or broken CRIU fails them instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from kernelhib.engines.criu import CriuEngine

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


class KernelChannel:
    """A kernel websocket spoken as JupyterLab speaks it (JSON messages)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.session = Session()
        self.received: list[dict[str, Any]] = []

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg = self.session.msg(msg_type, content)
        msg["channel"] = channel
        self.ws.write_message(json.dumps(msg, default=json_default))
        return msg["header"]["msg_id"]

    async def next(self, timeout: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("the kernel websocket closed")
        msg = json.loads(raw)
        self.received.append(msg)
        return msg

    async def reply_and_output(
        self, msg_id: str, timeout: float = 60
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The shell reply to ``msg_id`` and its IOPub messages up to status idle."""
        reply, output, idle = None, [], False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while reply is None or not idle:
            msg = await self.next(deadline - loop.time())
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                reply = msg
            elif msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
            else:
                output.append(msg)
        return reply, output

    async def next_reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        """The shell reply to ``msg_id``, skipping everything else."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.next(deadline - loop.time())
            if msg["channel"] == "shell" and msg["parent_header"].get("msg_id") == msg_id:
                return msg

    async def execute(self, code: str, timeout: float = 60) -> dict[str, Any]:
        """Run ``code``; return the reply content plus its ``stdout`` and ``result`` text."""
        msg_id = self.send("execute_request", {"code": code, "silent": False})
        reply, output = await self.reply_and_output(msg_id, timeout)
        return summarize(reply, output)


def summarize(reply: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, Any]:
    content = dict(reply["content"])
    content["stdout"] = "".join(m["content"]["text"] for m in output if m["msg_type"] == "stream")
    results = [
        m["content"]["data"]["text/plain"] for m in output if m["msg_type"] == "execute_result"
    ]
    content["result"] = results[-1] if results else None
    return content


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
        assert response.code == expect, f"{method} {parts}: {response.code} {text}"
        return json.loads(text) if text else None

    return _call


@pytest.fixture
def start_kernel(api: Any, open_channel: Any, jp_serverapp: Any):
    """Start a python3 kernel and open a channel: ``kernel_id, channel = await start_kernel()``.

    The server's teardown shuts the kernels down.
    """

    async def _start() -> tuple[str, KernelChannel]:
        model = await api("POST", "kernels", body={"name": "python3", "path": ""}, expect=201)
        channel = await open_channel(model["id"])
        assert (await channel.execute("pass"))["status"] == "ok"
        return model["id"], channel

    return _start


async def wait_for_state(api: Any, kernel_id: str, state: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await api("GET", "kernels", kernel_id))["execution_state"] != state:
        assert loop.time() < deadline, f"kernel {kernel_id} never became {state}"
        await asyncio.sleep(0.05)


class ServerProcess:
    """A real ``jupyter server`` in its own process on loopback, as an admin runs it.

    Stopping it with a signal runs the server's own shutdown, which an
    in-process test server never does the same way.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        cwd: Path,
        runner: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.token = os.urandom(8).hex()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        self.env = env
        self.image_dir = Path(env["JUPYTER_DATA_DIR"]) / "kernelhib" / "images"
        self.channels: list[KernelChannel] = []
        command = [
            *runner, sys.executable, "-m", "jupyter_server",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.open_browser=False", "--allow-root", f"--ServerApp.root_dir={cwd}",
            *args,
        ]  # fmt: skip
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_until_up(self, timeout: float = 120) -> None:
        """Return once kernelhib has started in the server: hibernated kernels are adopted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while "kernelhib started" not in self.log_text():
            assert self.process.poll() is None, f"the server exited:\n{self.log_text()}"
            assert loop.time() < deadline, f"kernelhib not started after {timeout} s"
            await asyncio.sleep(0.2)

    def sync_api(self, method: str, path: str) -> Any:
        """A blocking REST call, for setup and teardown outside the event loop."""
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    async def request(self, method: str, *parts: str, body: Any = None) -> tuple[int, Any]:
        """A JSON REST call: its status and its decoded answer, whatever the status."""
        request = HTTPRequest(
            self.url + "api/" + "/".join(parts),
            method=method,
            headers={"Authorization": f"token {self.token}"},
            body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
            request_timeout=300,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        text = response.body.decode() if response.body else ""
        return response.code, json.loads(text) if text else None

    async def api(self, method: str, *parts: str, body: Any = None, expect: int = 200) -> Any:
        """A JSON REST call, like the ``api`` fixture's."""
        status, answer = await self.request(method, *parts, body=body)
        assert status == expect, f"{method} {parts}: {status} {answer}"
        return answer

    async def open_channel(self, kernel_id: str) -> KernelChannel:
        ws = await websocket_connect(
            HTTPRequest(
                f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels",
                headers={"Authorization": f"token {self.token}"},
            )
        )
        channel = KernelChannel(ws)
        self.channels.append(channel)
        return channel

    async def stop(self, timeout: float = 300) -> int:
        """SIGTERM, as systemd or JupyterHub stop a server; return its exit status."""
        for channel in self.channels:
            channel.ws.close()
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def discard(self) -> None:
        """Shut its kernels down, hibernated or not, then stop it: nothing is left behind."""
        if self.process.poll() is not None:
            return
        try:
            for kernel in self.sync_api("GET", "api/kernels"):
                self.sync_api("DELETE", f"api/kernels/{kernel['id']}")
        finally:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(300)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch_server(criu_path: str, tmp_path: Path):
    """Start ``jupyter server`` processes sharing one Jupyter home: ``await launch_server(*args)``.

    Each one is up when returned. Servers still running at the end are
    discarded with their kernels.
    """
    home = tmp_path / "jupyter"
    env = {
        **os.environ,
        "HOME": str(home / "home"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }
    root = home / "notebooks"
    root.mkdir(parents=True)
    servers: list[ServerProcess] = []

    async def _launch(*args: str) -> ServerProcess:
        log = tmp_path / f"server-{len(servers) + 1}.log"
        server = ServerProcess([f"--KernelHibernator.criu_path={criu_path}", *args], env, log, root)
        servers.append(server)
        await server.wait_until_up()
        return server

    yield _launch
    for server in servers:
        server.discard()
