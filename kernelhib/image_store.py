"""Signed, verified kernel images on disk.

An image is a directory of files written by an engine plus ``manifest.json``:
what the image is (kernel id, kernelspec, engine, sizes, time) and the BLAKE3
hash of every file, signed with HMAC-SHA256 under a per-server secret key. An image
is loaded only if the signature and every hash match: images are restored into
a process (or unpickled), so an altered one must never run. Nor is anything
else of the directory loaded: CRIU restores from a directory that holds only
the signed files (:meth:`ImageStore.restore_dir`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .chunk_store import (
    CHUNKED_FORMAT,
    PLAIN_FORMAT,
    ChunkedFile,
    ChunkStore,
    StreamedImage,
    image_format,
)
from .disk_io import Partial, WriteBehind, digest, evict, fsync
from .journal import Journal
from .paths import private_dir

MANIFEST = "manifest.json"
_KEY_FILE = "secret.key"
_LOCK_FILE = "server.lock"
_KEY_BYTES = 32
_STAGING_PREFIX = ".partial-"
_RETIRED_PREFIX = ".retired-"
_RESTORE_PREFIX = ".restore-"
_JOURNAL_DIR = ".journal"


class ImageError(RuntimeError):
    """An image is missing, incomplete, or does not match its signed manifest."""


@dataclass(frozen=True)
class Image:
    """A committed image: its directory and its (verified or trusted) manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        """The image's logical size: its files as the engine wrote them, chunks unpacked."""
        return sum(entry["size"] for entry in self.manifest["files"].values())

    @property
    def stored_bytes(self) -> int:
        """What storing the image took: its plain files and the chunks it was the first
        to store (chunks other images already held cost it nothing)."""
        stored = self.manifest.get("stored_bytes")
        return stored if isinstance(stored, int) else self.bytes

    def chunked(self) -> dict[str, Any]:
        """The chunk lists of the image's chunked files (format 2), by file name."""
        files = self.manifest.get("files", {})
        return {name: entry["chunks"] for name, entry in files.items() if "chunks" in entry}


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def claim(root: Path) -> IO[bytes] | None:
    """Lock ``root`` for this server, or None if another live server holds it.

    Only the holder adopts the images found there at start: two servers
    sharing a directory must not both wake the same kernel. The lock lasts as
    long as the returned file stays open (or the process lives).
    """
    path = private_dir(Path(root)) / _LOCK_FILE
    handle = os.fdopen(
        os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600), "ab"
    )
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _load_key(path: Path) -> bytes:
    """The server's signing key, created on first use, readable by the owner only.

    A key file that is a link, someone else's, or not a whole key (a power
    loss while an older version wrote it) is refused, never used.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        _create_key(path)
        return _load_key(path)
    except OSError as exc:
        why = (
            "it is a symbolic link, which someone may have planted"
            if path.is_symlink()
            else exc.strerror
        )
        raise ImageError(
            f"cannot use the signing key {path}: {why}; remove it and restart the server "
            "(images signed with the old key are then refused)"
        ) from exc
    with os.fdopen(fd) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ImageError(
                f"the signing key {path} is not a file of this server's uid {os.geteuid()} "
                f"(owner uid {info.st_uid}): someone may have planted it; remove it and restart "
                "the server (images signed with the old key are then refused)"
            )
        text = f.read(4 * _KEY_BYTES).strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise ImageError(
            f"the signing key {path} is {'empty' if not text else 'damaged'}: it must be "
            f"{2 * _KEY_BYTES} hex digits; remove it and restart the server to have a new one "
            "made (images signed with the old key are then refused)"
        )
    return key


def _create_key(path: Path) -> None:
    """Write a new key durably: after a power loss there is a whole key or none.

    Linked into place, never renamed: a key another server made meanwhile is kept.
    """
    written = path.with_name(f"{_STAGING_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(written, path)
    finally:
        written.unlink()
    fsync(path.parent)


def plain_files(image: Image) -> list[str]:
    """The names of the image's files kept as plain files in its directory."""
    return [name for name, entry in image.manifest["files"].items() if "chunks" not in entry]


