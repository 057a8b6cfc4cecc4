"""The CRIU engine: checkpoint the whole kernel process tree, restore it later.

A CRIU image keeps everything: memory, threads, open files, listening sockets,
even a cell that is still running. The kernel's connections to the server are
closed on restore (``--tcp-close``); ZMQ reconnects them by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..kernel_process import gpu_memory, tree_memory
from .base import Availability, Engine, EngineError, Kernel, StoredImage, Woken
from .criu_install import CriuBinary, CriuUnavailable, locate_criu, version_text
from .criu_service import ServiceError, acall, call
from .criu_stream import ImageSink, ImageSource, Streamer
from .dill import DillEngine
from .lazy_pages import LazyPageServer, lazy_pages_unavailable

log = logging.getLogger(__name__)

# One table of options serves both drivers: RPC field name -> command-line flag.
_COMMON = {
    "tcp_close": "--tcp-close",
    "shell_job": "--shell-job",
    "ext_unix_sk": "--ext-unix-sk",
    "file_locks": "--file-locks",
}
# Stopped, not killed: the kernel is ended only once the image is verified on disk.
# In flight: a connection to one of the kernel's ports not yet accepted (the server's
# ZMQ reconnecting) would fail the dump; skipped, its peer connects again after the wake.
_DUMP = {**_COMMON, "leave_stopped": "--leave-stopped", "tcp_skip_in_flight": "--skip-in-flight"}
# Sibling: the restored kernel becomes our child, so we can reap it, and
# ipykernel's parent poller sees no change of parent.
_RESTORE = {**_COMMON, "rst_sibling": "--restore-sibling", "leave_stopped": "--leave-stopped"}

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
_PIDFILE = "restored.pid"
_PROC_MOUNT = "proc.crtools"
# With the service, the image is the service's; the engine's directory names it.
SERVICE_IMAGE = "criud.json"
# Inside a CRIU image: the optional dill snapshot woken from if the restore fails.
DILL_SNAPSHOT = "dill"

_T = TypeVar("_T")


def _log_errors(log: Path, limit: int = 6) -> str:
    """The last error lines of a CRIU log: the part a person needs to read."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log})"
    errors = [line for line in lines if "Error" in line or "error" in line]
    return "\n".join((errors or lines)[-limit:])


class _CliDriver:
    """Runs ``criu`` as a command."""

    def __init__(self, binary: CriuBinary) -> None:
        self.binary = binary

    def _run(
        self,
        action: str,
        image_dir: Path,
        options: dict[str, str],
        extra: list[str],
        prefix: Sequence[str] = (),
    ) -> None:
        log = DUMP_LOG if action == "dump" else RESTORE_LOG
        # Streamed, CRIU runs in the images directory: it connects to the streamer's
        # socket by the -D path it was given, and a socket's path may be at most 107 bytes.
        stream = "--stream" in extra
        images = "." if stream else str(image_dir)
        cmd = [*prefix, str(self.binary.path), action, "-D", images, "-o", log, "-v2"]
        cmd += list(options.values()) + extra
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=image_dir if stream else None,
        )
        if result.returncode != 0:
            raise EngineError(
                f"criu {action} failed (exit {result.returncode}):\n" + _log_errors(image_dir / log)
            )

    def dump(
        self, pid: int, image_dir: Path, prefix: Sequence[str] = (), stream: bool = False
    ) -> None:
        """``prefix`` runs CRIU as the dumped processes' uid, with the capabilities it
        names (kernelhib-criud's dumps): CRIU is told it is not root. ``stream``: the
        image goes to the streamer listening in ``image_dir``."""
        unprivileged = ["--unprivileged"] if prefix else []
        streamed = ["--stream"] if stream else []
        self._run("dump", image_dir, _DUMP, ["-t", str(pid), *unprivileged, *streamed], prefix)

    def restore(self, image_dir: Path, stream: bool = False, lazy: bool = False) -> int:
        """``lazy``: the memory is left to the lazy page server listening in ``image_dir``."""
        pidfile = image_dir / _PIDFILE
        extra = ["--restore-detached", "--pidfile", str(pidfile)]
        extra += ["--stream"] if stream else []
        extra += list(LazyPageServer.restore_args) if lazy else []
        self._run("restore", image_dir, _RESTORE, extra)
        return int(pidfile.read_text())


