"""kernelhib: hibernate idle Jupyter kernels to disk and wake them intact."""

from __future__ import annotations

from typing import Any

# Written by the build (hatch's version hook) from labextension/package.json.
from ._version import __version__ as __version__


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "kernelhib"}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import KernelHibernatorApp

    return [{"module": "kernelhib", "app": KernelHibernatorApp}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext kernelhib``: ``%hibernate``, imported only now to keep kernels light."""
    from .magic import load_ipython_extension as load

    load(ipython)
