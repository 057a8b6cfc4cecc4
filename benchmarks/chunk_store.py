"""Measure the chunk store: chunking + hashing + compressing throughput, zstd levels on a
real CRIU page file, and ``criu dump/restore --stream`` into the store against plain files.

Throughput is given per wall second and per CPU second of this process (the
second holds on a machine others are using too). Needs root and CRIU for the
CRIU parts. Run from the repository root::

    .venv/bin/python benchmarks/chunk_store.py --size-mib 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard
from blake3 import blake3

from kernelhib.chunk_store import ChunkedFile, ChunkStore, ChunkWriter, StreamedImage
from kernelhib.disk_io import fsync
from kernelhib.engines.criu import CriuEngine
from kernelhib.engines.criu_install import locate_criu
from kernelhib.engines.criu_stream import Streamer

MiB = 1 << 20
# A data-science kernel: a DataFrame of int, float, category and string columns.
DATAFRAME = r"""
import os, sys, time
import numpy as np, pandas as pd
rows = int(sys.argv[1])
rng = np.random.default_rng(0)
df = pd.DataFrame({
    "id": np.arange(rows),
    "value": rng.normal(size=rows).round(3),
    "kind": pd.Categorical(rng.choice(["red", "green", "blue", "black"], rows)),
    "name": [f"customer-{i % 50000}" for i in range(rows)],
})
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(0.05)
"""
_FLAGS = ["--tcp-close", "--shell-job", "--ext-unix-sk", "--file-locks", "-v2"]


def timed(work: Callable[[], object]) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def synthetic(size: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    line = b"2024-01-01,customer-000123,red,3.141,OK\n"
    return {
        "random": rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
        "zeros": bytes(size),
        "text": (line * (size // len(line) + 1))[:size],
        "float64": rng.normal(size=size // 8).round(2).tobytes(),
    }


def row(name: str, size: int, wall: float, cpu: float, stored: str = "") -> None:
    print(
        f"| {name} | {wall:.2f} s | {size / wall / 1e9:.2f} | {size / cpu / 1e9:.2f} | {stored} |"
    )


def store_throughput(root: Path, size: int) -> None:
    print(f"\n## Chunk store, {size // MiB} MiB per workload, store in {root}")
    print("| Data | Wall | GB/s (wall) | GB/s per CPU-s | Stored / in |")
    print("|---|---|---|---|---|")
    data = synthetic(size)["random"]
    for name, work in (
        ("baseline: copy", lambda: bytearray(data)),
        ("baseline: blake3, 1 thread", lambda: blake3(data).digest()),
        ("baseline: zstd -1, 1 thread", lambda: zstandard.ZstdCompressor(level=1).compress(data)),
    ):
        row(name, size, *timed(work)[1:])
    for name, data in synthetic(size).items():
        (root / name).mkdir()
        writer = ChunkStore(root / name).writer()

        def write(writer: ChunkWriter = writer, data: bytes = data) -> ChunkedFile:
            for offset in range(0, len(data), 8 * MiB):
                writer.write(data[offset : offset + 8 * MiB])
            return writer.close()

        file, wall, cpu = timed(write)
        row(name, size, wall, cpu, f"{writer.stats.bytes_written / size:.3f}")
        fresh = ChunkStore(root / name).open(file.to_json())  # type: ignore[attr-defined]
        _, wall, cpu = timed(lambda fresh=fresh: sum(len(b) for b in fresh.blocks()))
        row(f"{name}, read back", size, wall, cpu)
        shutil.rmtree(root / name)


def dataframe_holder(rows: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    ready = workdir / "ready"
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "setsid", sys.executable, "-c",
         DATAFRAME, str(rows), str(ready)],
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not ready.exists():
        time.sleep(0.05)
    children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text()
    return holder, int(children.split()[0])


def criu(binary: str, directory: Path, log: Path, *args: str) -> None:
    command = [binary, *args, "-D", str(directory), "-o", str(log), *_FLAGS]
    if subprocess.run(command, capture_output=True).returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")


def zstd_levels(pages: bytes) -> None:
    print(
        f"\n## zstd on a DataFrame kernel's page file ({len(pages) / MiB:.0f} MiB), 256 KiB blocks"
    )
    print("| Level | Ratio | GB/s per CPU-s |")
    print("|---|---|---|")
    blocks = [pages[i : i + 256 * 1024] for i in range(0, len(pages), 256 * 1024)]
    for level in (1, 2, 3):
        compressor = zstandard.ZstdCompressor(level=level)
        out, _, cpu = timed(lambda c=compressor: sum(len(c.compress(b)) for b in blocks))
        print(f"| {level} | {len(pages) / out:.2f} | {len(pages) / cpu / 1e9:.2f} |")  # type: ignore[operator]


def dump_compare(binary: str, rows: int, workdir: Path) -> None:
    """Plain dump to files + fsync, against --stream into the chunk store; and restores."""
    print(f"\n## CRIU dump/restore of a DataFrame kernel ({rows} rows)")
    holder, pid = dataframe_holder(rows, workdir)
    try:
        plain = workdir / "plain"
        plain.mkdir()

        def plain_dump() -> None:
            criu(binary, plain, plain / "dump.log", "dump", "--leave-running", "-t", str(pid))
            for file in plain.iterdir():
                fsync(file)
            fsync(plain)

        _, wall, _ = timed(plain_dump)
        size = sum(f.stat().st_size for f in plain.glob("pages-*.img"))
        print(f"plain dump + fsync: {wall:.2f} s, {size / MiB:.0f} MiB of pages")
        zstd_levels(b"".join(f.read_bytes() for f in sorted(plain.glob("pages-*.img"))))
        (workdir / "store").mkdir()
        store = ChunkStore(workdir / "store")
        streamed = workdir / "streamed"
        (streamed / "files").mkdir(parents=True)
        image = StreamedImage(store, streamed / "files", CriuEngine.is_bulk)

        def stream_dump() -> None:
            with store.using(), Streamer(streamed, sink=image):
                log = streamed / "dump.log"
                criu(binary, streamed, log, "dump", "--stream", "--leave-running", "-t", str(pid))

        _, wall, cpu = timed(stream_dump)
        print(
            f"stream dump into chunks: {wall:.2f} s ({cpu:.2f} CPU-s in the streamer), "
            f"{image.stats.bytes_written / MiB:.1f} MiB written, image/pages = "
            f"{image.stats.bytes_written / size:.3f}"
        )
    finally:
        holder.kill()
        holder.wait()
    restore_flags = ["--restore-detached", "--restore-sibling", "--pidfile"]
    for name, source in (("plain", None), ("stream", image)):
        target = workdir / f"restore-{name}"
        target.mkdir()
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")

        def restore(target: Path = target, source: StreamedImage | None = source) -> int:
            pidfile = target / "pid"
            if source is None:
                criu(binary, plain, target / "log", "restore", *restore_flags, str(pidfile))
            else:
                with store.using(), Streamer(target, source=source):
                    criu(binary, target, target / "log", "restore", "--stream", *restore_flags,
                         str(pidfile))  # fmt: skip
            return int(pidfile.read_text())

        restored, wall, cpu = timed(restore)
        print(f"{name} restore, cold cache: {wall:.2f} s ({cpu:.2f} CPU-s here)")
        os.kill(restored, 9)  # type: ignore[arg-type]
        os.waitpid(restored, 0)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    parser.add_argument("--no-criu", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kernelhib-bench-") as tmp:
        store_throughput(Path(tmp), args.size_mib * MiB)
    if not args.no_criu:
        with tempfile.TemporaryDirectory(prefix="kernelhib-bench-") as tmp:
            dump_compare(str(locate_criu().path), args.rows, Path(tmp))


if __name__ == "__main__":
    main()
