"""jupyter_server's kernel manager, taught that a hibernated kernel is still a kernel.

A hibernated kernel stays registered (its sessions and id survive), shows its
hibernation in the REST model, is never culled, and loses its image only when
the user shuts it down or restarts it.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone
from typing import Any

from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.utils import ensure_async
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Dict, Instance, default

from .hibernate_requests import HibernateRequests
from .hibernator import KernelHibernator, NoEngine, Operation
from .magic import STATUS_ENV
from .provisioner import HibernatingProvisioner


class HibernatingKernelManager(AsyncMappingKernelManager):
    """The server's kernel manager, with a :class:`KernelHibernator` beside it."""

    hibernator = Instance(KernelHibernator)
    # Kernel id -> the watcher that carries out its %hibernate requests.
    hibernate_requests = Dict()

    @default("hibernator")
    def _default_hibernator(self) -> KernelHibernator:
        return KernelHibernator(kernel_manager=self, parent=self)

    def __len__(self) -> int:
        """The kernels that have a process: what keeps the server busy.

        jupyter_server's ``shutdown_no_activity_timeout`` stops a server only
        while this is 0. Hibernated kernels live on disk and are adopted by the
        next server, so a server whose kernels all hibernated may stop; on a
        hub, that returns the whole single-user server's memory.
        """
        return sum(not self.hibernator.is_hibernated(k) for k in self.list_kernel_ids())

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        model = super().kernel_model(kernel_id)
        hibernation = self.hibernator.model(kernel_id)
        if hibernation is not None:
            model["hibernation"] = hibernation
        provisioner = self.get_kernel(kernel_id).provisioner
        if isinstance(provisioner, HibernatingProvisioner) and provisioner.kernel:
            # What hibernating it would free: front ends show it beside each kernel.
            model["memory_bytes"] = provisioner.kernel.memory_bytes()
        return model

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        if self.hibernator.is_hibernated(kernel_id):
            return
        await super().cull_kernel_if_idle(kernel_id)

    async def _async_start_kernel(  # type:ignore[override]
        self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any
    ) -> str:
        if kernel_id is None or kernel_id not in self:
            # The id is chosen here so that the kernel can be told it.
            kernel_id = kernel_id or self.new_kernel_id()
            status = await self._status_at_start(kernel_id, kwargs.get("kernel_name"))
            kwargs["env"] = {**(kwargs.get("env") or os.environ), STATUS_ENV: json.dumps(status)}
            await self.hibernator.journal_start(kernel_id)
        kernel_id = await super()._async_start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        self.hibernator.count_running()
        return kernel_id

    async def _status_at_start(self, kernel_id: str, kernel_name: str | None) -> dict[str, str]:
        """What ``%hibernate --status`` prints in the kernel: the engine, and why.

        The provisioner decides only at launch whether CRIU can restore the
        kernel (a kernel on the ipc transport cannot); this is the status as
        far as the server knows before that.
        """
        spec = self.kernel_spec_manager.get_kernel_spec(kernel_name or self.default_kernel_name)
        provisioner = KernelProvisionerFactory.instance(parent=self).create_provisioner_instance(
            kernel_id, spec, parent=self
        )
        setting = f"KernelHibernator.engine is {self.hibernator.engine!r}"
        try:
            engine, fallback = await asyncio.to_thread(
                self.hibernator.choose_engine, "", provisioner
            )
        except NoEngine as exc:
            return {"kernel_id": kernel_id, "engine": "", "why": f"{setting}, but {exc}"}
        why = fallback or (await asyncio.to_thread(engine.availability)).detail
        return {"kernel_id": kernel_id, "engine": engine.name, "why": f"{setting}; {why}"}

    async def _finish_kernel_start(self, kernel_id: str) -> None:
        await super()._finish_kernel_start(kernel_id)
        # Started once a %hibernate in its first cell would be heard.
        if (requests := self.hibernate_requests.get(kernel_id)) is not None:
            await requests.listening()

    def start_watching_activity(self, kernel_id: str) -> None:
        super().start_watching_activity(kernel_id)
        self.hibernate_requests[kernel_id] = HibernateRequests(
            self.hibernator, kernel_id, self.get_kernel(kernel_id)
        )

    def rewatch(self, kernel_id: str) -> None:
        """Fresh IOPub subscribers for a kernel that came back: they connect at once."""
        self.stop_watching_activity(kernel_id)
        self.start_watching_activity(kernel_id)

    def stop_watching_activity(self, kernel_id: str) -> None:
        requests = self.hibernate_requests.pop(kernel_id, None)
        if requests is not None:
            requests.close()
        super().stop_watching_activity(kernel_id)

    async def _async_shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        # After a hibernation or wake in flight: the kernel and its image go together.
        async with self.hibernator.operation(kernel_id, Operation.SHUTDOWN, wait=True):
            await self.hibernator.stop_fetching(kernel_id)
            # A hibernated kernel has no process to ask: shut it down at once.
            now = now or self.hibernator.is_hibernated(kernel_id)
            await self.hibernator.forget(kernel_id)
            await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)

    async def _async_restart_kernel(self, kernel_id: str, now: bool = False) -> None:
        async with self.hibernator.operation(kernel_id, Operation.RESTART, wait=True):
            await self.hibernator.stop_fetching(kernel_id)
            hibernated = self.hibernator.is_hibernated(kernel_id)
            if hibernated:
                await self.hibernator.forget(kernel_id)
                # It had no process: the new one must die with its server like any other.
                await self.hibernator.journal_start(kernel_id)
                now = True
            await super()._async_restart_kernel(kernel_id, now=now)
            # A fresh namespace: the last wake's recompute offer no longer applies.
            self.hibernator.record(kernel_id).recompute = {}
            if hibernated:
                # A new process that answered kernel_info: idle. Its status messages
                # reach subscribers that connect now, not the ones of the image's days.
                self.get_kernel(kernel_id).execution_state = "idle"
                self.rewatch(kernel_id)
                self.hibernator.count_running()

    async def interrupt_kernel(self, kernel_id: str) -> None:  # type:ignore[override]
        """Interrupt the running cell; a hibernated kernel runs nothing to interrupt.

        An interrupt during a hibernation or wake is delivered after it, to
        the kernel's process if it has one: a signal sent to a process being
        dumped would be restored with it.
        """
        async with self.hibernator.operation(kernel_id, Operation.INTERRUPT, wait=True):
            if not self.hibernator.is_hibernated(kernel_id):
                await ensure_async(super().interrupt_kernel(kernel_id))

    async def _async_shutdown_all(self, now: bool = False) -> None:
        # The server is stopping: hibernated kernels stay on disk for the next one.
        for kernel_id in self.list_kernel_ids():
            if self.hibernator.is_hibernated(kernel_id):
                self.release(kernel_id)
        await super()._async_shutdown_all(now=now)

    start_kernel = _async_start_kernel  # type:ignore[assignment]
    shutdown_kernel = _async_shutdown_kernel
    restart_kernel = _async_restart_kernel
    shutdown_all = _async_shutdown_all

    def remove_kernel(self, kernel_id: str) -> Any:
        """Unregister a kernel (shut down, died, or released): its process is gone."""
        self.hibernator.journal_end(kernel_id)
        km = super().remove_kernel(kernel_id)
        # jupyter_server counted it down at its shutdown even if it was hibernated,
        # and never when it died: counted again from the kernels there are.
        self.hibernator.count_running()
        return km

    def release(self, kernel_id: str) -> None:
        """Unregister a hibernated kernel without touching its image or files."""
        km = self.get_kernel(kernel_id)
        km.stop_restarter()
        self.stop_watching_activity(kernel_id)
        self.stop_buffering(kernel_id)
        self._kernel_connections.pop(kernel_id, None)
        self._kernel_ports.pop(kernel_id, None)
        self.remove_kernel(kernel_id)

    def adopt_hibernated(self, kernel_id: str, manifest: dict[str, Any]) -> None:
        """Register a kernel hibernated by an earlier server, as hibernated, under its id.

        It gets its old ports and key back, so that a CRIU restore (which
        brings back the kernel's listening sockets) is reachable as before.
        """
        km = self._adopt(kernel_id, manifest)
        km.execution_state = "hibernated"
        km.last_activity = datetime.fromtimestamp(manifest["created"], timezone.utc)

    def adopt_running(self, kernel_id: str, facts: dict[str, Any], pid: int) -> None:
        """Register the live kernel process ``pid`` that a dead server left, as running.

        ``facts`` are its kernelspec, working directory, ports and key, as
        recorded in the journal when its hibernation began.
        """
        km = self._adopt(kernel_id, facts, pid)
        km.execution_state = "idle"
        km.last_activity = datetime.now(timezone.utc)
        km.start_restarter()

    def _adopt(
        self, kernel_id: str, facts: dict[str, Any], pid: int | None = None
    ) -> KernelManager:
        """Register a kernel this server did not start: its process ``pid``, or none."""
        connection = facts["connection"]
        km = self.kernel_manager_factory(
            connection_file=os.path.join(self.connection_dir, f"kernel-{kernel_id}.json"),
            parent=self,
            log=self.log,
            kernel_name=facts["kernel_name"],
            kernel_spec_manager=self.kernel_spec_manager,
        )
        km.kernel_id = kernel_id
        km.load_connection_info(connection)
        km.write_connection_file()
        km._launch_args = {"cwd": facts.get("cwd")}
        km.provisioner = KernelProvisionerFactory.instance(parent=self).create_provisioner_instance(
            kernel_id, km.kernel_spec, parent=km
        )
        if not isinstance(km.provisioner, HibernatingProvisioner):
            raise ValueError(f"kernelspec {facts['kernel_name']!r} uses another provisioner")
        km.provisioner.adopt(connection, facts.get("cwd"), pid)
        km.ready.set_result(None)
        # As if started here: shutting it down then gets a fresh `ready` future
        # instead of failing to set this done one again.
        km._attempted_start = True
        km.reason = ""
        self._kernels[kernel_id] = km
        self._kernel_connections[kernel_id] = 0
        self._kernel_ports[kernel_id] = km.ports
        self.start_watching_activity(kernel_id)
        self.add_restart_callback(kernel_id, lambda: self._handle_kernel_died(kernel_id), "dead")
        return km
