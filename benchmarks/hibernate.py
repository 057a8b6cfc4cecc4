"""Benchmark kernel hibernation (CRIU and dill engines) against file I/O and plain dill.

For each workload (random numpy data of each size, and optionally a dict of
many small Python objects), a real ``jupyter server`` with kernelhib runs a
python3 kernel holding it. In each run, on the same disk: the same number of
bytes is written (with fsync) and read back (from a cold page cache) with plain
file I/O; the kernel is hibernated and woken with CRIU, then with the dill
engine; and inside the kernel its user namespace is saved with plain
``dill.dump_module`` and loaded back with ``dill.load_module``. After the runs
the kernel is restarted and the data recomputed. The results go to stdout, to
a JSON file and, with ``--markdown``, into ``docs/performance.md``.

Needs root (CRIU, and dropping the page cache). Run from the repository root::

    .venv/bin/python benchmarks/hibernate.py --markdown docs/performance.md
    .venv/bin/python benchmarks/hibernate.py --quick
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import websocket
from blake3 import blake3
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from kernelhib.disk_io import digest
from kernelhib.kernel_process import available_memory

GIB = 1 << 30
MIB = 1 << 20
CHUNK = 64 * MIB
HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
MARK_START = "<!-- benchmark-results:start -->"
MARK_END = "<!-- benchmark-results:end -->"
# Targets from the issue: ratio name -> (limit, True if the ratio must stay at or below it).
TARGETS = {
    "hibernate_vs_write": (1.5, True),
    "wake_vs_read": (1.5, True),
    "freed_vs_rss": (0.95, False),
    "worst_vs_median_wake": (2.0, True),
}
HTTP_TIMEOUT_S = 1800
REPLY_TIMEOUT_S = 600


class BenchmarkError(RuntimeError):
    """The benchmark could not go on; the message says why."""


# Measurements of the machine.


def kernel_pids(kernel_id: str) -> list[int]:
    """Host pids of every process of a kelnelhib kernel (found by its environment)."""
    needle = f"KERNELHIB_KERNEL_ID={kernel_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def rss_bytes(pids: list[int]) -> dict[str, int]:
    """Summed resident memory of ``pids``: total, anonymous, file-backed and shared memory."""
    total = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0]) * 1024
    return {
        "rss": sum(total.values()),
        "anon": total["RssAnon"],
        "file": total["RssFile"],
        "shmem": total["RssShmem"],
    }


def others_rss(exclude: list[int]) -> int:
    """Summed private (anonymous and shmem) RSS of every process but ``exclude``: to tell
    the kernel's freed memory from memory that other work on the machine took or gave
    back meanwhile (file pages are left out: they are page cache either way)."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    memory = rss_bytes([pid for pid in pids if pid not in exclude])
    return memory["anon"] + memory["shmem"]


def _disk_activity() -> list[str]:
    """The I/O counters of every disk (virtual devices left out)."""
    return [
        stat.read_text()
        for stat in Path("/sys/block").glob("*/stat")
        if not stat.parent.name.startswith(("loop", "zram", "ram", "dm-"))
    ]


def settle_disks(quiet_s: float = 0.3, timeout_s: float = 15) -> None:
    """Wait until no disk has done any I/O for ``quiet_s``.

    Deleting a file on a filesystem mounted with ``discard`` (like this VM's
    root) sends the disk a TRIM for its blocks some time after the delete;
    a multi-GiB TRIM, left over from the previous run's files, slowed the
    next timed write or dump by up to 3x. Each timed step starts on an idle disk.
    """
    deadline = time.monotonic() + timeout_s
    last, quiet_since = _disk_activity(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        time.sleep(0.05)
        now = _disk_activity()
        if now != last:
            last, quiet_since = now, time.monotonic()


def drop_caches(enabled: bool) -> None:
    """Write back dirty pages, wait for the disk to go idle and, if ``enabled``, empty
    the page cache."""
    os.sync()
    settle_disks()
    if enabled:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_file(path: Path, size: int, chunk: bytes) -> float:
    """Seconds to write ``size`` bytes to a new file, fsync it and its directory."""
    view = memoryview(chunk)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return time.perf_counter() - started


def read_file(path: Path) -> float:
    """Seconds to read a file through with plain file I/O."""
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


def digest_seconds(path: Path) -> float:
    """Seconds to BLAKE3 a file with the image store's own function, as a wake checks pages."""
    started = time.perf_counter()
    digest(path)
    return time.perf_counter() - started


def blake3_seconds(size: int, chunk: bytes) -> float:
    """Seconds to BLAKE3 ``size`` bytes already in memory, as the image store does."""
    view = memoryview(chunk)
    hasher = blake3(max_threads=blake3.AUTO)
    started = time.perf_counter()
    left = size
    while left:
        n = min(left, len(view))
        hasher.update(view[:n])
        left -= n
    return time.perf_counter() - started


def _mount_of(path: Path) -> dict[str, str]:
    """Device, mount point and filesystem type of the filesystem holding ``path``."""
    best: dict[str, str] = {}
    target = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount, fstype = line.split()[:3]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best.get("mount", "")):
            best = {"device": device, "mount": mount, "fstype": fstype}
    return best


