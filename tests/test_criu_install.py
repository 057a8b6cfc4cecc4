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

from kernelhib.engines import criu_install
from kernelhib.engines.criu_install import (
    MIN_CRIU_VERSION,
    PINS,
    CriuUnavailable,
    Pin,
    clear_criu_cache,
    criu_check,
    dpkg_architecture,
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


SID = "deb http://deb.debian.org/debian sid main"
# Debian 13 carries CRIU 4.1.1: none of the pinned files, now or later.
TRIXIE = "deb http://deb.debian.org/debian trixie main"
UNREACHABLE = "deb http://127.0.0.1:9/debian sid main"


def test_pins_name_a_recent_criu_with_its_pycriu():
    for arch, pins in PINS.items():
        versions = {pin.package: pin.version for pin in pins}
        assert parse_version(f"Version: {versions['criu'].split('-')[0]}") >= MIN_CRIU_VERSION
        assert versions["libcompel1"] == versions["python3-pycriu"] == versions["criu"], arch
        assert all(len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0 for pin in pins)
        assert len({pin.package for pin in pins}) == len(pins), f"{arch}: a package twice"


def test_pin_spec_decodes_the_epoch_of_a_pool_file_name():
    pin = Pin("libgmp10_2%3a6.3.0+dfsg-5+b2_amd64.deb", "0" * 64)
    assert (pin.package, pin.version) == ("libgmp10", "2:6.3.0+dfsg-5+b2")
    assert pin.spec == "libgmp10=2:6.3.0+dfsg-5+b2"


@pytest.mark.criu
def test_tampered_deb_is_refused_and_the_prefix_is_left_alone(tmp_path, monkeypatch):
    require_installable()
    # A working install already there, which --force would replace.
    prefix = tmp_path / "criu"
    (prefix / "bin").mkdir(parents=True)
    old = fake_criu(prefix / "bin", "Version: 4.2.1").read_bytes()
    real_download = criu_install._download_pinned

    def download_then_tamper(work, debs, *args, **kwargs):
        """The real download, then one byte of criu's .deb flipped on its way."""
        result = real_download(work, debs, *args, **kwargs)
        deb = next(debs.glob("criu_*.deb"))
        data = bytearray(deb.read_bytes())
        data[len(data) // 2] ^= 0xFF
        deb.write_bytes(data)
        return result

    monkeypatch.setattr(criu_install, "_download_pinned", download_then_tamper)
    with pytest.raises(CriuUnavailable) as caught:
        install_criu(prefix, force=True, sources=[SID], log=lambda line: None)
    pin = next(pin for pin in PINS[dpkg_architecture()] if pin.package == "criu")
    assert caught.value.reason.startswith(f"{pin.file} has SHA-256 ")
    assert caught.value.reason.endswith(f", but kernelhib pins {pin.sha256}")
    assert "nothing was installed" in caught.value.remedy
    assert (prefix / "bin" / "criu").read_bytes() == old
    assert sorted(path.name for path in tmp_path.iterdir()) == ["criu"], "no staging left"


@pytest.mark.criu
def test_pins_come_from_the_next_source_when_the_first_fails_or_moved_on(tmp_path):
    require_installable()
    prefix = tmp_path / "criu"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "kernelhib.cli", "install-criu", "--prefix", str(prefix)),
            *("--debian-source", UNREACHABLE, "--debian-source", TRIXIE),
            *("--debian-source", SID),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    pins = PINS[dpkg_architecture()]
    assert f"`{UNREACHABLE}` failed: `apt-get update` fetched no package list from" in done.stdout
    assert (
        f"`{TRIXIE}` carries none of the {len(pins)} pinned packages; trying the next source."
        in lines
    )
    assert f"Downloading {len(pins)} pinned packages from `{SID}`..." in lines
    assert lines[-1] == f"Installed CRIU 4.2.1 at {prefix / 'bin' / 'criu'}."
    assert criu_check(prefix / "bin" / "criu").ok


@pytest.mark.criu
def test_moved_pins_refuse_unless_allow_unpinned_which_warns_and_prints_new_pins(
    tmp_path, monkeypatch
):
    require_installable()
    arch = dpkg_architecture()
    # The archive has moved on: the pinned criu is gone from every source.
    gone = Pin(f"criu_4.2.0-0_{arch}.deb", "0" * 64)
    monkeypatch.setitem(PINS, arch, (gone,))
    prefix = tmp_path / "criu"
    with pytest.raises(CriuUnavailable) as caught:
        install_criu(prefix, sources=[SID], log=lambda line: None)
    assert caught.value.reason == f"1 pinned packages are in none of the sources: {gone.file}"
    assert "--allow-unpinned" in caught.value.remedy
    assert list(tmp_path.iterdir()) == []

    logs: list[str] = []
    criu = install_criu(prefix, allow_unpinned=True, sources=[SID], log=logs.append)
    assert criu.version >= MIN_CRIU_VERSION
    assert any(line.startswith("WARNING: installing the CURRENT CRIU packages") for line in logs)
    # The pins to paste into PINS, one per downloaded file, with that file's SHA-256.
    criu_row = next(line for line in logs if line.startswith('    Pin("criu_'))
    file, digest = criu_row.split('"')[1::2]
    assert len(digest) == 64
    assert file.endswith(f"_{arch}.deb")


@pytest.mark.criu
def test_no_check_installs_where_criu_cannot_run_as_in_an_image_build(tmp_path):
    require_installable()
    prefix = tmp_path / "criu"
    # Root without capabilities, as in a container image build: CRIU cannot run.
    without_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    install = [sys.executable, "-m", "kernelhib.cli", "install-criu", "--prefix", str(prefix)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*without_capabilities, *install, *extra, "--debian-source", SID],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    refused = run()
    assert refused.returncode == 1
    assert "the downloaded CRIU fails `criu check` on this machine" in refused.stderr
    assert "install with --no-check" in refused.stderr
    assert list(tmp_path.iterdir()) == []

    unchecked = run("--no-check")
    assert unchecked.returncode == 0, unchecked.stdout + unchecked.stderr
    assert "Not checked with `criu check` (--no-check)" in unchecked.stdout
    assert (
        unchecked.stdout.splitlines()[-1] == f"Installed CRIU 4.2.1 at {prefix / 'bin' / 'criu'}."
    )
    # Where the server runs, with its capabilities, the same CRIU passes.
    assert criu_check(prefix / "bin" / "criu").ok


def test_an_architecture_without_pins_needs_allow_unpinned(tmp_path, monkeypatch):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs root and apt-get to get that far")
    monkeypatch.setattr(criu_install, "PINS", {"s390x": ()})
    with pytest.raises(CriuUnavailable) as caught:
        install_criu(tmp_path / "criu", sources=[UNREACHABLE], log=lambda line: None)
    arch = dpkg_architecture()
    assert (
        caught.value.reason
        == f"kernelhib pins CRIU packages for s390x only, and this host is {arch}"
    )
    assert "--allow-unpinned" in caught.value.remedy
    assert list(tmp_path.iterdir()) == []


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
