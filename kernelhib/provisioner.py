"""A kernel provisioner whose kernels can be checkpointed and restored.

Differences from jupyter_client's LocalProvisioner, each one needed for a
restore to work:

- The kernel runs as the first process of its own pid namespace
  (``unshare --pid --fork``): a restore recreates the namespace, so it never
  fails because the kernel's old pid was taken meanwhile. Not on hosts with
  NVIDIA GPUs (unless configured): CUDA cannot start in such a namespace. There,
  where CRIU can checkpoint CUDA (:mod:`kernelhib.engines.cuda`), the kernel is
  restored at its own pids instead, after checking that they are free; else it
  is hibernated with dill.
- No pipes to the server: stdin is /dev/null, output goes to a per-kernel log
  file. A pipe to a process outside the image cannot be restored.
- No ``JPY_PARENT_PID``, and nothing else that ties the kernel's life to the
  server's: ipykernel's parent poller would end a kernel whose parent changed,
  which a restored kernel's always has, and a kernel being hibernated must
  outlive a server that dies meanwhile. The server's watchdog ends the others
  (see :mod:`kernelhib.recovery`).
- IPython's history database is private to the kernel: CRIU refuses to restore
  a kernel whose open files changed size, and a shared database grows whenever
  any other kernel runs a cell.

A restored kernel is managed through a pidfd (:class:`KernelProcess`), because
it need not be our child. With ``CriuService.socket`` set, no kernel is: the root
service kernelhib-criud launches it, as our uid, in its pid namespace.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from jupyter_client.connect import port_names
from jupyter_client.provisioning import LocalProvisioner
from traitlets import CaselessStrEnum, Unicode, default

from .engines import cuda
from .engines.base import EngineError
from .engines.criu import CriuEngine
from .engines.criu_service import CriuService, acall
from .engines.criu_stream import ImageSink, ImageSource
from .kernel_process import KERNEL_ID_VAR, KernelProcess, namespace_init, process_tree
from .paths import kernelhib_data_dir, private_dir

# --kill-child: the kernel dies with unshare, so ending either ends both.
_UNSHARE = ("unshare", "--pid", "--fork", "--kill-child", "setsid")
# Present where the NVIDIA driver is loaded. In a pid namespace that shares the
# host's /proc, CUDA fails to start (error 304, "OS call failed or operation not
# supported on this OS"), seen with driver 580 on an H200; a private /proc would
# fix that, but a kernel in a mount namespace of its own is beyond what CRIU dumps.
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")
ON_GPU_HOST = (
    "this host has NVIDIA GPUs, so kernels start without a pid namespace (CUDA cannot start in one)"
)
IF_NO_CUDA = "if kernels here never use CUDA, set HibernatingProvisioner.pid_namespace = 'always'"
_RESUMING: set[asyncio.Future[None]] = set()
SAME_PIDS = (
    "on this GPU host kernels start without a pid namespace and CRIU restores them at their "
    "own pids, GPU memory included (CRIU's CUDA plugin)"
)


def _runs_our_python(executable: str) -> bool:
    """Whether ``executable`` is the server's own Python environment, where kernelhib is."""
    found = shutil.which(executable)
    ours = Path(sys.executable)
    return found is not None and Path(found).parent == ours.parent and os.path.samefile(found, ours)


