"""GPU kernels hibernated whole by CRIU, on a stand-in GPU host (CI has no GPU).

The stand-in: a file for the driver's control device and version file, scripts
for ``cuda-checkpoint`` and ``nvidia-smi``, and for CRIU's CUDA plugin a real
shared library without CRIU's hooks (CRIU loads it and it does nothing). No
CUDA runs here: scripts/gpu-check.py checks the same path on a real GPU.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernelhib import provisioner
from kernelhib.cli import main
from kernelhib.engines import cuda
from kernelhib.engines.base import EngineError
from kernelhib.provisioner import HibernatingProvisioner
from kernelhib.recovery import kernel_processes

from .test_dill_engine import check_no_pid_namespace_means_dill

DRIVER_580 = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 22 01:04:43 UTC 2025\nGCC version:  gcc 12.2.0\n"
)
HELP = "CUDA checkpoint and restore utility.\\n--action lock | checkpoint | restore | unlock"


@dataclass
class GpuHost:
    """The stand-in's parts, each of which a test may take away or change."""

    bin: Path
    driver: Path
    plugin: Path
    mps: Path

    def script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def mig(self, modes: str) -> None:
        """nvidia-smi, answering the MIG query with ``modes`` (one GPU a line)."""
        self.script("nvidia-smi", f'case "$*" in *mig.mode*) printf "{modes}";; esac')


