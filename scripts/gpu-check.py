"""What hibernation does to kernels on a host with an NVIDIA GPU; prints and saves findings.

Needs root, torch with CUDA, kernelhib and CRIU installed. It starts a jupyter server
with kernelhib (through benchmarks/hibernate.py's helpers) and checks, step by step:

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

Each step's result or error goes to ``$OUT/gpu-check.json`` (default /tmp/gpu-check);
a failing step does not stop the others. ``GPU_CHECK_NO_GPU=1`` runs the same steps
with numpy instead, to try the plumbing on a machine without a GPU. Results and the
command used on an H200 are in docs/engines.md.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hibernate as hb  # the benchmark's server and channel helpers

from kernelhib.engines import cuda
from kernelhib.engines.criu_install import locate_criu

OUT = Path(os.environ.get("OUT", "/tmp/gpu-check"))
GPU = os.environ.get("GPU_CHECK_NO_GPU") != "1"
results: dict[str, Any] = {}


def step(name: str, action: Callable[[], Any]) -> None:
    """Run one check; record its value or its error, and how long it took."""
    started = time.perf_counter()
    try:
        results[name] = {"ok": True, "value": action()}
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


def criu_cuda_check(server: Any) -> None:
    """CRIU with its CUDA plugin, on a real GPU: what `kernelhib doctor` finds, then a
    kernel holding 1 GiB on the GPU hibernated with ``auto`` twice (engine, GPU memory
    freed, seconds per GiB of GPU memory), each wake (same pid, tensor checksum,
    cuda-checkpoint's state), and a kernel with managed memory, which must fall back
    to dill and stay usable."""
    gpu = cuda.check()
    results["criu_cuda.requirements"] = {"ok": gpu.ok, "reason": gpu.reason}
    results["criu_cuda.driver"] = cuda.driver_version()

    def hibernate(kernel_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        model = server.request("POST", f"api/kernels/{kernel_id}/hibernate", {})["hibernation"]
        seconds = time.perf_counter() - started
        gib = model.get("gpu_freed_bytes", 0) / 2**30
        keep = ("engine", "image_bytes", "gpu_freed_bytes", "seconds", "fallback_reason")
        return {
            **{key: model.get(key) for key in keep},
            "request_s": round(seconds, 3),
            "s_per_gpu_gib": round(seconds / gib, 3) if gib else None,
            "gpu_mib_after": gpu_used_mib(),
        }

    def wake(kernel_id: str, channel: hb.KernelChannel, pid: int) -> dict[str, Any]:
        started = time.perf_counter()
        server.request("POST", f"api/kernels/{kernel_id}/wake")
        seconds = time.perf_counter() - started
        device, same, now = channel.evaluate(f"__import__('json').dumps({CUDA_CHECK})")
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

    kernel_id = server.start_kernel()
    channel = hb.KernelChannel(server, kernel_id)
    try:
        step("criu_cuda.fill", lambda: channel.execute(CUDA_FILL, timeout=300)["status"])
        pid = channel.evaluate("__import__('json').dumps(__import__('os').getpid())")
        results["criu_cuda.gpu_mib_filled"] = gpu_used_mib()
        for cycle in (1, 2):
            step(f"criu_cuda.hibernate_{cycle}", lambda: hibernate(kernel_id))
            step(f"criu_cuda.wake_{cycle}", lambda: wake(kernel_id, channel, pid))
    finally:
        channel.close()
        server.shutdown_kernel(kernel_id)

    kernel_id = server.start_kernel()
    channel = hb.KernelChannel(server, kernel_id)
    try:
        step("criu_cuda.uvm_fill", lambda: channel.execute(UVM_FILL, timeout=300)["status"])
        step("criu_cuda.uvm_rc", lambda: channel.evaluate("__import__('json').dumps(uvm_rc)"))
        step("criu_cuda.uvm_hibernate", lambda: hibernate(kernel_id))
        step("criu_cuda.uvm_wake", lambda: server.request("POST", f"api/kernels/{kernel_id}/wake"))
        use = "__import__('json').dumps(float(y.sum()))"
        step("criu_cuda.uvm_after_wake", lambda: channel.evaluate(use))
    finally:
        channel.close()
        server.shutdown_kernel(kernel_id)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    criu = str(locate_criu().path)
    if GPU:
        gpus = ["nvidia-smi", "-L"]
        step("gpu", lambda: subprocess.run(gpus, capture_output=True, text=True).stdout)
        step("criu_dump_of_a_cuda_process", lambda: criu_dump_of_a_cuda_process(criu))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    config = work / "config"
    config.mkdir()
    settings = {"jpserver_extensions": {"kernelhib": True}}
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": settings, "KernelHibernator": {"criu_path": criu}})
    )
    os.environ["JUPYTER_CONFIG_PATH"] = str(config)
    server = hb.JupyterServer(work, work / "images")

    def hibernate(kernel_id: str, engine: str = "") -> dict[str, Any]:
        body = {"engine": engine} if engine else {}
        model = server.request("POST", f"api/kernels/{kernel_id}/hibernate", body)
        keep = (
            "engine", "image_bytes", "freed_bytes", "gpu_freed_bytes", "seconds", "lost",
            "fallback_reason",
        )  # fmt: skip
        return {key: model["hibernation"].get(key) for key in keep}

    def wake(kernel_id: str) -> str:
        return server.request("POST", f"api/kernels/{kernel_id}/wake")["execution_state"]

    def value(channel: hb.KernelChannel, expression: str) -> Any:
        return channel.evaluate(f"__import__('json').dumps({expression})")

    try:
        server.wait_ready()
        if "--criu-cuda" in sys.argv:
            criu_cuda_check(server)
            return
        kernel_id = server.start_kernel()
        channel = hb.KernelChannel(server, kernel_id)
        channel.execute("1+1", timeout=120)
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
        step("gpu_kernel.fill", lambda: channel.execute(gpu_fill, timeout=300)["status"])
        results["gpu_mib.filled"] = gpu_used_mib()
        step("gpu_kernel.hibernate_criu", lambda: hibernate(kernel_id, "criu"))
        step("gpu_kernel.still_running", lambda: value(channel, check))
        step("gpu_kernel.hibernate_auto", lambda: hibernate(kernel_id))
        time.sleep(1)
        results["gpu_mib.hibernated"] = gpu_used_mib()
        step("gpu_kernel.wake", lambda: wake(kernel_id))
        step("gpu_kernel.after_wake", lambda: value(channel, check))
        results["gpu_mib.woken"] = gpu_used_mib()
        channel.close()
        server.shutdown_kernel(kernel_id)

        kernel_id = server.start_kernel()
        channel = hb.KernelChannel(server, kernel_id)
        channel.execute("1+1", timeout=120)
        library = "torch" if GPU else "numpy"
        cpu_fill = f"import {library}\nt = {library}.arange(10**6)"
        step("cpu_kernel.fill", lambda: channel.execute(cpu_fill, timeout=300)["status"])
        step("cpu_kernel.hibernate", lambda: hibernate(kernel_id))
        step("cpu_kernel.wake", lambda: wake(kernel_id))
        cuda = ", torch.cuda.is_available(), float(torch.ones(4, device='cuda').sum())"
        step("cpu_kernel.then_cuda", lambda: value(channel, f"[int(t.sum()){cuda if GPU else ''}]"))
        channel.close()
        server.shutdown_kernel(kernel_id)

        if GPU:  # 4. The GPU is full when a hibernated GPU kernel wakes.
            kernel_id = server.start_kernel()
            channel = hb.KernelChannel(server, kernel_id)
            channel.execute("1+1", timeout=120)
            step("full_gpu.fill", lambda: channel.execute(gpu_fill, timeout=300)["status"])
            step("full_gpu.hibernate", lambda: hibernate(kernel_id))
            with gpu_hog():
                step("full_gpu.wake", lambda: wake(kernel_id))
                model = f"api/kernels/{kernel_id}"
                step("full_gpu.model", lambda: server.request("GET", model)["execution_state"])
            step("full_gpu.wake_again", lambda: wake(kernel_id))
            step("full_gpu.after_wake", lambda: value(channel, check))
            channel.close()
            server.shutdown_kernel(kernel_id)
    finally:
        server.stop()
        (OUT / "server.log").write_text(server.log_path.read_text(errors="replace")[-200_000:])
        (OUT / "gpu-check.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
