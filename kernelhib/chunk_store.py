"""Content-addressed, compressed chunks of kernel memory images.

A kernel's memory is mostly what it was at its last hibernation, what another
kernel with the same imports also holds, or zeros. Storing a CRIU page file
as chunks keyed by the BLAKE3 of their bytes writes each distinct chunk once
per image store: a re-hibernation writes only the chunks that changed, two
kernels share their libraries' pages, and a run of zero pages costs nothing.

Chunk boundaries are content-defined at page granularity (:class:`Chunker`), so
pages inserted or removed in the middle move no boundary elsewhere. A chunk is
zstd-compressed only where that pays; every chunk is verified against its hash
after decompression, before a byte of it is handed out.

Layout under an image store's root::

    .chunks/lock              flock: shared while writing or reading, exclusive for GC
    .chunks/ab/cdef...        a chunk: one header byte (raw or zstd), then its bytes
    .chunks/ab/.tmp-...       a chunk being written (renamed into place once durable)

Everything here blocks: call it from a thread.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard
from blake3 import blake3

from .disk_io import uncache

PAGE = 4096
ZERO = "zero"
"""The digest of an all-zero chunk, which is stored as nothing."""

PLAIN_FORMAT = 1
"""Images whose files are plain files, each with its whole-file hash (kernelhib <= 0.x)."""
CHUNKED_FORMAT = 2
"""Images whose page files are lists of chunks in the store's ``.chunks``."""
FORMAT = CHUNKED_FORMAT

CHUNKS_DIR = ".chunks"
_LOCK = "lock"
_TMP_PREFIX = ".tmp-"
_RAW, _ZSTD = 0, 1  # the header byte of a chunk file
# zstd level 1: on a pandas kernel's CRIU page file, ratio 9.7; level 3 gained 4 %
# of ratio for 27 % more CPU (docs/image-format.md). Stored raw unless it saves at
# least 1/6 (ratio 1.2): random floats compress to 0.9, and decompressing them took
# a quarter of a lazy wake's CPU (0.7 GB/s) for a tenth of their disk.
_LEVEL = 1
_WORTH = 1.2
_SAMPLE = 8 << 10
# Chunks of 16-128 pages (64-512 KiB), about 70 pages (280 KiB) on average: a
# boundary 1 in 64 pages after the minimum. The maximum bounds what a small change
# rewrites around it: with 1 MiB, a 400 KiB change could rewrite 2.4 MiB.
# Runs of at least 16 zero pages are chunks of their own.
_MIN_PAGES, _AVG_PAGES, _MAX_PAGES = 16, 64, 128
_MIN_ZERO_PAGES = 16
# The words of a page the fingerprint reads: spread over the page, 8 of its 512.
_SAMPLED = np.array([0, 67, 131, 199, 263, 331, 389, 457])
_MIX = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
     0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
    dtype=np.uint64,
)  # fmt: skip
_IO_THREADS = 8  # chunk writes wait on fsync, not on the CPU
_CACHED_CHUNKS = 8
# A dump is read from CRIU's pipe in blocks this big: a chunk that spans two blocks is
# copied whole, and 1 MiB blocks made that a quarter of the bytes (a re-hibernation
# received 20-25 % faster with 4 MiB; 16 MiB took longer, with less overlap).
_READ = 4 << 20


class ChunkError(RuntimeError):
    """A chunk is missing or does not match its hash, or a chunk list is malformed."""


class FormatError(ChunkError):
    """An image was written in a format this kernelhib cannot read."""


def image_format(manifest: dict[str, Any]) -> int:
    """The format of an image's (signed) manifest; refuse one newer than this release.

    Images written before formats existed carry none: they are plain files.
    """
    version = manifest.get("format", PLAIN_FORMAT)
    if not isinstance(version, int) or isinstance(version, bool) or version < PLAIN_FORMAT:
        raise FormatError(f"the image's format {version!r} is not a format kernelhib writes")
    if version > FORMAT:
        raise FormatError(
            f"the image is in format {version}, newer than this kernelhib reads (up to "
            f"{FORMAT}): it was written by a newer kernelhib; upgrade kernelhib to wake it, "
            "or discard the image"
        )
    return version