class _RpcDriver:
    """Talks to ``criu swrk`` through pycriu: structured requests, no argument parsing."""

    def __init__(self, binary: CriuBinary, pycriu: Any) -> None:
        self.binary = binary
        self.pycriu = pycriu

    def _call(self, action: str, image_dir: Path, options: dict[str, str], **fields: Any) -> Any:
        client = self.pycriu.criu()
        client.use_binary(str(self.binary.path))
        fd = os.open(image_dir, os.O_DIRECTORY)
        try:
            client.opts.images_dir_fd = fd
            client.opts.log_file = DUMP_LOG if action == "dump" else RESTORE_LOG
            client.opts.log_level = 2
            for name in options:
                setattr(client.opts, name, True)
            for name, value in fields.items():
                setattr(client.opts, name, value)
            return getattr(client, action)()
        except self.pycriu.CRIUException as exc:
            log = image_dir / client.opts.log_file
            raise EngineError(f"criu {action} failed ({exc}):\n{_log_errors(log)}") from exc
        finally:
            os.close(fd)

    def dump(self, pid: int, image_dir: Path) -> None:
        self._call("dump", image_dir, _DUMP, pid=pid)

    def restore(self, image_dir: Path) -> int:
        return self._call("restore", image_dir, _RESTORE).pid


def _import_pycriu(binary: CriuBinary) -> Any | None:
    """pycriu from the located CRIU install, or None to use the command line."""
    if binary.pycriu_dir and str(binary.pycriu_dir) not in sys.path:
        sys.path.append(str(binary.pycriu_dir))
    try:
        return importlib.import_module("pycriu")
    except ImportError:
        return None


