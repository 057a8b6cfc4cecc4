"""Whether CRIU can checkpoint the kernels of this GPU host, GPU memory included.

CRIU's CUDA plugin (``cuda_plugin.so``) has NVIDIA's ``cuda-checkpoint`` lock
each CUDA process, copy its GPU memory into host memory and release the GPU
before the dump; after a restore it puts the memory back on the GPU. CRIU then
dumps a process with no GPU mappings left. This needs, as the plugin's and
cuda-checkpoint's documentation say:

- driver 570 or later: cuda-checkpoint exists since 550, but CRIU 4's process
  trees (a kernel and its children) only since 570;
- ``cuda-checkpoint`` on the PATH that CRIU inherits, supporting ``--action``:
  the plugin runs it by that name, and disables itself without it;
- ``cuda_plugin.so`` where CRIU loads plugins from: ``$CRIU_LIBS_DIR``, else
  ``/usr/lib/criu``. Debian's CRIU packages, which ``kernelhib install-criu``
  installs, do not ship it;
- no MIG and no MPS, which cuda-checkpoint does not support.

UVM managed memory and CUDA IPC memory are not supported either, and only the
dump can tell: the plugin fails it, and the kernel is hibernated with dill
(:func:`explain_dump_failure` says why). This module only looks and runs
``cuda-checkpoint`` and ``nvidia-smi``; it never starts CUDA itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DRIVER_VERSION = Path("/proc/driver/nvidia/version")
CUDA_CHECKPOINT = "cuda-checkpoint"
PLUGIN = "cuda_plugin.so"
PLUGIN_DIR_ENV = "CRIU_LIBS_DIR"
DEFAULT_PLUGIN_DIR = Path("/usr/lib/criu")  # CRIU's built-in plugin directory
MIN_DRIVER = 570
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_MPS_PIPE_DIRECTORY = Path("/tmp/nvidia-mps")
_TIMEOUT_S = 30.0
UNSUPPORTED = "cuda-checkpoint supports no UVM managed memory, CUDA IPC memory, MIG or MPS"


@dataclass(frozen=True)
class Requirement:
    """One thing CRIU needs to checkpoint CUDA kernels, and whether this host has it."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""


@dataclass(frozen=True)
class GpuCheckpoint:
    """Each requirement, in the order ``kernelhib doctor`` lists them."""

    requirements: tuple[Requirement, ...]

    @property
    def ok(self) -> bool:
        return all(requirement.ok for requirement in self.requirements)

    @property
    def reason(self) -> str:
        """Why not, naming every requirement missing; empty when all are there."""
        return "; ".join(
            f"{requirement.name}: {requirement.detail}"
            for requirement in self.requirements
            if not requirement.ok
        )


def _run(*argv: str, check: bool = True) -> str | None:
    """A command's output, or None if it did not run or failed; without ``check``, its
    output and errors whatever its exit status."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=check,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if check else done.stdout + done.stderr


def driver_version() -> str | None:
    """The loaded NVIDIA kernel module's version, from /proc, else from nvidia-smi."""
    try:
        text = DRIVER_VERSION.read_text(errors="replace")
    except OSError:
        text = ""
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..." (or
    # "... Open Kernel Module for x86_64  580.65.06 ...").
    found = re.search(r"Kernel Module.*?\s(\d+\.[\d.]+)\s", text)
    if not found:
        smi = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        found = re.match(r"\s*(\d+\.[\d.]+)", smi or "")
    return found.group(1) if found else None


def plugin_dir() -> Path:
    """Where CRIU loads its plugins from: it inherits the server's environment."""
    return Path(os.environ.get(PLUGIN_DIR_ENV) or DEFAULT_PLUGIN_DIR)


def mps_pipe_directory() -> Path:
    return Path(os.environ.get(MPS_PIPE_ENV) or DEFAULT_MPS_PIPE_DIRECTORY)


def _driver() -> Requirement:
    name = "NVIDIA driver >= 570"
    version = driver_version()
    if version is None:
        return Requirement(
            name,
            False,
            f"no driver version in {DRIVER_VERSION} nor from nvidia-smi",
            "check that the NVIDIA driver is loaded",
        )
    if int(version.split(".")[0]) < MIN_DRIVER:
        return Requirement(
            name,
            False,
            f"driver {version}: cuda-checkpoint with CRIU's process trees needs 570 or later",
            "upgrade the NVIDIA driver to 570 or later",
        )
    return Requirement(name, True, f"driver {version}")


