"""Benchmark kernel hibernation (CRIU and dill engines) against file I/O and plain dill.

For each workload (random numpy data of each size, a pandas DataFrame, touched
zeros, a dict of many small Python objects), a real ``jupyter server`` with
kernelhib runs a python3 kernel holding it. In each run, on the same disk: the
kernel's bytes are written (with fsync) and read back (from a cold page cache)
with plain file I/O, the kernel is hibernated, its image read back cold, and
it is woken; the order of the two halves alternates from run to run, and the
ratios the targets name are taken run by run. Then with the dill engine, and
inside the kernel plain ``dill.dump_module`` / ``dill.load_module``. After the
runs the kernel is restarted and the data recomputed. Two more workloads:
re-hibernating a kernel after a cell rewrote 1 % of its data, and a second
kernel with the same imports as a first one. The results go to stdout, to a
JSON file and, with ``--markdown``, into ``docs/performance.md``.

Needs root (CRIU, and dropping the page cache). Run from the repository root::

    .venv/bin/python benchmarks/hibernate.py --markdown docs/performance.md
    .venv/bin/python benchmarks/hibernate.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from blake3 import blake3

from kernelhib.disk_io import digest
from kernelhib.kernel_process import HELPER_VAR, available_memory, proc_fields, process_tree
from kernelhib.testing import (
    KernelChannel,
    ServerProcess,
    jupyter_env,
    launch,
    wait_until_fetched,
)

GIB = 1 << 30
MIB = 1 << 20
CHUNK = 64 * MIB
HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
MARK_START = "<!-- benchmark-results:start -->"
MARK_END = "<!-- benchmark-results:end -->"
# Targets from the issue: ratio name -> (limit, True if the ratio must stay at or below it).
TARGETS = {
    "first_reply_s": (0.5, True),
    "memory_back_vs_image_read": (1.2, True),
    "freed_vs_rss_worst": (0.95, False),
    "worst_vs_median_wake": (2.0, True),
}
# Per kind of data: the image's stored bytes / the kernel's RSS, and hibernate / plain write.
STORED_VS_RSS = {"numpy": 1.02, "dataframe": 0.3, "objects": 0.3, "zeros": 0.02}
HIBERNATE_VS_WRITE = {"numpy": 1.2, "dataframe": 1.0, "zeros": 1.0}
REHIBERNATE_TARGETS = {"time_ratio": 0.25, "written_ratio": 0.05}
SAME_IMPORTS_TARGET = 0.3
# A kernel's memory is back after a wake once its private RSS is this share of what it was.
MEMORY_BACK = 0.98
# Modules a workload needs in the kernels' Python that the benchmark installs if missing.
INSTALLABLE = {"numpy", "pandas"}


class BenchmarkError(RuntimeError):
    """The benchmark could not go on; the message says why."""


# Measurements of the machine.


def kernel_pids(kernel_id: str, among: Iterable[int] | None = None) -> list[int]:
    """Host pids of the processes of a kernelhib kernel (found by their environment), among
    ``among`` or all; not a lazy wake's userfaultfd holder."""
    needle = f"KERNELHIB_KERNEL_ID={kernel_id}".encode()
    if among is None:
        among = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    pids = []
    for pid in among:
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            helper = any(var.startswith(f"{HELPER_VAR}=".encode()) for var in environ)
            if needle in environ and not helper:
                pids.append(pid)
    return pids


def rss_bytes(pids: list[int]) -> dict[str, int]:
    """Summed resident memory of ``pids``: total, anonymous, file-backed and shared memory."""
    total = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    for pid in pids:
        with contextlib.suppress(OSError, KeyError):
            status = proc_fields(Path(f"/proc/{pid}/status"))
            for key in total:
                total[key] += int(status[key].split()[0]) * 1024
    return {
        "rss": sum(total.values()),
        "anon": total["RssAnon"],
        "file": total["RssFile"],
        "shmem": total["RssShmem"],
    }


def private_rss(pids: list[int]) -> int:
    """Anonymous and shmem RSS of ``pids``: the memory a wake has to bring back (file pages
    come back from the page cache as they are touched)."""
    memory = rss_bytes(pids)
    return memory["anon"] + memory["shmem"]


class MemoryWatch:
    """Watches, from a thread, for a kernel's private RSS to reach ``target`` after a wake
    starts: when all its memory is back, which a lazy wake reaches after its first reply.

    Its processes are looked for among ``candidates()`` only (a CRIU wake restores the
    same pids; a dill wake starts a child of the server): scanning all of /proc every
    few milliseconds would take CPU from the wake being timed.
    """

    def __init__(
        self, kernel_id: str, target: int, candidates: Callable[[], Iterable[int]]
    ) -> None:
        self.kernel_id, self.target, self.candidates = kernel_id, target, candidates
        self.started = self.grew = time.perf_counter()
        self.reached_s: float | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        pids: list[int] = []
        while not self._stop.is_set():
            pids = pids or kernel_pids(self.kernel_id, self.candidates())
            memory = private_rss(pids)
            now = time.perf_counter()
            if memory > self.peak:
                self.peak, self.grew = memory, now
            if memory >= self.target:
                self.reached_s = now - self.started
                return
            if not memory:
                pids = []  # not started yet, or a new process (the dill engine's wake)
            self._stop.wait(0.01)

    def finish(self, still_s: float = 2.0, timeout_s: float = 600) -> dict[str, Any]:
        """Wait until the target is reached, or the RSS has not grown for ``still_s``."""
        while self._thread.is_alive() and time.perf_counter() - self.started < timeout_s:
            if time.perf_counter() - self.grew > still_s:
                break
            self._thread.join(0.05)
        self._stop.set()
        self._thread.join()
        fraction = self.peak / self.target if self.target else 1.0
        return {"memory_back_s": self.reached_s, "memory_back_fraction": fraction}


