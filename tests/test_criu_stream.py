"""``criu dump/restore --stream`` through kernelhib's streamer into the chunk store: a
process's memory goes in as chunks and comes back intact, a second dump after a
small change writes little, and a corrupt chunk fails the restore, named."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from kernelhib.chunk_store import ChunkStore, StreamedImage
from kernelhib.engines.criu import CriuEngine
from kernelhib.engines.criu_stream import ImageSink, Streamer, StreamError

pytestmark = pytest.mark.criu

# A process like a kernel holding data: 160 MiB random, 40 MiB of touched zeros, 32 MiB of
# repetitive text. SIGUSR1 rewrites 1 % of the random data, like a small cell; each
# answer goes to the report file with the digest of all of it.
HOLDER = r"""
import hashlib, os, signal, sys, time
MiB = 1 << 20
random_data = bytearray(os.urandom(160 * MiB))
zeros = bytearray(40 * MiB)
for page in range(0, len(zeros), 4096):
    zeros[page] = 0
text = bytearray(b"row,category-7,3.14159;" * (32 * MiB // 23))

def report(what):
    digest = hashlib.sha256()
    for data in (random_data, zeros, text):
        digest.update(data)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{what} {digest.hexdigest()}")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])

def change(*_):
    random_data[: len(random_data) // 100] = os.urandom(len(random_data) // 100)
    report("changed")

signal.signal(signal.SIGUSR1, change)
signal.signal(signal.SIGUSR2, lambda *_: report("checked"))
report("ready")
while True:  # not signal.pause(): restored in it, a signal that came at once waits for another
    time.sleep(0.05)
"""
# The engine's flags (kernelhib/engines/criu.py), plus --stream.
COMMON = ["--tcp-close", "--shell-job", "--ext-unix-sk", "--file-locks", "--stream", "-v2"]


@dataclass
class Dumped:
    store: ChunkStore
    images: list[StreamedImage]
    digest: str  # of the data at the second dump


def wait_report(path: Path, what: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            word, digest = path.read_text().split()
        except (FileNotFoundError, ValueError):
            word = digest = ""
        if word == what:
            path.unlink()
            return digest
        time.sleep(0.05)
    raise AssertionError(f"no {what!r} report in {timeout} s")


def dump(criu: str, pid: int, store: ChunkStore, where: Path, sink: ImageSink) -> None:
    """``criu dump --stream`` of ``pid`` into ``sink``; the process is left stopped."""
    command = [criu, "dump", "-D", str(where), "-o", "dump.log", *COMMON, "--leave-stopped"]
    with store.using(), Streamer(where, sink=sink):
        done = subprocess.run([*command, "-t", str(pid)], capture_output=True)
    assert done.returncode == 0, (where / "dump.log").read_text()[-3000:]


def new_image(store: ChunkStore, where: Path) -> StreamedImage:
    (where / "files").mkdir(parents=True)
    return StreamedImage(store, where / "files", CriuEngine.is_bulk)


def restore(criu: str, image: StreamedImage, where: Path) -> int:
    """``criu restore --stream`` from ``image`` as our stopped child; its pid."""
    where.mkdir()
    pidfile = where / "restored.pid"
    with image.store.using(), Streamer(where, source=image):
        done = subprocess.run(
            [criu, "restore", "-D", str(where), "-o", "restore.log", *COMMON,
             "--restore-sibling", "--leave-stopped", "--restore-detached",
             "--pidfile", str(pidfile)],
            capture_output=True,
        )  # fmt: skip
    # After the streamer's own report: a CRIU that failed because of it sees a broken pipe.
    assert done.returncode == 0, (where / "restore.log").read_text()[-3000:]
    return int(pidfile.read_text())


@dataclass
class Holder:
    pid: int
    report: Path
    root: Path


@pytest.fixture(scope="module")
def holder(criu_path: str, tmp_path_factory: pytest.TempPathFactory):
    """The data holder, in its own pid namespace like a kernel, running."""
    root = tmp_path_factory.mktemp("stream")
    report = root / "report"
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "setsid", sys.executable, "-c", HOLDER,
         str(report)],
        cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_report(report, "ready")
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text()
        yield Holder(int(children.split()[0]), report, root)
    finally:
        unshare.kill()
        unshare.wait()


@pytest.fixture(scope="module")
def dumped(criu_path: str, holder: Holder):
    """Two dumps of the holder: as started, and after a cell changed 1 % of its data."""
    (holder.root / "store").mkdir()
    store = ChunkStore(holder.root / "store")
    first = new_image(store, holder.root / "first")
    dump(criu_path, holder.pid, store, holder.root / "first", first)
    os.kill(holder.pid, signal.SIGCONT)
    os.kill(holder.pid, signal.SIGUSR1)
    changed = wait_report(holder.report, "changed")
    second = new_image(store, holder.root / "second")
    dump(criu_path, holder.pid, store, holder.root / "second", second)
    os.kill(holder.pid, signal.SIGCONT)
    return Dumped(store, [first, second], changed)


def test_memory_streams_into_chunks_and_restores_intact(
    criu_path: str, dumped: Dumped, tmp_path: Path
) -> None:
    image = dumped.images[1]
    assert image.files and all(name.startswith("pages-") for name in image.files)
    assert not list(image.directory.glob("pages-*"))  # no copy of the memory as a file
    assert image.stats.zero_bytes >= 40 << 20
    pid = restore(criu_path, image, tmp_path / "restore")
    try:
        report = Path(f"/proc/{pid}/cwd/report")
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGUSR2)
        assert wait_report(report, "checked") == dumped.digest
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_second_dump_after_a_small_change_writes_little(dumped: Dumped) -> None:
    first, second = (image.stats for image in dumped.images)
    assert first.bytes_written < 0.75 * first.bytes_in  # zeros free, text compressed
    assert second.bytes_written <= 0.05 * first.bytes_written, (first, second)


def test_a_corrupt_chunk_fails_the_restore_and_is_named(
    criu_path: str, dumped: Dumped, tmp_path: Path
) -> None:
    # As a wake would read it: from the manifest's chunk lists, nothing cached.
    store = ChunkStore(dumped.store.dir.parent)
    files = {name: store.open(file.to_json()) for name, file in dumped.images[0].files.items()}
    image = StreamedImage(store, dumped.images[0].directory, CriuEngine.is_bulk, files)
    pages = max(image.files.values(), key=lambda file: file.size)
    chunks = [(d, dumped.store.dir / d[:2] / d[2:]) for d, _ in pages.refs if d != "zero"]
    # A raw chunk (random data; header byte 0), read late: only its hash can tell.
    digest, chunk = next((d, c) for d, c in reversed(chunks) if c.read_bytes()[0] == 0)
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(StreamError, match=f"chunk {digest}"):
            restore(criu_path, image, tmp_path / "restore")
    finally:
        chunk.write_bytes(original)


class DiskFull:
    """Fault injection: the store's disk fills up in the middle of the memory."""

    def __init__(self, image: StreamedImage) -> None:
        self.image = image

    def receive(self, name: str, stream: BinaryIO) -> None:
        if CriuEngine.is_bulk(name):
            stream.read(1 << 20)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.image.receive(name, stream)


def test_a_dump_the_store_cannot_take_fails_and_the_process_runs_on(
    criu_path: str, holder: Holder, dumped: Dumped, tmp_path: Path
) -> None:
    sink = DiskFull(new_image(dumped.store, tmp_path))
    with pytest.raises(StreamError, match="No space left on device"):
        dump(criu_path, holder.pid, dumped.store, tmp_path, sink)
    os.kill(holder.pid, signal.SIGUSR2)  # no SIGCONT: CRIU let it run on
    assert wait_report(holder.report, "checked") == dumped.digest