class HibernatingProvisioner(LocalProvisioner):  # type:ignore[misc]
    """Launches restorable kernels and hands their process to an engine."""

    kernel_files_dir = Unicode(
        config=True,
        help="Directory for each kernel's log file and IPython history database. "
        "Must persist as long as images do: a restored kernel reopens these files.",
    )

    @default("kernel_files_dir")
    def _default_kernel_files_dir(self) -> str:
        return str(kernelhib_data_dir() / "kernels")

    pid_namespace = CaselessStrEnum(
        ["auto", "always", "never"],
        default_value="auto",
        config=True,
        help="Run each kernel in a pid namespace of its own, which CRIU needs to restore it "
        "(else its pid may be taken by then). 'auto': unless the host has NVIDIA GPUs, "
        "where CUDA cannot start in such a namespace: there kernels start without one, and "
        "where CRIU can checkpoint CUDA (driver >= 570, cuda-checkpoint, CRIU's CUDA plugin, "
        "no MIG or MPS; see `kernelhib doctor`) CRIU restores them at their own pids, else "
        "they are hibernated with dill. 'never': kernels have none and are hibernated with "
        "dill. 'always' suits GPU hosts whose kernels never use CUDA.",
    )

    @property
    def service(self) -> str:
        """The CRIU service's socket that launches our kernels, or '' to launch them here."""
        return CriuService(parent=self).socket

    kernel: KernelProcess | None = None
    _hibernated: bool = False
    _held_ports: tuple[socket.socket, ...] = ()
    not_restorable: str = ""
    # Restored at its own pids, without a pid namespace: a kernel of a GPU host.
    same_pids: bool = False

    @property
    def files_dir(self) -> Path:
        return Path(self.kernel_files_dir) / str(self.kernel_id)

    @property
    def log_file(self) -> Path:
        return self.files_dir / "kernel.log"

    @property
    def has_process(self) -> bool:
        return self.hibernated or self.kernel is not None

    @property
    def hibernated(self) -> bool:
        """The kernel is an image, with no process; its ports are held meanwhile."""
        return self._hibernated

    @hibernated.setter
    def hibernated(self, hibernated: bool) -> None:
        self._hibernated = hibernated
        if hibernated:
            self._hold_ports()
        else:
            self._let_go_of_ports()

    def _hold_ports(self) -> None:
        """Keep the hibernated kernel's ports from being taken before it wakes.

        jupyter_client picks them among the ephemeral ports, and while the kernel is an
        image nothing listens on them: any connection from this host, the server's own
        to other kernels among them, could get one as its local port, and the wake would
        then fail ("Address already in use" from CRIU, or a dill wake's fresh kernel
        failing to bind). A socket bound to each port, not listening (a connection is
        refused as before), keeps Linux from handing it out.
        """
        info = self.connection_info
        if self._held_ports or info.get("transport", "tcp") != "tcp":
            return
        ip = str(info.get("ip") or "127.0.0.1")
        host = "" if ip in ("*", "0.0.0.0") else ip
        held = []
        for name in port_names:
            if not (port := info.get(name)):
                continue
            hold = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            # Its old connections may linger in TIME_WAIT on the port.
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                hold.bind((host, int(port)))
            except OSError as exc:
                hold.close()
                self.log.warning(
                    "Kernel %s: its %s %s is in use by another process (%s); it cannot wake "
                    "until that ends", self.kernel_id, name.replace("_", " "), port, exc,
                )  # fmt: skip
                continue
            held.append(hold)
        self._held_ports = tuple(held)

    def _let_go_of_ports(self) -> None:
        for hold in self._held_ports:
            hold.close()
        self._held_ports = ()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        private_dir(self.files_dir)
        cmd: list[str] = kwargs["cmd"]
        if any("ipykernel" in arg for arg in cmd):
            cmd.append(f"--HistoryManager.hist_file={self.files_dir / 'history.sqlite'}")
            if _runs_our_python(cmd[0]):
                # kernelhib is importable there: %hibernate works without %load_ext.
                cmd.append("--InteractiveShellApp.extra_extensions=kernelhib")
        self.same_pids = False
        self.not_restorable = self._why_not_restorable() or await self._why_not_on_gpu_host()
        if not self.not_restorable and not self.service and not self.same_pids:
            kwargs["cmd"] = [*_UNSHARE, *cmd]
        env = dict(kwargs.get("env") or os.environ)
        env.pop("JPY_PARENT_PID", None)  # the launcher sets it again where it is harmless
        env[KERNEL_ID_VAR] = str(self.kernel_id)
        kwargs["env"] = env
        return kwargs

    def _why_not_restorable(self) -> str:
        transport = getattr(self.parent, "transport", "tcp")
        if transport != "tcp":
            return f"the kernel uses the {transport} transport; CRIU needs tcp"
        # Else kernelhib-criud starts it as root would: in a pid namespace of its own.
        if not self.service:
            if os.geteuid() != 0:
                return "the server does not run as root, so the kernel has no pid namespace"
            if not shutil.which("unshare"):
                return "`unshare` (util-linux) is not installed, so the kernel has no pid namespace"
        if self.pid_namespace == "never":
            return "HibernatingProvisioner.pid_namespace is 'never', so the kernel has none"
        return ""

    async def _why_not_on_gpu_host(self) -> str:
        """On a GPU host ('auto'), the kernel gets no pid namespace: CRIU restores it at its
        own pids where it can checkpoint CUDA (``same_pids``), else say why not."""
        if self.pid_namespace != "auto" or not NVIDIA_CONTROL_DEVICE.exists():
            return ""
        if self.service:  # kernelhib-criud starts every kernel in a pid namespace
            return f"{ON_GPU_HOST}; {IF_NO_CUDA}"
        gpu = await asyncio.to_thread(cuda.check)
        if not gpu.ok:
            return (
                f"{ON_GPU_HOST}, and CRIU cannot checkpoint CUDA here ({gpu.reason}); {IF_NO_CUDA}"
            )
        self.same_pids = True
        return ""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        if self.service and not self.not_restorable:
            return await self._launch_by_service(cmd, **kwargs)
        with self.log_file.open("ab") as log:
            # independent: no JPY_PARENT_PID, and a session of its own (a Ctrl-C
            # in the server's terminal is not the kernel's).
            kwargs.update(
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, independent=True
            )
            info = await super().launch_kernel(cmd, **kwargs)
        pid = self.process.pid
        if not self.not_restorable and not self.same_pids:
            try:
                pid = await namespace_init(pid, self.process.poll)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; see {self.log_file}") from None
        self.kernel = KernelProcess(pid)
        self.pid = self.pgid = pid
        self.hibernated = False
        return info

    async def _launch_by_service(self, cmd: list[str], **kwargs: Any) -> Any:
        """Have kernelhib-criud start the kernel, as our uid, in its pid namespace: only
        kernels it started (or restored) for us, it dumps for us."""
        self.log_file.touch(mode=0o600)
        answer = await acall(
            self.service,
            "launch",
            argv=cmd,
            env=kwargs.get("env") or dict(os.environ),
            cwd=str(kwargs.get("cwd") or os.getcwd()),
            log=str(self.log_file),
        )
        self.kernel = KernelProcess(int(answer["pid"]))
        self.pid = self.pgid = self.kernel.pid
        self.cwd = kwargs.get("cwd") or os.getcwd()
        self.hibernated = False
        return self.connection_info

    async def poll(self) -> int | None:
        if self.hibernated:
            return None
        return self.kernel.poll() if self.kernel else 0

    async def wait(self) -> int | None:
        status = await self.kernel.wait() if self.kernel else 0
        if self.process is not None:
            # unshare ends with its kernel; reap it so no zombie stays behind.
            status = await asyncio.to_thread(self.process.wait)
            self.process = None
        self.kernel = None
        return status

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group (the kernel and what it spawned)."""
        if self.kernel is None or self.kernel.poll() is not None:
            return
        try:
            os.killpg(self.kernel.pid, signum)
        except OSError:
            self.kernel.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        # A hibernated kernel has no process; killing it means forgetting it.
        self.hibernated = False
        if self.kernel:
            self.kernel.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        self.hibernated = False
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and not self.hibernated:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    # Hibernation, in the order the hibernator calls it.

    async def checkpoint(
        self, engine: CriuEngine, image_dir: Path, sink: ImageSink | None = None
    ) -> int:
        """Write the kernel's image (streamed into ``sink`` if given) and leave it
        stopped; return the memory it holds.

        On failure the kernel is resumed, untouched, and EngineError is raised.
        """
        if self.not_restorable:
            raise EngineError(f"this kernel cannot be restored by CRIU: {self.not_restorable}")
        if self.kernel is None or self.kernel.poll() is not None:
            raise EngineError("the kernel process is not running")
        memory = self.kernel.memory_bytes()
        try:
            await engine.dump(self.kernel.pid, image_dir, sink)
        except BaseException as exc:
            self.resume()
            if self.same_pids and isinstance(exc, EngineError):
                raise EngineError(cuda.explain_dump_failure(str(exc))) from exc
            raise
        return memory

    def resume(self) -> None:
        """Let the kernel that :meth:`checkpoint` or :meth:`restore` left stopped run on.

        A GPU kernel whose dump succeeded has its CUDA state checkpointed still,
        and a restore whose plugin failed to resume it only logs that: it is put
        back on the GPU, in the background.
        """
        if self.kernel:
            self.kernel.resume()
            if self.same_pids:
                task = asyncio.ensure_future(asyncio.to_thread(self._resume_cuda, self.kernel.pid))
                _RESUMING.add(task)  # held until done
                task.add_done_callback(_RESUMING.discard)

    def _resume_cuda(self, pid: int) -> None:
        for problem in cuda.resume(process_tree(pid)):
            self.log.warning(
                "Kernel %s: its GPU state did not come back: %s", self.kernel_id, problem
            )

    async def restore(
        self,
        engine: CriuEngine,
        image_dir: Path,
        source: ImageSource | None = None,
        lazy: bool = False,
    ) -> None:
        """Bring the kernel back from its image (streamed from ``source`` if given, its
        memory left to the lazy page server if ``lazy``), as our child, in a new pid
        namespace, or (``same_pids``) at its own pids if none of them is taken.

        It is left stopped: :meth:`resume` lets it run.
        """
        if self.same_pids and (taken := await asyncio.to_thread(cuda.pids_taken, image_dir)):
            raise EngineError(
                f"pids {', '.join(map(str, taken))} of the kernel are taken by other processes; "
                f"a kernel of this GPU host is restored at its own pids (it has no pid "
                f"namespace): wake it again once they have ended"
            )
        self._let_go_of_ports()  # for the restored kernel to bind
        try:
            pid = await engine.restore(image_dir, source, lazy)
        except BaseException:
            if self.hibernated:
                self._hold_ports()
            raise
        self.kernel = KernelProcess(pid)
        self.pid = self.pgid = pid
        self.hibernated = False

    def adopt(self, connection_info: dict[str, Any], cwd: str | None, pid: int | None) -> None:
        """Take charge of a kernel an earlier server left: its live process ``pid``, or
        none (hibernated: an image)."""
        self.connection_info = connection_info
        self.cwd = cwd
        self.hibernated = pid is None
        if pid is not None:
            self.kernel = KernelProcess(pid)
            self.pid = self.pgid = pid
        # Its ports are its own: a fresh process (a dill wake) must bind the same ones.
        self.ports_cached = True

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(
            hibernated=self.hibernated,
            not_restorable=self.not_restorable,
            same_pids=self.same_pids,
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.hibernated = provisioner_info.get("hibernated", False)
        self.not_restorable = provisioner_info.get("not_restorable", "")
        self.same_pids = provisioner_info.get("same_pids", False)
