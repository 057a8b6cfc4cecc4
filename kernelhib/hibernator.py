"""The hibernation protocol: when a kernel may hibernate, in which order, and how it wakes.

Hibernation never loses a kernel. The kernel is checked idle, frozen and
dumped, the image is made durable and signed, and only then is the process
ended. A failure at any step resumes the kernel untouched and removes the
partial image. A failed wake keeps the image and the kernel stays hibernated,
with the reason in its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import queue
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerBase
from jupyter_events import EventLogger
from traitlets import Any as AnyTrait
from traitlets import Bool, CaselessStrEnum, Float, Instance, Int, Unicode, default
from traitlets.config import LoggingConfigurable

from . import journal, metrics
from .chunk_store import ChunkedFile, FormatError, StreamedImage
from .engines.base import ENGINE_CHOICES, Engine, EngineError, Settling
from .engines.criu import CriuEngine
from .engines.criu_service import CriuService
from .engines.criu_stream import ImageSink, ImageSource
from .engines.dill import DillEngine
from .engines.lazy_pages import PageSource
from .idle import IdleWatcher
from .image_store import Image, ImageError, ImageStore
from .journal import server_id
from .kernel_process import HELPER_VAR, KERNEL_ID_VAR, gpu_memory, process_start
from .paths import default_image_dir
from .provisioner import HibernatingProvisioner
from .recomputer import MODES as RECOMPUTE_MODES
from .recomputer import Recomputer
from .recovery import boot_ticks, recover

EVENT_SCHEMA_ID = "https://kernelhib.org/events/hibernation/v1"
EVENT_SCHEMA = Path(__file__).parent / "events" / "hibernation.yaml"


class Reason(str, Enum):
    """Why a request was refused or failed: the ``reason`` of an error answer.

    Front ends and the CLI decide what to offer from these codes, never from
    the wording of the message.
    """

    NOT_FOUND = "not-found"
    BAD_REQUEST = "bad-request"
    BUSY = "busy"  # a cell runs: force=true would freeze it (CRIU)
    BUSY_NEEDS_CRIU = "busy-needs-criu"  # a cell runs, and only dill could save the kernel
    NOT_RUNNING = "not-running"  # the kernel process has ended
    HIBERNATED = "hibernated"
    NO_ENGINE = "no-engine"
    HIBERNATE_FAILED = "hibernate-failed"
    WAKE_FAILED = "wake-failed"
    # The image's format is newer than this kernelhib reads: upgrade, or discard the image.
    IMAGE_FORMAT = "image-format"
    NO_SPACE = "no-space"  # the image store's filesystem has no room for the image
    STORE_FULL = "store-full"  # the image would take the store past max_image_bytes
    # Another operation on the kernel is in flight (the values of Operation).
    HIBERNATING = "hibernating"
    WAKING = "waking"
    SHUTTING_DOWN = "shutting-down"
    RESTARTING = "restarting"
    INTERRUPTING = "interrupting"
    RECOMPUTING = "recomputing"
    NOTHING_TO_RECOMPUTE = "nothing-to-recompute"  # no lost name has a plan to run
    RECOMPUTE_FAILED = "recompute-failed"  # a cell of the plan raised; the others did not run


class HibernationError(RuntimeError):
    """A hibernate or wake request could not be carried out.

    ``status`` is its HTTP code, ``reason`` its :class:`Reason`.
    """

    status = 500
    reason = Reason.HIBERNATE_FAILED

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class KernelNotFound(HibernationError):
    status = 404
    reason = Reason.NOT_FOUND


class Conflict(HibernationError):
    """The kernel is busy, already hibernated, or another operation on it is in flight."""

    status = 409


class NoEngine(HibernationError):
    """No engine can hibernate this kernel here."""

    status = 503
    reason = Reason.NO_ENGINE


class NoRoom(HibernationError):
    """The kernel's image would not fit in the image store: the kernel runs on untouched.

    507 Insufficient Storage: nothing is wrong with the request or the kernel,
    the server cannot store what the request needs.
    """

    status = 507
    reason = Reason.NO_SPACE


class Operation(str, Enum):
    """What is being done to a kernel; one at a time (see :meth:`KernelHibernator.operation`)."""

    HIBERNATE = Reason.HIBERNATING.value
    WAKE = Reason.WAKING.value
    SHUTDOWN = Reason.SHUTTING_DOWN.value
    RESTART = Reason.RESTARTING.value
    INTERRUPT = Reason.INTERRUPTING.value
    RECOMPUTE = Reason.RECOMPUTING.value


@dataclass
class Hibernation:
    """What the hibernator knows about one kernel."""

    state: str = "running"  # running | hibernating | hibernated | waking
    engine: str = ""
    image_bytes: int = 0  # what storing it took: chunks other images already held cost nothing
    logical_bytes: int = 0  # the image's files as the engine wrote them
    freed_bytes: int = 0
    gpu_freed_bytes: int = 0  # GPU memory the kernel held (a CUDA kernel's)
    seconds: float = 0.0
    hibernated_at: float = 0.0
    execution_state: str = "idle"  # before hibernation; a forced one may be "busy"
    error: str = ""
    lost: list[dict[str, str]] = field(default_factory=list)  # what dill could not keep
    fallback_reason: str = ""  # why not CRIU, when 'auto' used dill
    recompute: dict[str, Any] = field(default_factory=dict)  # the plan for lost (recomputer.py)
    # Wakes so far. A connection that saw an older epoch must prove its IOPub
    # subscription is live again before it forwards messages.
    epoch: int = 0
    waking: asyncio.Future[None] | None = None
    fetching: bool = False  # running, woken lazily: its memory is still coming in

    def settle(self, image: Image) -> None:
        """Take the facts of a committed image: the kernel is now hibernated in it."""
        manifest = image.manifest
        self.state = "hibernated"
        self.engine = manifest["engine"]
        self.image_bytes = image.stored_bytes
        self.logical_bytes = image.bytes
        self.freed_bytes = manifest.get("freed_bytes", 0)
        self.gpu_freed_bytes = manifest.get("gpu_freed_bytes", 0)
        self.hibernated_at = manifest["created"]
        self.execution_state = manifest.get("execution_state", "idle")
        self.lost = manifest.get("lost", [])
        self.fallback_reason = manifest.get("fallback_reason", "")
        self.recompute = manifest.get("recompute", {})

    def model(self) -> dict[str, Any]:
        model: dict[str, Any] = {"state": self.state}
        if self.engine:
            model.update(
                engine=self.engine,
                image_bytes=self.image_bytes,
                logical_bytes=self.logical_bytes,
                freed_bytes=self.freed_bytes,
                seconds=round(self.seconds, 3),
                hibernated_at=self.hibernated_at,
            )
        if self.gpu_freed_bytes:
            model["gpu_freed_bytes"] = self.gpu_freed_bytes
        if self.lost:
            model["lost"] = self.lost
        if self.fallback_reason:
            model["fallback_reason"] = self.fallback_reason
        if self.recompute:
            model["recompute"] = self.recompute
        if self.error:
            model["error"] = self.error
        if self.fetching:
            model["fetching"] = True
        return model


class KernelHibernator(LoggingConfigurable):
    """Hibernates and wakes the kernels of one kernel manager (``c.KernelHibernator``)."""

    engine = CaselessStrEnum(
        list(ENGINE_CHOICES),
        default_value="auto",
        config=True,
        help="Engine used when a request does not name one. 'auto' picks CRIU where it works.",
    )

    image_dir = Unicode(
        config=True,
        help="Where images are kept. Must be persistent (not /tmp, not the runtime "
        "directory) for kernels to outlive a server restart; it is created mode 0700.",
    )

    @default("image_dir")
    def _default_image_dir(self) -> str:
        return str(default_image_dir())

    criu_path = Unicode(
        "",
        config=True,
        help="Path of the criu binary. Empty: criu on PATH if it is 4.2 or later and "
        "passes `criu check`, else the one installed by `kernelhib install-criu`.",
    )

    wake_timeout = Float(
        60.0,
        config=True,
        help="Seconds a woken kernel has to answer (a comm_info request, which changes "
        "nothing in the kernel) before the wake counts as failed (the image is kept).",
    )

    idle_timeout = Float(
        0,
        config=True,
        help="Hibernate a kernel after this many seconds without execution or activity "
        "(0 turns idle hibernation off). A kernelspec may override it in its metadata: "
        '{"kernelhib": {"idle_timeout": 600}}.',
    )

    check_interval = Float(
        60,
        config=True,
        help="Seconds between two checks for idle kernels and old images.",
    )

    hibernate_connected = Bool(
        True,
        config=True,
        help="Hibernate idle kernels even while a browser tab is connected to them; "
        "the next message from that tab wakes the kernel.",
    )

    discard_after = Float(
        0,
        config=True,
        help="Shut down a kernel that has been hibernated this many seconds, deleting "
        "its image (0 keeps images until their kernel is shut down).",
    )

    hibernate_on_stop = Bool(
        True,
        config=True,
        help="When the server stops (SIGTERM/SIGINT), hibernate every running kernel, "
        "idle ones first, so that the next server with the same image_dir wakes them.",
    )

    stop_timeout = Float(
        60,
        config=True,
        help="Seconds the server's stop may spend hibernating kernels; kernels not "
        "hibernated by then are shut down as before.",
    )

    keep_dill_snapshot = Bool(
        False,
        config=True,
        help="With CRIU, also keep a dill snapshot in the image, and wake from it if the "
        "CRIU restore fails (for example when the environment's libraries changed). "
        "Off by default: it makes hibernation slower.",
    )

    chunked_images = Bool(
        True,
        config=True,
        help="Store CRIU images' memory as deduplicated, compressed chunks (image format "
        "2): a re-hibernation writes only what changed, and kernels share identical memory. "
        "False writes plain files (format 1), as kernelhib did before. Images of either "
        "format wake. Not with kernelhib-criud, whose images are plain files.",
    )

    lazy_wake = Bool(
        True,
        config=True,
        help="Wake CRIU kernels of chunked images lazily: the kernel answers before its "
        "memory is back, and the rest streams in behind, each page verified before the "
        "kernel gets it. The image is kept until all of it is in. Needs userfaultfd "
        "(criu check --feature uffd-noncoop); where it fails, kernels are woken in full. "
        "False: always wake in full, which brings all memory back sooner but answers "
        "only once all of it is in (docs/lazy-wake.md).",
    )

    snapshot_timeout = Float(
        600,
        config=True,
        help="Seconds a kernel has to save or load its dill snapshot.",
    )

    max_image_bytes = Int(
        0,
        config=True,
        help="The most bytes the images in image_dir may take together (0: no limit). A "
        "hibernation whose image would go past it is refused (reason 'store-full'), and "
        "the kernel runs on.",
    )

    free_space_reserve = Int(
        256 << 20,
        config=True,
        help="Bytes a hibernation must leave free on image_dir's filesystem, beyond its "
        "image's estimated size and 10%: one that would not is refused (reason "
        "'no-space'), and the kernel runs on.",
    )

    recompute = CaselessStrEnum(
        list(RECOMPUTE_MODES),
        default_value="offer",
        config=True,
        help="What to do when a dill hibernation or wake loses variables: 'offer' lists the "
        "cells of the kernel's history that re-create each one, for the user to run with one "
        "action; 'auto' runs them during the wake; 'off' only reports the loss. Cells that "
        "write files or run shell commands are never run; each cell has snapshot_timeout "
        "seconds (see docs/engines.md).",
    )

    kernel_manager = AnyTrait(help="The MappingKernelManager whose kernels this hibernates.")
    event_logger = Instance(EventLogger, allow_none=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records: dict[str, Hibernation] = {}
        self._dill = DillEngine(self.snapshot_timeout)
        self._criu = CriuEngine(
            self.criu_path,
            CriuService(parent=self).socket,
            self._dill,
            self.keep_dill_snapshot,
            lazy=self.lazy_wake,
        )
        self._store: ImageStore | None = None
        self.idle = IdleWatcher(self)
        self._background: set[asyncio.Future[Any]] = set()
        # Kernel id -> the operation in flight on it, and a future done when it ends.
        self._operations: dict[str, tuple[Operation, asyncio.Future[None]]] = {}
        self.server_id = server_id()
        self._watchdog: subprocess.Popen[bytes] | None = None
        # Kernel id -> the estimated size of its image being written: room already taken.
        self._reserved: dict[str, int] = {}
        # Kernel id -> the end of its lazy wake: its memory coming in, then its image retired.
        self._settling: dict[str, asyncio.Future[None]] = {}
        # Running kernel id -> the chunks of the image it was woken from: kept (from
        # garbage collection) for its next hibernation, which then writes only what changed.
        self._parents: dict[str, set[str]] = {}
        self.recomputer = Recomputer(self.kernel_manager, self.log)
        metrics.watch(self.kept)

    @property
    def store(self) -> ImageStore:
        if self._store is None:
            self._store = ImageStore(Path(self.image_dir), self._criu.release)
        return self._store

    def record(self, kernel_id: str) -> Hibernation:
        return self._records.setdefault(kernel_id, Hibernation())

    def model(self, kernel_id: str) -> dict[str, Any] | None:
        """The ``hibernation`` object of a kernel's REST model; None while it simply runs."""
        record = self._records.get(kernel_id)
        if record is None or (
            record.state == "running" and not (record.error or record.recompute or record.fetching)
        ):
            return None
        return record.model()

    def kept(self) -> list[Hibernation]:
        """The kernels whose images are in the store: hibernated, being woken, or
        woken lazily with their memory still coming in from the image."""
        return [
            r for r in self._records.values() if r.state in ("hibernated", "waking") or r.fetching
        ]

    def count_running(self) -> None:
        """Set jupyter_server's running-kernel gauge: the kernels that have a process."""
        mkm = self.kernel_manager
        metrics.set_running(
            mkm.get_kernel(k).kernel_name
            for k in mkm.list_kernel_ids()
            if not self.is_hibernated(k)
        )

    def is_hibernated(self, kernel_id: str) -> bool:
        """True while the kernel has no process: hibernated, or being woken."""
        record = self._records.get(kernel_id)
        return record is not None and record.state in ("hibernated", "waking")

    def epoch(self, kernel_id: str) -> int:
        return self.record(kernel_id).epoch

    def _engine_named(self, name: str | None) -> Engine:
        """The engine that wrote an image (its signed manifest names it)."""
        return self._criu if name == self._criu.name else self._dill

    def choose_engine(
        self, requested: str, provisioner: KernelProvisionerBase | None
    ) -> tuple[Engine, str]:
        """The engine for a request, and why not CRIU when 'auto' falls back to dill.

        NoEngine says why when no engine that the request allows can run.
        """
        name = (requested or self.engine).lower()
        if name not in ENGINE_CHOICES:
            raise HibernationError(
                f"unknown engine {name[:20]!r}: use {', '.join(ENGINE_CHOICES)}", Reason.BAD_REQUEST
            )
        if name == "dill":
            if why_not_dill := _why_not(self._dill):
                raise NoEngine(why_not_dill)
            return self._dill, ""
        why_not_criu = self._why_not_criu(provisioner)
        if not why_not_criu:
            return self._criu, ""
        if name == "criu":
            raise NoEngine(why_not_criu)
        if why_not_dill := _why_not(self._dill):
            raise NoEngine(f"{why_not_criu}; {why_not_dill}")
        return self._dill, why_not_criu

    def _why_not_criu(self, provisioner: KernelProvisionerBase | None) -> str:
        if why_not := _why_not(self._criu):
            return why_not
        if not isinstance(provisioner, HibernatingProvisioner):
            return "the kernel was not started by kernelhib-provisioner, so CRIU cannot restore it"
        if provisioner.not_restorable:
            return f"this kernel cannot be restored by CRIU: {provisioner.not_restorable}"
        return ""

    def operation_of(self, kernel_id: str) -> Operation | None:
        """The operation in flight on a kernel, if any."""
        current = self._operations.get(kernel_id)
        return current[0] if current else None

    @contextlib.asynccontextmanager
    async def operation(
        self, kernel_id: str, operation: Operation, wait: bool = False
    ) -> AsyncIterator[None]:
        """Carry out one operation on a kernel at a time.

        A request while another is in flight is refused (409, with the other's
        name as reason), or with ``wait`` queued behind it. Two hibernations at
        once, or a shutdown in the middle of one, would leave the kernel's
        process, model and image disagreeing.
        """
        while (current := self._operations.get(kernel_id)) is not None:
            if not wait:
                raise Conflict(
                    f"kernel {kernel_id} is {current[0].value}", Reason(current[0].value)
                )
            await asyncio.shield(current[1])
        done = asyncio.get_running_loop().create_future()
        self._operations[kernel_id] = (operation, done)
        try:
            yield
        finally:
            del self._operations[kernel_id]
            done.set_result(None)

    async def _journal(self, km: KernelManager, state: str) -> None:
        """Record durably what the kernel's process is doing (see :mod:`kernelhib.journal`)."""
        pid = _pid(km)
        entry = journal.Entry(
            km.kernel_id,
            self.server_id,
            state,
            pid,
            process_start(pid) if pid else 0,
            _facts(km),
        )
        await asyncio.to_thread(self.store.journal.write, entry)

    async def journal_start(self, kernel_id: str) -> None:
        """Record a kernel about to be launched: if the server dies, it is ended with it."""
        entry = journal.Entry(kernel_id, self.server_id, journal.RUNNING)
        await asyncio.to_thread(self.store.journal.write, entry)

    def journal_end(self, kernel_id: str) -> None:
        """Forget the journal entry of a kernel that has no process any more."""
        self.store.journal.remove(kernel_id, self.server_id)

    def _kernel(self, kernel_id: str) -> KernelManager:
        if kernel_id not in self.kernel_manager:
            raise KernelNotFound(f"no kernel {kernel_id}")
        return self.kernel_manager.get_kernel(kernel_id)

    async def hibernate(
        self, kernel_id: str, engine: str = "", force: bool = False
    ) -> dict[str, Any]:
        """Write the kernel's image and end its process; return the hibernation model."""
        self._kernel(kernel_id)
        async with self.operation(kernel_id, Operation.HIBERNATE):
            if (settling := self._settling.get(kernel_id)) is not None:
                # CRIU cannot dump memory that is not back yet.
                await asyncio.shield(settling)
            try:
                return await self._hibernate(kernel_id, engine, force)
            finally:
                self._reserved.pop(kernel_id, None)

    async def _hibernate(self, kernel_id: str, engine: str, force: bool) -> dict[str, Any]:
        km = self._kernel(kernel_id)
        record = self.record(kernel_id)
        if record.state != "running":
            raise Conflict(f"kernel {kernel_id} is {record.state}", Reason(record.state))
        requested = (engine or self.engine).lower()
        # Off the event loop: the first look for CRIU runs `criu check`.
        chosen, fallback = await asyncio.to_thread(self.choose_engine, requested, km.provisioner)
        if await km.provisioner.poll() is not None:
            raise Conflict(
                f"kernel {kernel_id} is not running: there is nothing to hibernate",
                Reason.NOT_RUNNING,
            )
        busy = km.execution_state == "busy"
        if busy and not force:
            raise Conflict(
                f"kernel {kernel_id} is busy running a cell; hibernate it with force=true "
                "to freeze the cell and let it carry on after wake",
                Reason.BUSY,
            )
        if busy and not chosen.saves_running_cells:
            raise Conflict(
                f"kernel {kernel_id} is busy running a cell, and the {chosen.name} engine can only "
                f"save a kernel between cells ({fallback or 'dill was requested'})",
                Reason.BUSY_NEEDS_CRIU,
            )
        try:
            self._reserved[kernel_id] = await self._room_for(km, chosen)
        except NoRoom as exc:
            record.error = str(exc)
            self._ended(Operation.HIBERNATE, kernel_id, record, chosen.name, None, exc)
            raise

        record.state, record.error = "hibernating", ""
        self._emit("hibernate-started", kernel_id, record)
        started = time.monotonic()
        try:
            # From here until the commit, this process is all there is of the kernel:
            # if the server dies, it is kept running for the next server.
            await self._journal(km, journal.HIBERNATING)
            try:
                image = await self._write_image(km, chosen, fallback)
            except EngineError as exc:
                # CRIU failed before the kernel was touched: same request, other engine.
                if requested != "auto" or chosen is self._dill or busy:
                    raise
                fallback = f"CRIU could not checkpoint this kernel: {exc}"
                self.log.warning("Kernel %s: %s; using dill", kernel_id, fallback)
                chosen = self._dill
                image = await self._write_image(km, chosen, fallback)
            try:
                await self._end_process(km, graceful=chosen.graceful_end)
            except BaseException as exc:
                if isinstance(exc, Exception) and await self._has_ended(km):
                    # It ended all the same: the committed image is all there is of it now.
                    self.log.warning("Kernel %s ended, though not cleanly: %s", kernel_id, exc)
                    if isinstance(km.provisioner, HibernatingProvisioner):
                        km.provisioner.hibernated = True
                else:
                    self._resume(km)
                    km.start_restarter()
                    await self._discard(kernel_id)
                    raise
        except (Exception, asyncio.CancelledError) as exc:
            record.state = "running"
            record.error = f"hibernation failed, the kernel runs on: {exc}"
            try:
                await self._journal(km, journal.RUNNING)
            except OSError as unrecorded:
                # Left 'hibernating', the entry only keeps the kernel alive if we die.
                self.log.warning("Kernel %s: journal not updated: %s", kernel_id, unrecorded)
            error = HibernationError(record.error)
            self._ended(Operation.HIBERNATE, kernel_id, record, chosen.name, started, error)
            raise error from exc

        await asyncio.to_thread(self.store.journal.remove, kernel_id)  # no process left
        if self._parents.pop(kernel_id, None):
            # Its new image holds what it still needs of the one it was woken from.
            self._later(self._collect_chunks())
        record.settle(image)
        record.seconds = time.monotonic() - started
        km.execution_state = "hibernated"
        self.count_running()
        freed = f"{record.freed_bytes >> 20} MB"
        if record.gpu_freed_bytes:
            freed += f" (and {record.gpu_freed_bytes >> 20} MB of GPU memory)"
        self.log.info(
            "Hibernated kernel %s with %s: %d MB image, %s freed, %.1f s",
            kernel_id, chosen.name, image.bytes >> 20, freed, record.seconds,
        )  # fmt: skip
        self._ended(Operation.HIBERNATE, kernel_id, record, chosen.name, started)
        return record.model()

    async def _room_for(self, km: KernelManager, engine: Engine) -> int:
        """The estimated size of the kernel's image, once sure that it fits in the store.

        NoRoom says why not, before anything is done to the kernel: a dump
        that fills the disk would fail late, after freezing the kernel for as
        long as it wrote, and leave other servers' files short of space.
        """
        pid = _pid(km)
        needed = await asyncio.to_thread(engine.estimate, pid) if pid else 0
        taken = sum(r.image_bytes for r in self.kept()) + sum(self._reserved.values())
        if self.max_image_bytes and taken + needed > self.max_image_bytes:
            raise NoRoom(
                f"the image store is full: images take {_mb(taken)} of its "
                f"{_mb(self.max_image_bytes)} (KernelHibernator.max_image_bytes), and this "
                f"kernel's image needs about {_mb(needed)}; shut down hibernated kernels that "
                "are no longer needed, or raise max_image_bytes. The kernel runs on.",
                Reason.STORE_FULL,
            )
        free = await asyncio.to_thread(self.store.free_bytes)
        # Images being written have yet to take their room.
        free -= sum(self._reserved.values())
        if free < needed + needed // 10 + self.free_space_reserve:
            raise NoRoom(
                f"not enough free space for the kernel's image: it needs about {_mb(needed)} "
                f"(and {_mb(self.free_space_reserve)} left free), and {self.store.root} has "
                f"{_mb(max(free, 0))} free; free space there, or set KernelHibernator.image_dir "
                "to a larger filesystem. The kernel runs on.",
                Reason.NO_SPACE,
            )
        return needed

    async def _write_image(self, km: KernelManager, engine: Engine, fallback: str) -> Image:
        """Save the kernel into a committed image; the engine may leave it stopped (CRIU).

        On failure the kernel runs on untouched and no image or staging is left.
        """
        staging = await asyncio.to_thread(self.store.stage, km.kernel_id, engine.is_bulk)
        streamed = (
            StreamedImage(self.store.chunks, staging, engine.is_bulk)
            if self.chunked_images
            else None
        )
        meta: dict[str, Any] = {
            "engine": engine.name,
            "pid": km.provisioner.pid,
            "execution_state": km.execution_state,
            "fallback_reason": fallback,
            **_facts(km),
        }
        try:
            if pid := _pid(km):  # before CRIU's CUDA plugin or the kernel's end frees it
                meta["gpu_freed_bytes"] = await asyncio.to_thread(gpu_memory, pid)
            # The chunks it stores or finds are referenced by no image until the commit.
            async with _holding_chunks(self.store):
                lent = _Lent(self, km, self.record(km.kernel_id))
                meta.update(await engine.write(lent, staging, streamed))
                if "lost" in meta and self.recompute != "off":  # recompute hook: plan in the image
                    meta["recompute"] = await self.recomputer.prepare(
                        km.kernel_id, staging, meta["lost"]
                    )
                try:
                    return await asyncio.to_thread(
                        self.store.commit, staging, km.kernel_id, meta, streamed
                    )
                except BaseException:
                    self._resume(km)
                    raise
        except BaseException:
            await self._discard(staging)
            raise

    def _resume(self, km: KernelManager) -> None:
        if isinstance(km.provisioner, HibernatingProvisioner):
            km.provisioner.resume()

    async def _end_process(self, km: KernelManager, graceful: bool = False) -> None:
        """End the kernel whose image is safely on disk, keeping its manager and ports.

        ``graceful`` asks the kernel to exit first: a clean exit flushes what its
        open files still buffer (a dill wake will not reopen them). A kernel
        CRIU left stopped is simply killed: its image has all of it.
        """
        km.stop_restarter()
        provisioner = km.provisioner
        if graceful:
            async with _client(km) as client:
                client.shutdown()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(provisioner.wait(), 5)
        if await provisioner.poll() is None:
            await provisioner.kill()
            await provisioner.wait()
        if isinstance(provisioner, HibernatingProvisioner):
            provisioner.hibernated = True

    @staticmethod
    async def _has_ended(km: KernelManager) -> bool:
        provisioner = km.provisioner
        if isinstance(provisioner, HibernatingProvisioner) and provisioner.hibernated:
            return True  # _end_process saw it end; poll() now answers None, for the image
        return await provisioner.poll() is not None

    async def wake(self, kernel_id: str) -> None:
        """Bring a hibernated kernel back; concurrent callers share one wake. No-op if running.

        A wake asked for while the kernel hibernates waits for that to finish.
        """
        self._kernel(kernel_id)
        waking = self.record(kernel_id).waking
        if waking is None:
            async with self.operation(kernel_id, Operation.WAKE, wait=True):
                self._kernel(kernel_id)  # it may have been shut down meanwhile
                record = self.record(kernel_id)
                if record.state == "running":
                    return
                waking = record.waking = asyncio.ensure_future(self._wake(kernel_id, record))
                await asyncio.shield(waking)
                return
        await asyncio.shield(waking)

    async def _wake(self, kernel_id: str, record: Hibernation) -> None:
        km = self._kernel(kernel_id)
        record.state, started = "waking", time.monotonic()
        self._emit("wake-started", kernel_id, record)
        settling: Settling | None = None
        try:
            # Until the wake ends, a process restored from the image is unverified:
            # if the server dies, it is ended and the image stays.
            await self._journal(km, journal.WAKING)
            image = await asyncio.to_thread(self.store.read, kernel_id)
            # The signature check covers the engine too: a manifest claiming CRIU
            # for a dill image, to get its pickles checked late, is refused.
            engine = self._engine_named(image.manifest.get("engine"))
            async with self._lend(image, engine) as lent:
                woken = await engine.wake(_Lent(self, km, record), lent)
                settling = woken.settling
                # Before the chunks are let go of: no collection can come between.
                self._parents[kernel_id] = lent.digests()
            record.lost = woken.lost
            if record.lost and self.recompute != "off":  # recompute hook: offer or run
                await self._recompute_at_wake(km, image, record)
            if settling is None:
                retired = await self._commit_wake(km)
        except (Exception, asyncio.CancelledError) as exc:
            if settling is not None:
                await settling.cancel()
                await self._end_process(km)
            await asyncio.to_thread(self.store.journal.remove, kernel_id)
            self._parents.pop(kernel_id, None)  # the image itself is kept
            record.state = "hibernated"
            record.error = f"wake failed, the image is kept: {exc}"
            # A dill wake's fresh kernel may have reported itself idle before it was ended.
            km.execution_state, km.reason = "hibernated", record.error
            reason = Reason.IMAGE_FORMAT if isinstance(exc, FormatError) else Reason.WAKE_FAILED
            error = HibernationError(record.error, reason)
            self._ended(Operation.WAKE, kernel_id, record, record.engine, started, error)
            raise error from exc
        finally:
            record.waking = None

        # A cell frozen by a forced hibernation runs on; anything else is idle now.
        km.execution_state = (
            "busy" if record.execution_state == "busy" and not woken.restarted else "idle"
        )
        km.reason = ""
        km.last_activity = datetime.now(timezone.utc)  # the idle timeout starts over
        if settling is None:  # else once all its memory is in: it must not restart before
            km.start_restarter()
        if woken.restarted and km._restarter is not None:
            # A new process: tell connected front ends, as an auto-restart does.
            km._restarter._fire_callbacks("restart")
        record.seconds = time.monotonic() - started
        self.log.info("Woke kernel %s in %.1f s", kernel_id, record.seconds)
        record.state, record.error = "running", ""
        self.count_running()
        self._ended(Operation.WAKE, kernel_id, record, record.engine, started)
        # Running again: a new record, so that nothing of this image shows any more.
        fetching = settling is not None
        self._records[kernel_id] = Hibernation(
            epoch=record.epoch + 1,
            recompute=record.recompute,
            fetching=fetching,
            # Its image stays, and counts against max_image_bytes, until the memory is in.
            image_bytes=record.image_bytes if fetching else 0,
        )
        if settling is not None:
            self._settling[kernel_id] = self._later(self._settle(km, settling, image))
            return
        # The image holds every secret the kernel had: gone now, but without
        # making the user wait for a multi-GiB delete.
        self._later(self._discard(retired))

    async def _commit_wake(self, km: KernelManager) -> Path:
        """The process is the kernel now, then the image is gone for good, before the
        wake is reported: whenever the server dies, or the power fails, one of the two
        is there, never both, never neither. Returns the retired image, to delete."""
        try:
            await self._journal(km, journal.RUNNING)
            return await asyncio.to_thread(self.store.retire, km.kernel_id)
        except BaseException:
            await self._end_process(km)
            raise

    async def _settle(self, km: KernelManager, settling: Settling, image: Image) -> None:
        """The end of a lazy wake: once all of the kernel's memory is in and verified,
        commit the wake. Until then the image is the kernel's only whole copy, and
        the journal says "waking": if the server dies, the process is ended and the
        image stays. If the memory does not all come in, the kernel has been ended,
        and it is hibernated in that image again, with the reason."""
        kernel_id = km.kernel_id
        try:
            seconds = await settling.wait()
            if (status := await km.provisioner.poll()) is not None:
                raise EngineError(
                    f"the kernel ended (status {status}) before all of its memory was back"
                )
            retired = await self._commit_wake(km)
        except (Exception, asyncio.CancelledError) as exc:
            await self._end_process(km)  # (the fetch has released what it held)
            await asyncio.to_thread(self.store.journal.remove, kernel_id)
            self._parents.pop(kernel_id, None)
            # Before it shows hibernated, which lets a new wake start a fetch of its own.
            self._stop_settling(kernel_id)
            record = self._records[kernel_id] = Hibernation(epoch=self.epoch(kernel_id) + 1)
            record.settle(image)
            record.error = (
                f"the kernel was ended because its memory did not all come back after its "
                f"wake; the image is kept: {exc}"
            )
            km.execution_state, km.reason = "hibernated", record.error
            self.count_running()
            if isinstance(exc, asyncio.CancelledError):
                raise  # shut down or restarted: not a failure to report
            self.log.error("Kernel %s: %s", kernel_id, record.error)
            error = HibernationError(record.error, Reason.WAKE_FAILED)
            self._ended(Operation.WAKE, kernel_id, record, record.engine, None, error)
            return
        finally:
            self._stop_settling(kernel_id)
        record = self.record(kernel_id)
        record.fetching, record.image_bytes = False, 0
        km.start_restarter()
        self.log.info("Kernel %s: all of its memory is back, after %.1f s", kernel_id, seconds)
        self._later(self._discard(retired))

    def _stop_settling(self, kernel_id: str) -> None:
        """Forget the running task's fetch (not a later wake's)."""
        if self._settling.get(kernel_id) is asyncio.current_task():
            del self._settling[kernel_id]

    async def _discard(self, image: Path | str) -> None:
        """Delete an image, then the chunks that no image refers to any more."""
        await asyncio.to_thread(self.store.discard, image)
        await self._collect_chunks()

    async def _collect_chunks(self) -> None:
        """Delete the chunks no committed image refers to, nor the image a running kernel
        was woken from, off the event loop.

        Skipped while a hibernation or a wake uses chunks (the next discard
        collects them), or when a manifest cannot be read (its chunks stay).
        """

        def referenced() -> set[str]:
            return self.store.referenced_chunks().union(*tuple(self._parents.values()))

        try:
            removed = await asyncio.to_thread(self.store.chunks.gc, referenced)
        except Exception as exc:  # a broken manifest: keep every chunk, say why
            self.log.warning("Chunks not collected: %s", exc)
            return
        if removed:
            self.log.info("Deleted %d chunks no image refers to", removed)

    @contextlib.asynccontextmanager
    async def _lend(self, image: Image, engine: Engine) -> AsyncIterator[_LentImage]:
        """The image, authenticated, for ``engine`` to wake from.

        Its bulk files are checked against the (not yet authenticated) manifest
        while everything else is, and while the engine starts reading them: the
        bulk of the image, read from the disk once. That check counts only once
        the signature passed.
        """
        files = image.manifest.get("files", {})
        bulk = [
            name
            for name, entry in (files.items() if isinstance(files, dict) else ())
            if engine.is_bulk(name) and isinstance(entry, dict) and "blake3" in entry
        ]
        checked = asyncio.ensure_future(asyncio.to_thread(self.store.verify, image, bulk))
        try:
            async with _holding_chunks(self.store, reading=True):
                await asyncio.to_thread(self.store.authenticate, image, engine.is_bulk)
                chunked = self.store.open_chunked(image)
                yield _LentImage(self.store, image, checked, chunked, engine.is_bulk)
        finally:
            await asyncio.gather(checked, return_exceptions=True)

    def _later(self, work: Any) -> asyncio.Future[Any]:
        """Run ``work`` in the background, holding a reference until it is done (asyncio
        holds none: a task nobody refers to may be collected in the middle)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _until_responsive(self, km: KernelManager, cell_running: bool = False) -> None:
        """Wait until the kernel answers.

        It is asked for comm_info, which changes nothing in the kernel, not
        kernel_info: IPython builds kernel_info's banner with ``random.choice``
        on the global generator, so a wake would move the user's random state.
        jupyter_client's ``wait_for_ready`` would also drain IOPub for 0.2 s,
        which every wake would pay for. A kernel woken with a cell running
        (a forced hibernation) answers its shell only once the cell ends: it is
        asked on its control channel, which ipykernel serves meanwhile.
        """
        # The server's own IOPub subscribers (activity, %hibernate requests)
        # reconnect at once, rather than at their next retry, and miss nothing
        # of the first cell.
        self.kernel_manager.rewatch(km.kernel_id)
        deadline = time.monotonic() + self.wake_timeout
        async with _client(km) as client:
            channel, receive = (
                (client.control_channel, client.get_control_msg)
                if cell_running
                else (client.shell_channel, client.get_shell_msg)
            )
            while time.monotonic() < deadline:
                request = client.session.msg("comm_info_request", {})
                channel.send(request)
                with contextlib.suppress(queue.Empty):
                    while True:
                        reply = await receive(timeout=1)
                        if reply["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                            # Answered; and a %hibernate in its next cell will be heard.
                            await self.kernel_manager.hibernate_requests[km.kernel_id].listening()
                            return
        raise EngineError(f"the kernel did not answer within {self.wake_timeout:.0f} s")

    def start(self) -> None:
        """Start the idle watcher, once the server's event loop runs, and the watchdog."""
        self.idle.start()
        # What images discarded before a crash, or by the last server, left.
        self._later(self._collect_chunks())
        if self._watchdog is None:
            # Its own session: a Ctrl-C in the server's terminal must not end it. The
            # pipe's write end stays here only (not inheritable): it closes when we exit.
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "kernelhib.watchdog", str(self.store.root), self.server_id],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def stop(self) -> None:
        """Stop watching; hibernate running kernels if the server is going away."""
        await self.idle.stop()
        if self.hibernate_on_stop:
            await self.hibernate_all(self.stop_timeout)

    async def hibernate_all(self, timeout: float) -> None:
        """Hibernate every running kernel, idle ones first (oldest activity first)."""
        mkm = self.kernel_manager
        running = [k for k in mkm.list_kernel_ids() if self.record(k).state == "running"]
        running.sort(
            key=lambda k: (
                mkm.get_kernel(k).execution_state == "busy",
                mkm.get_kernel(k).last_activity,
            )
        )

        async def _all() -> None:
            for kernel_id in running:
                try:
                    await self.hibernate(kernel_id, force=True)
                except HibernationError as exc:
                    self.log.warning("Kernel %s will be shut down: %s", kernel_id, exc)

        try:
            await asyncio.wait_for(_all(), timeout)
        except asyncio.TimeoutError:
            self.log.warning(
                "Stop timeout (%.0f s) reached: kernels not yet hibernated are shut down",
                timeout,
            )

    def adopt_images(self) -> None:
        """Register the kernels whose images are in ``image_dir`` as hibernated kernels.

        Called before the server answers requests: a session listed before its
        kernel is adopted would be deleted as a session of a vanished kernel.
        """
        self.store.sweep()
        self._recover()
        for kernel_id in self.store.kernel_ids():
            if kernel_id in self.kernel_manager:
                continue
            try:
                # Its ports, key and working directory are used now: signed ones only.
                image = self.store.read_signed(kernel_id)
                self.kernel_manager.adopt_hibernated(kernel_id, image.manifest)
            except (ImageError, KeyError, ValueError) as exc:
                self.log.error("Cannot adopt hibernated kernel %s: %s", kernel_id, exc)
                continue
            self.record(kernel_id).settle(image)
            self.log.info("Adopted hibernated kernel %s from %s", kernel_id, image.path)
        # Adopted kernels were not started here: jupyter_server never counted them.
        self.count_running()

    def _recover(self) -> None:
        """Settle what servers that died left in the journal; adopt the kernels they kept.

        This server holds the store's claim, so every other server in the
        journal is gone (its watchdog may be settling the same entries: both
        act on the same facts).
        """
        started_before = boot_ticks()
        theirs = [e for e in self.store.journal.entries() if e.server != self.server_id]
        for entry in recover(self.store.journal, self.store.has_image, theirs, started_before):
            try:
                self.kernel_manager.adopt_running(entry.kernel_id, entry.facts, entry.pid)
            except (KeyError, ValueError, OSError) as exc:
                self.log.error("Cannot adopt kept kernel %s: %s", entry.kernel_id, exc)
                continue
            km = self.kernel_manager.get_kernel(entry.kernel_id)
            # Ours now: it dies with this server, as a running kernel does.
            self.store.journal.write(
                dataclasses.replace(entry, server=self.server_id, state=journal.RUNNING)
            )
            self.record(
                entry.kernel_id
            ).error = "the server stopped during this kernel's hibernation; it runs on"
            self.log.warning(
                "Adopted kernel %s, running: its server died while hibernating it", km.kernel_id
            )

    async def stop_fetching(self, kernel_id: str) -> None:
        """End a lazy wake's fetch, and with it the kernel, which is hibernated in its
        image again: for a shutdown or a restart, within its :meth:`operation`, which
        then finds the kernel hibernated. A fetch left running would see its kernel's
        process go, and end the next one."""
        if (settling := self._settling.get(kernel_id)) is not None:
            settling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settling

    async def forget(self, kernel_id: str) -> None:
        """Forget a kernel being shut down or restarted, and its image if it has one.

        Called within the shutdown's or restart's :meth:`operation`: no
        hibernation or wake of the kernel is in flight.
        """
        record = self._records.pop(kernel_id, None)
        self.recomputer.forget(kernel_id)
        if record is None or record.state == "running":
            if self._parents.pop(kernel_id, None):
                await self._collect_chunks()  # what its next hibernation would have reused
            return
        km = self.kernel_manager.get_kernel(kernel_id)
        if isinstance(km.provisioner, HibernatingProvisioner):
            km.provisioner.hibernated = False
        # Not hibernated any more: a restart starts it afresh (its status follows).
        km.execution_state = "starting"
        await self._discard(kernel_id)

    # Recompute: what a dill hibernation or wake lost (kernelhib/recomputer.py).

    async def _recompute_at_wake(
        self, km: KernelManager, image: Image, record: Hibernation
    ) -> None:
        """Offer the plan for what the wake lost; with ``auto``, run it before the wake ends,
        so the user's first request finds the names back."""
        snapshot = self._engine_named(record.engine).snapshot_of(image.path)
        try:
            record.recompute = await self.recomputer.at_wake(
                km.kernel_id, snapshot, record.recompute, record.lost
            )
            if self.recompute == "auto" and record.recompute.get("run"):
                await self._run_plan(km, record)
                back = set(record.recompute["recomputed"])
                record.lost = [entry for entry in record.lost if entry["name"] not in back]
        except Exception as exc:  # the kernel is awake: a plan that fails must not undo that
            self.log.warning("Kernel %s: no recompute plan: %s", km.kernel_id, exc)
            record.recompute = {}

    async def recompute_lost(self, kernel_id: str) -> dict[str, Any]:
        """Run the cells that re-create the lost names of the last dill wake (the one action
        of ``recompute = offer``); return the hibernation model, which says what came back."""
        km = self._kernel(kernel_id)
        async with self.operation(kernel_id, Operation.RECOMPUTE):
            record = self.record(kernel_id)
            if record.state != "running":
                raise Conflict(
                    f"kernel {kernel_id} is {record.state}: wake it first, the wake offers "
                    "what to recompute",
                    Reason(record.state),
                )
            if not record.recompute.get("run"):
                raise Conflict(
                    f"kernel {kernel_id} has nothing to recompute: no lost variable has a plan "
                    "that may run (see 'recompute' in its hibernation model for why)",
                    Reason.NOTHING_TO_RECOMPUTE,
                )
            await self._run_plan(km, record)
            failed = record.recompute.get("failed")
            error = None
            if failed:
                error = HibernationError(
                    f"cell [{failed['cell']}] failed while recomputing: {failed['error']}; "
                    "the cells before it ran, the ones after it did not",
                    Reason.RECOMPUTE_FAILED,
                )
            self._emit(
                "recompute-failed" if error else "recompute",
                kernel_id,
                record,
                error and error.reason,
            )
            if error:
                raise error
            return record.model()

    async def _run_plan(self, km: KernelManager, record: Hibernation) -> None:
        async with _client(km) as client:
            record.recompute = await self.recomputer.run(
                client, record.recompute, self.snapshot_timeout
            )

    def _ended(
        self,
        operation: Operation,
        kernel_id: str,
        record: Hibernation,
        engine: str,
        started: float | None,
        error: HibernationError | None = None,
    ) -> None:
        """Report the end of a hibernation or a wake: its event, and on /metrics its
        duration and outcome. ``started`` is None for one refused before it began."""
        name = "hibernate" if operation is Operation.HIBERNATE else "wake"
        reason = error.reason if error is not None else None
        if started is not None:
            seconds = time.monotonic() - started
            metrics.finished(name, engine, seconds, reason.value if reason else "")
        elif reason is not None:
            metrics.failed(name, reason.value)
        self._emit(f"{name}-failed" if error else name, kernel_id, record, reason)

    def _emit(
        self, action: str, kernel_id: str, record: Hibernation, reason: Reason | None = None
    ) -> None:
        """Tell front ends what happened, on jupyter_server's event bus; ``reason``
        is the code of a failure, as in the REST answer."""
        if self.event_logger is None:
            return
        data = {
            "action": action,
            "kernel_id": kernel_id,
            "status": "error" if reason else "success",
            **record.model(),
        }
        if reason is not None:
            data["reason"] = reason.value
        self.event_logger.emit(schema_id=EVENT_SCHEMA_ID, data=data)


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.0f} MB"


