"""The chunk store: dedup across generations and kernels, zeros for free, verified reads,
garbage collection that survives a SIGKILL at any step, and the image format version."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import shutil
import signal
import tempfile
import threading
import traceback
from pathlib import Path

import pytest

from kernelhib.chunk_store import (
    CHUNKS_DIR,
    PAGE,
    ZERO,
    ChunkedFile,
    Chunker,
    ChunkError,
    ChunkStore,
    FormatError,
    image_format,
)

MiB = 1 << 20


def pages(seed: int, count: int) -> bytes:
    return random.Random(seed).randbytes(count * PAGE)


def memory(seed: int = 0) -> bytes:
    """A kernel's memory in small: random data, touched zeros, and repetitive text."""
    text = b"".join(b"row %08d,category-%d,3.14159;" % (i, i % 7) for i in range(60_000))
    text = text[: len(text) // PAGE * PAGE]
    return pages(seed, 512) + bytes(2 * MiB) + text + pages(seed + 1, 256)


def store_file(store: ChunkStore, data: bytes, step: int = MiB):
    writer = store.writer()
    for offset in range(0, len(data), step):
        writer.write(data[offset : offset + step])
    return writer.close(), writer.stats


def stored_files(store: ChunkStore) -> list[Path]:
    return [p for p in store.dir.glob("??/*") if p.is_file()]


def read(file: ChunkedFile, offset: int, length: int) -> bytes:
    return b"".join(file.pieces(offset, length))


def test_chunks_do_not_depend_on_how_the_stream_is_cut() -> None:
    data = memory() + b"tail that is not a whole page"
    chunkings = []
    for step in (MiB, 12345, 3 * PAGE + 1):
        chunker = Chunker()
        chunks = []
        for offset in range(0, len(data), step):
            chunks += chunker.feed(data[offset : offset + step])
        chunks += chunker.finish()
        chunks = [
            (bytes(c), False) if isinstance(c, memoryview) else (bytes(c), True) for c in chunks
        ]
        assert b"".join(c for c, _ in chunks) == data
        merged: list[tuple[bytes, bool]] = []  # zero runs may arrive in pieces
        for chunk, zero in chunks:
            if zero and merged and merged[-1][1]:
                merged[-1] = (merged[-1][0] + chunk, True)
            else:
                merged.append((chunk, zero))
        chunkings.append(merged)
    assert chunkings[0] == chunkings[1] == chunkings[2]
    sizes = [len(c) for c, zero in chunkings[0] if not zero]
    assert max(sizes[:-1]) <= 512 << 10 and min(sizes[:-1]) >= 64 << 10


def test_file_reads_back_verified_at_any_offset(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = memory()
    file, stats = store_file(store, data)
    assert file.size == len(data) == stats.bytes_in
    assert b"".join(file.blocks()) == data
    reopened = store.open(json.loads(json.dumps(file.to_json())))
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.choice([1, PAGE, 300_000, 3 * MiB])
        assert read(reopened, offset, length) == data[offset : offset + length]
    assert read(reopened, len(data) - 5, 100) == data[-5:]


def test_zero_pages_are_stored_as_nothing(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    file, stats = store_file(store, bytes(64 * MiB))
    assert file.refs == ((ZERO, 64 * MiB),)
    assert stats.bytes_written == 0 and stored_files(store) == []
    assert read(file, 5 * MiB, 10) == bytes(10)
    # A lazy wake copies none of it in: a fault there gets a zero page.
    data = pages(3, 256) + bytes(32 * MiB) + pages(4, 256)
    mixed, _ = store_file(store, data)
    assert mixed.zeros() == [(256 * PAGE, 32 * MiB)]


def cached_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mincore of a mapping of it)."""
    size = path.stat().st_size
    with path.open("rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = -(-size // PAGE)
        resident = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), resident) == 0
        return sum(page & 1 for page in resident)


def test_chunks_are_not_left_in_the_page_cache(tmp_path: Path) -> None:
    """A hibernation frees the kernel's memory without filling the page cache, and a
    wake reads each chunk once."""
    store = ChunkStore(tmp_path)
    data = pages(11, 2048)
    file, _ = store_file(store, data)
    chunks = stored_files(store)
    assert chunks and sum(cached_pages(chunk) for chunk in chunks) == 0
    for chunk in chunks:
        chunk.read_bytes()  # cached now, as a plain read leaves it
    assert sum(cached_pages(chunk) for chunk in chunks) > 0
    assert read(store.open(file.to_json()), 0, len(data)) == data
    assert sum(cached_pages(chunk) for chunk in chunks) == 0


def test_compressible_chunks_are_compressed_and_random_ones_stored_raw(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    text = memory()[512 * PAGE + 2 * MiB : -256 * PAGE]
    _, compressible = store_file(store, text)
    assert compressible.bytes_written < len(text) / 4
    random_data = pages(7, 1024)
    _, incompressible = store_file(store, random_data)
    assert len(random_data) < incompressible.bytes_written <= len(random_data) * 1.001


def test_rehibernation_after_a_small_change_writes_only_what_changed(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    before = pages(0, 6000) + memory()
    _, first = store_file(store, before)
    # A cell rewrote 1 % of the data (a slice of an array), touched two pages elsewhere,
    # and allocated 8 pages in the middle.
    after = bytearray(before)
    count = len(before) // PAGE
    after[count // 3 * PAGE : (count // 3 + count // 100) * PAGE] = pages(98, count // 100)
    for page in (count // 5, count // 2):
        after[page * PAGE : page * PAGE + 8] = b"modified"
    after[3000 * PAGE : 3000 * PAGE] = pages(99, 8)
    file, second = store_file(store, bytes(after))
    assert b"".join(file.blocks()) == after
    assert second.bytes_written <= 0.1 * first.bytes_written, (first, second)
    unchanged, third = store_file(store, bytes(after))
    assert third.bytes_written == 0 and unchanged.refs == file.refs


def test_two_kernels_with_the_same_libraries_share_chunks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    libraries = pages(5, 1024)
    _, first = store_file(store, pages(1, 64) + libraries + pages(2, 32))
    _, second = store_file(store, pages(3, 128) + libraries + pages(4, 16))
    assert second.bytes_written < 0.3 * first.bytes_written, (first, second)


def test_a_corrupt_chunk_is_refused_and_named(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = memory()
    file, _ = store_file(store, data)
    digest, length = file.refs[-1]
    chunk = store.dir / digest[:2] / digest[2:]
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    chunk.write_bytes(damaged)
    offset = file.size - length
    assert read(file, 0, PAGE) == data[:PAGE]  # other chunks still read
    with pytest.raises(ChunkError, match=f"chunk {digest} .*does not match its hash"):
        read(file, offset, PAGE)
    with pytest.raises(ChunkError, match=f"chunk {digest}"):
        b"".join(file.blocks())
    chunk.unlink()
    with pytest.raises(ChunkError, match=f"chunk {digest} is missing"):
        read(file, offset, PAGE)


def test_a_compressed_chunk_that_is_altered_is_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    file, _ = store_file(store, b"abc" * 100_000)
    digest, _ = file.refs[0]
    chunk = store.dir / digest[:2] / digest[2:]
    assert chunk.read_bytes()[0] == 1  # zstd
    chunk.write_bytes(b"\x01" + b"not zstd at all")
    with pytest.raises(ChunkError, match=f"chunk {digest} .*damaged"):
        read(file, 0, 10)


@pytest.mark.parametrize(
    "refs",
    [
        [["../../etc/passwd", 10]],
        [[ZERO, 0]],
        [["a" * 64, True]],
        [["A" * 64, 10]],
        {"digest": 1},
    ],
)
def test_a_malformed_chunk_list_is_refused(tmp_path: Path, refs: object) -> None:
    with pytest.raises(ChunkError, match="chunk"):
        ChunkStore(tmp_path).open(refs)


def test_gc_removes_only_unreferenced_chunks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    kept, _ = store_file(store, pages(1, 512))
    dropped, _ = store_file(store, pages(2, 512))
    (store.dir / "ab").mkdir(exist_ok=True)
    (store.dir / "ab" / ".tmp-left-by-a-crash").write_bytes(b"x")
    removed = store.gc(kept.digests)
    assert removed == len(dropped.digests()) + 1
    assert b"".join(kept.blocks()) == pages(1, 512)
    with pytest.raises(ChunkError, match="missing"):
        b"".join(dropped.blocks())


def test_gc_waits_for_a_hibernation_in_flight(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    with store.using():
        pending, _ = store_file(store, pages(1, 512))
        assert store.gc(set) is None  # referenced by no committed image yet, yet kept
        assert b"".join(pending.blocks()) == pages(1, 512)
    assert store.gc(set) == len(pending.digests())


def test_gc_runs_once_a_crashed_writer_has_gone(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    child = os.fork()
    if child == 0:  # holds the lock, then dies without letting go
        with store.using():
            store_file(store, pages(1, 256))
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    left = stored_files(store)
    assert left and store.gc(set) == len(left)
    assert stored_files(store) == []


# --- crash safety: a SIGKILL at every step of writing, committing and collecting ----------


def _commit(root: Path, name: str, refs: list) -> None:
    """How an image store commits: the manifest written, fsynced, renamed into place."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    tmp = images / f".{name}.tmp"
    with open(tmp, "w") as f:
        json.dump(refs, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, images / name)
    fd = os.open(images, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _committed(root: Path) -> dict[str, list]:
    return {p.name: json.loads(p.read_text()) for p in root.glob("images/[!.]*")}


def _referenced(root: Path, store: ChunkStore) -> set[str]:
    return {d for refs in _committed(root).values() for d in store.open(refs).digests()}


_BASE = pages(1, 200) + bytes(MiB // 4) + pages(2, 100)
CONTENTS = {
    "first": _BASE,
    "second": _BASE[: MiB // 2] + pages(8, 20) + _BASE[MiB // 2 :],
    "third": pages(9, 100) + _BASE[MiB // 2 :],
}


def _life(root: Path) -> None:
    """Three generations of images, the oldest deleted, garbage collected in between."""
    store = ChunkStore(root)
    for name, data in CONTENTS.items():
        with store.using():
            file, _ = store_file(store, data, step=300_000)
            _commit(root, name, file.to_json())
        if name == "second":
            os.unlink(root / "images" / "first")
        store.gc(lambda: _referenced(root, store))


def _killed_at(root: Path, step: int) -> bool:
    """Run :func:`_life` in a child that SIGKILLs itself at its ``step``-th rename,
    unlink, fsync or write; whether it got that far."""
    child = os.fork()
    if child == 0:
        try:
            count = 0
            lock = threading.Lock()

            def counted(function):
                def call(*args, **kwargs):
                    nonlocal count
                    with lock:
                        count += 1
                        if count == step:
                            os.kill(os.getpid(), signal.SIGKILL)
                    return function(*args, **kwargs)

                return call

            for name in ("rename", "unlink", "fsync", "writev"):
                setattr(os, name, counted(getattr(os, name)))
            _life(root)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"step {step} failed"
    return os.WIFSIGNALED(status)


def _check_wakeable(root: Path) -> None:
    store = ChunkStore(root)
    for name, refs in _committed(root).items():
        assert b"".join(store.open(refs).blocks()) == CONTENTS[name], name


@pytest.fixture
def memory_path(tmp_path: Path):
    """A directory in tmpfs where there is one: a killed process loses no written
    data, so the disk's fsyncs would only make the 60-odd runs slow."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir=shm, prefix="kernelhib-test-"))
    yield path
    shutil.rmtree(path)


def test_every_committed_image_survives_a_kill_at_any_step(memory_path: Path) -> None:
    step = 1
    while True:
        root = memory_path / f"kill-{step}"
        root.mkdir()
        killed = _killed_at(root, step)
        _check_wakeable(root)
        ChunkStore(root).gc(lambda root=root: _referenced(root, ChunkStore(root)))
        _check_wakeable(root)
        if not killed:
            break
        step += 1
    assert step > 30  # it did go through writes, commits and collections
    assert set(_committed(root)) == {"second", "third"}
    store = ChunkStore(root)
    assert set(_referenced(root, store)) == {p.parent.name + p.name for p in stored_files(store)}


def test_old_format_images_are_read_and_newer_ones_refused_with_a_remedy() -> None:
    assert image_format({"files": {}}) == 1  # written before images had a format
    assert image_format({"format": 2}) == 2
    with pytest.raises(FormatError, match=r"format 3.*upgrade kernelhib"):
        image_format({"format": 3})
    with pytest.raises(FormatError):
        image_format({"format": "2"})


def test_chunks_live_under_the_image_store(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    file, _ = store_file(store, pages(1, 64))
    digest = file.refs[0][0]
    assert (tmp_path / CHUNKS_DIR / digest[:2] / digest[2:]).is_file()
