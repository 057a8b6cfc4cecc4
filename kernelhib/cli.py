"""The ``kernelhib`` command: install CRIU, diagnose, and drive a server.

A thin layer over :mod:`kernelhib.engines.criu_install`, :mod:`kernelhib.doctor`
and :mod:`kernelhib.server_client`: it parses arguments, prints results and
turns failures into a message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelhib import server_client
from kernelhib.doctor import (
    Setting,
    as_json,
    describe_setting,
    diagnose,
    format_gpu_table,
    format_table,
    gpu_requirements,
    render_table,
    server_setting,
)
from kernelhib.engines.base import ENGINE_CHOICES
from kernelhib.engines.criu_install import DEBIAN_SOURCES, CriuUnavailable, install_criu
from kernelhib.hibernator import Operation, Reason


class UsageError(ValueError):
    """The arguments, though each valid, do not go together."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``kernelhib`` subcommand and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        parser.error(str(exc))
    except (CriuUnavailable, server_client.ServerError) as exc:
        print(f"kernelhib {args.command}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(
            f"kernelhib {args.command}: interrupted; the server carries on with what it was "
            "asked: `kernelhib list` shows how it ends",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelhib", description="Hibernate idle Jupyter kernels to disk and wake them intact."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    install = commands.add_parser(
        "install-criu",
        help="install the pinned CRIU >= 4.2 from Debian's packages into a private prefix",
    )
    install.add_argument(
        "--prefix", type=Path, help="install here instead of kernelhib's data directory"
    )
    install.add_argument("--force", action="store_true", help="reinstall even if it works")
    install.add_argument(
        "--debian-source",
        action="append",
        dest="sources",
        metavar="LINE",
        help="a sources.list line to take the pinned packages from, e.g. a local mirror; "
        "repeat it for fallbacks, tried in order (default: "
        + "; ".join(f"'{source}'" for source in DEBIAN_SOURCES)
        + ")",
    )
    install.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="if no source has the pinned packages any more (or this architecture has no "
        "pins), install the first source's current ones, unverified",
    )
    install.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="do not require `criu check` to pass here, e.g. in an image build, which lacks "
        "the capabilities CRIU needs; check with `kernelhib doctor` where the server runs",
    )
    install.set_defaults(run=_install_criu)

    doctor = commands.add_parser(
        "doctor",
        help="tell which hibernation engines work here, with the Jupyter server's configuration",
    )
    doctor.add_argument(
        "--criu-path",
        default="",
        help="check this criu binary instead of the server's KernelHibernator.criu_path",
    )
    doctor.add_argument("--json", action="store_true", help="print the answer as JSON")
    doctor.set_defaults(run=_doctor)

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url",
        help="the Jupyter server's URL (default: in a JupyterHub server, that server; "
        "else the first running server)",
    )
    server.add_argument("--token", help="its token (default: the running server's)")
    server.add_argument("--json", action="store_true", help="print the answer as JSON")

    listing = commands.add_parser("list", parents=[server], help="list the server's kernels")
    listing.set_defaults(run=_list)

    hibernate = commands.add_parser(
        "hibernate", parents=[server], help="hibernate kernels (exit status 3: busy, --force)"
    )
    hibernate.add_argument("kernel_ids", nargs="*", metavar="KERNEL_ID")
    hibernate.add_argument(
        "--all-idle", action="store_true", help="hibernate every kernel that is idle now"
    )
    hibernate.add_argument(
        "--force",
        action="store_true",
        help="hibernate even a busy kernel: its running cell is frozen and carries on after wake",
    )
    hibernate.add_argument(
        "--engine", choices=ENGINE_CHOICES, help="default: the server's KernelHibernator.engine"
    )
    hibernate.set_defaults(run=_hibernate)

    wake = commands.add_parser("wake", parents=[server], help="wake hibernated kernels")
    wake.add_argument("kernel_ids", nargs="+", metavar="KERNEL_ID")
    wake.set_defaults(run=_wake)

    recompute = commands.add_parser(
        "recompute",
        parents=[server],
        help="run the cells that re-create the variables a dill wake lost",
    )
    recompute.add_argument("kernel_ids", nargs="+", metavar="KERNEL_ID")
    recompute.add_argument(
        "--dry-run", action="store_true", help="only list each lost name and its cells"
    )
    recompute.set_defaults(run=_recompute)
    return parser


