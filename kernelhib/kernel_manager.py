"""jupyter_server's kernel manager, taught that a hibernated kernel is still a kernel.

A hibernated kernel stays registered (its sessions and id survive), shows its
hibernation in the REST model, is never culled, and loses its image only when
the user shuts it down or restarts it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Instance, default

from .hibernator import KernelHibernator
from .provisioner import HibernatingProvisioner


class HibernatingKernelManager(AsyncMappingKernelManager):
    """The server's kernel manager, with a :class:`KernelHibernator` beside it."""

    hibernator = Instance(KernelHibernator)

    @default("hibernator")
    def _default_hibernator(self) -> KernelHibernator:
        return KernelHibernator(kernel_manager=self, parent=self)

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

    async def _async_shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        if self.hibernator.is_hibernated(kernel_id):
            await self.hibernator.forget(kernel_id)
            now = True
        await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)

    async def _async_restart_kernel(self, kernel_id: str, now: bool = False) -> None:
        if self.hibernator.is_hibernated(kernel_id):
            await self.hibernator.forget(kernel_id)
            now = True
        await super()._async_restart_kernel(kernel_id, now=now)

    async def _async_shutdown_all(self, now: bool = False) -> None:
        # The server is stopping: hibernated kernels stay on disk for the next one.
        for kernel_id in self.list_kernel_ids():
            if self.hibernator.is_hibernated(kernel_id):
                self.release(kernel_id)
        await super()._async_shutdown_all(now=now)

    shutdown_kernel = _async_shutdown_kernel
    restart_kernel = _async_restart_kernel
    shutdown_all = _async_shutdown_all

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
        connection = manifest["connection"]
        km = self.kernel_manager_factory(
            connection_file=os.path.join(self.connection_dir, f"kernel-{kernel_id}.json"),
            parent=self,
            log=self.log,
            kernel_name=manifest["kernel_name"],
            kernel_spec_manager=self.kernel_spec_manager,
        )
        km.kernel_id = kernel_id
        km.load_connection_info(connection)
        km.write_connection_file()
        km._launch_args = {"cwd": manifest.get("cwd")}
        km.provisioner = KernelProvisionerFactory.instance(parent=self).create_provisioner_instance(
            kernel_id, km.kernel_spec, parent=km
        )
        if not isinstance(km.provisioner, HibernatingProvisioner):
            raise ValueError(f"kernelspec {manifest['kernel_name']!r} uses another provisioner")
        km.provisioner.adopt(connection, manifest.get("cwd"))
        km.ready.set_result(None)
        km.execution_state = "hibernated"
        km.reason = ""
        km.last_activity = datetime.fromtimestamp(manifest["created"], timezone.utc)
        self._kernels[kernel_id] = km
        self._kernel_connections[kernel_id] = 0
        self._kernel_ports[kernel_id] = km.ports
        self.start_watching_activity(kernel_id)
        self.add_restart_callback(kernel_id, lambda: self._handle_kernel_died(kernel_id), "dead")