class ImageStore:
    """One directory per hibernated kernel under ``root``; blocking, call from a thread."""

    def __init__(self, root: Path, release: Callable[[Path], None] | None = None) -> None:
        """``release(directory)`` is called before an image, or a staging or retired
        directory, is deleted: for what an engine keeps elsewhere (the CRIU service's
        image)."""
        self.root = private_dir(Path(root))
        self._release = release
        self._key = _load_key(self.root / _KEY_FILE)
        self.chunks = ChunkStore(self.root)
        self._writing: dict[Path, WriteBehind] = {}
        self.journal = Journal(self.root / _JOURNAL_DIR, self._sign)

    def path(self, kernel_id: str) -> Path:
        if not kernel_id or "/" in kernel_id or kernel_id.startswith("."):
            raise ImageError(f"invalid kernel id {kernel_id!r}")
        return self.root / kernel_id

    def has_image(self, kernel_id: str) -> bool:
        """Whether a committed image of the kernel is here (whether or not it verifies)."""
        return (self.path(kernel_id) / MANIFEST).is_file()

    def free_bytes(self) -> int:
        """Bytes that this server may still write on the store's filesystem."""
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def kernel_ids(self) -> list[str]:
        """The kernels that have a committed image here."""
        return sorted(
            p.parent.name
            for p in self.root.glob(f"*/{MANIFEST}")
            if not p.parent.name.startswith(".")
        )

    def stage(self, kernel_id: str, appended: Callable[[str], bool] | None = None) -> Path:
        """A fresh private directory for an engine to write an image into.

        The disk starts writing its files while the engine writes them, and the
        files the engine only appends to (``appended(name)``) are hashed as they
        grow; :meth:`commit` or :meth:`discard` ends that.
        """
        self.path(kernel_id)  # validates the id
        staging = private_dir(self.root / f"{_STAGING_PREFIX}{kernel_id}.{uuid.uuid4().hex[:8]}")
        self._writing[staging] = WriteBehind(staging, appended)
        return staging

    def _written(self, staging: Path) -> dict[Path, Partial]:
        writer = self._writing.pop(staging, None)
        return writer.stop() if writer else {}

    def commit(
        self,
        staging: Path,
        kernel_id: str,
        meta: dict[str, Any],
        streamed: StreamedImage | None = None,
    ) -> Image:
        """Make ``staging`` the image of ``kernel_id``: durable, hashed, signed.

        Every file and directory is fsynced and every file hashed, then the
        signed manifest is written and the directory renamed into place. Until
        that rename, no image exists. The disk writes the files back while they
        are hashed from the page cache. Files ``streamed`` into the chunk store
        (already durable) are listed by their chunks: the image is then format 2.
        Call it within ``chunks.using()`` when it has any.
        """
        partials = self._written(staging)
        final = self.path(kernel_id)
        if final.exists():
            raise ImageError(f"an image of kernel {kernel_id} already exists at {final}")
        entries = sorted(staging.rglob("*"))
        paths = [p for p in entries if p.is_file()]
        if not paths:
            raise ImageError(f"the engine wrote no files into {staging}")
        for file in paths:
            os.chmod(file, 0o600)
        durable = [*paths, *(p for p in entries if p.is_dir())]
        with ThreadPoolExecutor(1) as writeback:
            synced = writeback.submit(lambda: [fsync(path) for path in durable])
            files = {
                str(file.relative_to(staging)): {
                    "size": file.stat().st_size,
                    "blake3": digest(file, partial=partials.get(file)),
                }
                for file in paths
            }
            synced.result()
        for file in paths:
            evict(file)
        stored = sum(entry["size"] for entry in files.values())
        chunked = streamed.files if streamed else {}
        for name, chunks in chunked.items():
            if name in files:
                raise ImageError(f"image file {name} was written both as chunks and as a file")
            files[name] = {"size": chunks.size, "chunks": chunks.to_json()}
        if chunked:
            assert streamed is not None
            stored += streamed.stats.bytes_written
        manifest = {
            **meta,
            "format": CHUNKED_FORMAT if chunked else PLAIN_FORMAT,
            "kernel_id": kernel_id,
            "created": time.time(),
            "files": files,
            "stored_bytes": stored,
        }
        manifest["signature"] = self._sign(manifest)
        manifest_path = staging / MANIFEST
        fd = os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync(staging)
        staging.rename(final)
        fsync(self.root)
        return Image(final, manifest)

    def authenticate(self, image: Image, later: Callable[[str], bool] | None = None) -> Image:
        """Check a :meth:`read` image's signature and its files' hashes.

        Files for which ``later(name)`` is true are left for :meth:`verify`: an
        engine may read bulk data (never code or structure) meanwhile, as long
        as nothing runs before that check passes. Chunked files are checked
        chunk by chunk as they are read. An image in a format newer than this
        kernelhib reads raises :class:`~kernelhib.chunk_store.FormatError`.
        """
        self._check_signature(image)
        image_format(image.manifest)
        self.verify(image, [name for name in plain_files(image) if not (later and later(name))])
        return image

    def open_chunked(self, image: Image) -> dict[str, ChunkedFile]:
        """The chunked files of an authenticated image; every read of them is verified.
        Read them within ``chunks.using()``."""
        return {name: self.chunks.open(refs) for name, refs in image.chunked().items()}

    def referenced_chunks(self) -> set[str]:
        """The chunks that committed images refer to: what garbage collection keeps.

        A manifest that cannot be read raises: its chunks are unknown, so none
        may be deleted.
        """
        referenced: set[str] = set()
        for kernel_id in self.kernel_ids():
            for refs in self.read(kernel_id).chunked().values():
                referenced |= self.chunks.open(refs).digests()
        return referenced

    def verify(self, image: Image, names: Iterable[str]) -> None:
        """Check the named files of a signed image against their hashes.

        Files are read in parallel: an image is dozens of small files, each a
        separate seek on a cold disk.
        """
        with ThreadPoolExecutor(8) as pool:
            for problem in pool.map(lambda name: self._mismatch(image, name), names):
                if problem:
                    raise ImageError(f"{problem}; the image is kept for inspection")

    @staticmethod
    def _mismatch(image: Image, name: str) -> str:
        """Why the image file ``name`` fails its signed hash, or '' if it passes."""
        entry = image.manifest["files"][name]
        file = image.path / name
        if not file.is_file():
            return f"image file {file} is missing"
        if file.stat().st_size != entry["size"] or digest(file) != entry["blake3"]:
            return f"image file {file} does not match its signed hash: altered after hibernation"
        return ""

    def _check_signature(self, image: Image) -> None:
        signature = image.manifest.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(
            signature.encode(), self._sign(image.manifest).encode()
        ):
            raise ImageError(
                f"the manifest of {image.path} is not signed by this server's key: "
                "it was altered or written elsewhere; the image is kept for inspection"
            )

    def read(self, kernel_id: str) -> Image:
        """The image's manifest as written, unverified: for listing, or for
        :meth:`authenticate` before anything of it is loaded."""
        path = self.path(kernel_id)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ImageError(f"no image of kernel {kernel_id} in {self.root}") from None
        except ValueError as exc:
            raise ImageError(f"the manifest of {path} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise ImageError(f"the manifest of {path} is not a JSON object")
        return Image(path, manifest)

    def read_signed(self, kernel_id: str) -> Image:
        """The image's manifest, its signature checked but not its files: what it
        says (ports, key, working directory) can be acted on without reading
        gigabytes. Before loading the image, :meth:`authenticate` it."""
        image = self.read(kernel_id)
        self._check_signature(image)
        return image

    def restore_dir(self, image: Image) -> Path:
        """A fresh private directory holding exactly the files an image's signed manifest lists.

        CRIU opens every image file it knows the name of that is there: an
        extra file in the image's directory would be parsed and restored into
        the kernel. It restores from this directory instead, and writes its
        log and pidfile here, not into the image. Hard links: nothing is copied,
        and the files are the ones checked. :meth:`discard` it after the restore.
        """
        linked = private_dir(
            self.root / f"{_RESTORE_PREFIX}{image.path.name}.{uuid.uuid4().hex[:8]}"
        )
        try:
            for name in plain_files(image):
                (linked / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.link(image.path / name, linked / name, follow_symlinks=False)
        except FileNotFoundError as exc:
            shutil.rmtree(linked, ignore_errors=True)
            raise ImageError(
                f"image file {exc.filename} is missing; the image is kept for inspection"
            ) from None
        except BaseException:
            shutil.rmtree(linked, ignore_errors=True)
            raise
        return linked

    def discard(self, path_or_id: Path | str) -> None:
        """Delete an image (or a staging, retired or restore directory); missing is fine.

        An image is retired first: a power loss midway leaves no part of it to adopt.
        """
        path = path_or_id if isinstance(path_or_id, Path) else self.retire(path_or_id)
        self._written(path)
        self._delete(path)

    def _delete(self, path: Path) -> None:
        # A restore directory only links to an image's files: the image stays.
        if self._release and not path.name.startswith(_RESTORE_PREFIX) and path.is_dir():
            self._release(path)
        shutil.rmtree(path, ignore_errors=True)

    def retire(self, kernel_id: str) -> Path:
        """Move an image aside, durably, freeing its id; :meth:`discard` the result later.

        After a power loss a retired image stays retired: a woken kernel's old
        image must not come back as a hibernated kernel.
        """
        retired = self.root / f"{_RETIRED_PREFIX}{kernel_id}.{uuid.uuid4().hex[:8]}"
        try:
            self.path(kernel_id).rename(retired)
        except FileNotFoundError:
            return retired
        fsync(self.root)
        return retired

    def sweep(self) -> None:
        """Delete what an interrupted server left: partial, retired and restore directories,
        and a half-written key."""
        for path in self.root.glob(".*"):
            if not path.name.startswith((_STAGING_PREFIX, _RETIRED_PREFIX, _RESTORE_PREFIX)):
                continue
            if path.is_dir() and not path.is_symlink():
                self._delete(path)
            else:
                path.unlink(missing_ok=True)

    def _sign(self, manifest: dict[str, Any]) -> str:
        return hmac.new(self._key, _canonical(manifest), hashlib.sha256).hexdigest()