def _install_criu(args: argparse.Namespace) -> int:
    install_criu(  # its log says where and which
        args.prefix,
        force=args.force,
        allow_unpinned=args.allow_unpinned,
        check=args.check,
        sources=args.sources or DEBIAN_SOURCES,
        log=print,
    )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    setting = (
        Setting(args.criu_path, "--criu-path") if args.criu_path else server_setting("criu_path")
    )
    gpu = gpu_requirements()
    reports = diagnose(setting.value, gpu, server_setting("lazy_wake").value)
    if args.json:
        print(json.dumps(as_json(setting, reports, gpu), indent=2))
    else:
        print(f"{describe_setting(setting)}\n\n{format_table(reports)}")
        if gpu is not None:
            print(f"\n{format_gpu_table(gpu)}")
    return 0 if any(report.ok for _, report in reports) else 1


def _list(args: argparse.Namespace) -> int:
    server = server_client.find_server(args.url, args.token)
    kernels = server_client.list_kernels(server)
    paths = server_client.notebook_paths(server)
    listed = [_listed(kernel, paths.get(kernel["id"], [])) for kernel in kernels]
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [
        [
            kernel["id"],
            kernel["name"],
            kernel["state"],
            human_bytes(kernel["memory_bytes"]) if kernel["memory_bytes"] is not None else "",
            human_bytes(kernel["image_bytes"]) if kernel["image_bytes"] is not None else "",
            ", ".join(kernel["paths"]),
        ]
        for kernel in listed
    ]
    print(render_table(["ID", "NAME", "STATE", "MEMORY", "IMAGE", "NOTEBOOK"], rows))
    for kernel in listed:
        if kernel["error"]:
            # CRIU's errors run over several lines: they stay under their kernel.
            print(f"Kernel {kernel['id']}: {kernel['error']}".replace("\n", "\n  "))
    return 0


def _listed(kernel: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """One kernel as ``kernelhib list`` shows it, and as ``--json`` prints it.

    ``memory_bytes``: a running kernel's memory (what hibernating it would
    free), a hibernated one's as it was, freed when it hibernated.
    """
    hibernation = kernel.get("hibernation") or {}
    state = server_client.state_of(kernel)
    has_image = state in ("hibernating", "hibernated", "waking") and "engine" in hibernation
    return {
        "id": kernel["id"],
        "name": kernel.get("name", ""),
        "state": state,
        "paths": paths,
        "memory_bytes": hibernation.get("freed_bytes") if has_image else kernel.get("memory_bytes"),
        "image_bytes": hibernation.get("image_bytes") if has_image else None,
        "engine": hibernation.get("engine") if has_image else None,
        "error": hibernation.get("error") or None,
        "hibernation": kernel.get("hibernation"),
    }


# Exit statuses, decided from the server's reason codes (kernelhib.hibernator.Reason).
FAILED = 1
BUSY = 3  # a cell runs: --force (or later) may do it
IN_FLIGHT = 4  # another operation on the kernel is in flight: try again once it is done
EXIT_STATUS = {
    Reason.BUSY: BUSY,
    Reason.BUSY_NEEDS_CRIU: BUSY,
    **{Reason(operation.value): IN_FLIGHT for operation in Operation},
}
# With --all-idle, a kernel that changed since it was listed idle is skipped, not failed.
CHANGED_SINCE_LISTED = {
    *EXIT_STATUS,
    Reason.NOT_FOUND,
    Reason.NOT_RUNNING,
    Reason.HIBERNATED,
}


@dataclass(eq=False)
class Outcome:
    """What became of one kernel a command was asked to hibernate or wake."""

    kernel_id: str
    kernel: dict[str, Any] | None = None  # its model once done
    error: server_client.ServerError | None = None
    already: bool = False  # nothing to do: it was hibernated already
    skipped: bool = False  # --all-idle: no longer idle when its turn came; not a failure

    @property
    def exit_status(self) -> int:
        if self.error is None or self.skipped:
            return 0
        return EXIT_STATUS.get(self.error.reason, FAILED)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.kernel_id,
            "ok": self.error is None,
            "skipped": self.skipped,
            "state": server_client.state_of(self.kernel) if self.kernel else None,
            "kernel": self.kernel,
            "reason": (self.error.reason or None) if self.error else None,
            "message": str(self.error) if self.error else None,
        }