def _why_not(engine: Engine) -> str:
    """Why ``engine`` cannot run here, with what to do; empty when it can."""
    availability = engine.availability()
    if availability.ok:
        return ""
    remedy = f" ({availability.remedy})" if availability.remedy else ""
    return f"{engine.name} cannot run here: {availability.detail}{remedy}"


def _pid(km: KernelManager) -> int:
    """The kernel's process, 0 when it has none."""
    return (km.provisioner.pid if km.provisioner else 0) or 0


def _facts(km: KernelManager) -> dict[str, Any]:
    """What a new server needs to take the kernel over after this one stops or dies:
    its kernelspec, working directory, and its ports and key."""
    info = km.get_connection_info()
    return {
        "kernel_name": km.kernel_name,
        "cwd": str(getattr(km.provisioner, "cwd", "") or ""),
        "connection": {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()},
    }


@contextlib.asynccontextmanager
async def _client(km: KernelManager) -> AsyncIterator[Any]:
    """A kernel client of the server's own, closed after use."""
    client = km.client()
    client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=True)
    try:
        yield client
    finally:
        client.stop_channels()


@contextlib.asynccontextmanager
async def _holding_chunks(store: ImageStore, reading: bool = False) -> AsyncIterator[None]:
    """Hold off chunk garbage collection (``ChunkStore.using``); the lock is taken off
    the event loop, since a collection holds it a while.

    ``reading`` a committed image need not wait for a collection under way: it
    deletes only chunks that no committed image refers to, and the image cannot
    be replaced before it ends (that takes a hibernation, which waits for the
    lock). A wake that waited for one after a hibernation (about 0.1 s for a 4 GiB
    kernel's chunks, more in a big store) answered that much later. Once
    taken, the lock keeps any further collection off until the reading ends.
    """
    using = store.chunks.using()
    entering = asyncio.ensure_future(asyncio.to_thread(using.__enter__))
    try:
        if not reading:
            await asyncio.shield(entering)
        yield
    finally:
        # Taken even if cancelled meanwhile: let go of it once it is.
        if entering.done():
            _let_go(using, entering)
        else:
            entering.add_done_callback(functools.partial(_let_go, using))


