"""A real jupyter_server on loopback with kernelhib, real kernels, real CRIU.

CRIU tests skip where CRIU cannot run, unless KERNELHIB_REQUIRE_CRIU=1 (set by
CI), under which a missing or broken CRIU fails them instead.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from kernelhib.engines.criu import CriuEngine

pytest_plugins = ["pytest_jupyter.jupyter_server"]

REQUIRE_CRIU = os.environ.get("KERNELHIB_REQUIRE_CRIU") == "1"


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
        "ServerApp": {"jpserver_extensions": {"kernelhib": True}},
        "KernelHibernator": {"criu_path": criu_path, **hibernator_config},
        **server_config,
    }


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
