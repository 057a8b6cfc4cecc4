"""What hibernation does to kernels on a host with an NVIDIA GPU; prints and saves findings.

Needs root, torch with CUDA, kernelhib and CRIU installed. It starts a jupyter server
with kernelhib (through kernelhib.testing, the tests' and the benchmark's harness) and
checks, step by step:

1. ``criu dump`` of a plain process holding CUDA memory (no kernelhib involved);
2. a kernel holding 1 GiB on the GPU: hibernate with CRIU, then with ``auto``, GPU
   memory before and after, wake, the tensor's device and checksum;
3. a kernel that imported torch without touching the GPU: hibernate, wake, then
   start CUDA in it.
4. a kernel holding 1 GiB on the GPU, woken while another process holds all but
   256 MiB of the GPU's memory, then again once that process ended.

``--criu-cuda`` runs instead only :func:`criu_cuda_check`: CRIU with its CUDA plugin and
NVIDIA's cuda-checkpoint (docs/engines.md#gpu-kernels). The GPU machine has no network:
bring ``cuda-checkpoint`` (github.com/NVIDIA/cuda-checkpoint, bin/x86_64_Linux) and a
``cuda_plugin.so`` built from CRIU's source of the installed version (``make cuda_plugin``;
the packages it needs are in docs/engines.md#gpu-kernels),
and run it as ``CRIU_LIBS_DIR=<plugin dir> PATH=<cuda-checkpoint dir>:$PATH python
scripts/gpu-check.py --criu-cuda`` (the server, and CRIU under it, inherit both).

Each step's result or error goes to ``OUT/gpu-check.json`` (``--out``, default
``$OUT`` or /tmp/gpu-check); a failing step does not stop the others. ``--no-gpu`` (or
``GPU_CHECK_NO_GPU=1``) runs the same steps with numpy instead, to try the plumbing on a
machine without a GPU. Results and the command used on an H200 are in docs/engines.md.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from kernelhib.engines import cuda
from kernelhib.engines.criu_install import locate_criu
from kernelhib.testing import KernelChannel, ServerProcess, launch

OUT = Path(os.environ.get("OUT", "/tmp/gpu-check"))
CRIU_CUDA = False
GPU = os.environ.get("GPU_CHECK_NO_GPU") != "1"
results: dict[str, Any] = {}


async def step(name: str, action: Callable[[], Any]) -> None:
    """Run one check; record its value or its error, and how long it took."""
    started = time.perf_counter()
    try:
        value = action()
        if isinstance(value, Awaitable):
            value = await value
        results[name] = {"ok": True, "value": value}
    except Exception as exc:
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
    results[name]["s"] = round(time.perf_counter() - started, 3)
    print(name, json.dumps(results[name])[:1500], flush=True)


def gpu_used_mib() -> int | None:
    if not GPU:
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    return int(subprocess.run(query, capture_output=True, text=True).stdout.split()[0])


def criu_dump_of_a_cuda_process(criu: str) -> dict[str, Any]:
    code = (
        "import torch, time; x = torch.ones(2**20, device='cuda'); print('ok', flush=True); "
        "time.sleep(300)"
    )
    process = subprocess.Popen(
        ["setsid", sys.executable, "-c", code],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = process.stdout.readline().strip() if process.stdout else ""
    image = Path(tempfile.mkdtemp(prefix="gpu-check-dump-"))
    dump = [criu, "dump", "-t", str(process.pid), "-D", str(image), "--shell-job"]
    done = subprocess.run([*dump, "--leave-running", "-o", "dump.log"], capture_output=True)
    process.kill()
    log = (image / "dump.log").read_text(errors="replace").splitlines()
    errors = [line for line in log if "Error" in line and "RLIMIT_NOFILE" not in line]
    return {"started": started, "exit": done.returncode, "errors": errors[-8:]}


@contextlib.contextmanager
def gpu_hog() -> Iterator[None]:
    """Another process holding all but 256 MiB of the GPU's free memory meanwhile."""
    code = (
        "import torch, time; free, _ = torch.cuda.mem_get_info(); "
        "x = torch.empty(free - (256 << 20), dtype=torch.uint8, device='cuda'); "
        "print('ok', flush=True); time.sleep(600)"
    )
    hog = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        results["full_gpu.hog"] = hog.stdout.readline().strip() if hog.stdout else ""
        results["gpu_mib.hogged"] = gpu_used_mib()
        yield
    finally:
        hog.kill()
        hog.wait()