def _let_go(using: contextlib.AbstractContextManager[None], taken: asyncio.Future[None]) -> None:
    if not taken.cancelled() and taken.exception() is None:
        using.__exit__(None, None, None)


@dataclass
class _Lent:
    """A kernel lent to its engine (:class:`~kernelhib.engines.base.Kernel`): the
    hibernator's own steps over the kernel manager and the provisioner, which
    engines do not reach."""

    hibernator: KernelHibernator
    km: KernelManager
    record: Hibernation

    @property
    def pid(self) -> int:
        return _pid(self.km)

    @property
    def busy(self) -> bool:
        return self.km.execution_state == "busy"

    def client(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return _client(self.km)

    async def checkpoint(
        self, engine: CriuEngine, directory: Path, sink: ImageSink | None = None
    ) -> int:
        return await self.km.provisioner.checkpoint(engine, directory, sink)

    @property
    def contained(self) -> bool:
        provisioner = self.km.provisioner
        return isinstance(provisioner, HibernatingProvisioner) and not provisioner.same_pids

    def helper_env(self) -> dict[str, str]:
        return {KERNEL_ID_VAR: self.km.kernel_id, HELPER_VAR: "lazy-pages"}

    async def restore(
        self,
        engine: CriuEngine,
        directory: Path,
        source: ImageSource | None = None,
        lazy: bool = False,
    ) -> None:
        await self.km.provisioner.restore(engine, directory, source, lazy)

    def resume(self) -> None:
        self.hibernator._resume(self.km)

    async def start(self) -> None:
        if isinstance(self.km.provisioner, HibernatingProvisioner):
            self.km.provisioner.hibernated = False
        await self.km.start_kernel(**self.km._launch_args)

    async def until_responsive(self) -> None:
        # Hibernated busy (forced, so CRIU): the woken process carries on with the cell.
        await self.hibernator._until_responsive(self.km, self.record.execution_state == "busy")

    async def end(self) -> None:
        await self.hibernator._end_process(self.km)

    def fell_back(self, reason: str) -> None:
        self.record.fallback_reason = reason
        self.hibernator.log.warning("Kernel %s: %s; falling back", self.km.kernel_id, reason)


@dataclass
class _LentImage:
    """An image lent to its engine for a wake
    (:class:`~kernelhib.engines.base.StoredImage`), over the image store."""

    store: ImageStore
    image: Image
    checked: asyncio.Future[None]  # the check of the engine's plain bulk files
    chunked: dict[str, ChunkedFile]  # its chunked files (format 2), each read verified
    is_bulk: Callable[[str], bool]

    @property
    def path(self) -> Path:
        return self.image.path

    async def verified(self) -> None:
        await self.checked

    def digests(self) -> set[str]:
        """The chunks the image's files are made of."""
        return set().union(*(file.digests() for file in self.chunked.values()))

    def held(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _holding_chunks(self.store, reading=True)

    def bulk_reader(self, name: str) -> PageSource:
        return self.chunked[name]

    def streamed(self, directory: Path) -> StreamedImage | None:
        if not self.chunked:
            return None
        return StreamedImage(self.store.chunks, directory, self.is_bulk, self.chunked)

    @contextlib.asynccontextmanager
    async def signed_copy(self) -> AsyncIterator[Path]:
        linked = await asyncio.to_thread(self.store.restore_dir, self.image)
        try:
            yield linked
        finally:
            await asyncio.to_thread(self.store.discard, linked)
