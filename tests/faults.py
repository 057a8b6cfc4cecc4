"""Fault injection for tests that kill a real server at a chosen step of a hibernation
or a wake: loaded from the server's own config file, it stops the server just
before or after that step, writes a marker file, and waits there to be killed.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import time
from pathlib import Path
from typing import Any

# Step -> (module, class, method, "before" | "after" the call).
PAUSES = {
    "commit": ("kernelhib.image_store", "ImageStore", "commit", "before"),
    "end the process": ("kernelhib.hibernator", "KernelHibernator", "_end_process", "before"),
    "restore": ("kernelhib.engines.criu", "CriuEngine", "restore", "after"),
    # A chunked image's pages are verified chunk by chunk as the restore reads them.
    "verify": ("kernelhib.chunk_store", "ChunkStore", "get", "before"),
    "resume": ("kernelhib.provisioner", "HibernatingProvisioner", "resume", "after"),
    "first reply": ("kernelhib.hibernator", "KernelHibernator", "_until_responsive", "after"),
    # A lazy wake's fetch, some way into the kernel's memory: the wake may have answered.
    "fetch": ("kernelhib.engines.lazy_pages", "_ReadAhead", "_read_window", "before"),
}
FETCHED_WINDOWS = 8  # MiB the fetch reads before it stops
FOREVER_S = 3600


def install(step: str, marker: str) -> None:
    """Make the server stop at ``step`` (once it is reached for a kernel's memory pages)."""
    module, cls_name, name, when = PAUSES[step]
    cls = getattr(importlib.import_module(module), cls_name)
    original = getattr(cls, name)

    windows = iter(range(FETCHED_WINDOWS))

    def reached(args: tuple[Any, ...]) -> bool:
        if name == "_read_window":
            return next(windows, None) is None
        # ImageStore.verify() also checks an image's small files first: stop at its pages.
        return name != "verify" or any(str(n).startswith("pages-") for n in args[-1])

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def paused(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs) if when == "after" else None
            Path(marker).write_text(step)
            await asyncio.sleep(FOREVER_S)
            return result

    else:

        @functools.wraps(original)
        def paused(*args: Any, **kwargs: Any) -> Any:
            if when == "after":
                result = original(*args, **kwargs)
            elif not reached(args):
                return original(*args, **kwargs)
            Path(marker).write_text(step)
            time.sleep(FOREVER_S)
            return result if when == "after" else None

    setattr(cls, name, paused)