async def hibernate(server: ServerProcess, kernel_id: str, engine: str = "") -> dict[str, Any]:
    model = await server.hibernate(kernel_id, **({"engine": engine} if engine else {}))
    keep = (
        "engine", "image_bytes", "freed_bytes", "gpu_freed_bytes", "seconds", "lost",
        "fallback_reason",
    )  # fmt: skip
    return {key: model["hibernation"].get(key) for key in keep}


async def wake(server: ServerProcess, kernel_id: str) -> str:
    return (await server.wake(kernel_id))["execution_state"]


async def state(server: ServerProcess, kernel_id: str) -> str:
    return (await server.api("GET", "kernels", kernel_id))["execution_state"]


async def fill(channel: KernelChannel, code: str) -> str:
    return (await channel.run(code))["status"]


async def value(channel: KernelChannel, expression: str) -> Any:
    return await channel.evaluate(f"__import__('json').dumps({expression})")


async def checks(server: ServerProcess) -> None:
    """Steps 2 to 4, in one server."""
    kernel_id, channel = await server.start_kernel()
    if GPU:
        gpu_fill = (
            "import torch\ng = torch.Generator('cuda').manual_seed(0)\n"
            "x = torch.randn(2**28, device='cuda', generator=g)\ns = float(x.double().sum())"
        )
        check = "[str(x.device), float(x.double().sum()) == s, torch.cuda.memory_allocated()]"
    else:
        gpu_fill = "import numpy as np\nx = np.random.default_rng(0).random(2**24)\n"
        gpu_fill += "s = float(x.sum())"
        check = "['cpu', float(x.sum()) == s, 0]"
    await step("gpu_kernel.fill", lambda: fill(channel, gpu_fill))
    results["gpu_mib.filled"] = gpu_used_mib()
    await step("gpu_kernel.hibernate_criu", lambda: hibernate(server, kernel_id, "criu"))
    await step("gpu_kernel.still_running", lambda: value(channel, check))
    await step("gpu_kernel.hibernate_auto", lambda: hibernate(server, kernel_id))
    await asyncio.sleep(1)
    results["gpu_mib.hibernated"] = gpu_used_mib()
    await step("gpu_kernel.wake", lambda: wake(server, kernel_id))
    await step("gpu_kernel.after_wake", lambda: value(channel, check))
    results["gpu_mib.woken"] = gpu_used_mib()
    await server.shutdown_kernel(kernel_id)

    kernel_id, channel = await server.start_kernel()
    library = "torch" if GPU else "numpy"
    cpu_fill = f"import {library}\nt = {library}.arange(10**6)"
    await step("cpu_kernel.fill", lambda: fill(channel, cpu_fill))
    await step("cpu_kernel.hibernate", lambda: hibernate(server, kernel_id))
    await step("cpu_kernel.wake", lambda: wake(server, kernel_id))
    cuda = ", torch.cuda.is_available(), float(torch.ones(4, device='cuda').sum())"
    then_cuda = f"[int(t.sum()){cuda if GPU else ''}]"
    await step("cpu_kernel.then_cuda", lambda: value(channel, then_cuda))
    await server.shutdown_kernel(kernel_id)

    if GPU:  # 4. The GPU is full when a hibernated GPU kernel wakes.
        kernel_id, channel = await server.start_kernel()
        await step("full_gpu.fill", lambda: fill(channel, gpu_fill))
        await step("full_gpu.hibernate", lambda: hibernate(server, kernel_id))
        with gpu_hog():
            await step("full_gpu.wake", lambda: wake(server, kernel_id))
            await step("full_gpu.model", lambda: state(server, kernel_id))
        await step("full_gpu.wake_again", lambda: wake(server, kernel_id))
        await step("full_gpu.after_wake", lambda: value(channel, check))
        await server.shutdown_kernel(kernel_id)


# A kernel holding 1 GiB on the GPU, and the expression that checks it after a wake.
CUDA_FILL = (
    "import os, torch\ng = torch.Generator('cuda').manual_seed(0)\n"
    "x = torch.randn(2**28, device='cuda', generator=g)\ns = float(x.double().sum())"
)
CUDA_CHECK = "[str(x.device), float(x.double().sum()) == s, os.getpid()]"
# Unified memory (cudaMallocManaged, here through the driver API on torch's context),
# which cuda-checkpoint does not support: the dump must fail and 'auto' use dill.
UVM_FILL = (
    "import ctypes, torch\ny = torch.ones(2**20, device='cuda')\n"
    "managed = ctypes.c_uint64()\n"
    "uvm_rc = ctypes.CDLL('libcuda.so.1').cuMemAllocManaged("
    "ctypes.byref(managed), ctypes.c_size_t(64 << 20), ctypes.c_uint(1))"
)


