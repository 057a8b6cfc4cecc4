"""kernelhib: hibernate idle Jupyter kernels to disk and wake them intact."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "kernelhib"}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import KernelHibernatorApp

    return [{"module": "kernelhib", "app": KernelHibernatorApp}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext kernelhib``: ``%hibernate``, imported only now to keep kernels light."""
    from .magic import load_ipython_extension as load

    load(ipython)