def _hibernate(args: argparse.Namespace) -> int:
    if args.all_idle == bool(args.kernel_ids):
        raise UsageError("name the kernels to hibernate, or pass --all-idle, not both")
    server = server_client.find_server(args.url, args.token)
    kernel_ids = args.kernel_ids or [
        kernel["id"]
        for kernel in server_client.list_kernels(server)
        if server_client.state_of(kernel) == "idle"
    ]
    if not kernel_ids and not args.json:
        print("No kernel is idle: nothing to hibernate.")

    def hibernate(kernel_id: str) -> Outcome:
        try:
            kernel = server_client.hibernate(
                server, kernel_id, engine=args.engine, force=args.force
            )
            return Outcome(kernel_id, kernel)
        except server_client.ServerError as exc:
            if exc.reason != Reason.HIBERNATED or args.all_idle:
                skipped = args.all_idle and exc.reason in CHANGED_SINCE_LISTED
                return Outcome(kernel_id, error=exc, skipped=skipped)
            return Outcome(kernel_id, server_client.get_kernel(server, kernel_id), already=True)

    outcomes = [
        _waiting(server, kernel_id, "hibernating", args, lambda k=kernel_id: hibernate(k))
        for kernel_id in kernel_ids
    ]
    return _report(args, outcomes, _hibernated_text)


def _hibernated_text(outcome: Outcome) -> str:
    if outcome.already:
        return f"Kernel {outcome.kernel_id} was hibernated already"
    info = (outcome.kernel or {}).get("hibernation") or {}
    return (
        f"Hibernated kernel {outcome.kernel_id} with {info.get('engine', '?')} in "
        f"{info.get('seconds', 0):.1f} s: image {human_bytes(info.get('image_bytes'))}, "
        f"memory freed {human_bytes(info.get('freed_bytes'))}"
    )


def _wake(args: argparse.Namespace) -> int:
    server = server_client.find_server(args.url, args.token)

    def wake(kernel_id: str) -> Outcome:
        try:
            return Outcome(kernel_id, server_client.wake(server, kernel_id))
        except server_client.ServerError as exc:
            return Outcome(kernel_id, error=exc)

    outcomes = [
        _waiting(server, kernel_id, "waking", args, lambda k=kernel_id: wake(k))
        for kernel_id in args.kernel_ids
    ]
    return _report(args, outcomes, _woken_text)


def _woken_text(outcome: Outcome) -> str:
    state = (outcome.kernel or {}).get("execution_state", "starting")
    plan = ((outcome.kernel or {}).get("hibernation") or {}).get("recompute") or {}
    back = [f"  recomputed {', '.join(plan['recomputed'])}"] if plan.get("recomputed") else []
    head = f"Woke kernel {outcome.kernel_id}; it is {state}"
    return "\n".join([head, *back, *_offer(outcome)])


def _recompute(args: argparse.Namespace) -> int:
    server = server_client.find_server(args.url, args.token)

    def recompute(kernel_id: str) -> Outcome:
        try:
            if args.dry_run:
                return Outcome(kernel_id, server_client.get_kernel(server, kernel_id))
            return Outcome(kernel_id, server_client.recompute(server, kernel_id))
        except server_client.ServerError as exc:
            if exc.reason != Reason.NOTHING_TO_RECOMPUTE:
                return Outcome(kernel_id, error=exc)
            return Outcome(kernel_id, server_client.get_kernel(server, kernel_id), already=True)

    outcomes = [
        _waiting(server, kernel_id, "recomputing", args, lambda k=kernel_id: recompute(k))
        for kernel_id in args.kernel_ids
    ]
    return _report(args, outcomes, lambda outcome: _recomputed_text(outcome, args.dry_run))


def _recomputed_text(outcome: Outcome, dry_run: bool) -> str:
    plan = ((outcome.kernel or {}).get("hibernation") or {}).get("recompute") or {}
    if dry_run:
        head = (
            f"Kernel {outcome.kernel_id}:" if plan else f"Kernel {outcome.kernel_id} lost nothing"
        )
    elif outcome.already:
        head = f"Kernel {outcome.kernel_id}: nothing to recompute"
    else:
        head = f"Recomputed in kernel {outcome.kernel_id}: {', '.join(plan['recomputed'])}"
    return "\n".join([head, *_offer(outcome, hint=dry_run)])


