"""The ``kernelhib`` command line, run as a user would run it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernelhib import provisioner, server_client
from kernelhib.cli import human_bytes, main
from kernelhib.testing import free_port

from .conftest import TRACE_A_CHILD, ServerProcess, wait_for_state
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


def test_doctor_reports_the_servers_lazy_wake_setting(criu_path: str, tmp_path: Path):
    env = jupyter_dirs(tmp_path)

    def criu_detail() -> str:
        engines = doctor_json("--criu-path", criu_path, env=env)["engines"]
        return next(engine["detail"] for engine in engines if engine["name"] == "criu")

    by_default = criu_detail()
    assert "wake lazily" in by_default or "woken in full" in by_default
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.json").write_text(
        json.dumps({"KernelHibernator": {"lazy_wake": False}})
    )
    assert "lazy wake off (KernelHibernator.lazy_wake)" in criu_detail()


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


def kernelhib_json(*args: str, env: dict[str, str], status: int = 0) -> Any:
    """``kernelhib ... --json``'s answer; it exits with ``status`` and says nothing on stderr."""
    done = kernelhib(*args, "--json", env=env)
    assert (done.returncode, done.stderr) == (status, ""), done.stderr
    return json.loads(done.stdout)


def runtime_of(server: ServerProcess) -> dict[str, str]:
    """The environment of a user of ``server``'s machine: the command finds it and its token."""
    return {"JUPYTER_RUNTIME_DIR": server.env["JUPYTER_RUNTIME_DIR"]}


async def start_idle(server: ServerProcess) -> str:
    """A kernel that has run a cell: idle (until then the server sees it "starting")."""
    kernel_id = (await server.api("POST", "kernels", body={"name": "python3"}, expect=201))["id"]
    channel = await server.open_channel(kernel_id)
    assert (await channel.execute("import time"))["status"] == "ok"
    return kernel_id


async def run_a_long_cell(server: ServerProcess, kernel_id: str) -> None:
    """Make a kernel busy for ten minutes: longer than any test, however slow the machine
    (a minute ran out under load before a frozen cell was checked still busy)."""
    channel = await server.open_channel(kernel_id)
    channel.send("execute_request", {"code": "import time; time.sleep(600)"})
    await wait_for_state(server.api, kernel_id, "busy")


@pytest.mark.criu
async def test_list_hibernate_and_wake_the_kernels_of_a_running_server(launch_server):
    server = await launch_server()
    session = await server.api(
        "POST",
        "sessions",
        body={"path": "work/analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        expect=201,
    )
    kernel_id = session["kernel"]["id"]
    channel = await server.open_channel(kernel_id)
    assert (await channel.execute("x = 41"))["status"] == "ok"
    # No --url: the command finds the running server and its token, as a user's would.
    env = runtime_of(server)

    listed = await asyncio.to_thread(kernelhib, "list", env=env)
    assert listed.stdout.splitlines()[0].split() == [
        "ID", "NAME", "STATE", "MEMORY", "IMAGE", "NOTEBOOK"
    ]  # fmt: skip
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(kernel_id))
    assert [row[1], row[2], row[-1]] == ["python3", "idle", "work/analysis.ipynb"]
    assert row[4] in ("MiB", "GiB")  # its memory

    hibernated = await asyncio.to_thread(kernelhib, "hibernate", kernel_id, env=env)
    assert (hibernated.returncode, hibernated.stderr) == (0, "")
    assert hibernated.stdout.startswith(f"Hibernated kernel {kernel_id} with criu in ")
    assert "memory freed" in hibernated.stdout

    listed = await asyncio.to_thread(kernelhib, "list", env=env)
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(kernel_id))
    assert row[1:3] == ["python3", "hibernated"]
    assert row[-1] == "work/analysis.ipynb"
    [kernel] = await asyncio.to_thread(kernelhib_json, "list", env=env)
    assert {key: kernel[key] for key in ("id", "name", "state", "paths", "engine", "error")} == {
        "id": kernel_id,
        "name": "python3",
        "state": "hibernated",
        "paths": ["work/analysis.ipynb"],
        "engine": "criu",
        "error": None,
    }
    assert kernel["image_bytes"] > 0
    assert kernel["memory_bytes"] == kernel["hibernation"]["freed_bytes"] > 0

    # Hibernating a hibernated kernel has nothing to do, as waking a running one.
    again = await asyncio.to_thread(kernelhib, "hibernate", kernel_id, env=env)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout == f"Kernel {kernel_id} was hibernated already\n"

    woken = await asyncio.to_thread(kernelhib, "wake", kernel_id, env=env)
    assert (woken.returncode, woken.stderr) == (0, "")
    assert woken.stdout == f"Woke kernel {kernel_id}; it is idle\n"
    assert (await channel.execute("x + 1"))["result"] == "42"

    unknown = await asyncio.to_thread(
        kernelhib, "wake", "00000000-0000-0000-0000-000000000000", env=env
    )
    assert unknown.returncode == 1
    assert "HTTP 404" in unknown.stderr
    assert "Traceback" not in unknown.stderr


