"""What every hibernation engine promises, and what it may ask of the kernel it saves.

An engine turns a live kernel into files and back, each in its own way: the
hibernator calls :meth:`Engine.write` and :meth:`Engine.wake` and never
asks which engine it holds. Engines know nothing about Jupyter servers or the
image store: the hibernator lends them the kernel (:class:`Kernel`) and the
image being woken (:class:`StoredImage`), and decides when to call them and
what to do when they fail.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from .criu import CriuEngine
    from .criu_stream import ImageSink, ImageSource
    from .lazy_pages import PageSource

# What a request may name: an engine, or "auto" for CRIU where it works, else dill.
ENGINE_CHOICES = ("auto", "criu", "dill")


@dataclass(frozen=True)
class Availability:
    """Whether an engine can run here, and if not, why and what to do."""

    ok: bool
    detail: str
    remedy: str = ""


class EngineError(RuntimeError):
    """An engine step failed. The message says which step and why."""


class Settling(Protocol):
    """The rest of a wake that answered before all of its kernel's memory was back
    (a lazy wake): the memory still streams in behind the kernel's first reply.

    Until :meth:`wait` returns, the image is the kernel's only complete copy.
    """

    async def wait(self) -> float:
        """Return the seconds the fetch took, once every byte is in and verified.
        Otherwise raise EngineError, having ended the kernel first: it must not run
        on memory that never came. Either way (cancelled too), what the fetch held
        is released."""

    async def cancel(self) -> None:
        """End the kernel, if the fetch still runs, and release what the fetch holds:
        for a fetch nobody waits on. Safe at any point, and after :meth:`wait`."""


@dataclass(frozen=True)
class Woken:
    """How a wake went: the hibernator reports it to front ends."""

    restarted: bool  # a fresh process: front ends are told, as after a restart
    lost: list[dict[str, str]] = field(default_factory=list)  # what a dill load could not keep
    settling: Settling | None = None  # a lazy wake: the memory still coming in


class Kernel(Protocol):
    """The kernel being hibernated or woken, as the hibernator lends it to an engine.

    The hibernator implements it over jupyter_client's kernel manager and the
    provisioner, which owns the process (its pid namespace, its pidfd): engines
    reach neither directly.
    """

    @property
    def pid(self) -> int:
        """The kernel's process, 0 when it has none."""

    @property
    def busy(self) -> bool:
        """Whether a cell runs (a forced hibernation freezes it)."""

    @property
    def contained(self) -> bool:
        """Whether all of its processes die with its root (its own pid namespace): a lazy
        wake ends a kernel whose memory fails verification by killing the root."""

    def helper_env(self) -> dict[str, str]:
        """The environment for a process that serves the kernel's memory: if the server
        dies, whoever cleans up after it ends that process only after the kernel."""

    def client(self) -> AbstractAsyncContextManager[Any]:
        """A kernel client of the server's, shell and control channels started."""

    async def checkpoint(
        self, engine: CriuEngine, directory: Path, sink: ImageSink | None = None
    ) -> int:
        """Have ``engine`` dump the process into ``directory`` (its files streamed into
        ``sink`` if given) and leave it stopped; return the memory it held. On failure
        the process runs on."""

    async def restore(
        self,
        engine: CriuEngine,
        directory: Path,
        source: ImageSource | None = None,
        lazy: bool = False,
    ) -> None:
        """Have ``engine`` restore the process from ``directory`` (its files streamed
        from ``source`` if given, its memory left to the lazy page server if ``lazy``),
        left stopped."""

    def resume(self) -> None:
        """Let the process that :meth:`checkpoint` or :meth:`restore` left stopped run."""

    async def start(self) -> None:
        """Start a fresh kernel process, on the kernel's ports and key."""

    async def until_responsive(self) -> None:
        """Return once the kernel answers; EngineError if it does not in time."""

    async def end(self) -> None:
        """End the process of a wake that failed: the image stays."""

    def fell_back(self, reason: str) -> None:
        """Note that the wake does not use the image's engine, and why."""


class StoredImage(Protocol):
    """A committed image being woken, as the hibernator lends it to its engine.

    Its signature and every file have been checked, except the files the
    engine only appends to (:meth:`Engine.is_bulk`): those are checked while
    the engine reads them, and nothing may run before :meth:`verified` returns.
    """

    @property
    def path(self) -> Path:
        """The image's directory."""

    async def verified(self) -> None:
        """Return once the bulk files passed their check; raise if one did not."""

    def signed_copy(self) -> AbstractAsyncContextManager[Path]:
        """A fresh directory holding only the image's signed files, removed after use:
        for a reader that opens whatever file it finds there (CRIU)."""

    def held(self) -> AbstractAsyncContextManager[None]:
        """Keep the image's chunks on disk while the context is held, past the wake's
        end: a lazy wake's fetch reads them after the kernel answered."""

    def streamed(self, directory: Path) -> ImageSource | None:
        """The image's files for a streamed read, the plain ones from its
        :meth:`signed_copy` ``directory`` and the bulk ones from the chunk store, each
        chunk verified before it is handed out; None when its bulk files are plain
        files (format 1), read from ``directory`` and checked by :meth:`verified`."""

    def bulk_reader(self, name: str) -> PageSource:
        """Random access to one of the image's chunked bulk files (format 2), every read
        verified: for a reader that wants its pages out of order (a lazy wake).
        KeyError if the image has no chunked file of that name."""


class Engine(ABC):
    """Base class of the hibernation engines, chosen by :attr:`name`."""

    name: ClassVar[str]
    # Whether a kernel busy running a cell can be saved, the cell carrying on after the wake.
    saves_running_cells: ClassVar[bool]
    # Whether the kernel is asked to exit once its image is committed, rather than killed:
    # a clean exit flushes what its open files still buffer, if the image does not keep them.
    graceful_end: ClassVar[bool]

    @abstractmethod
    def availability(self) -> Availability:
        """Tell whether this engine can hibernate kernels on this machine.

        Must be cheap after the first call: front ends ask before every
        hibernation.
        """

    @abstractmethod
    def estimate(self, pid: int) -> int:
        """About how many bytes the image of the kernel process ``pid`` will take:
        a hibernation that would not fit is refused before the kernel is touched.
        Blocking."""

    @abstractmethod
    async def write(
        self, kernel: Kernel, staging: Path, sink: ImageSink | None = None
    ) -> dict[str, Any]:
        """Save the kernel into ``staging``; return what the manifest records of it
        (``freed_bytes``, and ``gpu_freed_bytes`` and ``lost`` where they apply).
        An engine that can may stream its files into ``sink`` instead, which
        stores its bulk files as chunks.

        On failure the kernel runs on untouched. On success it may be left
        stopped; the hibernator ends it once the image is committed.
        """

    @abstractmethod
    async def wake(self, kernel: Kernel, image: StoredImage) -> Woken:
        """Bring the kernel back from ``image``, running and answering.

        On failure no process of it is left (:meth:`Kernel.end`) and the image
        is untouched.
        """

    @staticmethod
    def is_bulk(name: str) -> bool:
        """Whether an image file is raw data the engine only appends to and never
        parses: hashed as it is written, and checked while the restore reads it."""
        return False

    @staticmethod
    def snapshot_of(image: Path) -> Path:
        """Where an image of this engine keeps its dill snapshot: the kernel's
        history, from which the cells that re-create lost names are planned."""
        return image
