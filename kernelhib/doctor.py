"""Tell an admin which hibernation engines work here, and what to do if none.

Each engine answers for itself (:meth:`Engine.availability`); a new engine
gets its row by being added to the list in :func:`diagnose`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import replace

from . import provisioner
from .engines.base import Availability, Engine
from .engines.criu import CriuEngine
from .engines.dill import DillEngine


def diagnose(criu_path: str = "") -> list[tuple[str, Availability]]:
    """Each engine's name and whether it works here; ``criu_path`` is the configured CRIU."""
    engines: list[Engine] = [CriuEngine(criu_path), DillEngine()]
    reports = [(engine.name, engine.availability()) for engine in engines]
    return [
        (name, _on_gpu_host(report) if name == CriuEngine.name else report)
        for name, report in reports
    ]


def _on_gpu_host(report: Availability) -> Availability:
    """A working CRIU still hibernates no kernel of a GPU host by default: say so."""
    if not (report.ok and provisioner.NVIDIA_CONTROL_DEVICE.exists()):
        return report
    detail = f"{report.detail}; but {provisioner.ON_GPU_HOST}, and are hibernated with dill"
    return replace(report, detail=detail, remedy=provisioner.IF_NO_CUDA)


def format_table(reports: Sequence[tuple[str, Availability]]) -> str:
    """Render :func:`diagnose`'s answer as the plain-text table ``kernelhib doctor`` prints."""
    rows = [
        [name, "works" if report.ok else "unavailable", report.detail, report.remedy]
        for name, report in reports
    ]
    return render_table(["ENGINE", "STATUS", "DETAILS", "WHAT TO DO"], rows, wrap={2: 60, 3: 40})


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], wrap: dict[int, int] | None = None
) -> str:
    """Align ``rows`` under ``headers``; columns in ``wrap`` wrap at that width."""
    wrap = wrap or {}

    def lines_of(column: int, text: str) -> list[str]:
        if column not in wrap:
            return text.splitlines() or [""]
        return [
            wrapped
            for line in text.splitlines()
            for wrapped in textwrap.wrap(
                line, wrap[column], break_long_words=False, break_on_hyphens=False
            )
            or [""]
        ] or [""]

    cells = [[lines_of(column, text) for column, text in enumerate(row)] for row in rows]
    widths = [
        max([len(header), *(len(line) for row in cells for line in row[column])])
        for column, header in enumerate(headers)
    ]

    def render(values: Sequence[str]) -> str:
        padded = (value.ljust(width) for value, width in zip(values, widths, strict=True))
        return "  ".join(padded).rstrip()

    out = [render(headers), render(["-" * width for width in widths])]
    for row in cells:
        for index in range(max(len(lines) for lines in row)):
            out.append(render([lines[index] if index < len(lines) else "" for lines in row]))
    return "\n".join(out)