async def test_wake_lists_what_dill_lost_and_recompute_runs_the_cells_that_make_it(
    launch_server,
):
    server = await launch_server()
    kernel_id = await start_idle(server)
    channel = await server.open_channel(kernel_id)
    made = await channel.execute("import threading\nlock = threading.Lock()")
    cell = made["execution_count"]
    env = runtime_of(server)
    await asyncio.to_thread(kernelhib, "hibernate", "--engine", "dill", kernel_id, env=env)

    woken = await asyncio.to_thread(kernelhib, "wake", kernel_id, env=env)

    assert (woken.returncode, woken.stderr) == (0, "")
    lines = woken.stdout.splitlines()
    assert re.fullmatch(rf"  lost lock: cells \[{cell}\] \(last run [-0-9]+ [:0-9]+\)", lines[1])
    assert lines[2] == f"  Run `kernelhib recompute {kernel_id}` to run cells [{cell}]."
    listed = await asyncio.to_thread(kernelhib, "recompute", "--dry-run", kernel_id, env=env)
    assert listed.stdout.splitlines()[1:] == lines[1:]

    done = await asyncio.to_thread(kernelhib, "recompute", kernel_id, env=env)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"Recomputed in kernel {kernel_id}: lock\n"
    assert (await channel.execute("type(lock).__name__"))["result"] == "'lock'"
    again = await asyncio.to_thread(kernelhib, "recompute", kernel_id, env=env)
    assert (again.returncode, again.stdout) == (0, f"Kernel {kernel_id}: nothing to recompute\n")


@pytest.mark.criu
async def test_a_failed_hibernation_is_listed_running_with_its_error(launch_server):
    """A kernel CRIU cannot dump has a ``hibernation`` object, but it runs on."""
    server = await launch_server()
    kernel_id = (await server.api("POST", "kernels", body={"name": "python3"}, expect=201))["id"]
    channel = await server.open_channel(kernel_id)
    assert (await channel.execute(TRACE_A_CHILD + "value = 'alive'"))["status"] == "ok"
    env = runtime_of(server)

    failed = await asyncio.to_thread(kernelhib, "hibernate", "--engine", "criu", kernel_id, env=env)
    assert failed.returncode == 1
    assert "hibernation failed, the kernel runs on" in failed.stderr
    assert "--force" not in failed.stderr

    listed = (await asyncio.to_thread(kernelhib, "list", env=env)).stdout.splitlines()
    row = next(line.split() for line in listed if line.startswith(kernel_id))
    assert row[2] == "idle"
    footnote = next(
        index
        for index, line in enumerate(listed)
        if line.startswith(f"Kernel {kernel_id}: hibernation failed, the kernel runs on: ")
    )
    assert listed[footnote + 1].startswith("  ")  # the rest of CRIU's error, indented
    [kernel] = await asyncio.to_thread(kernelhib_json, "list", env=env)
    assert kernel["state"] == "idle"
    assert "criu dump failed" in kernel["error"]
    assert kernel["image_bytes"] is None