def _cuda_checkpoint() -> Requirement:
    name = "cuda-checkpoint"
    path = shutil.which(CUDA_CHECKPOINT)
    remedy = (
        "install NVIDIA's cuda-checkpoint (github.com/NVIDIA/cuda-checkpoint) on the "
        "Jupyter server's PATH: CRIU's CUDA plugin runs it by name"
    )
    if path is None:
        return Requirement(name, False, "not found on the Jupyter server's PATH", remedy)
    usage = _run(path, "--help", check=False)  # as the plugin asks, whatever its exit status
    if usage is None:
        return Requirement(name, False, f"{path} --help did not run", remedy)
    if "--action" not in usage:
        said = usage.strip().splitlines()[-1:]  # "error while loading ... libcuda.so.1", say
        return Requirement(
            name,
            False,
            f"{path} has no --action, which CRIU's CUDA plugin uses (driver 555 or later)"
            + "".join(f"; --help said: {line[:200]}" for line in said),
            remedy,
        )
    return Requirement(name, True, path)


def _plugin() -> Requirement:
    directory = plugin_dir()
    where = f"${PLUGIN_DIR_ENV}" if os.environ.get(PLUGIN_DIR_ENV) else "CRIU's default"
    if not (directory / PLUGIN).is_file():
        return Requirement(
            "CRIU's CUDA plugin",
            False,
            f"no {PLUGIN} in {directory} ({where} plugin directory)",
            f"build it from the source of the same CRIU version (make cuda_plugin) and put "
            f"it in {DEFAULT_PLUGIN_DIR}, or set {PLUGIN_DIR_ENV} in the server's environment",
        )
    return Requirement("CRIU's CUDA plugin", True, str(directory / PLUGIN))


def _mig() -> Requirement:
    modes = _run("nvidia-smi", "--query-gpu=index,mig.mode.current", "--format=csv,noheader")
    if modes is None:
        return Requirement(
            "no MIG", False, "nvidia-smi did not answer whether MIG is on", "install nvidia-smi"
        )
    on = [line.split(",")[0].strip() for line in modes.splitlines() if "enabled" in line.lower()]
    if on:
        return Requirement(
            "no MIG",
            False,
            f"MIG is enabled on GPU {', '.join(on)}; {UNSUPPORTED}",
            "disable MIG (nvidia-smi -mig 0), or let kernels be hibernated with dill",
        )
    return Requirement("no MIG", True, "MIG is off on every GPU")


def _mps() -> Requirement:
    control = mps_pipe_directory() / "control"
    if control.exists():
        return Requirement(
            "no MPS",
            False,
            f"an MPS control daemon listens at {control}; {UNSUPPORTED}",
            "stop the MPS daemon (echo quit | nvidia-cuda-mps-control), or let kernels be "
            "hibernated with dill",
        )
    return Requirement("no MPS", True, f"no MPS daemon at {control}")


def check() -> GpuCheckpoint:
    """What CRIU needs to checkpoint CUDA kernels on this host, each checked. Blocking."""
    return GpuCheckpoint((_driver(), _cuda_checkpoint(), _plugin(), _mig(), _mps()))


def explain_dump_failure(error: str) -> str:
    """CRIU's dump error, saying so when CUDA state was what it could not save.

    The plugin's failures name its hooks; without the plugin, CRIU cannot map
    the GPU's memory ("non-regular mapping").
    """
    if any(mark in error for mark in ("PAUSE_DEVICES", "CHECKPOINT_DEVICES", CUDA_CHECKPOINT)):
        return f"the kernel's CUDA state could not be checkpointed ({UNSUPPORTED}): {error}"
    if "non-regular mapping" in error or "handle_device_vma" in error:
        return f"the kernel has GPU memory CRIU cannot save ({PLUGIN} not loaded?): {error}"
    return error


def resume(pids: Iterable[int]) -> list[str]:
    """Put back on the GPU the CUDA state that a dump left checkpointed or locked.

    A dump leaves it so until the process ends; when the hibernation fails
    after the dump, the kernel runs on and needs its GPU state again. A process
    without CUDA, or running already, is left alone. Returns the failures. Blocking.
    """
    problems = []
    for pid in pids:
        state = (_run(CUDA_CHECKPOINT, "--get-state", "--pid", str(pid)) or "").strip()
        actions = {"checkpointed": ("restore", "unlock"), "locked": ("unlock",)}.get(state, ())
        for action in actions:
            if _run(CUDA_CHECKPOINT, "--action", action, "--pid", str(pid)) is None:
                problems.append(f"cuda-checkpoint --action {action} --pid {pid} failed")
                break
    return problems


def pids_taken(image_dir: Path) -> list[int]:
    """The pids and thread ids of the image that other processes hold now.

    Restored outside a pid namespace, a process gets its old pids back or the
    restore fails; this says which ones are in the way. Empty without pycriu
    (CRIU's own error says it then). Blocking.
    """
    try:
        from pycriu import images  # type: ignore[import-not-found]
    except ImportError:
        return []
    with (image_dir / "pstree.img").open("rb") as f:
        entries = images.load(f)["entries"]
    wanted = {entry["pid"] for entry in entries}
    wanted.update(tid for entry in entries for tid in entry.get("threads", ()))
    return sorted(pid for pid in wanted if Path(f"/proc/{pid}").exists())