# --- chunking -------------------------------------------------------------------------------


def _fingerprints(pages: np.ndarray) -> np.ndarray:
    """A cheap 64-bit fingerprint per page from 8 of its words: 0 for a zero page."""
    words = pages[:, _SAMPLED]
    mixed = (words * _MIX).sum(axis=1, dtype=np.uint64)
    return mixed ^ (mixed >> np.uint64(31))


def _zero_pages(pages: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
    """Which pages are all zeros; only pages whose sampled words are zero are read whole."""
    zero = fingerprints == 0
    for start, end in _runs(zero):
        if pages[start:end].any():  # whole runs of zeros are the common case: one pass
            zero[start:end] = ~pages[start:end].any(axis=1)
    return zero


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


Chunk = memoryview | int
"""A chunk's bytes, or the length of a run of zeros."""


@dataclass
class Chunker:
    """Splits a stream of pages into content-defined chunks, incrementally.

    A page ends a chunk when its fingerprint says so (1 in ``_AVG_PAGES``),
    within ``_MIN_PAGES``..``_MAX_PAGES``; a run of at least ``_MIN_ZERO_PAGES``
    zero pages is a zero chunk. Each decision depends only on the pages since
    the last boundary, so the same pages give the same chunks wherever they
    are in the file, and the stream may arrive in pieces of any size.

    Chunks are views of the bytes fed in, not copies (copying was most of the
    chunker's cost); only a chunk that spans two pieces is joined. The uncut
    pages at the end of a piece wait for the next, with their fingerprints.
    """

    _tail: memoryview = field(default_factory=lambda: memoryview(b""))
    _tail_fingerprints: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    _tail_zero: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    _partial: bytes = b""  # bytes after the last whole page fed
    _in_zero_run: bool = False  # the last chunk given out was zeros, maybe continued

    def feed(self, data: bytes | memoryview) -> list[Chunk]:
        """Add bytes (kept, not copied: do not change them); return the chunks now complete."""
        return self._cut(memoryview(data).cast("B"), final=False)

    def finish(self) -> list[Chunk]:
        """The remaining chunks; a trailing partial page ends the last one."""
        return self._cut(memoryview(b""), final=True)

    def _cut(self, data: memoryview, final: bool) -> list[Chunk]:
        if self._partial:  # only where pieces are not whole pages: join them
            data = memoryview(self._partial + bytes(data))
        whole = len(data) // PAGE
        self._partial = bytes(data[whole * PAGE :])
        data = data[: whole * PAGE]
        pages = np.frombuffer(data, dtype=np.uint64).reshape(whole, PAGE // 8)
        fresh = _fingerprints(pages)
        fingerprints = np.concatenate((self._tail_fingerprints, fresh))
        zero = np.concatenate((self._tail_zero, _zero_pages(pages, fresh)))
        del pages
        held = len(self._tail) // PAGE
        tail = self._tail

        def piece(start: int, end: int) -> memoryview:
            if end <= held:
                return tail[start * PAGE : end * PAGE]
            if start >= held:
                return data[(start - held) * PAGE : (end - held) * PAGE]
            return memoryview(b"".join((tail[start * PAGE :], data[: (end - held) * PAGE])))

        bounds = self._bounds(fingerprints, zero, final)
        chunks: list[Chunk] = [
            (end - start) * PAGE if is_zero else piece(start, end) for start, end, is_zero in bounds
        ]
        done = bounds[-1][1] if bounds else 0
        self._tail = piece(done, len(fingerprints))
        self._tail_fingerprints, self._tail_zero = fingerprints[done:], zero[done:]
        if final and self._partial:
            chunks.append(memoryview(bytes(self._tail) + self._partial))
            self._tail, self._partial = memoryview(b""), b""
        return chunks

    def _bounds(
        self, fingerprints: np.ndarray, zero: np.ndarray, final: bool
    ) -> list[tuple[int, int, bool]]:
        """The page ranges of the chunks now complete, and whether each is zeros."""
        whole = len(fingerprints)
        bounds: list[tuple[int, int, bool]] = []
        start = 0
        for run_start, run_end in _runs(zero):
            continued = run_start == 0 and self._in_zero_run
            if run_end - run_start < _MIN_ZERO_PAGES and not continued:
                if run_end < whole or final:
                    continue  # a few zero pages inside data
                # They may grow into a zero run with the next pages: cut only what is certain.
                _cut_data(fingerprints, start, run_start, False, bounds)
                break
            start = _cut_data(fingerprints, start, run_start, True, bounds)
            bounds.append((run_start, run_end, True))
            start = run_end
        else:
            _cut_data(fingerprints, start, whole, final, bounds)
        self._in_zero_run = bool(bounds) and bounds[-1][2] and bounds[-1][1] == whole
        return bounds


def _cut_data(
    fingerprints: np.ndarray,
    start: int,
    end: int,
    closed: bool,
    bounds: list[tuple[int, int, bool]],
) -> int:
    """Cut pages [start, end) into data chunks; return where the uncut rest starts.

    ``closed``: ``end`` is a real boundary (zeros follow, or the stream ends).
    """
    candidates = np.flatnonzero(fingerprints[start:end] % np.uint64(_AVG_PAGES) == 1)
    for cut in [*(candidates + start + 1).tolist(), *([end] if closed else [])]:
        while cut - start > _MAX_PAGES:
            bounds.append((start, start + _MAX_PAGES, False))
            start += _MAX_PAGES
        if cut - start >= _MIN_PAGES or (cut == end and closed and cut > start):
            bounds.append((start, cut, False))
            start = cut
    while end - start > _MAX_PAGES:
        bounds.append((start, start + _MAX_PAGES, False))
        start += _MAX_PAGES
    return start


# --- the store ------------------------------------------------------------------------------


@dataclass
class WriteStats:
    """What writing files cost: bytes in, chunks new to the store, and bytes written."""

    bytes_in: int = 0
    chunks: int = 0
    new_chunks: int = 0
    bytes_written: int = 0
    zero_bytes: int = 0


class ChunkStore:
    """The chunks of all images under one image store's root."""

    def __init__(self, root: Path, level: int = _LEVEL) -> None:
        self.dir = Path(root) / CHUNKS_DIR
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.level = level
        self._cache: OrderedDict[str, bytes | memoryview] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._writing: dict[str, threading.Event] = {}
        self._local = threading.local()  # a compressor per thread: each holds a context

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / digest[2:]

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold off garbage collection while chunks are written or read.

        A hibernation holds this from its first chunk until its manifest is
        committed (a chunk it found already stored, or just wrote, is
        referenced by no committed image until then), and a wake holds it while
        it reads chunks. A lock on a file: a crashed holder lets go.
        """
        fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def writer(self) -> ChunkWriter:
        """A file-like sink that stores what is written to it as chunks.

        Call it within :meth:`using`, held until the image that refers to the
        chunks is committed.
        """
        return ChunkWriter(self)

    def put(self, data: bytes | memoryview) -> tuple[str, int]:
        """Store one chunk unless the store has it; return its digest and the bytes written.

        Written to a temporary file, fsynced, then renamed: a chunk under its
        name is whole, so a later image may rely on it being there. The
        directory entry is made durable by :meth:`ChunkWriter.close`.
        """
        digest = blake3(data).hexdigest()
        path = self._path(digest)
        with self._cache_lock:  # a chunk repeated within a file is written once
            writing = self._writing.get(digest)
            if writing is None:
                self._writing[digest] = threading.Event()
        if writing is not None:
            writing.wait()
            return digest, 0
        try:
            return digest, 0 if path.exists() else self._write(path, data)
        finally:
            with self._cache_lock:
                self._writing.pop(digest).set()

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's: making one per chunk cost 2 % of a lazy wake's CPU."""
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _compress(self, data: bytes | memoryview) -> bytes | None:
        """The chunk compressed, or None where that does not pay.

        Two samples are tried first: on random data (a ratio of 1.0) compressing
        them costs 1/8 of compressing the chunk.
        """
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        middle = len(data) // 2
        sample = bytes(data[:_SAMPLE]) + bytes(data[middle : middle + _SAMPLE])
        if len(data) > 8 * _SAMPLE and len(sample) < _WORTH * len(compressor.compress(sample)):
            return None
        compressed = compressor.compress(data)
        return compressed if len(data) >= _WORTH * len(compressed) else None

    def _write(self, path: Path, data: bytes | memoryview) -> int:
        compressed = self._compress(data)
        header, body = (_RAW, data) if compressed is None else (_ZSTD, compressed)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.writev(fd, [bytes([header]), body])
            os.fsync(fd)
            uncache(fd)
        finally:
            os.close(fd)
        tmp.rename(path)
        return 1 + len(body)

    def get(self, digest: str, length: int) -> bytes | memoryview:
        """A chunk's bytes, checked against its digest: never hand out unverified bytes.
        A chunk stored raw comes as a view of what was read (no copy)."""
        if digest == ZERO:
            return bytes(length)
        with self._cache_lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return self._cache[digest]
        path = self._path(digest)
        try:
            stored = _read_once(path)
        except FileNotFoundError:
            raise ChunkError(
                f"chunk {digest} is missing from {self.dir}: the image is incomplete; "
                "it is kept for inspection"
            ) from None
        try:
            if stored[:1] == bytes([_ZSTD]):
                data = self._decompressor().decompress(stored[1:], max_output_size=length)
            elif stored[:1] == bytes([_RAW]):
                data = memoryview(stored)[1:]
            else:
                raise zstandard.ZstdError("unknown chunk header")
        except zstandard.ZstdError as exc:
            raise ChunkError(
                f"chunk {digest} ({path}) is damaged ({exc}): altered after hibernation; "
                "the image is kept for inspection"
            ) from None
        if len(data) != length or blake3(data).hexdigest() != digest:
            raise ChunkError(
                f"chunk {digest} ({path}) does not match its hash: altered after "
                "hibernation; the image is kept for inspection"
            )
        with self._cache_lock:
            self._cache[digest] = data
            while len(self._cache) > _CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def open(self, refs: Any) -> ChunkedFile:
        """A file from the chunk list a manifest holds (:meth:`ChunkedFile.to_json`)."""
        return ChunkedFile(self, _parse_refs(refs))

    def gc(self, referenced: Callable[[], Iterable[str]]) -> int | None:
        """Delete the chunks that ``referenced()`` (the committed images' digests) lacks.

        Runs only when nothing writes or reads chunks (None otherwise: try
        later): a chunk written or found by a hibernation not yet committed is
        referenced by no image, and must stay. Each deletion is one unlink of
        an unreferenced chunk, so a crash at any point leaves every committed
        image whole. Returns the number of files removed.
        """
        fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            keep = set(referenced())
            removed = 0
            for sub in self.dir.iterdir():
                if len(sub.name) != 2 or not sub.is_dir():
                    continue
                for chunk in sub.iterdir():
                    if chunk.name.startswith(_TMP_PREFIX) or sub.name + chunk.name not in keep:
                        chunk.unlink(missing_ok=True)
                        removed += 1
            return removed
        finally:
            os.close(fd)


def _parse_refs(refs: Any) -> tuple[tuple[str, int], ...]:
    """A manifest's chunk list, checked: it names files, so it must be exactly digests."""
    if not isinstance(refs, list):
        raise ChunkError(f"a chunk list must be a list, not {type(refs).__name__}")
    parsed = []
    for ref in refs:
        valid = isinstance(ref, list) and len(ref) == 2
        digest, length = ref if valid else ("", 0)
        hexadecimal = isinstance(digest, str) and len(digest) == 64
        hexadecimal = hexadecimal and all(c in "0123456789abcdef" for c in digest)
        if not (
            valid
            and (digest == ZERO or hexadecimal)
            and isinstance(length, int)
            and not isinstance(length, bool)
            and length > 0
        ):
            raise ChunkError(f"malformed chunk reference {ref!r}")
        parsed.append((digest, length))
    return tuple(parsed)


class ChunkWriter:
    """Chunks, hashes, compresses and stores one file as it is written.

    Chunks are stored by a few threads (hashing and compressing release the
    GIL; writing waits on fsync), at most 32 chunks (16 MiB) ahead of the writer.
    """

    def __init__(self, store: ChunkStore, readahead: int = 32) -> None:
        self.store = store
        self.stats = WriteStats()
        self._chunker = Chunker()
        self._pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="kernelhib-chunks")
        self._pending: deque[tuple[Future[tuple[str, int]] | None, int]] = deque()
        self._refs: list[tuple[str, int]] = []
        self._dirs: set[str] = set()
        self._limit = readahead

    def write(self, data: bytes | memoryview) -> int:
        """Take ``data``: chunks are views of it, hashed later, so it must not change."""
        self._submit(self._chunker.feed(data if isinstance(data, bytes) else bytes(data)))
        return len(data)

    def close(self) -> ChunkedFile:
        """Store the rest; make every chunk's directory entry durable; the file's chunks."""
        try:
            self._submit(self._chunker.finish())
            while self._pending:
                self._collect()
        finally:
            self.abort()
        for sub in sorted(self._dirs):
            fd = os.open(self.store.dir / sub, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return ChunkedFile(self.store, tuple(self._refs))

    def abort(self) -> None:
        """Stop storing: what was stored is left to garbage collection."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            if isinstance(chunk, int):
                self.stats.bytes_in += chunk
                self.stats.zero_bytes += chunk
                self._pending.append((None, chunk))
                continue
            self.stats.bytes_in += len(chunk)
            self._pending.append((self._pool.submit(self.store.put, chunk), len(chunk)))
            while len(self._pending) > self._limit:
                self._collect()

    def _collect(self) -> None:
        future, length = self._pending.popleft()
        digest, written = future.result() if future else (ZERO, 0)
        self.stats.chunks += 1
        if written:
            self.stats.new_chunks += 1
            self.stats.bytes_written += written
        if digest != ZERO:
            self._dirs.add(digest[:2])
        if self._refs and digest == ZERO and self._refs[-1][0] == ZERO:
            self._refs[-1] = (ZERO, self._refs[-1][1] + length)
        else:
            self._refs.append((digest, length))


class ChunkedFile:
    """A file stored as chunks: what a manifest lists instead of its whole-file hash.

    Every byte handed out was verified with its chunk's hash first.
    """

    def __init__(self, store: ChunkStore, refs: tuple[tuple[str, int], ...]) -> None:
        self.store = store
        self.refs = refs
        self._starts = [0]
        for _, length in refs:
            self._starts.append(self._starts[-1] + length)

    @property
    def size(self) -> int:
        return self._starts[-1]

    def to_json(self) -> list[list[str | int]]:
        return [[digest, length] for digest, length in self.refs]

    def digests(self) -> set[str]:
        """The stored chunks this file needs (what GC must keep)."""
        return {digest for digest, _ in self.refs if digest != ZERO}

    def pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        """``length`` bytes from ``offset`` (fewer at the end of the file), verified, as
        the chunks' own bytes (not copied into one)."""
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset}")
        end = min(offset + length, self.size)
        parts: list[bytes | memoryview] = []
        index = bisect.bisect_right(self._starts, offset) - 1
        while offset < end:
            digest, size = self.refs[index]
            start = self._starts[index]
            take = min(end, start + size) - offset
            if digest == ZERO:
                parts.append(bytes(take))
            else:
                chunk = memoryview(self.store.get(digest, size))
                parts.append(chunk[offset - start : offset - start + take])
            offset += take
            index += 1
        return parts

    def zeros(self) -> list[tuple[int, int]]:
        """(offset, length) of the all-zero chunks, adjacent ones merged."""
        ranges: list[tuple[int, int]] = []
        for (digest, length), start in zip(self.refs, self._starts, strict=False):
            if digest != ZERO:
                continue
            if ranges and sum(ranges[-1]) == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
        return ranges

    def blocks(self, readahead: int = 4, zero_block: int = 1 << 20) -> Iterator[bytes | memoryview]:
        """The whole file in order, chunk by chunk, each verified, a few read ahead in
        parallel (decompressing and hashing release the GIL). Long zero runs come
        as blocks of at most ``zero_block`` bytes."""
        with ThreadPoolExecutor(readahead, thread_name_prefix="kernelhib-unchunk") as pool:
            ahead: deque[Future[bytes | memoryview] | int] = deque()
            for digest, length in self.refs:
                get = self.store.get
                ahead.append(length if digest == ZERO else pool.submit(get, digest, length))
                if len(ahead) >= readahead:
                    yield from _ready(ahead.popleft(), zero_block)
            while ahead:
                yield from _ready(ahead.popleft(), zero_block)


def _ready(item: Future[bytes | memoryview] | int, zero_block: int) -> Iterator[bytes | memoryview]:
    if isinstance(item, int):
        zeros = bytes(min(item, zero_block))
        while item > 0:
            yield zeros[: min(item, zero_block)]
            item -= zero_block
    else:
        yield item.result()


class StreamedImage:
    """An engine's image files as they stream in or out: bulk files (``chunked(name)``)
    as chunks in the store, the rest as plain files in ``directory``.

    Both ends of the CRIU streamer (``engines.criu_stream``): an ``ImageSink`` on
    dump and an ``ImageSource`` on restore. On restore the plain files must
    have been checked against the signed manifest first; the chunked ones are
    checked chunk by chunk as they are read.
    """

    def __init__(
        self,
        store: ChunkStore,
        directory: Path,
        chunked: Callable[[str], bool],
        files: dict[str, ChunkedFile] | None = None,
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.chunked = chunked
        self.files: dict[str, ChunkedFile] = dict(files or {})
        self.stats = WriteStats()
        self._lock = threading.Lock()

    def receive(self, name: str, stream: BinaryIO) -> None:
        """Store one file read from ``stream`` to its end."""
        _plain_name(name)
        if not self.chunked(name):
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                while block := stream.read(_READ):
                    out.write(block)
            return
        writer = self.store.writer()
        try:
            while block := stream.read(_READ):
                writer.write(block)
        except BaseException:
            writer.abort()
            raise
        file = writer.close()
        with self._lock:
            self.files[name] = file
            for counter, value in vars(writer.stats).items():
                setattr(self.stats, counter, getattr(self.stats, counter) + value)

    def open(self, name: str) -> Iterable[bytes | memoryview] | None:
        """A file's verified bytes, in order; None if the image has none of that name."""
        _plain_name(name)
        if name in self.files:
            return self.files[name].blocks()
        if self.chunked(name):
            return None  # never a bulk file from the directory: only chunks are verified here
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        return _file_blocks(fd)


def _read_once(path: Path) -> bytes:
    """A chunk file's bytes, left out of the page cache as its writer left it.

    A chunk is written once at a hibernation and read once at a wake: kept cached,
    a wake would need fresh pages for the cache as well as for the kernel. Dropped,
    the same few pages serve chunk after chunk: a lazy wake of 4 GiB took a quarter
    to a half less CPU (docs/performance.md).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        uncache(fd)
        return data
    finally:
        os.close(fd)


def _plain_name(name: str) -> None:
    """CRIU names image files plainly; anything else would leave the directory."""
    if not name or "/" in name or name.startswith("."):
        raise ChunkError(f"refusing image file name {name!r}")


def _file_blocks(fd: int) -> Iterator[bytes]:
    with os.fdopen(fd, "rb") as f:
        while block := f.read(_READ):
            yield block
