"""The hibernation protocol: when a kernel may hibernate, in which order, and how it wakes.

Hibernation never loses a kernel. The kernel is checked idle, frozen and
dumped, the image is made durable and signed, and only then is the process
ended. A failure at any step resumes the kernel untouched and removes the
partial image. A failed wake keeps the image and the kernel stays hibernated,
with the reason in its model.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager
from jupyter_events import EventLogger
from traitlets import Any as AnyTrait
from traitlets import Bool, CaselessStrEnum, Float, Instance, Unicode, default
from traitlets.config import LoggingConfigurable

from .engines.criu import CriuEngine
from .idle import IdleWatcher
from .image_store import ImageError, ImageStore
from .paths import default_image_dir
from .provisioner import HibernatingProvisioner

EVENT_SCHEMA_ID = "https://events.jupyter.org/kernelhib/hibernation/v1"
EVENT_SCHEMA = Path(__file__).parent / "events" / "hibernation.yaml"


class HibernationError(RuntimeError):
    """A hibernate or wake request could not be carried out; ``status`` is its HTTP code."""

    status = 500


class KernelNotFound(HibernationError):
    status = 404


class Conflict(HibernationError):
    """The kernel is busy, or already hibernated or on its way."""

    status = 409


class NoEngine(HibernationError):
    """No engine can hibernate this kernel here."""

    status = 503


@dataclass
class Hibernation:
    """What the hibernator knows about one kernel."""

    state: str = "running"  # running | hibernating | hibernated | waking
    engine: str = ""
    image_bytes: int = 0
    freed_bytes: int = 0
    seconds: float = 0.0
    hibernated_at: float = 0.0
    execution_state: str = "idle"  # before hibernation; a forced one may be "busy"
    error: str = ""
    # Wakes so far. A connection that saw an older epoch must prove its IOPub
    # subscription is live again before it forwards messages.
    epoch: int = 0
    waking: asyncio.Future[None] | None = None

    def model(self) -> dict[str, Any]:
        model: dict[str, Any] = {"state": self.state}
        if self.engine:
            model.update(
                engine=self.engine,
                image_bytes=self.image_bytes,
                freed_bytes=self.freed_bytes,
                seconds=round(self.seconds, 3),
                hibernated_at=self.hibernated_at,
            )
        if self.error:
            model["error"] = self.error
        return model


class KernelHibernator(LoggingConfigurable):
    """Hibernates and wakes the kernels of one kernel manager (``c.KernelHibernator``)."""

    engine = CaselessStrEnum(
        ["auto", "criu", "dill"],
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
        help="Seconds a woken kernel has to answer kernel_info before the wake counts "
        "as failed (the image is kept).",
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

    kernel_manager = AnyTrait(help="The MappingKernelManager whose kernels this hibernates.")
    event_logger = Instance(EventLogger, allow_none=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records: dict[str, Hibernation] = {}
        self._criu = CriuEngine(self.criu_path)
        self._store: ImageStore | None = None
        self.idle = IdleWatcher(self)
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def store(self) -> ImageStore:
        if self._store is None:
            self._store = ImageStore(Path(self.image_dir))
        return self._store

    def record(self, kernel_id: str) -> Hibernation:
        return self._records.setdefault(kernel_id, Hibernation())

    def model(self, kernel_id: str) -> dict[str, Any] | None:
        """The ``hibernation`` object of a kernel's REST model; None while it simply runs."""
        record = self._records.get(kernel_id)
        if record is None or (record.state == "running" and not record.error):
            return None
        return record.model()

    def is_hibernated(self, kernel_id: str) -> bool:
        """True while the kernel has no process: hibernated, or being woken."""
        record = self._records.get(kernel_id)
        return record is not None and record.state in ("hibernated", "waking")

    def epoch(self, kernel_id: str) -> int:
        return self.record(kernel_id).epoch

    def engine_for(self, name: str) -> CriuEngine:
        """The engine to use for a request naming ``name``; NoEngine says why there is none."""
        name = (name or self.engine).lower()
        if name == "dill":
            raise NoEngine("the dill engine is not available in this version of kernelhib")
        if name not in ("auto", "criu"):
            raise NoEngine(f"unknown engine {name!r}: use 'auto', 'criu' or 'dill'")
        availability = self._criu.availability()
        if not availability.ok:
            remedy = f" ({availability.remedy})" if availability.remedy else ""
            raise NoEngine(f"CRIU cannot run here: {availability.detail}{remedy}")
        return self._criu

    def _kernel(self, kernel_id: str) -> KernelManager:
        if kernel_id not in self.kernel_manager:
            raise KernelNotFound(f"no kernel {kernel_id}")
        return self.kernel_manager.get_kernel(kernel_id)

    async def hibernate(
        self, kernel_id: str, engine: str = "", force: bool = False
    ) -> dict[str, Any]:
        """Checkpoint the kernel to disk and end its process; return the hibernation model."""
        km = self._kernel(kernel_id)
        record = self.record(kernel_id)
        if record.state != "running":
            raise Conflict(f"kernel {kernel_id} is {record.state}")
        if km.execution_state == "busy" and not force:
            raise Conflict(
                f"kernel {kernel_id} is busy running a cell; hibernate it with force=true "
                "to freeze the cell and let it carry on after wake"
            )
        chosen = self.engine_for(engine)
        provisioner = km.provisioner
        if not isinstance(provisioner, HibernatingProvisioner):
            raise NoEngine(
                f"kernel {kernel_id} was not started by kernelhib-provisioner, "
                "so CRIU cannot restore it"
            )
        if provisioner.not_restorable:
            raise NoEngine(f"kernel {kernel_id} cannot be restored: {provisioner.not_restorable}")

        record.state, record.error = "hibernating", ""
        started = time.monotonic()
        staging: Path | None = None
        try:
            staging = await asyncio.to_thread(self.store.stage, kernel_id)
            memory = await provisioner.checkpoint(chosen, staging)
            try:
                meta = {
                    "engine": chosen.name,
                    "kernel_name": km.kernel_name,
                    "freed_bytes": memory,
                    "execution_state": km.execution_state,
                    "cwd": str(provisioner.cwd),
                    "connection": _json_connection_info(km),
                }
                image = await asyncio.to_thread(self.store.commit, staging, kernel_id, meta)
            except BaseException:
                provisioner.resume()
                raise
            try:
                km.stop_restarter()
                await provisioner.end_checkpointed()
            except BaseException:
                provisioner.resume()
                km.start_restarter()
                await asyncio.to_thread(self.store.discard, kernel_id)
                raise
        except (Exception, asyncio.CancelledError) as exc:
            if staging is not None:
                await asyncio.to_thread(self.store.discard, staging)
            record.state = "running"
            record.error = f"hibernation failed, the kernel runs on: {exc}"
            self._emit("hibernate-failed", kernel_id, record)
            raise HibernationError(record.error) from exc

        record.state = "hibernated"
        record.engine = chosen.name
        record.image_bytes = image.bytes
        record.freed_bytes = memory
        record.seconds = time.monotonic() - started
        record.hibernated_at = time.time()
        record.execution_state = km.execution_state
        km.execution_state = "hibernated"
        self.log.info(
            "Hibernated kernel %s with %s: %d MB image, %d MB freed, %.1f s",
            kernel_id, chosen.name, image.bytes >> 20, memory >> 20, record.seconds,
        )  # fmt: skip
        self._emit("hibernate", kernel_id, record)
        return record.model()

    async def wake(self, kernel_id: str) -> None:
        """Restore a hibernated kernel; concurrent callers share one wake. No-op if running."""
        self._kernel(kernel_id)
        record = self.record(kernel_id)
        if record.state == "running":
            return
        if record.state == "hibernating":
            raise Conflict(f"kernel {kernel_id} is still hibernating")
        if record.waking is None:
            record.waking = asyncio.ensure_future(self._wake(kernel_id, record))
        await asyncio.shield(record.waking)

    async def _wake(self, kernel_id: str, record: Hibernation) -> None:
        km = self._kernel(kernel_id)
        record.state, started = "waking", time.monotonic()
        try:
            image = await asyncio.to_thread(self.store.load, kernel_id)
            engine = self.engine_for(image.manifest["engine"])
            await km.provisioner.restore(engine, image.path)
            try:
                await self._until_responsive(km)
            except BaseException:
                await km.provisioner.kill()
                await km.provisioner.wait()
                km.provisioner.hibernated = True
                raise
        except (Exception, asyncio.CancelledError) as exc:
            record.state = "hibernated"
            record.error = f"wake failed, the image is kept: {exc}"
            km.reason = record.error
            self._emit("wake-failed", kernel_id, record)
            raise HibernationError(record.error) from exc
        finally:
            record.waking = None

        record.state, record.error, record.epoch = "running", "", record.epoch + 1
        km.execution_state, km.reason = record.execution_state, ""
        km.start_restarter()
        record.seconds = time.monotonic() - started
        self.log.info("Woke kernel %s in %.1f s", kernel_id, record.seconds)
        self._emit("wake", kernel_id, record)
        # The image holds every secret the kernel had: gone now, but without
        # making the user wait for a multi-GiB delete.
        self._later(asyncio.to_thread(self.store.discard, self.store.retire(kernel_id)))

    def _later(self, work: Any) -> None:
        """Run ``work`` in the background, holding a reference until it is done."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _until_responsive(self, km: KernelManager) -> None:
        """Wait until the restored kernel answers on its shell channel."""
        client = km.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=self.wake_timeout)
        finally:
            client.stop_channels()

    async def start(self, adopt: bool = True) -> None:
        """Take over the images a previous server left, and start the idle watcher."""
        if adopt:
            await self.adopt_images()
        self.idle.start()

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

    async def adopt_images(self) -> None:
        """Register the kernels whose images are in ``image_dir`` as hibernated kernels."""
        await asyncio.to_thread(self.store.sweep)
        for kernel_id in await asyncio.to_thread(self.store.kernel_ids):
            if kernel_id in self.kernel_manager:
                continue
            try:
                image = await asyncio.to_thread(self.store.read, kernel_id)
                self.kernel_manager.adopt_hibernated(kernel_id, image.manifest)
            except (ImageError, KeyError, ValueError) as exc:
                self.log.error("Cannot adopt hibernated kernel %s: %s", kernel_id, exc)
                continue
            manifest = image.manifest
            self._records[kernel_id] = Hibernation(
                state="hibernated",
                engine=manifest["engine"],
                image_bytes=image.bytes,
                freed_bytes=manifest.get("freed_bytes", 0),
                hibernated_at=manifest["created"],
                execution_state=manifest.get("execution_state", "idle"),
            )
            self.log.info("Adopted hibernated kernel %s from %s", kernel_id, image.path)

    async def forget(self, kernel_id: str) -> None:
        """Drop a hibernated kernel's image: it is being shut down or restarted."""
        record = self._records.pop(kernel_id, None)
        if record is None:
            return
        if record.waking is not None:
            await asyncio.gather(record.waking, return_exceptions=True)
        km = self.kernel_manager.get_kernel(kernel_id)
        if isinstance(km.provisioner, HibernatingProvisioner):
            km.provisioner.hibernated = False
        await asyncio.to_thread(self.store.discard, kernel_id)

    def _emit(self, action: str, kernel_id: str, record: Hibernation) -> None:
        if self.event_logger is None:
            return
        data = {"action": action, "kernel_id": kernel_id, **record.model()}
        self.event_logger.emit(schema_id=EVENT_SCHEMA_ID, data=data)


def _json_connection_info(km: KernelManager) -> dict[str, Any]:
    """The kernel's ports and key, to re-adopt it from a new server after this one stops."""
    info = km.get_connection_info()
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}
