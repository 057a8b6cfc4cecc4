"""The ``kernelhib`` command line, run as a user would run it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernelhib import provisioner
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
    row = doctor.stdout.splitlines()[4].split()
    assert row[:2] == ["criu", "works"]
    assert "criu check passed" in doctor.stdout
    assert "RPC driver" in doctor.stdout


def doctor_json(*args: str, env: dict[str, str]) -> dict[str, Any]:
    """``kernelhib doctor --json``'s answer, in a child process with ``env``."""
    doctor = kernelhib("doctor", "--json", *args, env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    return json.loads(doctor.stdout)


def jupyter_dirs(tmp_path: Path) -> dict[str, str]:
    """An environment with its own, empty, Jupyter config and runtime directories."""
    env = {"JUPYTER_CONFIG_DIR": tmp_path / "config", "JUPYTER_RUNTIME_DIR": tmp_path / "runtime"}
    for directory in env.values():
        directory.mkdir()
    return {name: str(directory) for name, directory in env.items()}


def test_doctor_without_criu_says_why_and_that_dill_still_works(tmp_path):
    missing = str(tmp_path / "criu")
    answer = doctor_json("--criu-path", missing, env=jupyter_dirs(tmp_path))
    assert answer["criu_path"] == {"value": missing, "source": "--criu-path", "problems": []}
    assert answer["criu"] is None
    engines = {engine["name"]: engine for engine in answer["engines"]}
    assert {name: engine["ok"] for name, engine in engines.items()} == {"criu": False, "dill": True}
    assert "does not exist" in engines["criu"]["detail"] or "root" in engines["criu"]["detail"]


def test_doctor_checks_the_criu_path_of_the_servers_config_file(criu_path: str, tmp_path: Path):
    env = jupyter_dirs(tmp_path)
    config = Path(env["JUPYTER_CONFIG_DIR"])
    (link := tmp_path / "criu-link").symlink_to(criu_path)
    (config / "jupyter_server_config.py").write_text(
        f"c = get_config()\nc.KernelHibernator.criu_path = {str(link)!r}\n"
    )
    # The server merges kernelhib's own config file under its own: this one loses.
    (config / "jupyter_kernelhib_config.json").write_text(
        json.dumps({"KernelHibernator": {"criu_path": str(tmp_path / "not-this-one")}})
    )

    answer = doctor_json(env=env)

    source = str(config / "jupyter_server_config.py")
    assert answer["criu_path"] == {"value": str(link), "source": source, "problems": []}
    assert answer["criu"]["path"] == str(link)
    assert answer["engines"][0]["ok"], answer["engines"][0]
    text = kernelhib("doctor", env=env).stdout
    assert text.splitlines()[0] == f"KernelHibernator.criu_path = {str(link)!r}, from {source}."


def test_doctor_names_a_config_file_that_does_not_load_and_the_unset_criu_path(tmp_path: Path):
    env = jupyter_dirs(tmp_path)
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.py").write_text("1/0\n")
    answer = doctor_json(env=env)
    assert answer["criu_path"]["value"] == ""
    assert answer["criu_path"]["source"] is None
    [problem] = answer["criu_path"]["problems"]
    assert problem.startswith(f"{env['JUPYTER_CONFIG_DIR']}/jupyter_server_config.py does not load")
    text = kernelhib("doctor", env=env).stdout.splitlines()
    assert text[0].startswith("KernelHibernator.criu_path is not set")
    assert text[1] == f"Warning: {problem}"


@pytest.mark.criu
async def test_doctor_takes_criu_path_from_the_running_servers_command_line(
    launch_server, criu_path: str, tmp_path: Path
):
    # As JupyterHub's spawner does: criu_path on the command line, which beats the files.
    config = tmp_path / "jupyter" / "config"
    config.mkdir(parents=True)
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"KernelHibernator": {"criu_path": str(tmp_path / "overridden")}})
    )
    server = await launch_server()

    answer = await asyncio.to_thread(doctor_json, env=server.env)

    source = f"the command line of the Jupyter server (pid {server.process.pid})"
    assert answer["criu_path"] == {"value": criu_path, "source": source, "problems": []}
    assert answer["criu"]["path"] == criu_path


def test_doctor_on_a_gpu_host_says_kernels_are_hibernated_with_dill(
    criu_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The NVIDIA driver's control device, stood in for by a file (see test_dill_engine).
    (device := tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(provisioner, "NVIDIA_CONTROL_DEVICE", device)

    assert main(["doctor", "--criu-path", criu_path]) == 0

    words = capsys.readouterr().out.split()  # the table wraps the columns' text
    assert {"NVIDIA", "GPUs,", "dill", "HibernatingProvisioner.pid_namespace"} <= set(words)


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


@pytest.mark.criu
async def test_list_hibernate_and_wake_the_kernels_of_a_running_server(launch_server):
    server = await launch_server()
    kernel = await server.api("POST", "kernels", body={"name": "python3"}, expect=201)
    kernel_id = kernel["id"]
    channel = await server.open_channel(kernel_id)
    assert (await channel.execute("x = 41"))["status"] == "ok"
    # No --url: the command finds the running server and its token, as a user's would.
    env = {"JUPYTER_RUNTIME_DIR": server.env["JUPYTER_RUNTIME_DIR"]}

    hibernated = await asyncio.to_thread(kernelhib, "hibernate", kernel_id, env=env)
    assert hibernated.returncode == 0, hibernated.stderr
    assert hibernated.stdout.startswith(f"Hibernated kernel {kernel_id} with criu in ")
    assert "memory freed" in hibernated.stdout

    listed = await asyncio.to_thread(kernelhib, "list", env=env)
    assert listed.stdout.splitlines()[0].split() == ["ID", "NAME", "STATE", "IMAGE", "FREED"]
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(kernel_id))
    assert row[1:3] == ["python3", "hibernated"]

    again = await asyncio.to_thread(kernelhib, "hibernate", kernel_id, env=env)
    assert again.returncode == 1
    assert f"HTTP 409: kernel {kernel_id} is hibernated" in again.stderr
    assert "Traceback" not in again.stderr

    woken = await asyncio.to_thread(kernelhib, "wake", kernel_id, env=env)
    assert woken.returncode == 0, woken.stderr
    assert woken.stdout == f"Woke kernel {kernel_id}; it is idle\n"
    assert (await channel.execute("x + 1"))["result"] == "42"

    unknown = await asyncio.to_thread(
        kernelhib, "wake", "00000000-0000-0000-0000-000000000000", env=env
    )
    assert unknown.returncode == 1
    assert "HTTP 404" in unknown.stderr


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