class CriuEngine(Engine):
    """Checkpoint/restore of the kernel's process tree (root only, CRIU >= 4.2), or
    through kernelhib-criud, the root service at ``service`` (a unix socket).

    With ``dill``, a wake whose restore fails wakes from the image's dill
    snapshot, if it has one; ``keep_dill_snapshot`` has each image keep one.
    ``lazy``: wake chunked images lazily where userfaultfd works (docs/lazy-wake.md).
    """

    name = "criu"
    saves_running_cells = True  # frozen mid-cell, it carries on after the wake
    graceful_end = False  # left stopped by the dump, it is killed: its image has all of it

    def __init__(
        self,
        criu_path: str = "",
        service: str = "",
        dill: DillEngine | None = None,
        keep_dill_snapshot: bool = False,
        lazy: bool = True,
    ) -> None:
        self.criu_path = criu_path
        self.service = service
        self.dill = dill
        self.keep_dill_snapshot = keep_dill_snapshot
        self.lazy = lazy
        self._driver: _CliDriver | _RpcDriver | None = None
        self._dump_lock = asyncio.Lock()
        self._why_not_lazy: str | None = None  # once asked: "" when a lazy wake can run

    def availability(self) -> Availability:
        if self.service:
            try:
                hello = call(self.service, "hello")
            except ServiceError as exc:
                return Availability(
                    False, str(exc), "start kernelhib-criud (systemctl start kernelhib-criud)"
                )
            return Availability(
                True, f"through kernelhib-criud at {self.service}, for uid {hello['uid']}"
            )
        if os.geteuid() != 0:
            return Availability(
                False,
                f"running as uid {os.geteuid()}; CRIU can only restore kernels as root here",
                "run the Jupyter server as root, or kernelhib-criud and set "
                "CriuService.socket, or use the dill engine",
            )
        if not shutil.which("unshare"):
            return Availability(
                False,
                "`unshare` not found on PATH: kernels run in their own pid namespace "
                "(unshare --pid --fork) so that a restore never finds its pids taken",
                "install util-linux",
            )
        try:
            binary = locate_criu(self.criu_path)
        except CriuUnavailable as exc:
            detail = f"{exc.reason}\n{exc.output}" if exc.output else exc.reason
            return Availability(False, detail, exc.remedy)
        if _import_pycriu(binary):
            driver = f"pycriu from {binary.pycriu_dir} (RPC driver)"
        else:
            driver = "pycriu not found: the command-line driver is used, which works as well"
        if not self.lazy:
            wakes = "lazy wake off (KernelHibernator.lazy_wake)"
        elif why_not := self._why_not_lazy_here():
            wakes = f"kernels are woken in full: {why_not}"
        else:
            wakes = "chunked images wake lazily (userfaultfd works)"
        return Availability(
            True,
            f"CRIU {version_text(binary.version)} at {binary.path}; criu check passed; "
            f"{driver}; {wakes}",
        )

    @property
    def driver(self) -> _CliDriver | _RpcDriver:
        if self._driver is None:
            binary = locate_criu(self.criu_path)
            pycriu = _import_pycriu(binary)
            self._driver = _RpcDriver(binary, pycriu) if pycriu else _CliDriver(binary)
        return self._driver

    @property
    def _stream_driver(self) -> _CliDriver:
        """The command line: CRIU 4.2's RPC has no ``--stream``."""
        driver = self.driver
        return driver if isinstance(driver, _CliDriver) else _CliDriver(driver.binary)

    async def dump(self, pid: int, image_dir: Path, sink: ImageSink | None = None) -> None:
        """Write the image of ``pid``'s tree into ``image_dir``, or through the streamer
        into ``sink`` (not with the service: its images stay plain files); leave the
        tree stopped.

        One dump at a time: CRIU mounts a proc for the kernel's pid namespace at
        ``proc.crtools`` in the kernel's working directory, so two kernels
        sharing a directory cannot be dumped at once. A directory left there by
        an interrupted dump would make every later dump fail; it is removed.
        """
        if self.service:
            answer = await acall(self.service, "dump", pid=pid)
            reference = json.dumps({"image": answer["image"]})
            await asyncio.to_thread((image_dir / SERVICE_IMAGE).write_text, reference)
            return
        async with self._dump_lock:
            with contextlib.suppress(OSError):
                (Path(f"/proc/{pid}/cwd") / _PROC_MOUNT).rmdir()
            if sink is None:
                await asyncio.to_thread(self.driver.dump, pid, image_dir)
                return
            driver = self._stream_driver
            await asyncio.to_thread(
                _streaming,
                Streamer(image_dir, sink=sink),
                lambda: driver.dump(pid, image_dir, stream=True),
            )

    @staticmethod
    def is_bulk(name: str) -> bool:
        """Memory page files: raw memory, written once front to back, copied into the
        process and never parsed."""
        return name.startswith("pages-") and name.endswith(".img")

    @staticmethod
    def snapshot_of(image: Path) -> Path:
        """The spare snapshot beside the memory (keep_dill_snapshot)."""
        return image / DILL_SNAPSHOT

    def estimate(self, pid: int) -> int:
        """The kernel's private memory and GPU memory (CRIU's CUDA plugin copies it
        out), and a kept dill snapshot on top."""
        memory = tree_memory(pid) + gpu_memory(pid)
        return memory * 2 if self.keep_dill_snapshot else memory

    async def write(
        self, kernel: Kernel, staging: Path, sink: ImageSink | None = None
    ) -> dict[str, Any]:
        """Dump the kernel into ``staging``, or streamed into ``sink``, leaving it stopped
        (and a dill snapshot beside, if asked and the kernel is between cells)."""
        if self.dill and self.keep_dill_snapshot and not kernel.busy:
            # Its losses matter only if a wake ever falls back to it.
            await self.dill.save(kernel, self.snapshot_of(staging))
        return {"freed_bytes": await kernel.checkpoint(self, staging, sink)}

    async def wake(self, kernel: Kernel, image: StoredImage) -> Woken:
        """Restore the kernel from the image's signed files, or from its dill snapshot
        if CRIU cannot and the image keeps one.

        A chunked image is woken lazily where it can be: the kernel answers before
        its memory is back, and the memory streams in behind (``Woken.settling``).
        """
        try:
            async with contextlib.AsyncExitStack() as held:
                directory = await held.enter_async_context(image.signed_copy())
                if await self._can_wake_lazily(kernel, image, directory):
                    fetch = await self._restore_lazily(kernel, directory, image, held)
                    return Woken(restarted=False, settling=fetch)
                await self._restore(kernel, directory, image)
        except EngineError as exc:
            snapshot = self.snapshot_of(image.path)
            if self.dill is None or not snapshot.is_dir():
                raise
            kernel.fell_back(f"CRIU could not restore the kernel: {exc}")
            return Woken(restarted=True, lost=await self.dill.load(kernel, snapshot))
        return Woken(restarted=False)

    async def _restore(self, kernel: Kernel, directory: Path, image: StoredImage) -> None:
        """Restore the kernel while its memory pages are checked; run it once they pass.

        Both read the same files, so the disk reads them once. A streamed image's
        chunks are each verified before CRIU gets them.
        """
        await kernel.restore(self, directory, image.streamed(directory))
        await self._run_restored(kernel, image)

    @staticmethod
    async def _run_restored(
        kernel: Kernel, image: StoredImage, server: LazyPageServer | None = None
    ) -> None:
        """Run the restored kernel once its pages passed their check, until it answers
        (first handing it to the lazy page server, which must kill it if a page fails);
        end it if any of that fails."""
        try:
            if server is not None:
                await server.adopt(kernel.pid)
            await image.verified()
            kernel.resume()
            await kernel.until_responsive()
        except BaseException:
            await kernel.end()
            raise

    async def _can_wake_lazily(self, kernel: Kernel, image: StoredImage, directory: Path) -> bool:
        """A lazy wake needs a chunked image (its pages verified chunk by chunk), a
        kernel that dies with its root, and userfaultfd; not through the service."""
        if not (self.lazy and not self.service and kernel.contained):
            return False
        if image.streamed(directory) is None:
            return False
        return not await asyncio.to_thread(self._why_not_lazy_here)

    def _why_not_lazy_here(self) -> str:
        """Why this machine cannot wake lazily, or "" if it can; asked once. Blocking."""
        if self._why_not_lazy is None:
            self._why_not_lazy = lazy_pages_unavailable(self._stream_driver.binary.path) or ""
            if self._why_not_lazy:
                log.warning("Kernels are woken in full: %s", self._why_not_lazy)
        return self._why_not_lazy

    async def _restore_lazily(
        self, kernel: Kernel, directory: Path, image: StoredImage, held: contextlib.AsyncExitStack
    ) -> _Fetch:
        """Restore the kernel with its memory left to the lazy page server, run it once
        it is back, and hand what the fetch needs (``held``) over to the fetch."""
        await held.enter_async_context(image.held())
        server = LazyPageServer(
            directory,
            image.bulk_reader,
            env=kernel.helper_env(),
        )
        await held.enter_async_context(server)
        await kernel.restore(self, directory, lazy=True)
        await self._run_restored(kernel, image, server)
        return _Fetch(server, held.pop_all())

    async def restore(
        self, image_dir: Path, source: ImageSource | None = None, lazy: bool = False
    ) -> int:
        """Restore the tree from ``image_dir``, or streamed from ``source``, as our child,
        stopped; return its host pid.

        CRIU reads any image file it knows the name of from ``image_dir`` (or asks
        ``source`` for it), and writes its log and pidfile there: give it a fresh
        directory holding only the image's signed files (``ImageStore.restore_dir``).
        Nothing of the kernel runs until the caller continues it (SIGCONT).
        """
        if self.service:
            answer = await acall(self.service, "restore", image=_service_image(image_dir))
            return int(answer["pid"])
        if lazy:
            return await asyncio.to_thread(self._stream_driver.restore, image_dir, lazy=True)
        if source is None:
            return await asyncio.to_thread(self.driver.restore, image_dir)
        driver = self._stream_driver
        return await asyncio.to_thread(
            _streaming,
            Streamer(image_dir, source=source),
            lambda: driver.restore(image_dir, stream=True),
        )

    def release(self, image_dir: Path) -> None:
        """Have the service delete the image that ``image_dir`` names, if any: its
        own reference to it is being deleted. Blocking."""
        if self.service and (image_dir / SERVICE_IMAGE).is_file():
            with contextlib.suppress(ServiceError, OSError, ValueError, KeyError):
                call(self.service, "discard", image=_service_image(image_dir))


