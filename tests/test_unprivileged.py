"""A server run by an ordinary user, with no capabilities, still hibernates kernels: with dill."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServerProcess

USER = "kernelhib-test"


def runner_for(name: str) -> list[str]:
    """A command prefix that runs a program as the ordinary user ``name``, with no
    capabilities; the user is created if missing."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
        user = pwd.getpwnam(name)
    runner = [
        "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
    ]  # fmt: skip
    probe = subprocess.run(
        [*runner, sys.executable, "-c", "import kernelhib, dill"], capture_output=True, text=True
    )
    if probe.returncode:
        pytest.fail(
            f"{name} cannot run {sys.executable}: {probe.stderr.strip()}. Create the "
            "test environment with a Python other users may run (scripts/setup.sh uses "
            "/usr/bin/python3) in a directory they may read."
        )
    return runner


@pytest.fixture(scope="session")
def unprivileged_runner() -> list[str]:
    """A command prefix that runs a program as an ordinary user with no capabilities."""
    return runner_for(USER)


@pytest.fixture
def unprivileged_server(unprivileged_runner: list[str]) -> Any:
    """A server started as that user; the test awaits ``wait_until_up()``."""
    home = Path(tempfile.mkdtemp(prefix="kernelhib-unprivileged-"))
    (home / "notebooks").mkdir()
    user = pwd.getpwnam(USER)
    for path in (home, home / "notebooks"):
        os.chown(path, user.pw_uid, user.pw_gid)
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }
    server = ServerProcess([], env, home / "server.log", home / "notebooks", unprivileged_runner)
    try:
        yield server
    finally:
        server.discard()
        shutil.rmtree(home, ignore_errors=True)


async def test_unprivileged_server_hibernates_with_dill(unprivileged_server: Any) -> None:
    server = unprivileged_server
    await server.wait_until_up()
    assert Path(f"/proc/{server.process.pid}").stat().st_uid != 0
    kernel = await server.api("POST", "kernels", body={"name": "python3"}, expect=201)
    channel = await server.open_channel(kernel["id"])
    assert (await channel.execute("import os; x = 41; os.getuid()"))["result"] != "0"

    model = await server.api("POST", "kernels", kernel["id"], "hibernate")

    hibernation = model["hibernation"]
    assert hibernation["engine"] == "dill"
    assert "root" in hibernation["fallback_reason"]
    assert (await channel.execute("x + 1"))["result"] == "42"