async def criu_cuda_check(server: ServerProcess) -> None:
    """CRIU with its CUDA plugin, on a real GPU: what `kernelhib doctor` finds, then a
    kernel holding 1 GiB on the GPU hibernated with ``auto`` twice (engine, GPU memory
    freed, seconds per GiB of GPU memory), each wake (same pid, tensor checksum,
    cuda-checkpoint's state), and a kernel with managed memory, which must fall back
    to dill and stay usable."""
    gpu = cuda.check()
    results["criu_cuda.requirements"] = {"ok": gpu.ok, "reason": gpu.reason}
    results["criu_cuda.driver"] = cuda.driver_version()

    async def timed_hibernate(kernel_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        model = (await server.hibernate(kernel_id))["hibernation"]
        seconds = time.perf_counter() - started
        gib = (model.get("gpu_freed_bytes") or 0) / 2**30
        keep = ("engine", "image_bytes", "gpu_freed_bytes", "seconds", "fallback_reason")
        return {
            **{key: model.get(key) for key in keep},
            "request_s": round(seconds, 3),
            "s_per_gpu_gib": round(seconds / gib, 3) if gib else None,
            "gpu_mib_after": gpu_used_mib(),
        }

    async def timed_wake(kernel_id: str, channel: KernelChannel, pid: int) -> dict[str, Any]:
        started = time.perf_counter()
        await server.wake(kernel_id)
        seconds = time.perf_counter() - started
        device, same, now = await value(channel, CUDA_CHECK)
        state = subprocess.run(
            ["cuda-checkpoint", "--get-state", "--pid", str(now)], capture_output=True, text=True
        )
        return {
            "request_s": round(seconds, 3),
            "device": device,
            "checksum_equal": same,
            "same_pid": now == pid,
            "cuda_state": (state.stdout or state.stderr).strip(),
            "gpu_mib_after": gpu_used_mib(),
        }

    kernel_id, channel = await server.start_kernel()
    await step("criu_cuda.fill", lambda: fill(channel, CUDA_FILL))
    pid = await value(channel, "__import__('os').getpid()")
    results["criu_cuda.gpu_mib_filled"] = gpu_used_mib()
    for cycle in (1, 2):
        await step(f"criu_cuda.hibernate_{cycle}", lambda: timed_hibernate(kernel_id))
        await step(f"criu_cuda.wake_{cycle}", lambda: timed_wake(kernel_id, channel, pid))
    await server.shutdown_kernel(kernel_id)

    kernel_id, channel = await server.start_kernel()
    await step("criu_cuda.uvm_fill", lambda: fill(channel, UVM_FILL))
    await step("criu_cuda.uvm_rc", lambda: value(channel, "uvm_rc"))
    await step("criu_cuda.uvm_hibernate", lambda: timed_hibernate(kernel_id))
    await step("criu_cuda.uvm_wake", lambda: wake(server, kernel_id))
    await step("criu_cuda.uvm_after_wake", lambda: value(channel, "float(y.sum())"))
    await server.shutdown_kernel(kernel_id)


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    criu = str(locate_criu().path)
    if GPU:
        gpus = ["nvidia-smi", "-L"]
        await step("gpu", lambda: subprocess.run(gpus, capture_output=True, text=True).stdout)
        await step("criu_dump_of_a_cuda_process", lambda: criu_dump_of_a_cuda_process(criu))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log = work / "server.log"
    try:
        server = await launch(work / "jupyter", log=log, criu_path=criu)
        try:
            await (criu_cuda_check(server) if CRIU_CUDA else checks(server))
        finally:
            server.discard()
    finally:
        if log.exists():
            (OUT / "server.log").write_text(log.read_text(errors="replace")[-200_000:])
        (OUT / "gpu-check.json").write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)  # images of GPU kernels: gigabytes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default: {OUT})")
    parser.add_argument(
        "--no-gpu", action="store_true", default=not GPU,
        help="numpy instead of torch on CUDA: the plumbing only (also GPU_CHECK_NO_GPU=1)",
    )  # fmt: skip
    parser.add_argument(
        "--criu-cuda", action="store_true",
        help="only check CRIU with its CUDA plugin and cuda-checkpoint (see above)",
    )  # fmt: skip
    options = parser.parse_args()
    OUT, GPU, CRIU_CUDA = options.out, not options.no_gpu, options.criu_cuda
    asyncio.run(main())
