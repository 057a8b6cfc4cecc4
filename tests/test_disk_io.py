"""Image file I/O on real files: the read-ahead hash and the write-behind of staged images."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from blake3 import blake3

from kernelhib.disk_io import WriteBehind, digest


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
