"""The ``kernelhib`` server extension: wires the hibernator into jupyter_server.

It does no hibernation work itself. At link time, before the server builds its
kernel manager, it installs the hibernating kernel manager, the waking
websocket connection and the restorable provisioner as defaults; then it adds
the REST handlers and the event schema.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.extension.application import ExtensionApp
from traitlets.utils.importstring import import_item

from .handlers import handlers
from .hibernator import EVENT_SCHEMA
from .image_store import claim
from .kernel_manager import HibernatingKernelManager
from .paths import default_image_dir
from .websocket import WakingWebsocketConnection

PROVISIONER = "kernelhib-provisioner"


class KernelHibernatorApp(ExtensionApp):
    """Hibernate idle Jupyter kernels to disk and wake them intact."""

    name = "kernelhib"
    load_other_extensions = True

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        super()._link_jupyter_server_extension(serverapp)
        config = serverapp.config
        configured = config.ServerApp.get("kernel_manager_class")
        if configured is not None and not issubclass(
            import_item(configured) if isinstance(configured, str) else configured,
            HibernatingKernelManager,
        ):
            self.log.warning(
                "kernelhib is inactive: ServerApp.kernel_manager_class is %s; "
                "use kernelhib.kernel_manager.HibernatingKernelManager or a subclass",
                configured,
            )
            return
        serverapp.kernel_manager_class = configured or HibernatingKernelManager
        if "kernel_websocket_connection_class" not in config.ServerApp:
            serverapp.kernel_websocket_connection_class = WakingWebsocketConnection
        if "default_provisioner_name" not in config.KernelProvisionerFactory:
            KernelProvisionerFactory.instance(
                parent=serverapp
            ).default_provisioner_name = PROVISIONER
        image_dir = Path(config.KernelHibernator.get("image_dir") or default_image_dir())
        self._claim = claim(image_dir)
        if self._claim is None:
            self.log.warning(
                "Another Jupyter server uses %s: its hibernated kernels are not adopted "
                "here, and sessions are not kept across restarts. Give each server its "
                "own KernelHibernator.image_dir.",
                image_dir,
            )
        elif "database_filepath" not in config.SessionManager:
            # Notebook path -> kernel id must survive a restart with the kernels.
            config.SessionManager.database_filepath = str(image_dir / "sessions.db")

    @property
    def active(self) -> bool:
        return isinstance(self.serverapp.kernel_manager, HibernatingKernelManager)

    def initialize_settings(self) -> None:
        if not self.active:
            return
        logger = self.serverapp.event_logger
        logger.register_event_schema(EVENT_SCHEMA)
        hibernator = self.serverapp.kernel_manager.hibernator
        hibernator.event_logger = logger
        if self._claim is not None:
            hibernator.adopt_images()

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if not self.active:
            return
        _stop_cleanly_on_sigint(serverapp)
        mkm = serverapp.kernel_manager
        mkm.hibernator.start()
        # Admins (and tests) learn from this line that kernelhib is at work.
        self.log.info(
            "kernelhib started: %d hibernated kernels in %s",
            sum(map(mkm.hibernator.is_hibernated, mkm.list_kernel_ids())),
            mkm.hibernator.image_dir,
        )

    async def stop_extension(self) -> None:
        """Runs on SIGTERM/SIGINT before the server shuts kernels down: hibernate them."""
        if self.active:
            await self.serverapp.kernel_manager.hibernator.stop()

    def initialize_handlers(self) -> None:
        if self.active:
            self.handlers.extend(handlers)


def _stop_cleanly_on_sigint(serverapp: Any) -> None:
    """Let SIGINT stop the server as SIGTERM does: stop hooks first, so kernels hibernate.

    jupyter_server handles SIGINT only when stdin is a terminal (it asks before
    stopping); otherwise SIGINT raises KeyboardInterrupt in the event loop and the
    server exits without running extensions' stop hooks or shutting kernels down.
    JupyterHub's LocalProcessSpawner stops servers with SIGINT: without this, its
    kernels would be killed with the server instead of hibernating. Called once
    the server runs (never in tests that only start_app()), from the main thread.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, serverapp._signal_stop)
