"""Finding and installing CRIU, against real binaries and Debian's archive."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelhib.engines.criu_install import (
    MIN_CRIU_VERSION,
    CriuUnavailable,
    clear_criu_cache,
    criu_check,
    install_criu,
    locate_criu,
    parse_version,
)

REQUIRE_CRIU = os.environ.get("KERNELHIB_REQUIRE_CRIU") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip a test that needs CRIU, unless KERNELHIB_REQUIRE_CRIU=1 demands it."""
    if REQUIRE_CRIU:
        pytest.fail(f"KERNELHIB_REQUIRE_CRIU=1 but {reason}")
    pytest.skip(reason)


def fake_criu(
    directory: Path, version_output: str, check_rc: int = 0, check_output: str = "Looks good."
) -> Path:
    """Write a shell script that answers ``--version`` and ``check`` like criu.

    Every run appends a line to ``runs`` next to it, to count invocations.
    """
    script = directory / "criu"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> "{directory / "runs"}"\n'
        f'if [ "$1" = --version ]; then printf "%s\\n" "{version_output}"; exit 0; fi\n'
        f'echo "{check_output}"; exit {check_rc}\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_criu_cache()
    yield
    clear_criu_cache()


def require_installable() -> None:
    """Skip (or fail) unless CRIU can be installed: root, apt-get, deb.debian.org."""
    if os.geteuid() != 0:
        skip_or_fail("installing CRIU needs root")
    if not shutil.which("apt-get"):
        skip_or_fail("apt-get is missing: not a Debian or Ubuntu host")
    try:
        socket.create_connection(("deb.debian.org", 80), timeout=5).close()
    except OSError as exc:
        skip_or_fail(f"deb.debian.org is unreachable ({exc})")


@pytest.mark.criu
def test_install_then_reuse_then_force(tmp_path):
    require_installable()
    prefix = tmp_path / "criu"
    logs: list[str] = []
    criu = install_criu(prefix, log=logs.append)
    assert criu.path == prefix / "bin" / "criu"
    assert criu.version >= MIN_CRIU_VERSION
    assert criu_check(criu.path).ok
    assert criu.pycriu_dir is not None
    assert (criu.pycriu_dir / "pycriu" / "__init__.py").is_file()
    assert any("Downloading" in line for line in logs)

    logs.clear()
    start = time.monotonic()
    again = install_criu(prefix, log=logs.append)
    assert time.monotonic() - start < 2
    assert again == criu
    assert logs == [f"CRIU {'.'.join(map(str, criu.version))} is already installed at {criu.path}."]

    logs.clear()
    forced = install_criu(prefix, force=True, log=logs.append)
    assert forced == criu
    assert any("Downloading" in line for line in logs)
    # Staging and replaced trees are gone: only the prefix is left.
    assert [path.name for path in tmp_path.iterdir()] == ["criu"]
    # The binary runs from its final place, not a deleted staging directory.
    assert locate_criu(str(criu.path)) == criu


def test_install_refuses_without_apt(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    code = (
        "from pathlib import Path; from kernelhib.engines.criu_install import install_criu; "
        f"install_criu(Path({str(tmp_path / 'criu')!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert done.returncode != 0
    assert "apt-get not found" in done.stderr
    assert "Debian or Ubuntu" in done.stderr
    assert not (tmp_path / "criu").exists()


def test_install_refuses_without_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    code = (
        "from pathlib import Path; from kernelhib.engines.criu_install import install_criu; "
        f"install_criu(Path({str(tmp_path / 'criu')!r}))"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert done.returncode != 0
    assert "runs CRIU as root only, and this is uid 65534" in done.stderr, done.stderr
    assert not (tmp_path / "criu").exists()


def test_configured_path_missing(tmp_path):
    missing = tmp_path / "nowhere" / "criu"
    with pytest.raises(CriuUnavailable) as caught:
        locate_criu(str(missing))
    assert f"the configured CRIU {missing} does not exist" in str(caught.value)
    assert "kernelhib install-criu" in caught.value.remedy


def test_configured_path_too_old(tmp_path):
    old = fake_criu(tmp_path, "Version: 3.17")
    with pytest.raises(CriuUnavailable) as caught:
        locate_criu(str(old))
    assert f"CRIU 3.17 found at {old}; 4.2 or later is needed" in str(caught.value)
    # An old CRIU is refused on its version alone, before any `criu check`.
    assert (tmp_path / "runs").read_text().split() == ["--version"]


def test_configured_path_without_version(tmp_path):
    broken = fake_criu(tmp_path, "criu: something else")
    with pytest.raises(CriuUnavailable, match="printed no CRIU version"):
        locate_criu(str(broken))


def test_configured_path_failing_check(tmp_path):
    failing = fake_criu(tmp_path, "Version: 4.2.1", check_rc=1, check_output="Error: no TCP repair")
    with pytest.raises(CriuUnavailable) as caught:
        locate_criu(str(failing))
    assert caught.value.reason == f"`{failing} check` failed"
    assert caught.value.output == "Error: no TCP repair"
    assert "Error: no TCP repair" in str(caught.value)


def test_locate_caches_successes_until_cleared(tmp_path):
    good = fake_criu(tmp_path, "Version: 4.2.1\nGitID: v4.2.1")
    found = locate_criu(str(good))
    assert found.version == (4, 2, 1)
    assert found.path == good
    assert locate_criu(str(good)) is found
    runs = tmp_path / "runs"
    assert runs.read_text().split() == ["--version", "check"]
    clear_criu_cache()
    locate_criu(str(good))
    assert runs.read_text().split() == ["--version", "check"] * 2


def test_criu_check_reports_output(tmp_path):
    failing = fake_criu(tmp_path, "Version: 4.2.1", check_rc=3, check_output="boom")
    assert not criu_check(failing).ok
    assert criu_check(failing).output == "boom"
    assert criu_check(tmp_path / "absent").output.startswith(f"could not run {tmp_path}")


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 4.2\nGitID: v4.2-12-gdeadbee\n", (4, 2)),
        ("Version: 3.17.1\n", (3, 17, 1)),
        ("criu 4.2\n", None),
    ],
)
def test_parse_version(text, version):
    assert parse_version(text) == version
