"""Where kernelhib keeps its files.

Everything lives under Jupyter's *data* directory, not the runtime directory:
images and the files a hibernated kernel holds open must survive a server
restart, and the runtime directory is often a tmpfs that does not.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir


def kernelhib_data_dir() -> Path:
    """The root of kernelhib's persistent state for this user."""
    return Path(jupyter_data_dir()) / "kernelhib"


def default_image_dir() -> Path:
    """Where images are kept unless ``KernelHibernator.image_dir`` says otherwise."""
    return kernelhib_data_dir() / "images"


class UnsafeDirectory(RuntimeError):
    """A directory for kernels' secrets that someone else could read or plant files in."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only, and return it.

    Images hold every secret a kernel had in memory, so nobody else may list
    or read them, nor plant files (a signing key, an image) among them. A
    directory someone else could have made first (under /tmp, say) is
    refused: a symbolic link, one owned by another user, or one that others
    may write to. Found ours and only readable by others, it is made private.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise UnsafeDirectory(
                f"{path} is a symbolic link (to {os.readlink(path)}), which whoever made it "
                "can point elsewhere: configure the directory it points to instead"
            ) from None
        raise UnsafeDirectory(f"{path} cannot be used as a directory: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise UnsafeDirectory(
                f"{path} belongs to uid {info.st_uid}, not to this server's uid {os.geteuid()}: "
                "its owner could read kernels' images or plant files there; "
                "remove it or choose another directory"
            )
        if info.st_mode & 0o022:
            raise UnsafeDirectory(
                f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
                f"files may have been planted there; check its contents, then `chmod 700 {path}`"
            )
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path