@pytest.mark.criu
async def test_busy_kernels_exit_3_with_a_force_hint_and_all_idle_hibernates_only_idle_ones(
    launch_server,
):
    server = await launch_server()
    idle, hibernated, busy = [await start_idle(server) for _ in range(3)]
    await server.api("POST", "kernels", hibernated, "hibernate")
    await run_a_long_cell(server, busy)
    env = runtime_of(server)

    refused = await asyncio.to_thread(kernelhib, "hibernate", busy, env=env)
    assert refused.returncode == 3
    assert f"`kernelhib hibernate --force {busy}`" in refused.stderr
    [answer] = await asyncio.to_thread(kernelhib_json, "hibernate", busy, env=env, status=3)
    assert {key: answer[key] for key in ("id", "ok", "reason", "kernel")} == {
        "id": busy,
        "ok": False,
        "reason": "busy",
        "kernel": None,
    }

    all_idle = await asyncio.to_thread(kernelhib, "hibernate", "--all-idle", env=env)
    assert (all_idle.returncode, all_idle.stderr) == (0, "")
    assert all_idle.stdout.startswith(f"Hibernated kernel {idle} with ")
    assert len(all_idle.stdout.splitlines()) == 1
    assert (await server.api("GET", "kernels", busy))["execution_state"] == "busy"
    nothing = await asyncio.to_thread(kernelhib, "hibernate", "--all-idle", env=env)
    assert nothing.stdout == "No kernel is idle: nothing to hibernate.\n"

    forced = await asyncio.to_thread(kernelhib_json, "hibernate", "--force", busy, env=env)
    assert [(kernel["id"], kernel["state"]) for kernel in forced] == [(busy, "hibernated")]

    woken = await asyncio.to_thread(kernelhib_json, "wake", idle, busy, hibernated, env=env)
    # The frozen cell runs on.
    assert [(k["id"], k["ok"], k["state"]) for k in woken] == [
        (idle, True, "idle"),
        (busy, True, "busy"),
        (hibernated, True, "idle"),
    ]

    usage = await asyncio.to_thread(kernelhib, "hibernate", "--all-idle", idle, env=env)
    assert usage.returncode == 2
    assert "not both" in usage.stderr


# Hibernations and wakes wait at a step while the file HOLD names exists, as if the kernel had
# many GiB: the test sees them in flight for as long as it needs.
HOLD_CONFIG = """\
import os
import time
from kernelhib.image_store import ImageStore

HOLD = {hold!r}

def held(method):
    def wait_then_call(*args, **kwargs):
        deadline = time.monotonic() + 120
        while os.path.exists(HOLD) and time.monotonic() < deadline:
            time.sleep(0.05)
        return method(*args, **kwargs)
    return wait_then_call

ImageStore.commit = held(ImageStore.commit)
ImageStore.read = held(ImageStore.read)
"""


@contextlib.asynccontextmanager
async def held(hold: Path) -> AsyncIterator[None]:
    """Hold the operations started within, and release them at the end, a second later at least.

    The second lets the command on the terminal draw a line with the state it asked for.
    """
    hold.touch()
    try:
        yield
        await asyncio.sleep(1)
    finally:
        hold.unlink()


def on_a_terminal(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``kernelhib`` with its stderr on a terminal: the process, and what the terminal got."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "kernelhib.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the command has closed the terminal
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, ""), shown.decode()


