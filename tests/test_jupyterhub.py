"""A real JupyterHub: the idle culler stops a server, the user comes back, the kernel wakes intact.

The hub runs jupyter_config/jupyterhub/jupyterhub_config.py (the configuration
docs/jupyterhub.md documents) through a small overlay that changes only what a
test must: loopback ports, a temporary home, a dummy authenticator, an admin
token for the test, the test's CRIU, and short timings. configurable-http-proxy
is the one of tests/hub/package-lock.json (installed with npm if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from .conftest import REQUIRE_CRIU, KernelChannel

pytestmark = [pytest.mark.criu, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "jupyter_config" / "jupyterhub" / "jupyterhub_config.py"
HUB_NODE_DIR = REPO / "tests" / "hub"
PROXY = HUB_NODE_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
USER = "ada"

# Kernels hibernate after 3 s idle; servers are culled after 15 s idle. The
# server reports its activity to the hub every 2 s instead of every 5 minutes,
# so that the culler sees the test's last cell, not just the server's start.
KERNEL_IDLE = 3
SERVER_IDLE = 15
CULL_EVERY = 2


def _missing(message: str) -> None:
    if REQUIRE_CRIU:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def proxy_command() -> str:
    """configurable-http-proxy from tests/hub/package-lock.json (npm ci if not yet there)."""
    for module in ("jupyterhub", "jupyterhub_idle_culler"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed: pip install -e '.[test]'")
    if not PROXY.exists():
        npm = shutil.which("npm")
        if npm is None:
            _missing("configurable-http-proxy is missing and there is no npm to install it")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(HUB_NODE_DIR)],
            check=True,
            timeout=300,
        )
    return str(PROXY)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OVERLAY = '''\
"""tests/test_jupyterhub.py: the example configuration, for a test on loopback."""
import re

c = get_config()  # noqa: F821
load_subconfig({example!r})  # noqa: F821


def set_option(args, option, value):
    """Replace ``option``'s value in a command line, where the example sets it."""
    pattern = re.compile(re.escape(option) + "=")
    assert any(pattern.match(a) for a in args), f"{{option}} not in {{args}}"
    return [f"{{option}}={{value}}" if pattern.match(a) else a for a in args]


args = c.Spawner.args
args = set_option(args, "--KernelHibernator.idle_timeout", {kernel_idle})
args = set_option(args, "--KernelHibernator.check_interval", 1)
args = set_option(args, "--KernelHibernator.criu_path", {criu_path!r})
c.Spawner.args = args
c.Spawner.environment["JUPYTERHUB_ACTIVITY_INTERVAL"] = "2"
c.SimpleLocalProcessSpawner.home_dir_template = {home!r} + "/{{username}}"

(culler,) = [s for s in c.JupyterHub.services if s["name"] == "idle-culler"]
command = set_option(culler["command"], "--timeout", {server_idle})
culler["command"] = set_option(command, "--cull-every", {cull_every})

c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{workdir}/jupyterhub.pid"
c.JupyterHub.log_level = "DEBUG"  # the spawner logs its signals at debug level

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{{user!r}}}

