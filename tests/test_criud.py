"""Two real users on one machine, each with a Jupyter server of their own running as
them, hibernate with CRIU through kernelhib-criud, and neither can touch the other's
kernels or images (docs/security.md, "One machine, many users")."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelhib.engines.criu_service import Refusal, ServiceError, call
from kernelhib.recovery import kernel_processes

from .conftest import ServerProcess
from .test_unprivileged import runner_for

USERS = ("kernelhib-ada", "kernelhib-bob")


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, list[str]]]:
    """The two users, created for the test if missing (and deleted after): name -> the
    command prefix that runs a program as them."""
    created = []
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            created.append(name)
    try:
        yield {name: runner_for(name) for name in USERS}
    finally:
        for name in created:
            subprocess.run(["userdel", name], check=False)


@pytest.fixture(scope="module")
def service(criu_path: str, users: Any) -> Iterator[dict[str, Path]]:
    """kernelhib-criud, as root, on a temporary socket and store."""
    base = Path(tempfile.mkdtemp(prefix="kernelhib-criud-"))
    base.chmod(0o755)  # the users reach the socket through it
    paths = {"socket": base / "run" / "criud.sock", "store": base / "store", "log": base / "log"}
    with paths["log"].open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kernelhib.criud", f"--socket={paths['socket']}",
             f"--store={paths['store']}", f"--criu-path={criu_path}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        for _ in range(300):
            if paths["socket"].exists():
                break
            assert process.poll() is None, paths["log"].read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        yield paths
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def homes(users: Any) -> Iterator[dict[str, Path]]:
    """A private home per user, with a notebooks directory."""
    base = Path(tempfile.mkdtemp(prefix="kernelhib-criud-homes-"))
    base.chmod(0o755)
    homes = {}
    for name in USERS:
        account = pwd.getpwnam(name)
        home = base / name
        (home / "notebooks").mkdir(parents=True)
        for path in (home, home / "notebooks"):
            os.chown(path, account.pw_uid, account.pw_gid)
        home.chmod(0o700)
        homes[name] = home
    yield homes
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def servers(users: dict[str, list[str]], homes: dict[str, Path], service: dict[str, Path]) -> Any:
    """One Jupyter server per user, running as them, using the service; tests await
    :func:`up` before using them."""
    started = {}
    for name in USERS:
        home = homes[name]
        env = {
            **os.environ,
            "HOME": str(home),
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        }
        args = [f"--CriuService.socket={service['socket']}", "--KernelHibernator.engine=criu"]
        log = Path(tempfile.mkdtemp(prefix="kernelhib-criud-log-")) / "server.log"
        started[name] = ServerProcess(args, env, log, home / "notebooks", users[name])
    try:
        yield started
    finally:
        for server in started.values():
            server.discard()
            shutil.rmtree(server.log.parent, ignore_errors=True)


async def up(servers: dict[str, ServerProcess]) -> None:
    await asyncio.gather(*(server.wait_until_up() for server in servers.values()))


def as_user(runner: list[str], code: str) -> str:
    """Run Python ``code`` as a user; its output, or its error's last line."""
    done = subprocess.run([*runner, sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def refusal(runner: list[str], socket_path: Path, op: str, **fields: Any) -> str:
    """The service's answer to a user's request: 'ok', or the refusal's reason."""
    code = (
        "from kernelhib.engines.criu_service import call, ServiceError\n"
        f"try:\n call({str(socket_path)!r}, {op!r}, **{fields!r}); print('ok')\n"
        "except ServiceError as e: print(e.reason.value)\n"
    )
    return as_user(runner, code)


async def start_kernel(server: ServerProcess, value: int) -> tuple[str, Any]:
    kernel = await server.api("POST", "kernels", body={"name": "python3"}, expect=201)
    channel = await server.open_channel(kernel["id"])
    assert (await channel.execute(f"x = {value}"))["status"] == "ok"
    return kernel["id"], channel


def kernel_pid(kernel_id: str) -> int:
    """The kernel's process (it carries its id in its environment)."""
    (pid,) = kernel_processes(kernel_id)
    return pid


def kernel_uid(kernel_id: str) -> int:
    return Path(f"/proc/{kernel_pid(kernel_id)}").stat().st_uid


def service_images(service: dict[str, Path], name: str) -> list[Path]:
    store = service["store"] / str(pwd.getpwnam(name).pw_uid)
    return [p.parent for p in store.glob("*/manifest.json")]


async def test_each_user_hibernates_and_wakes_their_own_kernel_with_criu(
    servers: dict[str, ServerProcess], service: dict[str, Path]
) -> None:
    await up(servers)
    kernels = {name: await start_kernel(server, 41 + i) for i, (name, server) in
               enumerate(servers.items())}  # fmt: skip
    for name, server in servers.items():
        kernel_id, channel = kernels[name]
        assert kernel_uid(kernel_id) == pwd.getpwnam(name).pw_uid
        assert Path(f"/proc/{server.process.pid}").stat().st_uid == pwd.getpwnam(name).pw_uid

        model = await server.api("POST", "kernels", kernel_id, "hibernate")

        assert model["hibernation"]["engine"] == "criu", model
        # The user's image only names the service's; the memory is in the service's store.
        assert sorted(p.name for p in (server.image_dir / kernel_id).iterdir()) == [
            "criud.json", "manifest.json"
        ]  # fmt: skip
        assert len(service_images(service, name)) == 1
    for i, (name, server) in enumerate(servers.items()):
        kernel_id, channel = kernels[name]
        assert (await channel.execute("x + 1"))["result"] == str(42 + i)
        assert kernel_uid(kernel_id) == pwd.getpwnam(name).pw_uid
        await server.api("DELETE", "kernels", kernel_id, expect=204)
    # Woken, then shut down: no image left in the service's stores.
    assert [service_images(service, name) for name in USERS] == [[], []]


async def test_a_user_cannot_dump_restore_or_discard_another_users_kernels(
    servers: dict[str, ServerProcess], service: dict[str, Path], users: dict[str, list[str]]
) -> None:
    await up(servers)
    ada, bob = USERS
    bob_running, _ = await start_kernel(servers[bob], 1)
    bob_hibernated, bob_channel = await start_kernel(servers[bob], 2)
    await servers[bob].api("POST", "kernels", bob_hibernated, "hibernate")
    bob_pid = kernel_pid(bob_running)
    (bob_image,) = service_images(service, bob)
    socket_path = service["socket"]

    # Naming bob's kernel process, his image, or paths to it: refused, changing nothing.
    assert refusal(users[ada], socket_path, "dump", pid=bob_pid) == Refusal.NOT_YOURS.value
    assert refusal(users[ada], socket_path, "dump", pid=1) == Refusal.NOT_YOURS.value
    assert refusal(users[ada], socket_path, "dump", pid=servers[ada].process.pid) == "not-yours"
    assert refusal(users[ada], socket_path, "restore", image=bob_image.name) == "not-yours"
    bob_uid = str(pwd.getpwnam(bob).pw_uid)
    for name in (f"../{bob_uid}/{bob_image.name}", str(bob_image), "..", ".init"):
        assert refusal(users[ada], socket_path, "restore", image=name) in (
            "not-yours",
            "bad-request",
        )
        assert refusal(users[ada], socket_path, "discard", image=name) == "bad-request"
    assert refusal(users[ada], socket_path, "discard", image=bob_image.name) == "ok"
    assert bob_image.is_dir()  # that was ada's own (absent) image of that name
    # Ada cannot signal bob's kernel either: it runs as bob.
    assert "PermissionError" in as_user(users[ada], f"import os; os.kill({bob_pid}, 9)")

    # Bob's kernels are untouched: the hibernated one wakes intact.
    assert (await bob_channel.execute("x + 1"))["result"] == "3"


async def test_no_user_can_read_or_write_the_image_stores(
    servers: dict[str, ServerProcess], service: dict[str, Path], users: dict[str, list[str]]
) -> None:
    await up(servers)
    bob = USERS[1]
    kernel_id, _ = await start_kernel(servers[bob], 7)
    await servers[bob].api("POST", "kernels", kernel_id, "hibernate")
    (image,) = service_images(service, bob)
    pages = next(image.glob("pages-*.img"))
    store = service["store"]

    for name in USERS:  # bob cannot read his own images either: they are root's
        for path in (store, store / str(pwd.getpwnam(bob).pw_uid), image, pages):
            assert "PermissionError" in as_user(
                users[name],
                f"import os; os.listdir({str(path)!r})"
                if path.is_dir()
                else f"open({str(path)!r}).read()",
            )
        attempt = f"open({str(image / 'core-1.img')!r}, 'wb')"
        assert "PermissionError" in as_user(users[name], attempt)
    for path in (store, image, pages):
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o077) == (0, 0), path


async def test_an_altered_or_foreign_image_is_refused_and_kept(
    servers: dict[str, ServerProcess], service: dict[str, Path]
) -> None:
    await up(servers)
    ada, bob = USERS
    ada_kernel, _ = await start_kernel(servers[ada], 5)
    bob_kernel, _ = await start_kernel(servers[bob], 6)
    for name, kernel_id in ((ada, ada_kernel), (bob, bob_kernel)):
        await servers[name].api("POST", "kernels", kernel_id, "hibernate")
    (ada_image,) = service_images(service, ada)
    (bob_image,) = service_images(service, bob)

    # Ada's image, with its manifest, put in place of bob's: signed with another key.
    saved = bob_image.with_name(".saved")
    bob_image.rename(saved)
    shutil.copytree(ada_image, bob_image)
    status, answer = await servers[bob].request("POST", "kernels", bob_kernel, "wake")
    assert status == 500 and "not signed" in answer["message"], answer
    assert bob_image.is_dir()

    # Bob's own image with one byte of a memory page changed.
    shutil.rmtree(bob_image)
    saved.rename(bob_image)
    pages = max(bob_image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with pages.open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    status, answer = await servers[bob].request("POST", "kernels", bob_kernel, "wake")
    assert status == 500 and "does not match its signed hash" in answer["message"], answer
    model = await servers[bob].api("GET", "kernels", bob_kernel)
    assert model["execution_state"] == "hibernated"


async def test_a_kernel_restored_holding_a_file_its_user_may_not_open_is_killed(
    servers: dict[str, ServerProcess], homes: dict[str, Path], users: dict[str, list[str]]
) -> None:
    """The path of a file the kernel held is replaced by a link to root's secret before
    the wake: CRIU, as root, opens the secret; the kernel must never run with it."""
    await up(servers)
    ada = USERS[0]
    secret = Path(tempfile.mkdtemp(prefix="kernelhib-secret-")) / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    bait = homes[ada] / "notebooks" / "bait"
    kernel_id, channel = await start_kernel(servers[ada], 9)
    create = f"f = open({str(bait)!r}, 'w+'); f.write('x' * 14); f.flush(); import os; os.chmod({str(bait)!r}, 0o600)"  # noqa: E501
    assert (await channel.execute(create))["status"] == "ok"
    await servers[ada].api("POST", "kernels", kernel_id, "hibernate")
    assert (
        as_user(
            users[ada],
            f"import os; os.replace({str(bait)!r}, {str(bait)!r} + '.old'); "
            f"os.symlink({str(secret)!r}, {str(bait)!r}); print('swapped')",
        )
        == "swapped"
    )

    status, answer = await servers[ada].request("POST", "kernels", kernel_id, "wake")

    assert status == 500 and "may not open it" in answer["message"], answer
    assert str(secret) in answer["message"]
    model = await servers[ada].api("GET", "kernels", kernel_id)
    assert model["execution_state"] == "hibernated"
    uid = pwd.getpwnam(ada).pw_uid
    assert not [p for p in Path("/proc").glob("[0-9]*") if _owner(p) == uid and
                b"ipykernel" in _cmdline(p)]  # fmt: skip
    shutil.rmtree(secret.parent)


def _owner(proc: Path) -> int:
    try:
        return proc.stat().st_uid
    except OSError:
        return -1


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_bad_requests_are_refused(service: dict[str, Path]) -> None:
    path = str(service["socket"])
    for line in (b"not json\n", b'{"op": "shell"}\n', b"[]\n", b"x" * 300_000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            with __import__("contextlib").suppress(OSError):
                sock.sendall(line)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and answer["reason"] == "bad-request", answer
    with pytest.raises(ServiceError) as refused:
        call(path, "launch", argv=[], env={}, cwd="/", log="/tmp/x")
    assert refused.value.reason is Refusal.BAD_REQUEST


async def test_a_kernel_that_crius_restore_would_write_files_for_is_not_hibernated(
    servers: dict[str, ServerProcess], homes: dict[str, Path]
) -> None:
    """CRIU, as root, would bind a unix socket's path and recreate deleted files at paths
    the user controls: such kernels are refused, and run on."""
    await up(servers)
    ada = USERS[0]
    kernel_id, channel = await start_kernel(servers[ada], 3)
    held = {
        "a unix socket bound to a path": "import socket; held = socket.socket(socket.AF_UNIX); "
        f"held.bind({str(homes[ada] / 'notebooks' / 'sock')!r})",
        "deleted files": "import tempfile; held = tempfile.TemporaryFile(); held.write(b'x')",
    }
    for what, code in held.items():
        assert (await channel.execute(code))["status"] == "ok"
        status, answer = await servers[ada].request("POST", "kernels", kernel_id, "hibernate")
        assert status == 500 and what in answer["message"], answer
        assert (await channel.execute("held.close(); x"))["result"] == "3"
    model = await servers[ada].api("POST", "kernels", kernel_id, "hibernate")
    assert model["hibernation"]["engine"] == "criu"
