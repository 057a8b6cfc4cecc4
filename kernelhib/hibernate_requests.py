"""Carry out ``%hibernate``: watch a kernel's IOPub for its request, hibernate once idle.

The magic opens a comm with target ``kernelhib`` (see :mod:`kernelhib.magic`).
Its ``comm_open`` has the requesting cell as parent; when that cell's
``status: idle`` arrives, the kernel is hibernated as soon as its IOPub has
been quiet for :data:`SETTLE_S`. The wait is for front ends: JupyterLab
answers a comm_open for a target it does not know with a comm_close on the
shell channel, which would wake a kernel hibernated before it arrived. Cells
queued behind the requesting one run first, unless the request says ``force``.
The comm's data may name the ``engine`` and ``force``, as the REST request does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from jupyter_client.manager import KernelManager
from jupyter_client.session import Session

from .engines.base import ENGINE_CHOICES
from .magic import COMM_TARGET

if TYPE_CHECKING:
    from .hibernator import KernelHibernator

SETTLE_S = 1.0


async def ask_until(
    heard: asyncio.Event,
    km: KernelManager,
    session: Session,
    interval: float = 0.02,
    patience: float = 10,
) -> None:
    """Ask the kernel for comm_info every ``interval`` s until ``heard`` is set (an
    IOPub subscriber got a message), for at most ``patience`` s: ZMQ drops what the
    kernel publishes before a new SUB socket is subscribed, and nothing says when
    it is. comm_info, not kernel_info: IPython's kernel_info calls ``random.choice``
    on the global generator, which the user's code would see. On shell and control:
    a kernel running a cell answers only on control."""
    asking = [km.connect_shell(), km.connect_control()]
    try:
        deadline = asyncio.get_running_loop().time() + patience
        while not heard.is_set() and asyncio.get_running_loop().time() < deadline:
            for stream in asking:
                session.send(stream, "comm_info_request", {})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(heard.wait(), interval)
    finally:
        for stream in asking:
            stream.close()


class HibernateRequests:
    """Watches one kernel's IOPub for ``%hibernate`` and hibernates it when it is asked to."""

    def __init__(self, hibernator: KernelHibernator, kernel_id: str, km: KernelManager) -> None:
        self.hibernator = hibernator
        self.kernel_id = kernel_id
        self.km = km
        self._session = Session(config=km.session.config, key=km.session.key)
        self._asked_by: str | None = None  # msg_id of the cell that ran %hibernate
        self._engine = ""  # as it asked: "" for the server's KernelHibernator.engine
        self._force = False  # hibernate even while a queued cell runs
        self._settling: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._heard = asyncio.Event()  # made where no loop runs yet (adopting kernels)
        # A SUB socket of our own: after a CRIU wake ZMQ reconnects it by itself.
        self._stream = km.connect_iopub()
        self._stream.on_recv(self._on_iopub)

    async def listening(self) -> None:
        """Return once this watcher hears the kernel's IOPub: before, a ``%hibernate``
        (in the kernel's first cell, or the first after a wake) could go unseen."""
        await ask_until(self._heard, self.km, self._session)

    def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        if not self._stream.closed():
            self._stream.close()

    def _on_iopub(self, msg_list: list[bytes]) -> None:
        self._heard.set()
        _, fed = self._session.feed_identities(msg_list)
        msg = self._session.deserialize(fed, content=False)
        msg_type = msg["header"]["msg_type"]
        if self._settling is not None:
            self._settle()  # not quiet yet
        if msg_type == "execute_input":  # when each cell ran, for recompute plans
            count = self._session.unpack(msg["content"]).get("execution_count")
            if isinstance(count, int):
                self.hibernator.recomputer.cell_ran(self.kernel_id, count, time.time())
        if msg_type not in ("comm_open", "status"):
            return
        content = self._session.unpack(msg["content"])
        parent = msg["parent_header"].get("msg_id")
        if msg_type == "comm_open" and content.get("target_name") == COMM_TARGET:
            self._asked(parent, content.get("data"))
        elif content.get("execution_state") == "idle" and parent == self._asked_by:
            self._asked_by = None
            self._settle()

    def _asked(self, parent: str | None, data: Any) -> None:
        """Take a request from the kernel, checked: its code can send anything."""
        data = data if isinstance(data, dict) else {}
        engine, force = data.get("engine") or "", data.get("force", False)
        if engine not in ("", *ENGINE_CHOICES) or not isinstance(force, bool):
            self.hibernator.log.warning(
                "Kernel %s asked to hibernate with engine %.20r and force %.20r: ignored, "
                "the engine must be one of %s and force true or false",
                self.kernel_id,
                engine,
                force,
                ", ".join(ENGINE_CHOICES),
            )
            return
        self._asked_by, self._engine, self._force = parent, engine, force
        self.hibernator.log.info(
            "Kernel %s asked to hibernate after its cell (engine %r, force %s)",
            self.kernel_id,
            engine or self.hibernator.engine,
            force,
        )

    def _settle(self) -> None:
        """(Re)start the quiet period after which the kernel hibernates."""
        if self._settling is not None:
            self._settling.cancel()
        self._settling = asyncio.get_running_loop().call_later(SETTLE_S, self._quiet)

    def _quiet(self) -> None:
        if self.km.execution_state == "busy" and not self._force:
            # A queued cell runs, silently so far: its status idle settles again.
            return
        self._settling = None
        task = asyncio.ensure_future(self._hibernate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hibernate(self) -> None:
        # The magic already told the user what would happen; the log says how it went.
        try:
            await self.hibernator.hibernate(self.kernel_id, self._engine, self._force)
        except Exception as exc:
            self.hibernator.log.warning(
                "Could not hibernate kernel %s as %%hibernate asked: %s", self.kernel_id, exc
            )