c.JupyterHub.services.append({{"name": "test-admin", "api_token": {admin_token!r}}})
c.JupyterHub.load_roles.append(
    {{
        "name": "test-admin",
        "scopes": ["admin:users", "admin:servers", "tokens", "read:users"],
        "services": ["test-admin"],
    }}
)
'''


class Hub:
    """A JupyterHub subprocess, its REST API, and its user's server through the proxy."""

    def __init__(self, workdir: Path, criu_path: str, proxy: str) -> None:
        self.workdir = workdir
        self.home = workdir / "home"
        # In the environment of the user's server and of its kernels, and of no other process.
        self.user_env = f"HOME={self.home / USER}"
        self.log_path = workdir / "jupyterhub.log"
        self.admin_token = secrets.token_hex(16)
        self.user_token = ""
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = workdir / "jupyterhub_config.py"
        config.write_text(
            OVERLAY.format(
                example=str(EXAMPLE_CONFIG),
                kernel_idle=KERNEL_IDLE,
                server_idle=SERVER_IDLE,
                cull_every=CULL_EVERY,
                criu_path=criu_path,
                home=str(self.home),
                port=port,
                hub_port=_free_port(),
                proxy_api_port=_free_port(),
                proxy=proxy,
                workdir=str(workdir),
                user=USER,
                admin_token=self.admin_token,
            )
        )
        env = dict(os.environ)
        env.pop("JUPYTERHUB_API_TOKEN", None)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def client(self) -> AsyncHTTPClient:
        return AsyncHTTPClient()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        headers = {"Authorization": f"token {token or self.admin_token}"}
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers=headers,
            body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
            request_timeout=60,
            follow_redirects=False,
        )
        response = await self.client.fetch(request, raise_error=False)
        text = response.body.decode(errors="replace") if response.body else ""
        assert response.code in expect, f"{method} {path}: {response.code} {text[:2000]}"
        return json.loads(text) if text else None

    async def hub_api(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self.request(method, "/hub/api" + path, **kwargs)

    async def user_api(self, method: str, path: str, **kwargs: Any) -> Any:
        """The user's server, through the proxy, with the user's token."""
        return await self.request(
            method, f"/user/{USER}/api" + path, token=self.user_token, **kwargs
        )

    async def until(self, what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.process.poll() is None, f"the hub exited while waiting for {what}"
            result = await check()
            if result:
                return result
            assert loop.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            await asyncio.sleep(every)

    async def started(self) -> None:
        async def up() -> bool:
            try:
                response = await self.client.fetch(self.url + "/hub/api/", raise_error=False)
            except OSError:
                return False
            return response.code == 200

        await self.until("the hub to answer", up, timeout=60)

    async def server(self) -> dict[str, Any] | None:
        """The user's default server as the hub sees it, None if it has none."""
        user = await self.hub_api("GET", f"/users/{USER}")
        return user["servers"].get("")

    async def start_server(self) -> None:
        await self.hub_api("POST", f"/users/{USER}/server", expect=(201, 202))

        async def ready() -> bool:
            server = await self.server()
            return bool(server and server["ready"])

        await self.until("the user's server to be ready", ready, timeout=90)

    async def channel(self, kernel_id: str) -> KernelChannel:
        ws_url = self.url.replace("http", "ws", 1)
        request = HTTPRequest(
            f"{ws_url}/user/{USER}/api/kernels/{kernel_id}/channels",
            headers={"Authorization": f"token {self.user_token}"},
            request_timeout=60,
        )
        return KernelChannel(await websocket_connect(request))

    def stop(self) -> None:
        if self.process.poll() is None:
            # Like an admin's Ctrl-C: the hub stops the user servers, then the proxy.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def processes_with_env(entry: str) -> list[int]:
    """Pids of the processes whose environment holds ``entry`` (``NAME=value``)."""
    pids, wanted = [], entry.encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes() + b"\0"
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (b"\0" + wanted in b"\0" + environ):
            pids.append(int(proc.name))
    return pids


def singleuser_pids(hub: Hub) -> list[int]:
    """The test user's jupyterhub-singleuser processes, of this test's hub."""
    pids = []
    for pid in processes_with_env(hub.user_env):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"jupyterhub-singleuser" in cmdline:
            pids.append(pid)
    return pids


@pytest.fixture
def hub(tmp_path: Path, criu_path: str, proxy_command: str):
    hub = Hub(tmp_path, criu_path, proxy_command)
    try:
        yield hub
    finally:
        hub.stop()
        # Nothing of this test may outlive it: the user's server, its kernels.
        leftovers = processes_with_env(hub.user_env)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The hub's log (and through it the user server's) for a failed test.
        sys.stdout.write(hub.log()[-30000:])
        assert not leftovers, f"processes left by the hub's user server: {leftovers}"


def add_kernelspec_without_idle_hibernation(home: Path) -> str:
    """A user kernelspec whose kernels never hibernate on idle (only when the server stops)."""
    spec_dir = home / USER / ".local" / "share" / "jupyter" / "kernels" / "python3-awake"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (no idle hibernation)",
        "language": "python",
        "metadata": {"kernelhib": {"idle_timeout": 0}},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return spec_dir.name


async def test_kernel_state_survives_the_culler_stopping_the_server(hub: Hub) -> None:
    """Idle kernels hibernate, the culler stops the server, the user comes back: all wake.

    Kernel ``idle`` hibernates on its idle timeout before the culler acts; kernel
    ``awake`` (a kernelspec without idle hibernation) still runs when the culler
    stops the server, and the server's stop hibernates it.
    """
    awake_spec = add_kernelspec_without_idle_hibernation(hub.home)
    await hub.started()
    # allowed_users makes the hub create the user at startup.
    await hub.hub_api("POST", f"/users/{USER}", expect=(201, 409))
    token = await hub.hub_api(
        "POST", f"/users/{USER}/tokens", body={"note": "test", "expires_in": 600}, expect=(201,)
    )
    hub.user_token = token["token"]
    await hub.start_server()
    (server_pid,) = singleuser_pids(hub)

    # Two notebooks with some state each, then the user closes the tab.
    kernels: dict[str, str] = {}
    code = {
        "idle": "state = {'answer': 42, 'squares': [i * i for i in range(5)]}",
        "awake": "state = 'still running when the server stopped'",
    }
    for name, kernel_name in (("idle", "python3"), ("awake", awake_spec)):
        session = await hub.user_api(
            "POST",
            "/sessions",
            body={"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": kernel_name}},
            expect=(201,),
        )
        kernels[name] = session["kernel"]["id"]
        channel = await hub.channel(kernels[name])
        reply = await channel.execute(code[name])
        assert reply["status"] == "ok", reply
        channel.ws.close()

    # The idle kernel hibernates on its own timeout, long before the culler acts.
    async def state(name: str) -> str:
        model = await hub.user_api("GET", f"/kernels/{kernels[name]}?no_track_activity=1")
        return model["execution_state"]

    async def idle_hibernated() -> bool:
        return await state("idle") == "hibernated"

    await hub.until("the idle kernel to hibernate", idle_hibernated, timeout=KERNEL_IDLE + 30)
    assert await state("awake") == "idle"
    assert await hub.server() is not None, "the culler stopped the server before the kernel slept"
    assert not processes_with_env(f"KERNELHIB_KERNEL_ID={kernels['idle']}")
    assert processes_with_env(f"KERNELHIB_KERNEL_ID={kernels['awake']}")

    # The culler stops the idle server; the server hibernates the other kernel and exits.
    async def culled() -> bool:
        return await hub.server() is None

    await hub.until("the culler to stop the server", culled, timeout=SERVER_IDLE + 60)
    log = hub.log()
    assert f"Culling server {USER} (inactive for" in log
    assert f"Interrupting {server_pid}" in log
    assert f"Terminating {server_pid}" not in log, "the server did not exit on SIGINT"
    assert f"Killing {server_pid}" not in log, "the server did not exit on SIGINT"
    assert server_pid not in singleuser_pids(hub)
    images = hub.home / USER / ".local" / "share" / "jupyter" / "kernelhib" / "images"
    for name, kernel_id in kernels.items():
        assert not processes_with_env(f"KERNELHIB_KERNEL_ID={kernel_id}"), f"{name} still runs"
        assert (images / kernel_id).is_dir(), f"no image of kernel {name} in {images}"

    # The user comes back: the hub starts the server, which re-adopts both kernels.
    await hub.start_server()
    models = await hub.user_api("GET", "/kernels")
    assert sorted((k["id"], k["execution_state"]) for k in models) == sorted(
        (kernel_id, "hibernated") for kernel_id in kernels.values()
    )
    sessions = await hub.user_api("GET", "/sessions")
    assert sorted((s["path"], s["kernel"]["id"]) for s in sessions) == sorted(
        (f"{name}.ipynb", kernel_id) for name, kernel_id in kernels.items()
    )

    # The first cell wakes each kernel, with its state.
    expected = {
        "idle": "{'answer': 42, 'squares': [0, 1, 4, 9, 16]}\n",
        "awake": "still running when the server stopped\n",
    }
    for name, kernel_id in kernels.items():
        channel = await hub.channel(kernel_id)
        reply = await channel.execute("print(state)", timeout=90)
        assert reply["status"] == "ok", reply
        assert reply["stdout"] == expected[name]
        # The reply can reach us before the server has seen the kernel's status: idle.
        for _ in range(100):
            if await state(name) == "idle":
                break
            await asyncio.sleep(0.05)
        assert await state(name) == "idle"
        channel.ws.close()
