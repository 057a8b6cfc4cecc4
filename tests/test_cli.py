"""The ``kernelhib`` command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kernelhib.cli import human_bytes, main

from .test_criu_install import require_installable

REPO = Path(__file__).parent.parent
GIB = 1024**3


def kernelhib(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``kernelhib`` command in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "kernelhib.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> dict[str, str]:
    """An environment whose Jupyter data dir, hence private CRIU prefix, is fresh."""
    return {"JUPYTER_DATA_DIR": str(tmp_path_factory.mktemp("jupyter-data"))}


@pytest.mark.criu
def test_install_criu_then_doctor(data_dir):
    require_installable()
    installed = kernelhib("install-criu", env=data_dir)
    assert installed.returncode == 0, installed.stderr
    prefix = Path(data_dir["JUPYTER_DATA_DIR"]) / "kernelhib" / "criu"
    assert installed.stdout.splitlines()[-1].startswith("Installed CRIU 4.")
    assert installed.stdout.splitlines()[-1].endswith(f" at {prefix / 'bin' / 'criu'}.")

    again = kernelhib("install-criu", env=data_dir)
    assert again.returncode == 0
    assert "already installed" in again.stdout

    doctor = kernelhib("doctor", env=data_dir)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    row = doctor.stdout.splitlines()[2].split()
    assert row[:2] == ["criu", "works"]
    assert "criu check passed" in doctor.stdout
    assert "RPC driver" in doctor.stdout


def test_doctor_without_criu_says_why_and_that_dill_still_works(tmp_path):
    doctor = kernelhib("doctor", "--criu-path", str(tmp_path / "criu"))
    assert doctor.returncode == 0, "one engine works: dill"
    rows = {
        line.split()[0]: line.split()[1]
        for line in doctor.stdout.splitlines()[2:]
        if line[:1] != " "
    }
    assert rows == {"criu": "unavailable", "dill": "works"}
    assert "does not exist" in doctor.stdout or "root" in doctor.stdout


def test_install_criu_failure_exits_1(tmp_path):
    failed = kernelhib(
        "install-criu",
        "--prefix",
        str(tmp_path / "criu"),
        env={"PATH": str(Path(sys.executable).parent)},
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith("kernelhib install-criu: ")
    assert "Traceback" not in failed.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hibernate_without_server_exits_1():
    url = f"http://127.0.0.1:{free_port()}/"
    failed = kernelhib("hibernate", "abc", "--url", url, "--token", "t")
    assert failed.returncode == 1
    assert f"cannot reach the Jupyter server at {url}" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_no_running_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    assert main(["list"]) == 1
    assert "no running Jupyter server found" in capsys.readouterr().err


class FakeKernelsApi(BaseHTTPRequestHandler):
    """Answers like jupyter_server with kernelhib's handlers, and records requests."""

    replies: ClassVar[dict[tuple[str, str], tuple[int, Any]]] = {}
    requests: ClassVar[list[tuple[str, str, str | None, Any]]] = []

    def do_GET(self) -> None:
        self.answer(None)

    def do_POST(self) -> None:
        self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def answer(self, body: Any) -> None:
        self.requests.append((self.command, self.path, self.headers["Authorization"], body))
        status, reply = self.replies.get(
            (self.command, self.path), (404, {"message": "no such path", "reason": None})
        )
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def fake_api() -> Iterator[tuple[str, type[FakeKernelsApi]]]:
    FakeKernelsApi.replies = {}
    FakeKernelsApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKernelsApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/lab-base", FakeKernelsApi
    server.shutdown()
    server.server_close()


HIBERNATED = {
    "id": "k2",
    "name": "python3",
    "execution_state": "idle",
    "connections": 0,
    "hibernation": {
        "engine": "criu",
        "image_bytes": int(1.5 * GIB),
        "freed_bytes": 3 * GIB,
        "seconds": 2.25,
    },
}


def test_list_uses_running_server_and_its_token(fake_api, tmp_path, monkeypatch, capsys):
    url, handler = fake_api
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "jpserver-1.json").write_text(
        json.dumps({"url": url, "token": "secret", "pid": os.getpid()})
    )
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    handler.replies[("GET", "/lab-base/api/kernels")] = (
        200,
        [
            {"id": "k1", "name": "python3", "execution_state": "busy", "connections": 1},
            HIBERNATED,
        ],
    )
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "IMAGE", "FREED"]
    assert lines[2].split() == ["k1", "python3", "busy"]
    assert lines[3].split() == ["k2", "python3", "hibernated", "1.5", "GiB", "3.0", "GiB"]
    assert handler.requests == [("GET", "/lab-base/api/kernels", "token secret", None)]


def test_hibernate_prints_result(fake_api, capsys):
    url, handler = fake_api
    handler.replies[("POST", "/lab-base/api/kernels/k2/hibernate")] = (200, HIBERNATED)
    assert (
        main(["hibernate", "k2", "--engine", "criu", "--force", "--url", url, "--token", "t"]) == 0
    )
    assert capsys.readouterr().out == (
        "Hibernated kernel k2 with criu in 2.2 s: image 1.5 GiB, memory freed 3.0 GiB\n"
    )
    assert handler.requests[0][2:] == ("token t", {"engine": "criu", "force": True})


def test_hibernate_busy_kernel_prints_server_message(fake_api, capsys):
    url, handler = fake_api
    handler.replies[("POST", "/lab-base/api/kernels/k1/hibernate")] = (
        409,
        {"message": "Kernel k1 is busy; pass force to hibernate anyway", "reason": None},
    )
    assert main(["hibernate", "k1", "--url", url, "--token", "t"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 409: Kernel k1 is busy; pass force to hibernate anyway" in err
    assert handler.requests[0][3] == {"engine": "auto", "force": False}


def test_wake(fake_api, capsys):
    url, handler = fake_api
    handler.replies[("POST", "/lab-base/api/kernels/k2/wake")] = (
        200,
        {**HIBERNATED, "hibernation": None},
    )
    assert main(["wake", "k2", "--url", url, "--token", "t"]) == 0
    assert capsys.readouterr().out == "Woke kernel k2; it is idle\n"


def test_wake_unknown_kernel(fake_api, capsys):
    url, _ = fake_api
    assert main(["wake", "nope", "--url", url, "--token", "t"]) == 1
    assert "HTTP 404: no such path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (None, "?"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * GIB, "5.0 GiB"),
        (2 * 1024 * GIB, "2.0 TiB"),
    ],
)
def test_human_bytes(count, text):
    assert human_bytes(count) == text