@pytest.mark.criu
async def test_progress_on_a_terminal_and_true_states_during_long_operations(
    launch_server, tmp_path: Path
):
    config = tmp_path / "jupyter" / "config"
    config.mkdir(parents=True)
    hold = tmp_path / "hold"
    (config / "jupyter_server_config.py").write_text(HOLD_CONFIG.format(hold=str(hold)))
    server = await launch_server()
    first, second = [await start_idle(server) for _ in range(2)]
    env = runtime_of(server)

    async with held(hold):
        hibernating = asyncio.create_task(
            asyncio.to_thread(on_a_terminal, "hibernate", first, env=env)
        )
        await wait_for_hibernation_state(server, first, "hibernating")
        listed = await asyncio.to_thread(kernelhib_json, "list", env=env)
        assert [(kernel["id"], kernel["state"]) for kernel in listed] == [
            (first, "hibernating"),
            (second, "idle"),
        ]
        # Another operation is in flight: try again later.
        in_flight = await asyncio.to_thread(kernelhib, "hibernate", first, env=env)
        assert in_flight.returncode == 4
        assert "--force" not in in_flight.stderr
    done, shown = await hibernating
    assert done.returncode == 0
    assert done.stdout.startswith(f"Hibernated kernel {first} with ")
    frames = shown.split("\r")
    # A spinner, the seconds so far and the kernel's state, asked of the server meanwhile.
    assert any(
        re.match(rf"[|/\\-] hibernating kernel {first}: \d+\.\d s, hibernating", frame)
        for frame in frames
    ), shown
    assert shown.endswith("\r\x1b[K")  # the line is cleared once done

    async with held(hold):
        waking = asyncio.create_task(asyncio.to_thread(on_a_terminal, "wake", first, env=env))
        await wait_for_hibernation_state(server, first, "waking")
        listed = await asyncio.to_thread(kernelhib_json, "list", env=env)
        assert {kernel["id"]: kernel["state"] for kernel in listed}[first] == "waking"
    done, shown = await waking
    assert done.stdout == f"Woke kernel {first}; it is idle\n"
    assert re.search(rf"waking kernel {first}: \d+\.\d s, waking", shown), shown

    # --all-idle lists both idle, in this order; the second is busy by its turn: skipped.
    async with held(hold):
        all_idle = asyncio.create_task(
            asyncio.to_thread(on_a_terminal, "hibernate", "--all-idle", "--json", env=env)
        )
        await wait_for_hibernation_state(server, first, "hibernating")
        await run_a_long_cell(server, second)
    done, shown = await all_idle
    assert (done.returncode, shown) == (0, "")  # --json: no progress
    outcomes = {outcome["id"]: outcome for outcome in json.loads(done.stdout)}
    assert outcomes[first]["state"] == "hibernated"
    assert (outcomes[second]["reason"], outcomes[second]["skipped"]) == ("busy", True)


async def wait_for_hibernation_state(server: ServerProcess, kernel_id: str, state: str) -> None:
    for _ in range(200):
        kernel = await server.api("GET", "kernels", kernel_id)
        if (kernel.get("hibernation") or {}).get("state") == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"kernel {kernel_id} never became {state}")


@pytest.mark.criu
async def test_in_a_jupyterhub_server_it_finds_that_server_from_the_environment(
    launch_server, tmp_path: Path
):
    server = await launch_server("--ServerApp.base_url=/user/ada/")
    server.url += "user/ada/"
    kernel_id = (await server.api("POST", "kernels", body={"name": "python3"}, expect=201))["id"]
    # As JupyterHub sets it for a server it told to listen on every interface.
    hub = {
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:{server.port}/user/ada/",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/ada/",
        "JUPYTERHUB_API_TOKEN": server.token,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "no-runtime-files"),
    }
    listed = await asyncio.to_thread(kernelhib_json, "list", env=hub)
    assert [kernel["id"] for kernel in listed] == [kernel_id]


@pytest.mark.parametrize(
    ("service_url", "url"),
    [
        ("http://127.0.0.1:41917/user/ada/", "http://127.0.0.1:41917/user/ada/"),
        ("http://:8888/user/ada/", "http://127.0.0.1:8888/user/ada/"),
        ("http://0.0.0.0:8888/user/ada/", "http://127.0.0.1:8888/user/ada/"),
        ("http://[::]:8888/user/ada/", "http://[::1]:8888/user/ada/"),
        ("https://10.0.0.7:8888/user/ada/", "https://10.0.0.7:8888/user/ada/"),
    ],
)
def test_the_jupyterhub_service_url_is_reached_on_this_machine(service_url: str, url: str):
    environ = {"JUPYTERHUB_SERVICE_URL": service_url, "JUPYTERHUB_API_TOKEN": "hub-token"}
    assert server_client.find_server(environ=environ) == server_client.Server(url, "hub-token")
    assert server_client.find_server(token="mine", environ=environ).token == "mine"
    explicit = server_client.find_server("http://127.0.0.1:1/", environ=environ)
    assert explicit.url == "http://127.0.0.1:1/"


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
