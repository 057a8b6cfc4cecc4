"""The ``kernelhib`` command: install CRIU, diagnose, and drive a server.

A thin layer over :mod:`kernelhib.engines.criu_install`, :mod:`kernelhib.doctor`
and :mod:`kernelhib.server_client`: it parses arguments, prints results and
turns failures into a message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kernelhib import server_client
from kernelhib.doctor import (
    Setting,
    as_json,
    describe_setting,
    diagnose,
    format_table,
    render_table,
    server_criu_path,
)
from kernelhib.engines.base import ENGINE_CHOICES
from kernelhib.engines.criu_install import DEBIAN_SOURCES, CriuUnavailable, install_criu


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``kernelhib`` subcommand and return its exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CriuUnavailable, server_client.ServerError) as exc:
        print(f"kernelhib {args.command}: {exc}", file=sys.stderr)
        return 1


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
        "--url", help="the Jupyter server's URL (default: the first running server)"
    )
    server.add_argument("--token", help="its token (default: the running server's)")

    listing = commands.add_parser("list", parents=[server], help="list the server's kernels")
    listing.set_defaults(run=_list)

    hibernate = commands.add_parser("hibernate", parents=[server], help="hibernate a kernel")
    hibernate.add_argument("kernel_id")
    hibernate.add_argument(
        "--force",
        action="store_true",
        help="hibernate even a busy kernel: its running cell is frozen and carries on after wake",
    )
    hibernate.add_argument(
        "--engine", choices=ENGINE_CHOICES, help="default: the server's KernelHibernator.engine"
    )
    hibernate.set_defaults(run=_hibernate)

    wake = commands.add_parser("wake", parents=[server], help="wake a hibernated kernel")
    wake.add_argument("kernel_id")
    wake.set_defaults(run=_wake)
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
    setting = Setting(args.criu_path, "--criu-path") if args.criu_path else server_criu_path()
    reports = diagnose(setting.value)
    if args.json:
        print(json.dumps(as_json(setting, reports), indent=2))
    else:
        print(f"{describe_setting(setting)}\n\n{format_table(reports)}")
    return 0 if any(report.ok for _, report in reports) else 1


def _list(args: argparse.Namespace) -> int:
    kernels = server_client.list_kernels(server_client.find_server(args.url, args.token))
    rows = [_kernel_row(kernel) for kernel in kernels]
    print(render_table(["ID", "NAME", "STATE", "IMAGE", "FREED"], rows))
    return 0


def _kernel_row(kernel: dict[str, Any]) -> list[str]:
    hibernation = kernel.get("hibernation")
    if not hibernation:
        return [kernel["id"], kernel.get("name", ""), kernel.get("execution_state", ""), "", ""]
    sizes = [human_bytes(hibernation.get(key)) for key in ("image_bytes", "freed_bytes")]
    return [kernel["id"], kernel.get("name", ""), "hibernated", *sizes]


def _hibernate(args: argparse.Namespace) -> int:
    server = server_client.find_server(args.url, args.token)
    kernel = server_client.hibernate(server, args.kernel_id, engine=args.engine, force=args.force)
    info = kernel.get("hibernation") or {}
    print(
        f"Hibernated kernel {args.kernel_id} with {info.get('engine', '?')} in "
        f"{info.get('seconds', 0):.1f} s: image {human_bytes(info.get('image_bytes'))}, "
        f"memory freed {human_bytes(info.get('freed_bytes'))}"
    )
    return 0


def _wake(args: argparse.Namespace) -> int:
    server = server_client.find_server(args.url, args.token)
    kernel = server_client.wake(server, args.kernel_id)
    print(f"Woke kernel {args.kernel_id}; it is {kernel.get('execution_state', 'starting')}")
    return 0


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
