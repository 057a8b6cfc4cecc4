"""What a lazily woken task still lacks, as its memory changes (no CRIU needed)."""

from __future__ import annotations

import socket
import struct

from kernelhib.engines.lazy_pages import split_at
from kernelhib.engines.userfaultfd import RESTORE_FINISHED, Handoff, Run, Runs


def spans(runs: Runs) -> list[tuple[int, int, int]]:
    """What ``runs`` holds (taking all of it)."""
    return [(run.start, run.end, run.image) for run in runs.take(0, 1 << 64)]


def test_taking_a_range_cuts_the_runs_it_crosses_and_keeps_their_image_addresses() -> None:
    runs = Runs([Run(0x1000, 0x5000, 0x1000), Run(0x8000, 0x9000, 0x8000)])
    taken = runs.take(0x3000, 0x8800)
    assert [(r.start, r.end, r.image) for r in taken] == [
        (0x3000, 0x5000, 0x3000),
        (0x8000, 0x8800, 0x8000),
    ]
    assert runs.find(0x2FFF) is not None and runs.find(0x3000) is None
    assert spans(runs) == [(0x1000, 0x3000, 0x1000), (0x8800, 0x9000, 0x8800)]


def test_a_move_carries_what_is_missing_and_drops_what_was_mapped_at_the_target() -> None:
    runs = Runs([Run(0x1000, 0x3000, 0x1000), Run(0x10000, 0x11000, 0x10000)])
    runs.move(0x1000, 0x3000, 0x10000)  # mremap over an old mapping
    child = runs.copy()  # a fork: the child lacks what its parent lacked
    child.take(0x10000, 0x11000)
    assert spans(child) == [(0x11000, 0x12000, 0x2000)]
    assert spans(runs) == [(0x10000, 0x12000, 0x1000)]


def test_runs_are_cut_at_the_ends_of_memory_areas() -> None:
    assert split_at(0x1000, 0x9000, [0x0, 0x4000, 0x9000, 0xA000]) == [
        (0x1000, 0x4000),
        (0x4000, 0x9000),
    ]


def test_the_handoff_reads_each_task_and_its_descriptor_then_the_end() -> None:
    ours, criu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handoff = Handoff(ours)
    reader, writer = socket.socketpair()
    criu.send(struct.pack("<i", 7))
    socket.send_fds(criu, [b"\0"], [reader.fileno()])
    criu.send(struct.pack("<i", -8))  # a zombie: no descriptor
    criu.send(struct.pack("<I", RESTORE_FINISHED))
    criu.close()
    messages = []
    while (got := handoff.read()) is not None:
        messages += got
    assert [pid for pid, _ in messages] == [7, -8, RESTORE_FINISHED]
    fd = messages[0][1]
    assert fd is not None and messages[1][1] is None
    writer.send(b"x")  # the descriptor that came is the one sent
    assert socket.socket(fileno=fd).recv(1) == b"x"
    handoff.close()
    reader.close()
    writer.close()