class _Fetch:
    """The rest of a lazy wake (:class:`~kernelhib.engines.base.Settling`): the
    server copying in the kernel's memory, and what it reads (the image's restore
    directory, its chunks held off collection), released once it is done."""

    def __init__(self, server: LazyPageServer, held: contextlib.AsyncExitStack) -> None:
        self.server = server
        self.held = held

    async def wait(self) -> float:
        try:
            stats = await self.server.wait()
        finally:
            await self.cancel()
        return stats.drained if stats.drained is not None else stats.elapsed()

    async def cancel(self) -> None:
        await asyncio.shield(self.held.aclose())


def _streaming(streamer: Streamer, run: Callable[[], _T]) -> _T:
    """Run CRIU with ``streamer`` serving it. When both fail, the streamer's error is
    the reason (CRIU only saw its pipe close): it is the one raised. Blocking."""
    with streamer:
        try:
            return run()
        except EngineError as exc:
            failure = exc
    raise failure


def _service_image(image_dir: Path) -> str:
    """The name of the service's image that ``image_dir`` refers to."""
    try:
        name = json.loads((image_dir / SERVICE_IMAGE).read_text())["image"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{image_dir} names no image of kernelhib-criud: {exc}") from exc
    if not isinstance(name, str):
        raise EngineError(f"{image_dir / SERVICE_IMAGE} is not a kernelhib-criud reference")
    return name
