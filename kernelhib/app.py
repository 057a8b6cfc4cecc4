"""The ``kernelhib`` server extension: wires the hibernator into jupyter_server.

It does no hibernation work itself. At link time, before the server builds its
kernel manager, it installs the hibernating kernel manager, the waking
websocket connection and the restorable provisioner as defaults; then it adds
the REST handlers and the event schema.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.extension.application import ExtensionApp
from traitlets.utils.importstring import import_item

from .handlers import handlers
from .hibernator import EVENT_SCHEMA
from .kernel_manager import HibernatingKernelManager
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

    @property
    def active(self) -> bool:
        return isinstance(self.serverapp.kernel_manager, HibernatingKernelManager)

    def initialize_settings(self) -> None:
        if not self.active:
            return
        logger = self.serverapp.event_logger
        logger.register_event_schema(EVENT_SCHEMA)
        self.serverapp.kernel_manager.hibernator.event_logger = logger

    def initialize_handlers(self) -> None:
        if self.active:
            self.handlers.extend(handlers)
