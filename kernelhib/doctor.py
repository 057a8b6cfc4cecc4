"""Tell an admin which hibernation engines work here, and what to do if none.

Each engine answers for itself (:meth:`Engine.availability`); a new engine
gets its row by being added to the list in :func:`diagnose`. The CRIU asked
about is the one the Jupyter server is configured with: :func:`server_setting`
reads the server's configuration as jupyter_server does.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_config_path
from traitlets.config.loader import (
    ConfigFileNotFound,
    JSONFileConfigLoader,
    KVArgParseConfigLoader,
    PyFileConfigLoader,
)

from . import provisioner
from .app import KernelHibernatorApp
from .engines.base import Availability, Engine
from .engines.criu import CriuEngine
from .engines.criu_install import locate_criu, version_text
from .engines.cuda import GpuCheckpoint, check
from .engines.dill import DillEngine
from .hibernator import KernelHibernator

# The files jupyter_server reads KernelHibernator's settings from, lowest
# priority first: its extension apps merge their own file under the server's.
CONFIG_FILES = (
    "jupyter_config",
    f"jupyter_{KernelHibernatorApp.name}_config",
    "jupyter_server_config",
)


@dataclass(frozen=True)
class Setting:
    """A configured value and where it was set; ``source`` is empty when nowhere.

    ``problems`` names the configuration the server would skip, or fail on.
    """

    value: Any
    source: str
    problems: tuple[str, ...] = ()


def server_setting(name: str) -> Setting:
    """``KernelHibernator.<name>`` as the Jupyter server gets it, and from where; its
    default where it is set nowhere.

    Config files come from the Jupyter config path, as the server reads them;
    the running server's command line overrides them, and is where JupyterHub's
    spawners put their settings.
    """
    setting = Setting(KernelHibernator.class_traits()[name].default_value, "")
    problems: list[str] = []
    for file in CONFIG_FILES:
        for directory in reversed(jupyter_config_path()):
            for loader in (
                PyFileConfigLoader(f"{file}.py", path=directory),
                JSONFileConfigLoader(f"{file}.json", path=directory),
            ):
                try:
                    config = loader.load_config()
                except ConfigFileNotFound:
                    continue
                except Exception as exc:  # the server logs and skips such a file too
                    problems.append(f"{loader.full_filename} does not load: {exc}")
                    continue
                if name in config.KernelHibernator:
                    setting = Setting(config.KernelHibernator[name], loader.full_filename)
    pid = _server_pid()
    argv = _command_line(pid) if pid else []
    option = f"--KernelHibernator.{name}"
    options = [
        token
        for index, token in enumerate(argv)
        if token.startswith(option) or (index and argv[index - 1] == option)
    ]
    if options:
        try:
            config = KVArgParseConfigLoader(options, classes=[KernelHibernator]).load_config()
        except Exception as exc:  # the server would not have started with it
            problems.append(f"the command line of the Jupyter server (pid {pid}): {exc}")
        else:
            source = f"the command line of the Jupyter server (pid {pid})"
            setting = Setting(config.KernelHibernator[name], source)
    return replace(setting, problems=tuple(problems))


def _server_pid() -> int | None:
    """The running Jupyter server this process runs under, else the only one running."""
    from jupyter_server.serverapp import list_running_servers

    running = {info["pid"] for info in list_running_servers() if "pid" in info}
    mine = next((pid for pid in _ancestors() if pid in running), None)
    return mine or (next(iter(running)) if len(running) == 1 else None)


def _ancestors() -> Iterator[int]:
    """This process's parent, grandparent... (a terminal's or a kernel's server among them)."""
    pid = os.getppid()
    while pid > 1:
        yield pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        pid = int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")]


def gpu_requirements() -> GpuCheckpoint | None:
    """On a host with NVIDIA GPUs, what CRIU needs to checkpoint CUDA kernels; else None."""
    return check() if provisioner.NVIDIA_CONTROL_DEVICE.exists() else None