def machine_info(path: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    disk = _mount_of(path)
    name = Path(disk.get("device", "")).name
    block = Path("/sys/class/block") / name
    base = block.resolve().parent if (block / "partition").exists() else block.resolve()
    rotational = base / "queue" / "rotational"
    disk_model = base / "device" / "model"
    info = {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "virtual_machine": " hypervisor" in cpuinfo,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": {
            **disk,
            "rotational": rotational.read_text().strip() == "1" if rotational.exists() else None,
            "model": disk_model.read_text().strip() if disk_model.exists() else "",
            "virtio": name.startswith("vd"),
        },
    }
    with contextlib.suppress(Exception):
        from kernelhib.engines.criu_install import locate_criu, version_text

        binary = locate_criu()
        info["criu"] = f"{version_text(binary.version)} at {binary.path}"
    return info


# The server and its kernels.


def code_version() -> dict[str, Any]:
    """The commit measured, and whether kernelhib/ differed from it (uncommitted edits)."""
    repo = HERE.parent

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    import kernelhib

    package = Path(kernelhib.__file__).resolve().parent
    if package != repo / "kernelhib":
        # Another copy, e.g. a clean export on PYTHONPATH while the tree has edits in progress.
        return {"commit": git("rev-parse", "--short", "HEAD"), "kernelhib_path": str(package)}
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "kernelhib_modified": bool(git("status", "--porcelain", "--", "kernelhib")),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JupyterServer:
    """A ``jupyter server`` subprocess with kernelhib, on loopback, stopped on exit."""

    def __init__(self, workdir: Path, image_dir: Path) -> None:
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "server.log"
        self.image_dir = image_dir
        root_dir = workdir / "root"
        root_dir.mkdir()
        cmd = [
            sys.executable, "-m", "jupyter_server",
            f"--port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
            "--allow-root", f"--ServerApp.root_dir={root_dir}",
            f"--KernelHibernator.image_dir={image_dir}",
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        # Its own session: a Ctrl-C meant for the benchmark must not reach the server,
        # which would ask on stdin whether to shut down. Run from the work directory:
        # `python -m` puts its directory first on sys.path, so from the repository root
        # the server would import ./kernelhib even when PYTHONPATH names another copy.
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=workdir,
        )  # fmt: skip
        self.kernels: set[str] = set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"the server exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.request("GET", "api/status", timeout=2)
                extensions = self.log_path.read_text(errors="replace")
                if "kernelhib" not in extensions:
                    raise BenchmarkError("the server did not load the kernelhib extension")
                return
            time.sleep(0.2)
        raise BenchmarkError(f"the server did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = HTTP_TIMEOUT_S
    ) -> Any:
        """One REST call; the decoded JSON reply, or None for an empty one."""
        data = None if method in ("GET", "DELETE") else json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=data,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise BenchmarkError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        return json.loads(text) if text else None

    def warm_up(self, engines: list[str]) -> dict[str, Any]:
        """Hibernate and wake an empty kernel once with each engine, so one-time costs
        (``criu check``, imports in the server) do not land in the first measured run.
        Also records how plain ``dill.dump_module()`` of the kernel's ``__main__`` fails."""
        kernel_id = self.start_kernel()
        channel = KernelChannel(self, kernel_id)
        times: dict[str, Any] = {}
        try:
            channel.execute("1+1", timeout=120)
            for engine in engines:
                started = time.perf_counter()
                self.request("POST", f"api/kernels/{kernel_id}/hibernate", {"engine": engine})
                hibernated = time.perf_counter()
                self.request("POST", f"api/kernels/{kernel_id}/wake")
                channel.execute("1+1")
                woken = time.perf_counter()
                times[engine] = {"hibernate_s": hibernated - started, "wake_s": woken - hibernated}
            if "dill" in engines:
                # "": it worked. With a variable naming the shell, it meets its sqlite3
                # connection (the IPython history).
                times["dump_module_main_error"] = plain_dill(channel, "main_error()")
                channel.execute("shell = get_ipython()")
                times["dump_module_main_error_with_shell"] = plain_dill(channel, "main_error()")
        finally:
            channel.close()
            self.shutdown_kernel(kernel_id)
        return times

    def start_kernel(self) -> str:
        kernel_id: str = self.request("POST", "api/kernels", {"name": "python3"})["id"]
        self.kernels.add(kernel_id)
        return kernel_id

    def shutdown_kernel(self, kernel_id: str) -> None:
        self.request("DELETE", f"api/kernels/{kernel_id}", timeout=120)
        self.kernels.discard(kernel_id)

    def stop(self) -> None:
        """Shut down the kernels and the server; kill it if it does not go."""
        if self.process.poll() is None:
            for kernel_id in list(self.kernels):
                with contextlib.suppress(Exception):
                    self.shutdown_kernel(kernel_id)
            with contextlib.suppress(Exception):
                self.request("POST", "api/shutdown", timeout=10)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self._log.close()


