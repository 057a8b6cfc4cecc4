"""Hibernate kernels that sat idle too long, instead of culling them.

Idle means no execution and no kernel activity (jupyter_server's
``last_activity``) for the timeout. A busy kernel is never hibernated by this
policy. A kernelspec can override the timeout in its metadata:
``{"metadata": {"kernelhib": {"idle_timeout": 600}}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hibernator import KernelHibernator


def _seconds_since(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return (datetime.now(timezone.utc) - moment).total_seconds()


class IdleWatcher:
    """Checks every ``check_interval`` seconds which kernels to hibernate or discard."""

    def __init__(self, hibernator: KernelHibernator) -> None:
        self.hibernator = hibernator
        self._task: asyncio.Task[None] | None = None
        # Kernels whose idle hibernation failed, with their activity then:
        # retried only after new activity, not on every check.
        self._failed: dict[str, Any] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.hibernator.check_interval)
            try:
                await self.check()
            except Exception:
                self.hibernator.log.exception("Idle hibernation check failed")

    def timeout_for(self, km: Any) -> float:
        """The idle timeout of this kernel: its kernelspec's override, else the server's."""
        try:
            metadata = km.kernel_spec.metadata.get("kernelhib", {})
        except Exception:  # a kernelspec that no longer exists keeps the default
            metadata = {}
        return float(metadata.get("idle_timeout", self.hibernator.idle_timeout))

    async def check(self) -> None:
        """Hibernate the kernels idle past their timeout; discard images past ``discard_after``."""
        hibernator = self.hibernator
        mkm = hibernator.kernel_manager
        for kernel_id in list(mkm.list_kernel_ids()):
            km = mkm.get_kernel(kernel_id)
            record = hibernator.record(kernel_id)
            if record.state == "hibernated":
                age = time.time() - record.hibernated_at
                if hibernator.discard_after and age > hibernator.discard_after:
                    hibernator.log.info("Discarding kernel %s, hibernated %.0f s", kernel_id, age)
                    await mkm.shutdown_kernel(kernel_id)
                continue
            timeout = self.timeout_for(km)
            if (
                record.state != "running"
                or not timeout
                or km.execution_state in ("busy", "starting")
                or _seconds_since(getattr(km, "last_activity", None)) < timeout
                or (not hibernator.hibernate_connected and mkm._kernel_connections.get(kernel_id))
                or self._failed.get(kernel_id, False) == km.last_activity
            ):
                continue
            hibernator.log.info("Kernel %s idle for %.0f s: hibernating", kernel_id, timeout)
            try:
                await hibernator.hibernate(kernel_id)
            except Exception as exc:
                self._failed[kernel_id] = km.last_activity
                hibernator.log.warning("Could not hibernate idle kernel %s: %s", kernel_id, exc)
