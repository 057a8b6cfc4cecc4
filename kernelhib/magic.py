"""The ``%hibernate`` magic: a kernel asks its kernelhib server to hibernate it.

A kernel cannot checkpoint itself in the middle of a cell. The magic opens a
comm with target ``kernelhib``: its ``comm_open`` goes out on IOPub with the
running cell's request as parent, the server (which watches every kernel's
IOPub) sees it, and hibernates the kernel once that cell is done. No token,
no extra socket: the kernel only speaks on its own channels.

This module runs inside kernels: it must not import jupyter_server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kernelhib.engines.base import ENGINE_CHOICES

# Set by the kernelhib server in the environment of each kernel it starts.
STATUS_ENV = "KERNELHIB_STATUS"
COMM_TARGET = "kernelhib"

NOT_MANAGED = (
    "This kernel is not managed by a kernelhib server, so %hibernate cannot hibernate it. "
    "Start it from a Jupyter server with the kernelhib extension enabled."
)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext kernelhib``: register ``%hibernate``."""
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

    @magic_arguments()
    @argument(
        "--status",
        action="store_true",
        help="Print the engine that would hibernate this kernel, and why, instead.",
    )
    @argument(
        "--engine",
        choices=ENGINE_CHOICES,
        help="The engine to hibernate with (default: the server's KernelHibernator.engine).",
    )
    @argument(
        "--force",
        action="store_true",
        help="Do not wait for cells queued behind this one: a running one is frozen "
        "(CRIU) and carries on after the wake.",
    )
    def hibernate(line: str) -> None:
        """Hibernate this kernel as soon as the current cell has finished.

        Its memory goes back to the machine; running any cell wakes it.
        """
        args = parse_argstring(hibernate, line)
        status = server_status()
        if status is None:
            print(NOT_MANAGED)
        elif args.status:
            print(describe(status))
        else:
            print(request_hibernation(status, args.engine or "", args.force))

    ipython.register_magic_function(hibernate, magic_name="hibernate")


def server_status() -> dict[str, str] | None:
    """What the kernelhib server said about this kernel when it started it; None if none did.

    A kernel started from inside a managed kernel inherits its environment,
    so the kernel id must also name this kernel's own connection file.
    """
    try:
        status = json.loads(os.environ[STATUS_ENV])
    except (KeyError, ValueError):
        return None
    from ipykernel.kernelapp import IPKernelApp

    if not IPKernelApp.initialized():
        return None
    connection_file = Path(IPKernelApp.instance().connection_file).name
    if connection_file != f"kernel-{status.get('kernel_id')}.json":
        return None
    return status


def describe(status: dict[str, str]) -> str:
    engine = status["engine"] or "none: this kernel cannot hibernate"
    return (
        f"Engine: {engine}\nWhy: {status['why']}\n"
        "(As the kernelhib server saw it when it started this kernel.)"
    )


def request_hibernation(status: dict[str, str], engine: str = "", force: bool = False) -> str:
    """Ask the server, through IOPub, to hibernate this kernel after the current cell.

    ``engine`` "" leaves the choice to the server; ``force`` hibernates it
    even while a cell queued behind this one runs.
    """
    import comm

    data = {"request": "hibernate", "engine": engine, "force": force}
    comm.create_comm(target_name=COMM_TARGET, data=data).close()
    when = (
        "as soon as this cell is done, even if a cell queued behind it runs (it is frozen "
        "and carries on after the wake)"
        if force
        else "as soon as the kernel is idle after this cell"
    )
    if not status["engine"] and not engine:
        return (
            f"Asked the kernelhib server to hibernate this kernel, but when it started "
            f"this kernel it could not hibernate it: {status['why']}"
        )
    name = {"": status["engine"], "auto": "the engine 'auto' picks"}.get(engine, engine)
    planned = (
        f"This kernel will hibernate with {name} {when}. "
        "Its memory goes back to the machine; running any cell wakes it."
    )
    return planned if engine else f"{planned} `%hibernate --status` says why this engine."