def others_rss(exclude: list[int]) -> int:
    """Summed private (anonymous and shmem) RSS of every process but ``exclude``: to tell
    the kernel's freed memory from memory that other work on the machine took or gave
    back meanwhile (file pages are left out: they are page cache either way)."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return private_rss([pid for pid in pids if pid not in exclude])


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
    return read_files([path])


def read_files(paths: list[Path]) -> float:
    """Seconds to read files through, one after the other, with plain file I/O."""
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def stored_bytes(directory: Path) -> int:
    """Disk space the files under ``directory`` take (``du``: allocated blocks, each
    inode once), so holes, sharing and compression count as the disk sees them."""
    seen, total = set(), 0
    for path in directory.rglob("*") if directory.exists() else ():
        with contextlib.suppress(OSError):
            stat = path.lstat()
            if path.is_file() and not path.is_symlink() and (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def disk_stat(path: Path) -> Path | None:
    """The I/O counters (``/sys/class/block/<dev>/stat``) of the disk holding ``path``;
    None if it is not on a block device (tmpfs, overlay)."""
    device = Path(_mount_of(path).get("device", ""))
    stat = Path("/sys/class/block") / device.name / "stat"
    return stat if device.name and stat.exists() else None


def disk_written(stat: Path | None) -> int | None:
    """Bytes written to a disk since boot, after writing back what is dirty: a
    hibernation's bytes written is its difference, everything it caused to reach the
    disk (image, staging copies, filesystem metadata), whichever process wrote it."""
    if stat is None:
        return None
    os.sync()
    return int(stat.read_text().split()[6]) * 512


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


# What was measured.


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


# The server and its kernels.


def ensure_modules(modules: set[str], env: dict[str, str]) -> None:
    """Install numpy and pandas into the kernels' Python if a workload needs them and they
    are missing (the test extras have them); any other module must be there already."""
    missing = [
        module
        for module in sorted(modules)
        if subprocess.run([sys.executable, "-c", f"import {module}"], env=env).returncode
    ]
    if not missing:
        return
    unknown = sorted(set(missing) - INSTALLABLE)
    if unknown:
        raise BenchmarkError(
            f"{', '.join(unknown)}: not importable in the kernels' Python ({sys.executable}); "
            "install it there, or leave it out of --imports"
        )
    print(f"installing {' '.join(missing)} into {sys.prefix} for the kernels", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


async def warm_up(server: ServerProcess, engines: list[str]) -> dict[str, Any]:
    """Hibernate and wake an empty kernel once with each engine, so one-time costs
    (``criu check``, imports in the server) do not land in the first measured run.
    Also records how plain ``dill.dump_module()`` of the kernel's ``__main__`` fails."""
    kernel_id, channel = await server.start_kernel()
    times: dict[str, Any] = {}
    try:
        for engine in engines:
            started = time.perf_counter()
            await server.hibernate(kernel_id, engine=engine)
            hibernated = time.perf_counter()
            await server.wake(kernel_id)
            await channel.run("1+1")
            woken = time.perf_counter()
            times[engine] = {"hibernate_s": hibernated - started, "wake_s": woken - hibernated}
        if "dill" in engines:
            # "": it worked. With a variable naming the shell, it meets its sqlite3
            # connection (the IPython history).
            times["dump_module_main_error"] = await plain_dill(channel, "main_error()")
            await channel.run("shell = get_ipython()")
            times["dump_module_main_error_with_shell"] = await plain_dill(channel, "main_error()")
    finally:
        await discard_kernel(server, kernel_id, channel)
    return times


async def discard_kernel(server: ServerProcess, kernel_id: str, channel: KernelChannel) -> None:
    """Shut a kernel down and delete what is left of its image."""
    channel.close()
    with contextlib.suppress(Exception):
        await server.shutdown_kernel(kernel_id)
    shutil.rmtree(server.image_dir / kernel_id, ignore_errors=True)


# The workloads.


@dataclass(frozen=True)
class Workload:
    """What the kernel holds: ``data``, computed by ``fill``, checked by ``digest``."""

    name: str  # label in the tables
    kind: str  # "numpy" (random float64 data), "dataframe", "zeros" or "objects"
    bytes: int  # the data's size; 0: the kernel's private RSS once filled (for the baselines)
    fill: str
    digest: str  # an expression of ``data`` (and ``hashlib``): a hex digest
    modules: frozenset[str] = frozenset({"numpy"})


def numpy_workload(size_gib: float, seed: int = 0) -> Workload:
    size = int(size_gib * GIB) // 8 * 8
    return Workload(
        name=f"{size / GIB:g} GiB",
        kind="numpy",
        bytes=size,
        fill=f"import numpy as np\ndata = np.random.default_rng({seed}).random({size // 8})",
        digest="hashlib.sha256(data).hexdigest()",
    )


def zeros_workload(size_gib: float) -> Workload:
    size = int(size_gib * GIB)
    # np.zeros maps untouched pages, which are not in RSS: writing the zeros faults them in.
    return Workload(
        name=f"{size / GIB:g} GiB of zeros",
        kind="zeros",
        bytes=size,
        fill=f"import numpy as np\ndata = np.empty({size}, np.uint8)\ndata.fill(0)",
        digest="hashlib.sha256(data).hexdigest()",
    )


def dataframe_workload(rows: int) -> Workload:
    fill = (
        "import numpy as np, pandas as pd\n"
        "rng = np.random.default_rng(0)\n"
        f"n = {rows}\n"
        "data = pd.DataFrame({\n"
        "    'id': rng.integers(0, 1 << 40, n),\n"
        "    'value': rng.normal(size=n),\n"
        "    'category': pd.Categorical.from_codes(\n"
        "        rng.integers(0, 50, n), [f'category {i}' for i in range(50)]),\n"
        "    'name': pd.Series(rng.integers(0, 10**9, n)).map('user{:09d}'.format),\n"
        "})\n"
        "del rng, n"
    )
    return Workload(
        name=f"DataFrame of {rows / 1e6:g}M rows",
        kind="dataframe",
        bytes=0,
        fill=fill,
        digest="hashlib.sha256(pd.util.hash_pandas_object(data).values).hexdigest()",
        modules=frozenset({"numpy", "pandas"}),
    )