def diagnose(
    criu_path: str = "", gpu: GpuCheckpoint | None = None, lazy_wake: bool = True
) -> list[tuple[str, Availability]]:
    """Each engine's name and whether it works here; ``criu_path`` and ``lazy_wake`` are
    the server's settings, ``gpu`` :func:`gpu_requirements`'s answer."""
    engines: list[Engine] = [CriuEngine(criu_path, lazy=lazy_wake), DillEngine()]
    reports = [(engine.name, engine.availability()) for engine in engines]
    return [
        (name, _on_gpu_host(report, gpu) if name == CriuEngine.name else report)
        for name, report in reports
    ]


def _on_gpu_host(report: Availability, gpu: GpuCheckpoint | None) -> Availability:
    """Whether a working CRIU hibernates the kernels of this GPU host: say so."""
    if not report.ok or gpu is None:
        return report
    if gpu.ok:
        return replace(report, detail=f"{report.detail}; {provisioner.SAME_PIDS}")
    detail = (
        f"{report.detail}; but {provisioner.ON_GPU_HOST}, and CRIU cannot checkpoint CUDA "
        "here (see GPU KERNELS), so they are hibernated with dill"
    )
    remedy = f"meet the GPU requirements below; or {provisioner.IF_NO_CUDA}"
    return replace(report, detail=detail, remedy=remedy)


def describe_setting(setting: Setting) -> str:
    """Say which ``criu_path`` the server gets and where from, for ``kernelhib doctor``."""
    if setting.source:
        text = f"KernelHibernator.criu_path = {setting.value!r}, from {setting.source}."
    else:
        text = (
            "KernelHibernator.criu_path is not set (in no config file on the Jupyter config "
            "path, nor on a running server's command line): the server uses criu on PATH if "
            "it works, else the one `kernelhib install-criu` installed."
        )
    return "\n".join([text, *(f"Warning: {problem}" for problem in setting.problems)])


def as_json(
    setting: Setting,
    reports: Sequence[tuple[str, Availability]],
    gpu: GpuCheckpoint | None = None,
) -> dict[str, Any]:
    """``kernelhib doctor --json``: the setting, the CRIU it selects, each engine's report,
    and on a GPU host what CRIU needs for CUDA kernels.

    ``criu`` is null unless the CRIU engine works; ``source`` is null when unset;
    ``gpu`` is null on a host without NVIDIA GPUs.
    """
    criu = None
    if dict(reports)[CriuEngine.name].ok:
        binary = locate_criu(setting.value)  # cached: the engine just found it
        criu = {"path": str(binary.path), "version": version_text(binary.version)}
    return {
        "criu_path": asdict(setting) | {"source": setting.source or None},
        "criu": criu,
        "engines": [{"name": name, **asdict(report)} for name, report in reports],
        "gpu": None if gpu is None else {"ok": gpu.ok, **asdict(gpu)},
    }


def format_table(reports: Sequence[tuple[str, Availability]]) -> str:
    """Render :func:`diagnose`'s answer as the plain-text table ``kernelhib doctor`` prints."""
    rows = [
        [name, "works" if report.ok else "unavailable", report.detail, report.remedy]
        for name, report in reports
    ]
    return render_table(["ENGINE", "STATUS", "DETAILS", "WHAT TO DO"], rows, wrap={2: 60, 3: 40})


def format_gpu_table(gpu: GpuCheckpoint) -> str:
    """Each requirement for CRIU to checkpoint CUDA kernels, as ``kernelhib doctor`` prints it."""
    rows = [
        [need.name, "yes" if need.ok else "no", need.detail, need.remedy]
        for need in gpu.requirements
    ]
    headers = ["GPU KERNELS: CRIU NEEDS", "MET", "DETAILS", "WHAT TO DO"]
    return render_table(headers, rows, wrap={2: 60, 3: 40})


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