class KernelChannel:
    """A kernel websocket through the server, as a notebook front end opens one."""

    def __init__(self, server: JupyterServer, kernel_id: str) -> None:
        self.session = Session()
        url = (
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
            f"?session_id={uuid.uuid4()}"
        )
        self.ws = websocket.create_connection(
            url, header=[f"Authorization: token {server.token}"], timeout=REPLY_TIMEOUT_S
        )

    def execute(
        self,
        code: str,
        timeout: float = REPLY_TIMEOUT_S,
        user_expressions: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send ``code``; return the content of its execute_reply once it arrives.

        With ``user_expressions`` the request is silent (no history, no output).
        """
        content = {"code": code, "silent": bool(user_expressions)}
        if user_expressions:
            content.update(store_history=False, user_expressions=user_expressions)
        msg = self.session.msg("execute_request", content)
        msg["channel"] = "shell"
        msg_id = msg["header"]["msg_id"]
        self.ws.send(json.dumps(msg, default=json_default))
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(deadline - time.monotonic(), 0.001))
            raw = self.ws.recv()
            if not raw:
                raise BenchmarkError("the kernel websocket closed")
            reply = json.loads(raw)
            if reply.get("channel") == "shell" and reply["parent_header"].get("msg_id") == msg_id:
                content: dict[str, Any] = reply["content"]
                if content.get("status") != "ok":
                    raise BenchmarkError(f"{code!r} failed in the kernel: {content}")
                return content

    def evaluate(self, expression: str, timeout: float = REPLY_TIMEOUT_S) -> Any:
        """The value of a JSON-returning ``expression`` evaluated silently in the kernel."""
        reply = self.execute("", timeout, user_expressions={"value": expression})
        value = reply["user_expressions"]["value"]
        if value.get("status") != "ok":
            raise BenchmarkError(f"in the kernel: {value.get('ename')}: {value.get('evalue')}")
        return json.loads(ast.literal_eval(value["data"]["text/plain"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


# One workload.


@dataclass(frozen=True)
class Workload:
    """What the kernel holds: ``data``, computed by ``fill``, checked by ``digest``."""

    name: str  # label in the tables
    kind: str  # "numpy" (random float64 data) or "objects" (a dict of small objects)
    bytes: int  # numpy: the data's size, also written and read by the baselines
    fill: str
    digest: str  # an expression of ``data`` (and ``hashlib``): a hex digest


def numpy_workload(size_gib: float) -> Workload:
    size = int(size_gib * GIB) // 8 * 8
    return Workload(
        name=f"{size / GIB:g} GiB",
        kind="numpy",
        bytes=size,
        fill=f"import numpy as np\ndata = np.random.default_rng(0).random({size // 8})",
        digest="hashlib.sha256(data).hexdigest()",
    )


def objects_workload(count: int) -> Workload:
    return Workload(
        name=f"dict of {count / 1e6:g}M",
        kind="objects",
        bytes=0,
        fill=f"data = {{f'k{{i}}': i for i in range({count})}}",
        digest="hashlib.sha256(repr(data).encode()).hexdigest()",
    )


def _criu_dump_stats(image: Path) -> dict[str, float]:
    """CRIU's own dump timings in seconds (from ``stats-dump``), or {} without pycriu."""
    with contextlib.suppress(Exception):
        from kernelhib.engines.criu_install import locate_criu

        pycriu_dir = locate_criu().pycriu_dir
        if pycriu_dir and str(pycriu_dir) not in sys.path:
            sys.path.append(str(pycriu_dir))
        from pycriu import images

        with (image / "stats-dump").open("rb") as f:
            stats = images.load(f)["entries"][0]["dump"]
        return {
            key: stats[key] / 1e6
            for key in ("freezing_time", "frozen_time", "memdump_time", "memwrite_time")
            if key in stats
        }
    return {}


# Runs inside the kernel, in a namespace of its own (nothing is added to the user's).
# dill.dump_module() of the IPython __main__ fails as soon as a variable reaches the
# shell (its history holds a sqlite3 connection), and it would save IPython's own names
# (In, Out, _i1...), so the user's variables, as %who lists them, are copied into a new
# module, saved with refimported=True (modules and imported objects by name).
PLAIN_DILL_SOURCE = """
import hashlib, os, time, types
import dill
from IPython import get_ipython

def main_error():
    import io
    try:
        dill.dump_module(io.BytesIO())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return ""

def dump(path):
    shell = get_ipython()
    ns, hidden, missing = shell.user_ns, shell.user_ns_hidden, object()
    names = [n for n in ns if not n.startswith("_") and hidden.get(n, missing) is not ns[n]]
    module = types.ModuleType("kernelhib_benchmark_namespace")
    module.__dict__.update((n, ns[n]) for n in names)
    started = time.perf_counter()
    dill.dump_module(path, module=module, refimported=True)
    dumped = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "names": sorted(names), "dump_s": dumped - started,
        "fsync_s": time.perf_counter() - dumped, "file_bytes": os.path.getsize(path),
        "protocol": dill.settings["protocol"], "dill": dill.__version__,
    }

def load(path, digest):
    started = time.perf_counter()
    module = dill.load_module(path)
    load_s = time.perf_counter() - started
    names = sorted(n for n in vars(module) if not n.startswith("__"))
    scope = {"data": module.data, "hashlib": hashlib}
    intact = eval(digest, scope) == get_ipython().user_ns["digest"]
    del module, scope
    os.unlink(path)
    return {"load_s": load_s, "intact": intact, "names": names}
"""


def plain_dill(channel: KernelChannel, call: str) -> Any:
    """Call a function of PLAIN_DILL_SOURCE in the kernel, e.g. ``call="dump('/x')"``."""
    run = f"(lambda ns: (exec({PLAIN_DILL_SOURCE!r}, ns), eval({call!r}, ns))[1])"
    return channel.evaluate(f"__import__('json').dumps({run}({{'__name__': 'kernelhib_bench'}}))")


def hibernate_and_wake(
    server: JupyterServer, kernel_id: str, channel: KernelChannel, engine: str, drop: bool
) -> dict[str, Any]:
    """One hibernation with ``engine`` and one wake, timed; memory measured around them."""
    pids = kernel_pids(kernel_id)
    memory = rss_bytes(pids)
    drop_caches(drop)
    available = available_memory()
    server_rss = rss_bytes([server.process.pid])["rss"]
    others = others_rss(pids)
    started = time.perf_counter()
    model = server.request("POST", f"api/kernels/{kernel_id}/hibernate", {"engine": engine})
    hibernate_s = time.perf_counter() - started
    time.sleep(0.5)  # let the freed memory show in /proc/meminfo
    freed_cached = available_memory() - available
    drop_caches(drop)
    freed = available_memory() - available
    server_growth = rss_bytes([server.process.pid])["rss"] - server_rss
    others_growth = others_rss(pids) - others
    hibernation = model["hibernation"]
    if model["execution_state"] != "hibernated" or kernel_pids(kernel_id):
        raise BenchmarkError(f"the kernel still runs after hibernation: {model}")
    if hibernation.get("engine") != engine:
        raise BenchmarkError(f"asked for {engine}, the server used: {hibernation}")
    image = Path(server.image_dir) / kernel_id
    criu = _criu_dump_stats(image) if engine == "criu" else {}
    files = {p.name: p.stat().st_size for p in image.rglob("*") if p.is_file()}

    drop_caches(drop)
    started = time.perf_counter()
    model = server.request("POST", f"api/kernels/{kernel_id}/wake")
    wake_post_s = time.perf_counter() - started
    channel.execute("1+1")
    wake_s = time.perf_counter() - started
    if model.get("hibernation"):
        raise BenchmarkError(f"the kernel did not wake: {model}")
    return {
        "engine": engine,
        "hibernate_s": hibernate_s,
        "hibernate_server_s": hibernation["seconds"],
        "criu_dump_s": criu.get("frozen_time"),
        "criu_dump_stats_s": criu,
        "wake_s": wake_s,
        "wake_post_s": wake_post_s,
        "image_bytes": hibernation["image_bytes"],
        "image_files": files,
        "lost": hibernation.get("lost", []),
        "rss_bytes": memory["rss"],
        "rss_anon_bytes": memory["anon"],
        "rss_file_bytes": memory["file"],
        "rss_shmem_bytes": memory["shmem"],
        "freed_bytes_reported": hibernation["freed_bytes"],
        "mem_available_gain_bytes": freed,
        "mem_available_gain_image_cached_bytes": freed_cached,
        "server_rss_growth_bytes": server_growth,
        "others_rss_growth_bytes": others_growth,
        "freed_bytes": freed + others_growth,
        "rss_after_wake_bytes": rss_bytes(kernel_pids(kernel_id))["rss"],
        "kernel_processes": len(pids),
    }


def plain_dill_run(
    channel: KernelChannel, workload: Workload, path: Path, drop: bool
) -> dict[str, Any]:
    """dill.dump_module (then fsync) and, from a cold page cache, dill.load_module, in the
    kernel; the loaded copy is checked against the kernel's data and dropped."""
    need = 3 * (workload.bytes or 0) + GIB
    if available_memory() < need:
        return {"skipped": f"less than {_size(need)} of memory available"}
    result = plain_dill(channel, f"dump({str(path)!r})")
    drop_caches(drop)
    result.update(plain_dill(channel, f"load({str(path)!r}, {workload.digest!r})"))
    if not result["intact"]:
        raise BenchmarkError(f"dill.load_module did not give back the same data: {result}")
    return result


def measure_baselines(
    result: dict[str, Any], baseline_file: Path, size: int, chunk: bytes, drop: bool
) -> str:
    """Plain file I/O of ``size`` bytes on the images' disk, recorded in ``result``."""
    drop_caches(drop)
    write_s = write_file(baseline_file, size, chunk)
    drop_caches(drop)
    read_s = read_file(baseline_file)
    drop_caches(drop)
    read_blake3_s = digest_seconds(baseline_file)
    baseline_file.unlink()
    result["baseline"].append(
        {
            "write_s": write_s,
            "read_s": read_s,
            "read_blake3_s": read_blake3_s,
            "blake3_s": blake3_seconds(size, chunk),
        }
    )
    return f"write {write_s:.2f} s, read {read_s:.2f} s;"


def bench_size(
    server: JupyterServer,
    workload: Workload,
    runs: int,
    engines: list[str],
    workdir: Path,
    drop: bool,
) -> dict[str, Any]:
    """For one workload: per run the I/O baselines, each engine's hibernate/wake and plain
    dill; then restarts."""
    label, size = workload.name, workload.bytes
    chunk = os.urandom(min(CHUNK, size)) if size else b""
    baseline_file = workdir / "baseline.bin"
    pickle_file = workdir / "namespace.pkl"
    result: dict[str, Any] = {
        "workload": workload.kind,
        "label": label,
        "bytes": size,
        "runs": [],
        "dill_runs": [],
        "plain_dill": [],
        "restarts": [],
        "baseline": [],
    }

    print(f"[{label}] starting a kernel and computing the data", flush=True)
    kernel_id = server.start_kernel()
    channel = KernelChannel(server, kernel_id)
    try:
        channel.execute("1+1", timeout=120)
        started = time.perf_counter()
        channel.execute(workload.fill)
        result["fill_s"] = time.perf_counter() - started
        channel.execute(f"import hashlib\ndigest = {workload.digest}")
        result["rss_filled"] = rss_bytes(kernel_pids(kernel_id))

        # One engine after the other: each engine's runs after its first hibernate the
        # kernel its own previous wake left (a CRIU restore keeps the process's memory
        # as it was; a dill wake is a new process that loaded the data differently).
        for engine in engines:
            for run in range(runs):
                line = f"[{label}] {engine} run {run + 1}/{runs}:"
                if size and engine == engines[0]:
                    line += " " + measure_baselines(result, baseline_file, size, chunk, drop)
                measured = hibernate_and_wake(server, kernel_id, channel, engine, drop)
                result["runs" if engine == "criu" else "dill_runs"].append(measured)
                line += (
                    f" hibernate {measured['hibernate_s']:.2f} s, "
                    f"wake {measured['wake_s']:.2f} s, "
                    f"image {measured['image_bytes'] / MIB:.0f} MiB, "
                    f"freed {measured['freed_bytes'] / MIB:.0f} of "
                    f"{measured['rss_bytes'] / MIB:.0f} MiB RSS;"
                )
                if measured["lost"]:
                    raise BenchmarkError(f"the dill engine lost variables: {measured['lost']}")
                if engine == "dill":
                    plain = plain_dill_run(channel, workload, pickle_file, drop)
                    result["plain_dill"].append(plain)
                    if "skipped" in plain:
                        line += f" plain dill skipped: {plain['skipped']}"
                    else:
                        line += (
                            f" plain dump_module {plain['dump_s']:.2f} s + fsync "
                            f"{plain['fsync_s']:.2f} s, load_module {plain['load_s']:.2f} s, "
                            f"file {plain['file_bytes'] / MIB:.0f} MiB"
                        )
                print(line, flush=True)

        intact = channel.execute(f"assert {workload.digest} == digest, 'data changed'")
        result["data_intact"] = intact["status"] == "ok"

        for run in range(runs):
            channel.close()
            started = time.perf_counter()
            server.request("POST", f"api/kernels/{kernel_id}/restart")
            restart_post_s = time.perf_counter() - started
            channel = KernelChannel(server, kernel_id)
            reply = channel.execute(workload.fill)
            restart_s = time.perf_counter() - started
            if reply["execution_count"] != 1:
                raise BenchmarkError(f"the kernel did not restart: {reply}")
            result["restarts"].append({"restart_s": restart_s, "restart_post_s": restart_post_s})
            print(f"[{label}] restart {run + 1}/{runs}: {restart_s:.2f} s", flush=True)
    finally:
        channel.close()
        with contextlib.suppress(Exception):
            server.shutdown_kernel(kernel_id)
        baseline_file.unlink(missing_ok=True)
        pickle_file.unlink(missing_ok=True)
        shutil.rmtree(Path(server.image_dir) / kernel_id, ignore_errors=True)
        drop_caches(drop)

    result["load_average"] = os.getloadavg()
    result["summary"] = summarize(result)
    return result


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def _engine_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    wake = [run["wake_s"] for run in runs]
    freed = [run["freed_bytes"] / run["rss_bytes"] for run in runs]
    return {
        "hibernate_median_s": _median(runs, "hibernate_s"),
        "hibernate_worst_s": max(run["hibernate_s"] for run in runs),
        "hibernate_server_median_s": _median(runs, "hibernate_server_s"),
        "wake_median_s": statistics.median(wake),
        "wake_worst_s": max(wake),
        "wake_post_median_s": _median(runs, "wake_post_s"),
        "image_bytes": int(_median(runs, "image_bytes")),
        "rss_bytes": int(_median(runs, "rss_bytes")),
        "private_rss_bytes": int(
            statistics.median(run["rss_anon_bytes"] + run["rss_shmem_bytes"] for run in runs)
        ),
        "mem_available_gain_bytes": int(_median(runs, "mem_available_gain_bytes")),
        "freed_bytes": int(_median(runs, "freed_bytes")),
        "freed_bytes_reported": int(_median(runs, "freed_bytes_reported")),
        "freed_vs_rss": statistics.median(freed),
        "freed_vs_rss_worst": min(freed),
        "worst_vs_median_wake": max(wake) / statistics.median(wake),
        "criu_dump_median_s": (
            statistics.median(d for run in runs if (d := run["criu_dump_s"]) is not None)
            if any(run["criu_dump_s"] is not None for run in runs)
            else None
        ),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians, worst cases and the ratios checked against the targets (CRIU), and the
    dill engine and plain dill next to CRIU."""
    runs, baseline = result["runs"], result["baseline"]
    summary: dict[str, Any] = {
        "restart_median_s": _median(result["restarts"], "restart_s"),
        "restart_worst_s": max(row["restart_s"] for row in result["restarts"]),
        "restart_post_median_s": _median(result["restarts"], "restart_post_s"),
    }
    if baseline:
        summary.update(
            write_median_s=_median(baseline, "write_s"),
            read_median_s=_median(baseline, "read_s"),
            read_blake3_median_s=_median(baseline, "read_blake3_s"),
            blake3_median_s=_median(baseline, "blake3_s"),
        )
    if runs:
        summary.update(_engine_summary(runs))
        summary["ratios"] = {
            "freed_vs_rss": summary["freed_vs_rss"],
            "freed_vs_rss_worst": summary["freed_vs_rss_worst"],
            "worst_vs_median_wake": summary["worst_vs_median_wake"],
            "restart_vs_wake": summary["restart_median_s"] / summary["wake_median_s"],
        }
        if baseline:
            summary["ratios"].update(
                hibernate_vs_write=summary["hibernate_median_s"] / summary["write_median_s"],
                wake_vs_read=summary["wake_median_s"] / summary["read_median_s"],
            )
        summary["targets_met"] = {
            name: (value <= limit if at_most else value >= limit)
            for name, (limit, at_most) in TARGETS.items()
            if (value := summary["ratios"].get(name)) is not None
        }
    if result.get("dill_runs"):
        dill = summary["dill"] = _engine_summary(result["dill_runs"])
        if runs:
            dill["hibernate_vs_criu"] = dill["hibernate_median_s"] / summary["hibernate_median_s"]
            dill["wake_vs_criu"] = dill["wake_median_s"] / summary["wake_median_s"]
            dill["image_vs_criu"] = dill["image_bytes"] / summary["image_bytes"]
        if baseline:
            dill["hibernate_vs_write"] = dill["hibernate_median_s"] / summary["write_median_s"]
            dill["wake_vs_read"] = dill["wake_median_s"] / summary["read_median_s"]
    plain = [row for row in result.get("plain_dill", []) if "skipped" not in row]
    if plain:
        summary["plain_dill"] = {
            "dump_median_s": _median(plain, "dump_s"),
            "fsync_median_s": _median(plain, "fsync_s"),
            "dump_fsync_median_s": statistics.median(r["dump_s"] + r["fsync_s"] for r in plain),
            "load_median_s": _median(plain, "load_s"),
            "file_bytes": int(_median(plain, "file_bytes")),
            "protocol": plain[0]["protocol"],
            "names": plain[0]["names"],
        }
    return summary


# Reporting.


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


def _mark(met: bool) -> str:
    return "yes" if met else "**no**"


def _label(row: dict[str, Any]) -> str:
    return str(row.get("label") or f"{row['bytes'] / GIB:g} GiB")


NONE = "n/a"


def _s(value: float | None, digits: int = 2) -> str:
    return NONE if value is None else f"{value:.{digits}f} s"


def _x(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def tables(report: dict[str, Any]) -> str:
    """The results as Markdown tables (also readable on a terminal)."""
    sizes = report["sizes"]
    criu = [row for row in sizes if row["runs"]]
    lines = [
        '**CRIU** (`{"engine": "criu"}`):',
        "",
        "| Data | Runs | Hibernate median / worst | Write + fsync | Wake to 1st reply "
        "median / worst | Cold read | Restart + recompute | Image | Kernel RSS "
        "| Memory freed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in criu:
        s = row["summary"]
        lines.append(
            f"| {_label(row)} | {len(row['runs'])} "
            f"| {s['hibernate_median_s']:.2f} / {s['hibernate_worst_s']:.2f} s "
            f"| {_s(s.get('write_median_s'))} "
            f"| {s['wake_median_s']:.2f} / {s['wake_worst_s']:.2f} s "
            f"| {_s(s.get('read_median_s'))} "
            f"| {s['restart_median_s']:.2f} s "
            f"| {_size(s['image_bytes'])} | {_size(s['rss_bytes'])} "
            f"| {_size(s['freed_bytes'])} |"
        )
    lines += [
        "",
        "| Data | Hibernate / write (≤ 1.5) | Wake / read (≤ 1.5) | Freed / RSS, median "
        "(≥ 95 %) | Worst / median wake (≤ 2) | Restart + recompute / wake |",
        "|---|---|---|---|---|---|",
    ]
    for row in criu:
        r, met = row["summary"]["ratios"], row["summary"]["targets_met"]

        def target(name: str, r: dict[str, float] = r, met: dict[str, bool] = met) -> str:
            return f"{r[name]:.2f} ({_mark(met[name])})" if name in r else NONE

        lines.append(
            f"| {_label(row)} "
            f"| {target('hibernate_vs_write')} | {target('wake_vs_read')} "
            f"| {r['freed_vs_rss']:.1%}, worst {r['freed_vs_rss_worst']:.1%} "
            f"({_mark(met['freed_vs_rss'])}) "
            f"| {target('worst_vs_median_wake')} "
            f"| {r['restart_vs_wake']:.1f}x |"
        )
    lines += [
        "",
        "Where CRIU's time goes (medians):",
        "",
        "| Data | CRIU dump | Rest of hibernate (BLAKE3, fsync, evict, manifest) "
        "| BLAKE3 in memory | Cold read + BLAKE3 | Wake request | First reply after wake request |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in criu:
        s = row["summary"]
        server_s = statistics.median(run["hibernate_server_s"] for run in row["runs"])
        dump = s["criu_dump_median_s"]
        lines.append(
            f"| {_label(row)} "
            f"| {_s(dump)} | {_s(None if dump is None else server_s - dump)} "
            f"| {_s(s.get('blake3_median_s', s.get('sha256_median_s')))} "
            f"| {_s(s.get('read_blake3_median_s', s.get('read_sha256_median_s')))} "
            f"| {s['wake_post_median_s']:.2f} s "
            f"| {s['wake_median_s'] - s['wake_post_median_s']:.2f} s |"
        )
    dill = [row for row in sizes if "dill" in row["summary"] or "plain_dill" in row["summary"]]
    if not dill:
        return "\n".join(lines)
    lines += [
        "",
        '**dill engine** (`{"engine": "dill"}`) and **plain dill** '
        "(`dill.dump_module` / `dill.load_module` in the kernel), same kernel and runs:",
        "",
        "| Data | dill hibernate median / worst | dill wake to 1st reply median / worst "
        "| dill image | Freed / RSS, median | Plain `dump_module` + fsync | Plain "
        "`load_module` (cold) | Plain dill file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in dill:
        d, p = row["summary"].get("dill"), row["summary"].get("plain_dill")
        engine = (
            f"| {d['hibernate_median_s']:.2f} / {d['hibernate_worst_s']:.2f} s "
            f"| {d['wake_median_s']:.2f} / {d['wake_worst_s']:.2f} s "
            f"| {_size(d['image_bytes'])} | {d['freed_vs_rss']:.1%} "
            if d
            else f"| {NONE} | {NONE} | {NONE} | {NONE} "
        )
        plain = (
            f"| {p['dump_median_s']:.2f} + {p['fsync_median_s']:.2f} s "
            f"| {p['load_median_s']:.2f} s | {_size(p['file_bytes'])} |"
            if p
            else f"| skipped | skipped | {NONE} |"
        )
        lines.append(f"| {_label(row)} " + engine + plain)
    lines += [
        "",
        "Ratios, medians of the same run (below 1: the first is faster or smaller):",
        "",
        "| Data | dill / CRIU hibernate | dill / CRIU wake | dill / CRIU image "
        "| dill hibernate / write | dill wake / read | dill hibernate / plain dump + fsync "
        "| dill wake / plain load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in dill:
        d, p = row["summary"].get("dill") or {}, row["summary"].get("plain_dill")
        lines.append(
            f"| {_label(row)} | {_x(d.get('hibernate_vs_criu'))} | {_x(d.get('wake_vs_criu'))} "
            f"| {_x(d.get('image_vs_criu'))} | {_x(d.get('hibernate_vs_write'))} "
            f"| {_x(d.get('wake_vs_read'))} "
            f"| {_x(d['hibernate_median_s'] / p['dump_fsync_median_s'] if d and p else None)} "
            f"| {_x(d['wake_median_s'] / p['load_median_s'] if d and p else None)} |"
        )
    return "\n".join(lines)


def _code_text(report: dict[str, Any]) -> str:
    code = report.get("code") or {}
    if not code.get("commit"):
        return ""
    if code.get("kernelhib_path"):
        return (
            f" (imported from `{code['kernelhib_path']}`; the repository was at {code['commit']})"
        )
    dirty = " plus uncommitted changes to kernelhib/" if code.get("kernelhib_modified") else ""
    return f" (commit {code['commit']}{dirty})"


def machine_text(report: dict[str, Any]) -> str:
    m = report["machine"]
    disk = m["disk"]
    kind = "virtio block device" if disk.get("virtio") else "block device"
    rotational = {True: "reports rotational", False: "reports non-rotational", None: ""}
    parts = [
        f"- Measured {report['date']} with kernelhib {report['kernelhib']}{_code_text(report)}, "
        f"CRIU {m.get('criu', 'unknown')}.",
        f"- {m['cores']} cores ({m['cpu']}){', virtual machine' if m['virtual_machine'] else ''}, "
        f"{m['memory_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}.",
        f"- Disk: {disk.get('fstype', '?')} on {disk.get('device', '?')} ({kind}"
        f"{', ' + disk['model'] if disk.get('model') else ''}"
        f"{', ' + rotational[disk.get('rotational')] if disk.get('rotational') is not None else ''}"
        f"), mounted at {disk.get('mount', '?')}; images and baseline files in "
        f"`{report['work_dir']}`.",
        "- Page cache: "
        + (
            "dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every baseline "
            "read and before every wake, so both read from disk."
            if report["caches_dropped"]
            else "**not** dropped (run without root or with `--no-drop-caches`): reads may "
            "come from memory."
        ),
        f"- Command: `{report['command']}`",
    ]
    return "\n".join(parts)


def update_markdown(path: Path, report: dict[str, Any]) -> None:
    """Replace the generated section of ``path`` (or append one) with this run's results."""
    section = f"{MARK_START}\n{machine_text(report)}\n\n{tables(report)}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Performance\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# Driving it.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[0.1, 1, 4], metavar="GIB",
        help="data held by the kernel, in GiB (default: 0.1 1 4)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, nargs="+", metavar="N",
        help="hibernate/wake runs (and restarts): one count for all sizes, or one per size "
        "(default: 5, and 3 from 4 GiB up; the objects kernel gets the one count, else 5)",
    )  # fmt: skip
    parser.add_argument(
        "--objects", type=int, default=1_000_000, metavar="N",
        help="also a kernel holding a dict of N str keys to int values (many small objects, "
        "where dill's pure-Python pickler is slow); 0: none (default: 1000000)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", nargs="+", choices=["criu", "dill"], default=["criu", "dill"],
        help="engines to run, in this order in each run; with dill, plain dill.dump_module "
        "is measured too (default: criu dill)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke check: 0.1 GiB, 2 runs, both engines, no objects, no Markdown",
    )  # fmt: skip
    parser.add_argument(
        "--dir", type=Path, default=Path("/var/tmp"),
        help="where to put images and baseline files: the disk being measured "
        "(default: /var/tmp)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"results file (default: {DEFAULT_JSON})"
    )
    parser.add_argument("--markdown", type=Path, help="update the results section of this file")
    parser.add_argument(
        "--no-drop-caches", action="store_true",
        help="do not drop the page cache before reads and wakes (needed without root)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--render", type=Path, metavar="JSON",
        help="measure nothing: print (and with --markdown, write) the tables of a results file",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.runs, args.markdown, args.objects = [0.1], [2], None, 0
    objects_runs = args.runs[0] if args.runs and len(args.runs) == 1 else 5
    if args.runs is None:
        args.runs = [5 if s < 4 else 3 for s in args.sizes]
    elif len(args.runs) == 1:
        args.runs = args.runs * len(args.sizes)
    if len(args.runs) != len(args.sizes) or min(args.runs) < 1:
        parser.error("--runs takes one positive count, or one per size")
    args.workloads = [numpy_workload(size) for size in args.sizes]
    if args.objects > 0:
        args.workloads.append(objects_workload(args.objects))
        args.runs.append(objects_runs)
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def running_server(workdir: Path, image_dir: Path) -> Iterator[JupyterServer]:
    server = JupyterServer(workdir, image_dir)
    try:
        server.wait_ready()
        yield server
    except BaseException:
        print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        print(tables(report))
        if args.markdown:
            update_markdown(args.markdown, report)
        return 0
    drop = not args.no_drop_caches
    if drop and os.geteuid() != 0:
        print("not root: cannot drop the page cache; use --no-drop-caches", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kernelhib-bench-", dir=args.dir))
    image_dir = workdir / "images"
    from kernelhib import __version__

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernelhib": __version__,
        "code": code_version(),
        "command": " ".join(["python", "benchmarks/hibernate.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(workdir),
        "work_dir": str(workdir),
        "caches_dropped": drop,
        "engines": args.engines,
        "sizes": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        with running_server(workdir, image_dir) as server:
            report["warmup"] = server.warm_up(args.engines)
            for workload, runs in zip(args.workloads, args.runs, strict=True):
                report["sizes"].append(
                    bench_size(server, workload, runs, args.engines, workdir, drop)
                )
                args.json.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(tables(report))
    print(f"\nresults: {args.json}")
    if args.markdown:
        update_markdown(args.markdown, report)
        print(f"updated: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
