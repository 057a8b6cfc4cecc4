"""jupyter_server's kernel manager, taught that a hibernated kernel is still a kernel.

A hibernated kernel stays registered (its sessions and id survive), shows its
hibernation in the REST model, is never culled, and loses its image only when
the user shuts it down or restarts it.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Instance, default

from .hibernator import KernelHibernator


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

    shutdown_kernel = _async_shutdown_kernel
    restart_kernel = _async_restart_kernel