def objects_workload(count: int) -> Workload:
    return Workload(
        name=f"dict of {count / 1e6:g}M",
        kind="objects",
        bytes=0,
        fill=f"data = {{f'k{{i}}': i for i in range({count})}}",
        digest="hashlib.sha256(repr(data).encode()).hexdigest()",
        modules=frozenset(),
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
    scope = dict(vars(module), hashlib=hashlib)
    intact = eval(digest, scope) == get_ipython().user_ns["digest"]
    del module, scope
    os.unlink(path)
    return {"load_s": load_s, "intact": intact, "names": names}
"""


async def plain_dill(channel: KernelChannel, call: str) -> Any:
    """Call a function of PLAIN_DILL_SOURCE in the kernel, e.g. ``call="dump('/x')"``."""
    run = f"(lambda ns: (exec({PLAIN_DILL_SOURCE!r}, ns), eval({call!r}, ns))[1])"
    return await channel.evaluate(
        f"__import__('json').dumps({run}({{'__name__': 'kernelhib_bench'}}))"
    )


async def plain_dill_run(
    channel: KernelChannel, workload: Workload, path: Path, drop: bool
) -> dict[str, Any]:
    """dill.dump_module (then fsync) and, from a cold page cache, dill.load_module, in the
    kernel; the loaded copy is checked against the kernel's data and dropped."""
    need = 3 * (workload.bytes or 0) + GIB
    if available_memory() < need:
        return {"skipped": f"less than {_size(need)} of memory available"}
    result = await plain_dill(channel, f"dump({str(path)!r})")
    drop_caches(drop)
    result.update(await plain_dill(channel, f"load({str(path)!r}, {workload.digest!r})"))
    if not result["intact"]:
        raise BenchmarkError(f"dill.load_module did not give back the same data: {result}")
    return result


# Hibernations and wakes, measured.


@dataclass(frozen=True)
class Bench:
    """What every measurement needs: the server, the work directory on the disk being
    measured, that disk's I/O counters, and whether to drop the page cache."""

    server: ServerProcess
    workdir: Path
    disk: Path | None
    drop: bool


async def hibernate_measured(bench: Bench, kernel_id: str, engine: str) -> dict[str, Any]:
    """One hibernation with ``engine``, timed, and what it wrote to the disk and kept there."""
    pids = kernel_pids(kernel_id)
    memory = private_rss(pids)
    drop_caches(bench.drop)
    written, stored = disk_written(bench.disk), stored_bytes(bench.server.image_dir)
    started = time.perf_counter()
    model = await bench.server.hibernate(kernel_id, engine=engine)
    hibernate_s = time.perf_counter() - started
    after = disk_written(bench.disk)
    hibernation = model["hibernation"]
    if model["execution_state"] != "hibernated" or kernel_pids(kernel_id):
        raise BenchmarkError(f"the kernel still runs after hibernation: {model}")
    if hibernation.get("engine") != engine:
        raise BenchmarkError(f"asked for {engine}, the server used: {hibernation}")
    if hibernation.get("lost"):
        raise BenchmarkError(f"the {engine} engine lost variables: {hibernation['lost']}")
    return {
        "engine": engine,
        "hibernate_s": hibernate_s,
        "hibernate_server_s": hibernation["seconds"],
        "image_bytes": hibernation["image_bytes"],
        "written_bytes": None if after is None or written is None else after - written,
        "stored_bytes": stored_bytes(bench.server.image_dir) - stored,
        "freed_bytes_reported": hibernation["freed_bytes"],
        "lost": hibernation.get("lost", []),
        "kernel_pids": pids,
        "private_rss_bytes": memory,
    }


def image_read_seconds(bench: Bench, kernel_id: str) -> float:
    """Seconds to read the kernel's image files through from a cold page cache: the bytes
    a wake must bring back, read as plainly as the disk allows. For a chunked image
    (format 2), its chunks in the store too, each once, in the order of its pages."""
    image = bench.server.image_dir / kernel_id
    files = sorted(p for p in image.rglob("*") if p.is_file())
    manifest = json.loads((image / "manifest.json").read_text())
    chunks = dict.fromkeys(
        image.parent / ".chunks" / digest[:2] / digest[2:]
        for entry in manifest.get("files", {}).values()
        for digest, _ in entry.get("chunks", [])
        if digest != "zero"
    )
    drop_caches(bench.drop)
    return read_files([*files, *chunks])


async def wake_measured(
    bench: Bench, kernel_id: str, channel: KernelChannel, hibernated: dict[str, Any]
) -> dict[str, Any]:
    """One wake from a cold page cache: until the first reply over the kernel's open
    websocket, and until all its memory is back: its private RSS what it was before
    the hibernation, or, for a lazy wake, the end of the fetch."""
    drop_caches(bench.drop)
    before, server_pid = hibernated["kernel_pids"], bench.server.process.pid
    watch = MemoryWatch(
        kernel_id,
        int(hibernated["private_rss_bytes"] * MEMORY_BACK),
        lambda: [*before, *process_tree(server_pid)],
    )
    started = time.perf_counter()
    model = await bench.server.wake(kernel_id)
    wake_post_s = time.perf_counter() - started
    await channel.run("1+1")
    wake_s = time.perf_counter() - started
    if model.get("hibernation", {}).get("state", "running") != "running":
        raise BenchmarkError(f"the kernel did not wake: {model}")
    # A lazy wake ends once every page is in and verified, and its image is retired.
    lazy = bool(model.get("hibernation", {}).get("fetching"))

    async def until_fetched() -> float:
        await wait_until_fetched(bench.server.api, kernel_id, timeout=600)
        return time.perf_counter() - started

    fetching = asyncio.ensure_future(until_fetched())
    back = await asyncio.to_thread(watch.finish)
    fetched_s = await fetching
    if lazy:
        # All of it is back then, though its RSS may stay lower: pages the image holds
        # as zeros are left to zero pages, which take no memory until written.
        back["memory_back_s"] = fetched_s
    return {
        "wake_s": wake_s,
        "wake_post_s": wake_post_s,
        "lazy": lazy,
        "fetched_s": fetched_s,
        **back,
    }


async def measure_baselines(bench: Bench, size: int, chunk: bytes) -> dict[str, float]:
    """Plain file I/O of ``size`` bytes on the images' disk."""
    path = bench.workdir / "baseline.bin"
    drop_caches(bench.drop)
    write_s = write_file(path, size, chunk)
    drop_caches(bench.drop)
    read_s = read_file(path)
    drop_caches(bench.drop)
    read_blake3_s = digest_seconds(path)
    path.unlink()
    return {
        "write_s": write_s,
        "read_s": read_s,
        "read_blake3_s": read_blake3_s,
        "blake3_s": blake3_seconds(size, chunk),
    }


async def hibernate_and_wake(
    bench: Bench, kernel_id: str, channel: KernelChannel, engine: str
) -> dict[str, Any]:
    """One hibernation with ``engine``, a cold read of its image and one wake, timed;
    memory measured around them."""
    server = bench.server
    pids = kernel_pids(kernel_id)
    memory = rss_bytes(pids)
    drop_caches(bench.drop)
    available = available_memory()
    server_rss = rss_bytes([server.process.pid])["rss"]
    others = others_rss(pids)
    measured = await hibernate_measured(bench, kernel_id, engine)
    await asyncio.sleep(0.5)  # let the freed memory show in /proc/meminfo
    freed_cached = available_memory() - available
    drop_caches(bench.drop)
    freed = available_memory() - available
    server_growth = rss_bytes([server.process.pid])["rss"] - server_rss
    others_growth = others_rss(pids) - others
    image = server.image_dir / kernel_id
    criu = _criu_dump_stats(image) if engine == "criu" else {}
    files = {p.name: p.stat().st_size for p in image.rglob("*") if p.is_file()}
    measured.update(
        criu_dump_s=criu.get("frozen_time"),
        criu_dump_stats_s=criu,
        image_files=files,
        image_read_s=image_read_seconds(bench, kernel_id),
    )
    measured.update(await wake_measured(bench, kernel_id, channel, measured))
    return measured | {
        "rss_bytes": memory["rss"],
        "rss_anon_bytes": memory["anon"],
        "rss_file_bytes": memory["file"],
        "rss_shmem_bytes": memory["shmem"],
        "mem_available_gain_bytes": freed,
        "mem_available_gain_image_cached_bytes": freed_cached,
        "server_rss_growth_bytes": server_growth,
        "others_rss_growth_bytes": others_growth,
        "freed_bytes": freed + others_growth,
        "rss_after_wake_bytes": rss_bytes(kernel_pids(kernel_id))["rss"],
        "kernel_processes": len(pids),
    }


def run_line(measured: dict[str, Any]) -> str:
    line = f" hibernate {measured['hibernate_s']:.2f} s, "
    if "wake_s" in measured:
        back = measured["memory_back_s"]
        line += (
            f"wake {measured['wake_s']:.2f} s "
            f"(memory back {'never' if back is None else f'{back:.2f} s'}), "
        )
    return line + (
        f"image {_size(measured['image_bytes'])}, stored {_size(measured['stored_bytes'])}, "
        f"written {_size(measured['written_bytes'])};"
    )


async def bench_workload(
    bench: Bench, workload: Workload, runs: int, engines: list[str]
) -> dict[str, Any]:
    """For one workload: per run the I/O baselines and each engine's hibernate/wake (and
    plain dill with the dill engine); then restarts."""
    server, label = bench.server, workload.name
    pickle_file = bench.workdir / "namespace.pkl"
    result: dict[str, Any] = {
        "workload": workload.kind,
        "label": label,
        "bytes": workload.bytes,
        "runs": [],
        "dill_runs": [],
        "plain_dill": [],
        "restarts": [],
    }

    print(f"[{label}] starting a kernel and computing the data", flush=True)
    kernel_id, channel = await server.start_kernel()
    try:
        started = time.perf_counter()
        await channel.run(workload.fill)
        result["fill_s"] = time.perf_counter() - started
        await channel.run(f"import hashlib\ndigest = {workload.digest}")
        result["rss_filled"] = rss_bytes(kernel_pids(kernel_id))
        size = workload.bytes or result["rss_filled"]["anon"] + result["rss_filled"]["shmem"]
        result["baseline_bytes"] = size
        chunk = os.urandom(min(CHUNK, size))

        # One engine after the other: each engine's runs after its first hibernate the
        # kernel its own previous wake left (a CRIU restore keeps the process's memory
        # as it was; a dill wake is a new process that loaded the data differently).
        # The baselines go before the hibernation in even runs and after the wake in odd
        # ones, so a disk that speeds up or slows down favours neither.
        for engine in engines:
            for run in range(runs):
                line = f"[{label}] {engine} run {run + 1}/{runs}:"
                baseline = engine == engines[0]
                if baseline and run % 2 == 0:
                    plain = await measure_baselines(bench, size, chunk)
                measured = await hibernate_and_wake(bench, kernel_id, channel, engine)
                if baseline and run % 2 == 1:
                    plain = await measure_baselines(bench, size, chunk)
                if baseline:
                    measured["baseline"] = plain
                    line += f" write {plain['write_s']:.2f} s, read {plain['read_s']:.2f} s;"
                result["runs" if engine == "criu" else "dill_runs"].append(measured)
                line += run_line(measured) + (
                    f" freed {_size(measured['freed_bytes'])} of "
                    f"{_size(measured['rss_bytes'])} RSS;"
                )
                if engine == "dill":
                    plain = await plain_dill_run(channel, workload, pickle_file, bench.drop)
                    result["plain_dill"].append(plain)
                    if "skipped" in plain:
                        line += f" plain dill skipped: {plain['skipped']}"
                    else:
                        line += (
                            f" plain dump_module {plain['dump_s']:.2f} s + fsync "
                            f"{plain['fsync_s']:.2f} s, load_module {plain['load_s']:.2f} s, "
                            f"file {_size(plain['file_bytes'])}"
                        )
                print(line, flush=True)

        await channel.run(f"assert {workload.digest} == digest, 'data changed'")
        result["data_intact"] = True

        for run in range(runs):
            channel.close()
            started = time.perf_counter()
            await server.api("POST", "kernels", kernel_id, "restart")
            restart_post_s = time.perf_counter() - started
            channel = await server.open_channel(kernel_id)
            reply = await channel.run(workload.fill)
            restart_s = time.perf_counter() - started
            if reply["execution_count"] != 1:
                raise BenchmarkError(f"the kernel did not restart: {reply}")
            result["restarts"].append({"restart_s": restart_s, "restart_post_s": restart_post_s})
            print(f"[{label}] restart {run + 1}/{runs}: {restart_s:.2f} s", flush=True)
    finally:
        await discard_kernel(server, kernel_id, channel)
        pickle_file.unlink(missing_ok=True)
        drop_caches(bench.drop)

    result["load_average"] = os.getloadavg()
    result["summary"] = summarize(result)
    return result


def record(result: dict[str, Any], engine: str, run: str, **hibernations: Any) -> None:
    """Keep a run of a workload of several hibernations, and print it."""
    result["runs"].append({"engine": engine, **hibernations})
    measured = " ".join(f"{name}{run_line(value)}" for name, value in hibernations.items())
    print(f"[{result['label']}] {engine} run {run}: {measured}", flush=True)


async def bench_rehibernate(
    bench: Bench, size_gib: float, runs: int, engines: list[str]
) -> dict[str, Any]:
    """Per run, a new kernel with random data: hibernate, wake, rewrite 1 % of the data in
    a cell, hibernate again. A new kernel each run, so that the first hibernation is
    always a first one, even for a store that keeps images after a wake."""
    label = f"{size_gib:g} GiB, 1 % rewritten"
    result: dict[str, Any] = {"workload": "rehibernate", "label": label, "runs": []}
    for engine in engines:
        for run in range(runs):
            workload = numpy_workload(size_gib, seed=run)
            kernel_id, channel = await bench.server.start_kernel()
            try:
                await channel.run(workload.fill)
                first = await hibernate_measured(bench, kernel_id, engine)
                first |= await wake_measured(bench, kernel_id, channel, first)
                await channel.run(
                    "part = data[: len(data) // 100]\n"
                    f"part[:] = np.random.default_rng({runs + run}).random(len(part))\n"
                    f"del part\nimport hashlib\ndigest = {workload.digest}"
                )
                again = await hibernate_measured(bench, kernel_id, engine)
                again |= await wake_measured(bench, kernel_id, channel, again)
                await channel.run(f"assert {workload.digest} == digest, 'data changed'")
            finally:
                await discard_kernel(bench.server, kernel_id, channel)
            record(result, engine, f"{run + 1}/{runs}", first=first, again=again)
    result["summary"] = summarize_rehibernate(result["runs"])
    return result


async def bench_same_imports(
    bench: Bench, modules: list[str], runs: int, engines: list[str]
) -> dict[str, Any]:
    """Per run, two new kernels that import ``modules`` and hold no data, hibernated one
    after the other: what the second writes and stores beyond the first."""
    label = f"import {', '.join(modules)}"
    result: dict[str, Any] = {"workload": "same_imports", "label": label, "runs": []}
    code = f"import {', '.join(modules)}"
    for engine in engines:
        for run in range(runs):
            kernels = [await bench.server.start_kernel() for _ in range(2)]
            try:
                hibernations = []
                for kernel_id, channel in kernels:
                    await channel.run(code)
                    hibernations.append(await hibernate_measured(bench, kernel_id, engine))
                for (kernel_id, channel), measured in zip(kernels, hibernations, strict=True):
                    measured |= await wake_measured(bench, kernel_id, channel, measured)
            finally:
                for kernel_id, channel in kernels:
                    await discard_kernel(bench.server, kernel_id, channel)
            first, second = hibernations
            record(result, engine, f"{run + 1}/{runs}", first=first, second=second)
    result["summary"] = summarize_same_imports(result["runs"])
    return result


# Summaries: medians, worst cases, and the targets' ratios taken run by run.


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def _median_of(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _per_run(
    runs: list[dict[str, Any]], key: str, base: str, medians: dict[str, float]
) -> float | None:
    """Median over runs of ``run[key]`` / the same run's baseline ``base`` (the baselines'
    median for an engine whose runs had none): both measured minutes apart at most."""
    return _median_of(
        [
            run[key] / (run["baseline"][base] if "baseline" in run else medians[base])
            if run.get(key) is not None and ("baseline" in run or base in medians)
            else None
            for run in runs
        ]
    )


def _engine_summary(runs: list[dict[str, Any]], baseline: dict[str, float]) -> dict[str, Any]:
    wake = [run["wake_s"] for run in runs]
    freed = [run["freed_bytes"] / run["rss_bytes"] for run in runs]
    first = runs[0]
    summary = {
        "hibernate_median_s": _median(runs, "hibernate_s"),
        "hibernate_worst_s": max(run["hibernate_s"] for run in runs),
        "hibernate_server_median_s": _median(runs, "hibernate_server_s"),
        "wake_median_s": statistics.median(wake),
        "wake_worst_s": max(wake),
        "wake_post_median_s": _median(runs, "wake_post_s"),
        "memory_back_median_s": _median_of([run["memory_back_s"] for run in runs]),
        "memory_back_missed": sum(run["memory_back_s"] is None for run in runs),
        "image_read_median_s": _median(runs, "image_read_s"),
        "image_bytes": int(_median(runs, "image_bytes")),
        # A first hibernation's: later runs hibernate a kernel woken from an image, which a
        # store that keeps images after a wake need not write again.
        "stored_bytes": first["stored_bytes"],
        "written_bytes": first["written_bytes"],
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
        "criu_dump_median_s": _median_of([run.get("criu_dump_s") for run in runs]),
        "hibernate_vs_write": _per_run(runs, "hibernate_s", "write_s", baseline),
        "wake_vs_read": _per_run(runs, "wake_s", "read_s", baseline),
        "memory_back_vs_image_read": _median_of(
            [
                run["memory_back_s"] / run["image_read_s"]
                for run in runs
                if run["memory_back_s"] is not None and run["image_read_s"]
            ]
        ),
        "stored_vs_rss": first["stored_bytes"] / first["rss_bytes"],
    }
    return summary


def _met(value: float | None, limit: float, at_most: bool) -> bool | None:
    if value is None:
        return None
    return value <= limit if at_most else value >= limit


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians, worst cases and the ratios checked against the targets (CRIU), and the
    dill engine and plain dill next to CRIU."""
    runs = result["runs"]
    baselines = [run["baseline"] for run in runs + result["dill_runs"] if "baseline" in run]
    summary: dict[str, Any] = {
        "restart_median_s": _median(result["restarts"], "restart_s"),
        "restart_worst_s": max(row["restart_s"] for row in result["restarts"]),
        "restart_post_median_s": _median(result["restarts"], "restart_post_s"),
    }
    baseline = {}
    if baselines:
        baseline = {key: _median(baselines, key) for key in baselines[0]}
        summary.update({key.removesuffix("_s") + "_median_s": v for key, v in baseline.items()})
    if runs:
        summary.update(_engine_summary(runs, baseline))
        summary["ratios"] = ratios = {
            key: summary[key]
            for key in (
                "freed_vs_rss", "freed_vs_rss_worst", "worst_vs_median_wake",
                "hibernate_vs_write", "wake_vs_read", "memory_back_vs_image_read",
                "stored_vs_rss",
            )
        }  # fmt: skip
        ratios["first_reply_s"] = summary["wake_median_s"]
        ratios["restart_vs_wake"] = summary["restart_median_s"] / summary["wake_median_s"]
        kind = result["workload"]
        targets = dict(TARGETS)
        if kind in STORED_VS_RSS:
            targets["stored_vs_rss"] = (STORED_VS_RSS[kind], True)
        if kind in HIBERNATE_VS_WRITE:
            targets["hibernate_vs_write"] = (HIBERNATE_VS_WRITE[kind], True)
        summary["targets"] = {name: list(target) for name, target in targets.items()}
        summary["targets_met"] = {
            name: _met(ratios.get(name), limit, at_most)
            for name, (limit, at_most) in targets.items()
        }
    if result["dill_runs"]:
        dill = summary["dill"] = _engine_summary(result["dill_runs"], baseline)
        if runs:
            dill["hibernate_vs_criu"] = dill["hibernate_median_s"] / summary["hibernate_median_s"]
            dill["wake_vs_criu"] = dill["wake_median_s"] / summary["wake_median_s"]
            dill["image_vs_criu"] = dill["image_bytes"] / summary["image_bytes"]
    plain = [row for row in result["plain_dill"] if "skipped" not in row]
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


def _written_ratio(
    num: dict[str, Any], den: dict[str, Any], key: str = "written_bytes"
) -> float | None:
    """``num``'s bytes written / ``den``'s ``key``; None where the disk's were not known."""
    if num["written_bytes"] is None or not den[key]:
        return None
    return num["written_bytes"] / den[key]


def by_engine(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["engine"], []).append(run)
    return grouped


def summarize_rehibernate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per engine, medians of each run's re-hibernation / first hibernation."""
    summary = {}
    for engine, mine in by_engine(runs).items():
        first, again = [r["first"] for r in mine], [r["again"] for r in mine]
        ratios = {
            "time_ratio": statistics.median(
                a["hibernate_s"] / f["hibernate_s"] for f, a in zip(first, again, strict=True)
            ),
            "written_ratio": _median_of(
                [_written_ratio(a, f) for f, a in zip(first, again, strict=True)]
            ),
        }
        summary[engine] = {
            "runs": len(mine),
            "first_hibernate_median_s": _median(first, "hibernate_s"),
            "again_hibernate_median_s": _median(again, "hibernate_s"),
            "first_written_bytes": _median_of([f["written_bytes"] for f in first]),
            "again_written_bytes": _median_of([a["written_bytes"] for a in again]),
            "first_stored_bytes": _median(first, "stored_bytes"),
            "again_stored_bytes": _median(again, "stored_bytes"),
            "ratios": ratios,
            "targets_met": {
                name: _met(ratios[name], limit, True) for name, limit in REHIBERNATE_TARGETS.items()
            },
        }
    return summary


def summarize_same_imports(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per engine, medians of what the second kernel wrote and stored, against its image."""
    summary = {}
    for engine, mine in by_engine(runs).items():
        first, second = [r["first"] for r in mine], [r["second"] for r in mine]
        ratio = _median_of([_written_ratio(s, s, "image_bytes") for s in second])
        summary[engine] = {
            "runs": len(mine),
            "first_image_bytes": _median(first, "image_bytes"),
            "first_written_bytes": _median_of([f["written_bytes"] for f in first]),
            "image_bytes": _median(second, "image_bytes"),
            "written_bytes": _median_of([s["written_bytes"] for s in second]),
            "stored_bytes": _median(second, "stored_bytes"),
            "written_vs_image": ratio,
            "target_met": _met(ratio, SAME_IMPORTS_TARGET, True),
        }
    return summary


# Reporting.


def _size(n: float | None) -> str:
    if n is None:
        return NONE
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


def _mark(met: bool | None) -> str:
    return NONE if met is None else "yes" if met else "**no**"


def _label(row: dict[str, Any]) -> str:
    return str(row.get("label") or f"{row['bytes'] / GIB:g} GiB")


NONE = "n/a"


def _s(value: float | None, digits: int = 2) -> str:
    return NONE if value is None else f"{value:.{digits}f} s"


def _x(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def _target(summary: dict[str, Any], name: str, percent: bool = False) -> str:
    """A ratio, and whether it meets its target where it has one."""
    value = summary["ratios"].get(name)
    if value is None:
        return NONE
    text = f"{value:.1%}" if percent else f"{value:.2f}"
    target = summary["targets"].get(name)
    if not target:
        return text
    limit = f"{target[0]:.0%}" if percent else f"{target[0]:g}"
    return f"{text} ({'≤' if target[1] else '≥'} {limit}: {_mark(summary['targets_met'][name])})"


def _memory_back(s: dict[str, Any]) -> str:
    missed = s["memory_back_missed"]
    if s["memory_back_median_s"] is None:
        return "never"
    return _s(s["memory_back_median_s"]) + (f" ({missed} never)" if missed else "")


def criu_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        '**CRIU** (`{"engine": "criu"}`):',
        "",
        "| Data | Runs | Hibernate median / worst | Write + fsync | First reply after wake "
        "median / worst | All memory back | Cold read of image | Restart + recompute "
        "| Image / stored / written | Kernel RSS | Memory freed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        lines.append(
            f"| {_label(row)} | {len(row['runs'])} "
            f"| {s['hibernate_median_s']:.2f} / {s['hibernate_worst_s']:.2f} s "
            f"| {_s(s.get('write_median_s'))} "
            f"| {s['wake_median_s']:.2f} / {s['wake_worst_s']:.2f} s "
            f"| {_memory_back(s)} | {_s(s['image_read_median_s'])} "
            f"| {s['restart_median_s']:.2f} s "
            f"| {_size(s['image_bytes'])} / {_size(s['stored_bytes'])} "
            f"/ {_size(s['written_bytes'])} "
            f"| {_size(s['rss_bytes'])} | {_size(s['freed_bytes'])} |"
        )
    lines += [
        "",
        "Ratios, each the median of the runs' own (the baselines and the image's cold read "
        "measured in the same run as the hibernation and wake they are compared with):",
        "",
        "| Data | First reply | All memory back / cold read of image | Hibernate / write "
        "| Wake / read | Stored / RSS | Freed / RSS, worst | Worst / median wake "
        "| Restart + recompute / wake |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        first = s["wake_median_s"]
        lines.append(
            f"| {_label(row)} "
            f"| {first:.2f} s (≤ 0.5 s: {_mark(s['targets_met']['first_reply_s'])}) "
            f"| {_target(s, 'memory_back_vs_image_read')} | {_target(s, 'hibernate_vs_write')} "
            f"| {_target(s, 'wake_vs_read')} | {_target(s, 'stored_vs_rss')} "
            f"| {_target(s, 'freed_vs_rss_worst', percent=True)} "
            f"| {_target(s, 'worst_vs_median_wake')} "
            f"| {s['ratios']['restart_vs_wake']:.1f}x |"
        )
    lines += [
        "",
        "Where CRIU's time goes (medians):",
        "",
        "| Data | CRIU dump | Rest of hibernate (BLAKE3, fsync, evict, manifest) "
        "| BLAKE3 in memory | Cold read + BLAKE3 | Wake request | First reply after wake request |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        dump = s["criu_dump_median_s"]
        rest = None if dump is None else s["hibernate_server_median_s"] - dump
        lines.append(
            f"| {_label(row)} | {_s(dump)} | {_s(rest)} "
            f"| {_s(s.get('blake3_median_s'))} | {_s(s.get('read_blake3_median_s'))} "
            f"| {s['wake_post_median_s']:.2f} s "
            f"| {s['wake_median_s'] - s['wake_post_median_s']:.2f} s |"
        )
    return lines


def dill_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        '**dill engine** (`{"engine": "dill"}`) and **plain dill** '
        "(`dill.dump_module` / `dill.load_module` in the kernel), same kernel and runs:",
        "",
        "| Data | dill hibernate median / worst | dill wake to 1st reply median / worst "
        "| dill image / stored / written | Freed / RSS, median | Plain `dump_module` + fsync "
        "| Plain `load_module` (cold) | Plain dill file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d, p = row["summary"].get("dill"), row["summary"].get("plain_dill")
        engine = (
            f"| {d['hibernate_median_s']:.2f} / {d['hibernate_worst_s']:.2f} s "
            f"| {d['wake_median_s']:.2f} / {d['wake_worst_s']:.2f} s "
            f"| {_size(d['image_bytes'])} / {_size(d['stored_bytes'])} "
            f"/ {_size(d['written_bytes'])} | {d['freed_vs_rss']:.1%} "
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
    for row in rows:
        d, p = row["summary"].get("dill") or {}, row["summary"].get("plain_dill")
        lines.append(
            f"| {_label(row)} | {_x(d.get('hibernate_vs_criu'))} | {_x(d.get('wake_vs_criu'))} "
            f"| {_x(d.get('image_vs_criu'))} | {_x(d.get('hibernate_vs_write'))} "
            f"| {_x(d.get('wake_vs_read'))} "
            f"| {_x(d['hibernate_median_s'] / p['dump_fsync_median_s'] if d and p else None)} "
            f"| {_x(d['wake_median_s'] / p['load_median_s'] if d and p else None)} |"
        )
    return lines


def engine_table(
    heading: str, columns: list[str], row: dict[str, Any], cells: Callable[[Any], list[str]]
) -> list[str]:
    """A table of one engine a line, for workloads summarized by engine."""
    lines = [heading, "", "| Engine | Runs | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for engine, s in row["summary"].items():
        lines.append(f"| {engine} | {s['runs']} | " + " | ".join(cells(s)) + " |")
    return lines


def rehibernate_table(row: dict[str, Any]) -> list[str]:
    return engine_table(
        f"**Re-hibernation** ({_label(row)}: hibernate, wake, a cell rewrites 1 % of the "
        "data, hibernate again; a new kernel each run), medians:",
        [
            "First hibernation: time / written / stored",
            "Again: time / written / stored",
            "Again / first, time (≤ 0.25)",
            "Again / first, written (≤ 0.05)",
        ],
        row,
        lambda s: [
            f"{_s(s['first_hibernate_median_s'])} / {_size(s['first_written_bytes'])} "
            f"/ {_size(s['first_stored_bytes'])}",
            f"{_s(s['again_hibernate_median_s'])} / {_size(s['again_written_bytes'])} "
            f"/ {_size(s['again_stored_bytes'])}",
            f"{_x(s['ratios']['time_ratio'])} ({_mark(s['targets_met']['time_ratio'])})",
            f"{_x(s['ratios']['written_ratio'])} ({_mark(s['targets_met']['written_ratio'])})",
        ],
    )


def same_imports_table(row: dict[str, Any]) -> list[str]:
    return engine_table(
        f"**Two kernels with the same imports and no data** (`{_label(row)}`, hibernated one "
        "after the other), medians:",
        [
            "First kernel: image / written",
            "Second kernel: image / written / stored",
            "Second: written / its image (≤ 0.3)",
        ],
        row,
        lambda s: [
            f"{_size(s['first_image_bytes'])} / {_size(s['first_written_bytes'])}",
            f"{_size(s['image_bytes'])} / {_size(s['written_bytes'])} / {_size(s['stored_bytes'])}",
            f"{_x(s['written_vs_image'])} ({_mark(s['target_met'])})",
        ],
    )


def tables(report: dict[str, Any]) -> str:
    """The results as Markdown tables (also readable on a terminal)."""
    rows = report["sizes"]
    sections = []
    standard = [row for row in rows if "restarts" in row]
    criu = [row for row in standard if row["runs"]]
    if criu:
        sections.append(criu_tables(criu))
    dill = [row for row in standard if {"dill", "plain_dill"} & row["summary"].keys()]
    if dill:
        sections.append(dill_tables(dill))
    for row in rows:
        if row["workload"] == "rehibernate":
            sections.append(rehibernate_table(row))
        elif row["workload"] == "same_imports":
            sections.append(same_imports_table(row))
    return "\n\n".join("\n".join(lines) for lines in sections)


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
        "--sizes", type=float, nargs="*", default=[0.1, 1, 4], metavar="GIB",
        help="random data held by the kernel, in GiB (default: 0.1 1 4)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, nargs="+", metavar="N",
        help="hibernate/wake runs (and restarts): one count for all sizes, or one per size "
        "(default: 5, and 3 from 4 GiB up); the other workloads get the one count, else 5 "
        "(3 for --rehibernate and --imports)",
    )  # fmt: skip
    parser.add_argument(
        "--dataframe", type=int, default=10_000_000, metavar="ROWS",
        help="also a kernel holding a pandas DataFrame of ROWS rows of int, float, category "
        "and string columns; 0: none (default: 10000000)",
    )  # fmt: skip
    parser.add_argument(
        "--zeros", type=float, default=1, metavar="GIB",
        help="also a kernel holding GIB of zeros, every page touched; 0: none (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--objects", type=int, default=1_000_000, metavar="N",
        help="also a kernel holding a dict of N str keys to int values (many small objects, "
        "where dill's pure-Python pickler is slow); 0: none (default: 1000000)",
    )  # fmt: skip
    parser.add_argument(
        "--rehibernate", type=float, default=4, metavar="GIB",
        help="also re-hibernate a kernel of GIB of random data after a cell rewrote 1 %% of "
        "it; 0: not (default: 4)",
    )  # fmt: skip
    parser.add_argument(
        "--imports", nargs="*", default=["numpy", "pandas"], metavar="MODULE",
        help="also hibernate two kernels that imported these modules and hold no data; "
        "none: not (default: numpy pandas)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", nargs="+", choices=["criu", "dill"], default=["criu", "dill"],
        help="engines to run, in this order in each run; with dill, plain dill.dump_module "
        "is measured too (default: criu dill)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke check of every workload, small: 0.1 GiB, a DataFrame of 100000 rows, "
        "0.1 GiB of zeros and of re-hibernation, a dict of 100000, 2 runs, no Markdown",
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
        args.sizes, args.runs, args.markdown = [0.1], [2], None
        args.dataframe, args.zeros, args.objects, args.rehibernate = 100_000, 0.1, 100_000, 0.1
    other_runs = args.runs[0] if args.runs and len(args.runs) == 1 else None
    if args.runs is None:
        args.runs = [5 if s < 4 else 3 for s in args.sizes]
    elif len(args.runs) == 1:
        args.runs = args.runs * len(args.sizes)
    if len(args.runs) != len(args.sizes) or min(args.runs, default=1) < 1:
        parser.error("--runs takes one positive count, or one per size")
    args.workloads = [numpy_workload(size) for size in args.sizes]
    for wanted, workload in (
        (args.dataframe, dataframe_workload),
        (args.zeros, zeros_workload),
        (args.objects, objects_workload),
    ):
        if wanted > 0:
            args.workloads.append(workload(wanted))
            args.runs.append(other_runs or 5)
    args.other_runs = other_runs or 3
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


async def measure(args: argparse.Namespace, report: dict[str, Any], workdir: Path) -> None:
    """Every workload in one server, the results saved after each."""
    from kernelhib.engines.criu_install import locate_criu

    home = workdir / "jupyter"
    modules = set().union(*(w.modules for w in args.workloads), args.imports)
    if args.rehibernate > 0:
        modules.add("numpy")
    ensure_modules(modules, jupyter_env(home))
    server = await launch(home, log=workdir / "server.log", criu_path=str(locate_criu().path))
    try:
        bench = Bench(server, workdir, disk_stat(workdir), not args.no_drop_caches)
        report["warmup"] = await warm_up(server, args.engines)
        rows = report["sizes"]
        for workload, runs in zip(args.workloads, args.runs, strict=True):
            rows.append(await bench_workload(bench, workload, runs, args.engines))
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.rehibernate > 0:
            rows.append(
                await bench_rehibernate(bench, args.rehibernate, args.other_runs, args.engines)
            )
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.imports:
            rows.append(
                await bench_same_imports(bench, args.imports, args.other_runs, args.engines)
            )
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    except BaseException:
        print(f"server log tail:\n{server.log_text()[-5000:]}", file=sys.stderr)
        raise
    finally:
        server.discard()


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
        asyncio.run(measure(args, report, workdir))
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