def _offer(outcome: Outcome, hint: bool = True) -> list[str]:
    """Each lost name with the cells that re-create it and when they last ran, or why
    they may not run; and the command that runs them."""
    plan = ((outcome.kernel or {}).get("hibernation") or {}).get("recompute") or {}
    cells = {cell["number"]: cell for cell in plan.get("cells", [])}
    lines = []
    for entry in plan.get("names", []):
        text = f"  lost {entry['name']}: cells " if entry["cells"] else f"  lost {entry['name']}"
        text += ", ".join(_cell_text(cells[n]) for n in entry["cells"])
        if "refused" in entry:
            text += f"; not recomputed: {entry['refused']}"
        lines.append(text)
    notebook = plan.get("notebook") or {}
    if notebook.get("changed"):
        lines.append(
            f"  {notebook['path']} changed since the kernel hibernated: the cells run as they "
            "ran then, recorded in the image"
        )
    if plan.get("failed"):
        failed = plan["failed"]
        lines.append(f"  cell [{failed['cell']}] failed: {failed['error']}")
    if hint and plan.get("run"):
        cells_text = ", ".join(f"[{n}]" for n in plan["run"])
        lines.append(f"  Run `kernelhib recompute {outcome.kernel_id}` to run cells {cells_text}.")
    return lines


def _cell_text(cell: dict[str, Any]) -> str:
    """``[3] (notebook cell 2, last run 13:52:01)``."""
    facts = []
    if cell.get("notebook_cell") is not None:
        facts.append(f"notebook cell {cell['notebook_cell'] + 1}")
    if cell.get("last_run"):
        facts.append(
            f"last run {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(cell['last_run']))}"
        )
    return f"[{cell['number']}]" + (f" ({', '.join(facts)})" if facts else "")


def _report(
    args: argparse.Namespace, outcomes: list[Outcome], done_text: Callable[[Outcome], str]
) -> int:
    """Print what became of each kernel; the exit status is the first failure's."""
    if args.json:
        print(json.dumps([outcome.as_json() for outcome in outcomes], indent=2))
    for outcome in [] if args.json else outcomes:
        if outcome.error is None:
            print(done_text(outcome))
        elif outcome.skipped:
            print(f"Skipped kernel {outcome.kernel_id}: {outcome.error}")
        else:
            print(f"kernelhib {args.command}: {outcome.error}", file=sys.stderr)
            if outcome.error.reason == Reason.BUSY:
                print(
                    f"It is running a cell: `kernelhib hibernate --force {outcome.kernel_id}` "
                    "freezes the cell, which carries on after the wake.",
                    file=sys.stderr,
                )
    return next((outcome.exit_status for outcome in outcomes if outcome.exit_status), 0)


# While a request is in flight on a terminal: redraw every TICK_S, ask for the state every POLL_S.
TICK_S = 0.1
POLL_S = 0.5
SPINNER = "|/-\\"


def _waiting(
    server: server_client.Server,
    kernel_id: str,
    doing: str,
    args: argparse.Namespace,
    request: Callable[[], Outcome],
) -> Outcome:
    """Carry out ``request``, showing on a terminal what the kernel is doing meanwhile.

    Hibernating or waking gigabytes takes a while: a spinner line on stderr
    says how long so far and the kernel's state, as ``GET /api/kernels/{id}``
    gives it, from POLL_S on. Nothing is shown with ``--json`` or when stderr
    is not a terminal.
    """
    if args.json or not sys.stderr.isatty():
        return request()
    result: queue.Queue[Outcome | BaseException] = queue.Queue()

    def run() -> None:
        try:
            result.put(request())
        except BaseException as exc:  # handed to the main thread, raised there
            result.put(exc)

    # A daemon: Ctrl-C ends the command without waiting for the server's answer.
    threading.Thread(target=run, daemon=True).start()
    started = time.monotonic()
    state, polled, frame = "", started, 0  # the kernel's state, once asked; frames drawn
    try:
        while True:
            try:
                answer = result.get(timeout=TICK_S)
            except queue.Empty:
                pass
            else:
                if isinstance(answer, BaseException):
                    raise answer
                return answer
            now = time.monotonic()
            if now - polled < POLL_S and not frame:
                continue  # done within POLL_S: nothing shown
            if now - polled >= POLL_S:
                polled = now
                with contextlib.suppress(server_client.ServerError):
                    state = server_client.state_of(server_client.get_kernel(server, kernel_id))
            frame += 1
            sys.stderr.write(
                f"\r{SPINNER[frame % len(SPINNER)]} {doing} kernel {kernel_id}: "
                f"{now - started:.1f} s{', ' + state if state else ''}\x1b[K"
            )
            sys.stderr.flush()
    finally:
        if frame:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def human_bytes(count: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` (unknown) -> ``?``."""
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


if __name__ == "__main__":
    sys.exit(main())
