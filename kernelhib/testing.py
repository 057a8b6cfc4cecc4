"""Drive a real ``jupyter server`` with kernelhib from outside, as a browser and an admin do.

One harness for the tests (tests/conftest.py), the benchmark (benchmarks/hibernate.py)
and the GPU check (scripts/gpu-check.py), so how a server is started and a kernel is
spoken to is written once. It ships in the package, like jupyter_server's pytest
plugin, so the benchmark and the check run from a plain ``pip install`` too. It talks
to kernelhib only over HTTP and the kernel websocket: it sits above every other layer.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from .server_client import HIBERNATE_TIMEOUT_S

# Long enough for a kernel to compute gigabytes of data.
REPLY_TIMEOUT_S = 600.0


class HarnessError(AssertionError):
    """The server or a kernel did not answer as expected; the message says what it said.

    An ``AssertionError``, so a test shows it as the failed check it is.
    """


def expect_status(what: str, status: int, answer: Any, expect: int) -> Any:
    """``answer``, if ``status`` is the one expected."""
    if status != expect:
        raise HarnessError(f"{what}: {status} {answer}")
    return answer


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

    async def execute(
        self, code: str, timeout: float = 60, user_expressions: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Run ``code``; return the reply content plus its ``stdout`` and ``result`` text.

        With ``user_expressions`` the request is silent: no history, no output.
        """
        content: dict[str, Any] = {"code": code, "silent": bool(user_expressions)}
        if user_expressions:
            content.update(store_history=False, user_expressions=user_expressions)
        msg_id = self.send("execute_request", content)
        reply, output = await self.reply_and_output(msg_id, timeout)
        return summarize(reply, output)

    async def run(self, code: str, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Like :meth:`execute`, for code that must succeed: an error in the kernel raises."""
        content = await self.execute(code, timeout)
        if content["status"] != "ok":
            raise HarnessError(
                f"{code[:200]!r} failed in the kernel: {content.get('ename')}: "
                f"{content.get('evalue')}"
            )
        return content

    async def evaluate(self, expression: str, timeout: float = REPLY_TIMEOUT_S) -> Any:
        """The value of a JSON-returning ``expression``, evaluated silently in the kernel."""
        reply = await self.execute("", timeout, user_expressions={"value": expression})
        value = reply["user_expressions"]["value"]
        if value.get("status") != "ok":
            raise HarnessError(f"in the kernel: {value.get('ename')}: {value.get('evalue')}")
        return json.loads(ast.literal_eval(value["data"]["text/plain"]))

    def close(self) -> None:
        self.ws.close()


def summarize(reply: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, Any]:
    """A reply's content plus what the request printed (``stdout``) and its last result's
    text (``result``), as a notebook shows them."""
    content = dict(reply["content"])
    content["stdout"] = "".join(m["content"]["text"] for m in output if m["msg_type"] == "stream")
    results = [
        m["content"]["data"]["text/plain"] for m in output if m["msg_type"] == "execute_result"
    ]
    content["result"] = results[-1] if results else None
    return content


Api = Callable[..., Awaitable[Any]]


async def start_kernel(
    api: Api, open_channel: Callable[[str], Awaitable[KernelChannel]]
) -> tuple[str, KernelChannel]:
    """Start a python3 kernel through ``api`` and open a channel that has had a reply."""
    model = await api("POST", "kernels", body={"name": "python3", "path": ""}, expect=201)
    channel = await open_channel(model["id"])
    await channel.run("pass", timeout=120)
    return model["id"], channel


async def wait_for_state(api: Api, kernel_id: str, state: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await api("GET", "kernels", kernel_id))["execution_state"] != state:
        if loop.time() > deadline:
            raise HarnessError(f"kernel {kernel_id} never became {state}")
        await asyncio.sleep(0.05)


async def wait_until_fetched(api: Api, kernel_id: str, timeout: float = 120) -> dict[str, Any]:
    """The kernel's model once a lazy wake's memory is all back and its image is gone
    (at once after any other wake)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (model := await api("GET", "kernels", kernel_id)).get("hibernation", {}).get("fetching"):
        if loop.time() > deadline:
            raise HarnessError(f"kernel {kernel_id} never got all of its memory back")
        await asyncio.sleep(0.05)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jupyter_env(home: Path) -> dict[str, str]:
    """This process's environment with a Jupyter home of its own under ``home``: no
    user's configuration, runtime files or images are read or touched."""
    return {
        **os.environ,
        "HOME": str(home / "home"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }


class ServerProcess:
    """A real ``jupyter server`` in its own process on loopback, as an admin runs it.

    Stopping it with a signal runs the server's own shutdown, which an
    in-process test server never does the same way. It runs in a session of
    its own: a Ctrl-C meant for the caller must not reach it (the server would
    ask on stdin whether to shut down); :meth:`discard` ends it.
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
        # `python -m` puts its working directory first on sys.path: not the repository
        # root, whose ./kernelhib would win over another copy named by PYTHONPATH.
        command = [
            *runner, sys.executable, "-m", "jupyter_server",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.open_browser=False", "--allow-root", f"--ServerApp.root_dir={cwd}",
            *args,
        ]  # fmt: skip
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_until_up(self, timeout: float = 120) -> None:
        """Return once kernelhib has started in the server: hibernated kernels are adopted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while "kernelhib started" not in self.log_text():
            if self.process.poll() is not None:
                raise HarnessError(f"the server exited:\n{self.log_text()}")
            if loop.time() > deadline:
                raise HarnessError(f"kernelhib not started after {timeout} s:\n{self.log_text()}")
            await asyncio.sleep(0.2)

    def sync_api(self, method: str, path: str) -> Any:
        """A blocking REST call, for setup and teardown outside the event loop."""
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    async def request(
        self, method: str, *parts: str, body: Any = None, timeout: float = 300
    ) -> tuple[int, Any]:
        """A JSON REST call: its status and its decoded answer, whatever the status."""
        request = HTTPRequest(
            self.url + "api/" + "/".join(parts),
            method=method,
            headers={"Authorization": f"token {self.token}"},
            body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
            request_timeout=timeout,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        text = response.body.decode() if response.body else ""
        return response.code, json.loads(text) if text else None

    async def api(
        self, method: str, *parts: str, body: Any = None, expect: int = 200, timeout: float = 300
    ) -> Any:
        """A JSON REST call, like the ``api`` fixture's: the answer, if the status is ``expect``."""
        status, answer = await self.request(method, *parts, body=body, timeout=timeout)
        return expect_status(f"{method} {parts}", status, answer, expect)

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

    async def start_kernel(self) -> tuple[str, KernelChannel]:
        """Start a python3 kernel with a channel open: ``kernel_id, channel``."""
        return await start_kernel(self.api, self.open_channel)

    async def hibernate(self, kernel_id: str, **body: Any) -> dict[str, Any]:
        """Hibernate a kernel (``engine=``, ``force=``); its model."""
        return await self.api(
            "POST", "kernels", kernel_id, "hibernate", body=body, timeout=HIBERNATE_TIMEOUT_S
        )

    async def wake(self, kernel_id: str) -> dict[str, Any]:
        """Wake a hibernated kernel; its model."""
        return await self.api("POST", "kernels", kernel_id, "wake", timeout=HIBERNATE_TIMEOUT_S)

    async def shutdown_kernel(self, kernel_id: str) -> None:
        await self.api("DELETE", "kernels", kernel_id, expect=204)

    async def stop(self, timeout: float = 300) -> int:
        """SIGTERM, as systemd or JupyterHub stop a server; return its exit status."""
        for channel in self.channels:
            channel.close()
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def discard(self, timeout: float = 300) -> None:
        """Shut its kernels down, hibernated or not, then stop it: nothing is left behind.

        A server that does not stop within ``timeout`` is killed, and the timeout raised.
        """
        if self.process.poll() is not None:
            return
        try:
            for kernel in self.sync_api("GET", "api/kernels"):
                self.sync_api("DELETE", f"api/kernels/{kernel['id']}")
        finally:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise


async def launch(
    home: Path, *args: str, log: Path, criu_path: str | None = None, runner: Sequence[str] = ()
) -> ServerProcess:
    """Start a server in the Jupyter home ``home`` (made if new) and wait until it is up.

    Servers launched with the same ``home`` share their images, as restarts of one
    server do. ``criu_path``: the CRIU binary, since the home moves where it is looked for.
    """
    root = home / "notebooks"
    root.mkdir(parents=True, exist_ok=True)
    if criu_path:
        args = (f"--KernelHibernator.criu_path={criu_path}", *args)
    server = ServerProcess(list(args), jupyter_env(home), log, root, runner)
    try:
        await server.wait_until_up()
    except BaseException:
        server.process.kill()  # not up: it has no kernels yet
        server.process.wait()
        raise
    return server
