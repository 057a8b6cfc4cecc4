"""Kernel websockets that wake a hibernated kernel on demand.

A message sent to a hibernated kernel is held, the kernel is woken, and the
connection proves its IOPub subscription is live again (jupyter_server's
``nudge``) before the held messages go out in order. Without that proof, the
output of the first cell after a wake is lost about half the time: the SUB
socket reconnects later than the shell socket. The proof is first sought every
20 ms rather than nudge's 0.5 s, which most wakes waited for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

from .hibernate_requests import ask_until
from .hibernator import KernelHibernator


class WakingWebsocketConnection(ZMQChannelsWebsocketConnection):
    """A kernel websocket that holds messages while its kernel hibernates or wakes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The hibernator's wake count when this connection last proved IOPub live.
        self._epoch = -1
        self._held: list[Any] | None = None
        self._reviving: asyncio.Future[None] | None = None

    @property
    def hibernator(self) -> KernelHibernator:
        return self.multi_kernel_manager.hibernator

    def _asleep(self) -> bool:
        return self.hibernator.record(self.kernel_id).state != "running"

    async def prepare(self) -> None:
        if not self._asleep():
            await super().prepare()
            return
        # Accept the websocket without asking the sleeping kernel for its info.
        await self._register_session()
        self.session.key = self.kernel_manager.session.key

    def nudge(self) -> asyncio.Future[None]:
        if self._asleep():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self._epoch = self.hibernator.epoch(self.kernel_id)
        return super().nudge()

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        asleep = self._asleep()
        if (
            self._held is None
            and not asleep
            and self._epoch == self.hibernator.epoch(self.kernel_id)
        ):
            super().handle_incoming_message(incoming_msg)
            return
        if asleep and self._answer_kernel_info(incoming_msg):
            return
        if self._held is None:
            self._held = []
        self._held.append(incoming_msg)
        if self._reviving is None:
            self._reviving = asyncio.ensure_future(self._revive())

    def _answer_kernel_info(self, incoming_msg: Any) -> bool:
        """Answer kernel_info from the server's cache while the kernel sleeps.

        Front ends ask for it on every (re)connect; that alone must not wake
        the kernel. Without a cached answer, the request wakes it like any other.
        """
        cached = getattr(self.kernel_manager, "_kernel_info_future", None)
        if cached is None or not cached.done() or not cached.result():
            return False
        if self.subprotocol == "v1.kernel.websocket.jupyter.org":
            channel, msg_list = deserialize_msg_from_ws_v1(incoming_msg)
            header = self.session.unpack(msg_list[0])
        else:
            msg = json.loads(incoming_msg)
            channel, header = msg.get("channel"), msg["header"]
        if header.get("msg_type") != "kernel_info_request" or channel not in self.channels:
            return False
        reply = self.session.msg("kernel_info_reply", cached.result(), parent=header)
        self.handle_outgoing_message(channel, self.session.serialize(reply))
        return True

    async def _iopub_live(self, interval: float = 0.02, patience: float = 10) -> None:
        """Ask the kernel something every ``interval`` s until a message reaches this
        connection's IOPub: what nudge() waits for, but nudge asks only every 0.5 s,
        and for kernel_info (see :func:`ask_until`). The messages this draws out are
        swallowed, as nudge does. A busy kernel (a cell frozen by a forced
        hibernation runs on) is not asked, as by nudge.
        """
        iopub = self.channels.get("iopub")
        if iopub is None or getattr(self.kernel_manager, "execution_state", "") == "busy":
            return
        arrived = asyncio.Event()
        iopub.on_recv(lambda _msg: arrived.set())
        try:
            await ask_until(arrived, self.kernel_manager, self.session, interval, patience)
        finally:
            iopub.stop_on_recv()

    async def _revive(self) -> None:
        """Wake the kernel if needed, prove IOPub is live, then send the held messages."""
        try:
            while self.hibernator.record(self.kernel_id).state == "hibernating":
                await asyncio.sleep(0.05)
            await self.hibernator.wake(self.kernel_id)
            if self.channels:
                # The proof nudge() would give, without its kernel_info requests.
                await self._iopub_live()
                self._epoch = self.hibernator.epoch(self.kernel_id)
                # _iopub_live() took over the IOPub stream's callback; give it back.
                for stream in self.channels.values():
                    stream.on_recv_stream(self.handle_outgoing_message)
        except Exception as exc:
            # Keep the messages: the next one retries, and the kernel model says why.
            self.log.error("Could not wake kernel %s for its messages: %s", self.kernel_id, exc)
            return
        finally:
            self._reviving = None
        held, self._held = self._held or [], None
        self.log.debug("Delivering %d held messages to kernel %s", len(held), self.kernel_id)
        for message in held:
            super().handle_incoming_message(message)
