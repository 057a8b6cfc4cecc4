"""Where kernelhib keeps its files.

Everything lives under Jupyter's *data* directory, not the runtime directory:
images and the files a hibernated kernel holds open must survive a server
restart, and the runtime directory is often a tmpfs that does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir


def kernelhib_data_dir() -> Path:
    """The root of kernelhib's persistent state for this user."""
    return Path(jupyter_data_dir()) / "kernelhib"


def default_image_dir() -> Path:
    """Where images are kept unless ``KernelHibernator.image_dir`` says otherwise."""
    return kernelhib_data_dir() / "images"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only, and return it.

    Images hold every secret a kernel had in memory, so nobody else may list
    or read them.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
