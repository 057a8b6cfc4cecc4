"""Image file I/O on real files: the read-ahead hash and the write-behind of staged images."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from blake3 import blake3

from kernelhib.disk_io import Partial, WriteBehind, digest


def dirty_bytes() -> int:
    """Dirty page cache, machine-wide (``Dirty`` in /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no Dirty line in /proc/meminfo")


@pytest.mark.parametrize("size", [0, 1, 4096, 10_001])
def test_digest_reads_ahead_in_chunks_and_hashes_every_byte(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "pages-1.img"
    path.write_bytes(data)

    # Chunks far smaller than the file: every buffer is reused several times.
    assert digest(path, chunk=1000, depth=2) == blake3(data).hexdigest()
    assert digest(path) == blake3(data).hexdigest()


def test_digest_raises_what_the_reader_hit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        digest(tmp_path / "missing.img")
    with pytest.raises(IsADirectoryError):
        digest(tmp_path)
    # Too big to hash in one read: the read-ahead thread hits the error.
    with pytest.raises(IsADirectoryError):
        digest(tmp_path, chunk=1)


def test_write_behind_gets_the_disk_writing_before_fsync(tmp_path: Path) -> None:
    """Left to itself, Linux keeps these 512 MiB dirty for 30 s (dirty_expire_centisecs):
    the write-behind has them written back while the file is still open."""
    size, chunk = 512 << 20, os.urandom(8 << 20)
    os.sync()
    before = dirty_bytes()
    writer = WriteBehind(tmp_path)
    try:
        with (tmp_path / "pages-1.img").open("wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
            deadline = time.monotonic() + 20
            while dirty_bytes() - before > size // 4:
                assert time.monotonic() < deadline, (
                    f"{(dirty_bytes() - before) >> 20} MiB still dirty 20 s after the write"
                )
                time.sleep(0.05)
    finally:
        writer.stop()
    assert (tmp_path / "pages-1.img").stat().st_size == size


def test_appended_files_are_hashed_as_they_grow(tmp_path: Path) -> None:
    """The hash of what was written so far is handed over; digest finishes it from there."""
    step = 1 << 20
    writer = WriteBehind(tmp_path, appended=lambda name: name.startswith("pages-"), step=step)
    pages, core = tmp_path / "pages-1.img", tmp_path / "core-1.img"
    data = os.urandom(5 * step + 123)
    try:
        core.write_bytes(os.urandom(3 * step))
        with pages.open("wb") as f:
            f.write(data[: 4 * step])
            f.flush()
            deadline = time.monotonic() + 10
            while not writer._files.get(str(pages)) or writer._files[str(pages)].kicked < 4 * step:
                assert time.monotonic() < deadline, "the write-behind never saw the file grow"
                time.sleep(0.01)
            f.write(data[4 * step :])
    finally:
        partials = writer.stop()

    assert list(partials) == [pages], "only appended files are hashed on the way"
    partial = partials[pages]
    # On a loaded machine the write-behind may have caught up with the whole file.
    assert 4 * step <= partial.length <= len(data)
    assert digest(pages, partial=partial) == blake3(data).hexdigest()


def test_a_partial_hash_of_another_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(b"first version")
    stale = Partial(inode=path.stat().st_ino, length=5, hasher=blake3(b"first"))
    replacement = tmp_path / "new"
    replacement.write_bytes(b"second version, longer")
    replacement.rename(path)  # a new inode under the old name

    assert digest(path, partial=stale) == blake3(b"second version, longer").hexdigest()