@pytest.fixture
def gpu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GpuHost:
    """A host that meets every requirement of CRIU's CUDA plugin, stood in for."""
    (device := tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(provisioner, "NVIDIA_CONTROL_DEVICE", device)
    (driver := tmp_path / "version").write_text(DRIVER_580)
    monkeypatch.setattr(cuda, "DRIVER_VERSION", driver)
    (plugins := tmp_path / "criu-plugins").mkdir()
    # Any shared library that has none of CRIU's plugin symbols: CRIU loads it, warns, and
    # calls nothing in it.
    library = ctypes.util.find_library("z")
    assert library, "zlib's shared library, the plugin's stand-in, is missing"
    found = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    path = next(line.split(" => ")[1] for line in found.splitlines() if library in line)
    shutil.copy(path, plugins / cuda.PLUGIN)
    monkeypatch.setenv(cuda.PLUGIN_DIR_ENV, str(plugins))
    monkeypatch.setenv(cuda.MPS_PIPE_ENV, str(tmp_path / "mps"))
    (bin_dir := tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    host = GpuHost(bin_dir, driver, plugins / cuda.PLUGIN, tmp_path / "mps")
    host.script("cuda-checkpoint", f'[ "$1" = --help ] && printf "{HELP}\\n"; exit 0')
    host.mig("0, Disabled\\n1, Disabled\\n")
    return host


def test_a_gpu_host_with_everything_lets_criu_checkpoint_cuda(gpu_host: GpuHost) -> None:
    gpu = cuda.check()
    assert gpu.ok, gpu.reason
    assert gpu.reason == ""
    assert [need.name for need in gpu.requirements] == [
        "NVIDIA driver >= 570",
        "cuda-checkpoint",
        "CRIU's CUDA plugin",
        "no MIG",
        "no MPS",
    ]


def _old_driver(host: GpuHost) -> None:
    host.driver.write_text(DRIVER_580.replace("580.65.06", "565.57.01"))


def _no_driver(host: GpuHost) -> None:
    host.driver.unlink()  # and nvidia-smi tells no driver version either


def _no_cuda_checkpoint(host: GpuHost) -> None:
    (host.bin / "cuda-checkpoint").unlink()
    for directory in os.environ["PATH"].split(os.pathsep):
        assert not (Path(directory) / "cuda-checkpoint").exists(), directory


def _old_cuda_checkpoint(host: GpuHost) -> None:
    host.script("cuda-checkpoint", "echo '--toggle --pid <pid>'")


def _no_plugin(host: GpuHost) -> None:
    host.plugin.unlink()


def _mig_on(host: GpuHost) -> None:
    host.mig("0, Disabled\\n1, Enabled\\n")


def _mps_on(host: GpuHost) -> None:
    host.mps.mkdir()
    (host.mps / "control").touch()


MISSING = {
    "old driver": (
        _old_driver,
        "NVIDIA driver >= 570: driver 565.57.01: cuda-checkpoint with CRIU's process trees "
        "needs 570 or later",
    ),
    "no driver": (_no_driver, "NVIDIA driver >= 570: no driver version in {driver}"),
    "no cuda-checkpoint": (
        _no_cuda_checkpoint,
        "cuda-checkpoint: not found on the Jupyter server's PATH",
    ),
    "old cuda-checkpoint": (
        _old_cuda_checkpoint,
        "cuda-checkpoint: {bin}/cuda-checkpoint has no --action, which CRIU's CUDA plugin "
        "uses (driver 555 or later)",
    ),
    "no plugin": (
        _no_plugin,
        "CRIU's CUDA plugin: no cuda_plugin.so in {plugins} ($CRIU_LIBS_DIR plugin directory)",
    ),
    "MIG": (_mig_on, f"no MIG: MIG is enabled on GPU 1; {cuda.UNSUPPORTED}"),
    "MPS": (
        _mps_on,
        f"no MPS: an MPS control daemon listens at {{mps}}/control; {cuda.UNSUPPORTED}",
    ),
}


def expected_reason(host: GpuHost, template: str) -> str:
    return template.format(
        driver=host.driver, bin=host.bin, plugins=host.plugin.parent, mps=host.mps
    )


@pytest.mark.parametrize("missing", MISSING)
def test_each_missing_requirement_is_named(gpu_host: GpuHost, missing: str) -> None:
    take_away, reason = MISSING[missing]
    take_away(gpu_host)
    gpu = cuda.check()
    assert not gpu.ok
    assert gpu.reason.startswith(expected_reason(gpu_host, reason))


def test_a_driver_version_comes_from_nvidia_smi_without_the_proc_file(gpu_host: GpuHost) -> None:
    gpu_host.driver.unlink()
    gpu_host.script("nvidia-smi", 'case "$*" in *driver_version*) echo 575.51.03;; esac')
    assert cuda.driver_version() == "575.51.03"


def test_doctor_lists_each_gpu_requirement(
    criu_path: str, gpu_host: GpuHost, capsys: pytest.CaptureFixture
) -> None:
    _no_plugin(gpu_host)
    assert main(["doctor", "--criu-path", criu_path, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    gpu = answer["gpu"]
    assert not gpu["ok"]
    assert [(need["name"], need["ok"]) for need in gpu["requirements"]] == [
        ("NVIDIA driver >= 570", True),
        ("cuda-checkpoint", True),
        ("CRIU's CUDA plugin", False),
        ("no MIG", True),
        ("no MPS", True),
    ]
    [criu] = [engine for engine in answer["engines"] if engine["name"] == "criu"]
    assert "hibernated with dill" in criu["detail"]

    assert main(["doctor", "--criu-path", criu_path]) == 0
    table = capsys.readouterr().out
    assert "GPU KERNELS: CRIU NEEDS" in table
    assert "no cuda_plugin.so in" in table


def test_doctor_with_every_gpu_requirement_says_criu_restores_gpu_kernels(
    criu_path: str, gpu_host: GpuHost, capsys: pytest.CaptureFixture
) -> None:
    assert main(["doctor", "--criu-path", criu_path, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["gpu"]["ok"]
    [criu] = [engine for engine in answer["engines"] if engine["name"] == "criu"]
    assert criu["ok"] and provisioner.SAME_PIDS in criu["detail"]


def test_doctor_on_a_host_without_nvidia_gpus_has_no_gpu_part(
    criu_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(provisioner, "NVIDIA_CONTROL_DEVICE", tmp_path / "absent")
    assert main(["doctor", "--criu-path", criu_path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu"] is None


@pytest.mark.criu
async def test_with_every_requirement_auto_hibernates_a_gpu_kernel_with_criu_at_its_own_pid(
    gpu_host: GpuHost, start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    [pid] = kernel_processes(kernel_id)
    # No pid namespace: CUDA cannot start in one that shares the host's /proc.
    assert Path(f"/proc/{pid}/ns/pid").readlink() == Path("/proc/self/ns/pid").readlink()
    await channel.execute("value = 'kept'; import os; started_as = os.getpid()")

    model = await api("POST", "kernels", kernel_id, "hibernate")
    assert model["hibernation"]["engine"] == "criu", model["hibernation"]
    assert not model["hibernation"].get("fallback_reason")
    await api("POST", "kernels", kernel_id, "wake")

    assert kernel_processes(kernel_id) == [pid]  # restored at its own pid
    assert (await channel.execute("value, os.getpid() == started_as"))["result"] == "('kept', True)"


@pytest.mark.criu
async def test_a_gpu_host_missing_a_requirement_hibernates_with_dill_saying_which(
    gpu_host: GpuHost, start_kernel: Any, api: Any
) -> None:
    _no_plugin(gpu_host)
    reason = expected_reason(gpu_host, MISSING["no plugin"][1])
    await check_no_pid_namespace_means_dill(start_kernel, api, reason)


def test_a_failed_dump_of_a_gpu_kernel_says_it_was_its_cuda_state(tmp_path: Path) -> None:
    class FailingCriu:
        async def dump(self, pid: int, image_dir: Path, sink: Any = None) -> None:
            raise EngineError("criu dump failed (exit 1):\nPAUSE_DEVICES failed with error 3")

    kernel = subprocess.Popen(["sleep", "60"])
    try:
        launcher = HibernatingProvisioner(kernel_id="k", kernel_spec=None)
        launcher.kernel = provisioner.KernelProcess(kernel.pid)
        launcher.same_pids = True
        with pytest.raises(EngineError) as failed:
            asyncio.run(launcher.checkpoint(FailingCriu(), tmp_path))  # type: ignore[arg-type]
    finally:
        kernel.kill()
        kernel.wait()
    assert str(failed.value).startswith(
        f"the kernel's CUDA state could not be checkpointed ({cuda.UNSUPPORTED}): criu dump failed"
    )


def test_a_restore_at_its_own_pids_is_refused_while_another_process_holds_one(
    criu_path: str, tmp_path: Path
) -> None:
    # An image's process tree, written as CRIU does, naming this test's own pid. (Locating
    # CRIU, the criu_path fixture puts its pycriu on sys.path.)
    images = pytest.importorskip("pycriu.images", reason="pycriu (kernelhib install-criu)")
    entry = {"pid": os.getpid(), "ppid": 1, "pgid": os.getpid(), "sid": os.getsid(0)}
    with (tmp_path / "pstree.img").open("wb") as f:
        images.dump({"magic": "PSTREE", "entries": [{**entry, "threads": [os.getpid()]}]}, f)

    class UnusedCriu:
        async def restore(self, image_dir: Path) -> int:
            raise AssertionError("CRIU must not be asked")

    launcher = HibernatingProvisioner(kernel_id="k", kernel_spec=None)
    launcher.same_pids = True
    with pytest.raises(EngineError, match=f"pids {os.getpid()} of the kernel are taken"):
        asyncio.run(launcher.restore(UnusedCriu(), tmp_path))  # type: ignore[arg-type]


def test_cuda_state_a_dump_left_checkpointed_or_locked_is_put_back(
    gpu_host: GpuHost, tmp_path: Path
) -> None:
    # cuda-checkpoint, stood in for: process 11 checkpointed, 12 locked, 13 running, 14
    # without CUDA (get-state fails); each call is logged.
    log = tmp_path / "calls"
    gpu_host.script(
        "cuda-checkpoint",
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        '  "--get-state --pid 11") echo checkpointed;;\n'
        '  "--get-state --pid 12") echo locked;;\n'
        '  "--get-state --pid 13") echo running;;\n'
        '  "--get-state --pid 14") exit 1;;\n'
        "esac",
    )
    assert cuda.resume([11, 12, 13, 14]) == []
    assert log.read_text().splitlines() == [
        "--get-state --pid 11",
        "--action restore --pid 11",
        "--action unlock --pid 11",
        "--get-state --pid 12",
        "--action unlock --pid 12",
        "--get-state --pid 13",
        "--get-state --pid 14",
    ]


def test_a_failed_cuda_restore_is_reported(gpu_host: GpuHost) -> None:
    gpu_host.script("cuda-checkpoint", '[ "$1" = --get-state ] && echo checkpointed || exit 1')
    assert cuda.resume([11]) == ["cuda-checkpoint --action restore --pid 11 failed"]


@pytest.mark.parametrize(
    ("error", "explained"),
    [
        ("PAUSE_DEVICES failed with 3", "the kernel's CUDA state could not be checkpointed"),
        ("Can't handle non-regular mapping", "the kernel has GPU memory CRIU cannot save"),
        ("Can't dump ptraced task", "Can't dump ptraced task"),
    ],
)
def test_a_dump_failure_says_whether_cuda_was_the_cause(error: str, explained: str) -> None:
    assert cuda.explain_dump_failure(error).startswith(explained)
