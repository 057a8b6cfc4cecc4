"""Recompute what a dill snapshot lost: make the plan at hibernation, offer or run it at wake.

The plan (see :mod:`kernelhib.recompute`) is made from the kernel's own
history, saved in the snapshot, and recorded in the image with the notebook's
fingerprint: a wake does not depend on the notebook file, and says when it
changed. The notebook the kernel's session points at only tells which of its
cells each history entry is, for front ends to show.

The plan's model, the ``recompute`` object of the hibernation model::

    {"names": [{"name", "cells": [n...], "refused"?}],   # each lost name
     "cells": [{"number", "source", "last_run", "notebook_cell", "refused"?}],
     "run": [n...],                    # the cells one action runs, in order
     "notebook": {"path", "fingerprint", "changed"?},
     "recomputed": [name...], "replayed": [n...], "failed": {"cell", "error"}}
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import recompute

MODES = ("off", "offer", "auto")


def _read_snapshot(snapshot: Path) -> tuple[list[str], set[str]]:
    """The snapshot's history (``In``) and the names it kept (variables and modules)."""
    # Here, not at the top: it imports dill and IPython, which the server and the
    # command line need only once a dill snapshot exists.
    from .engines.dill_snapshot import STATE, SUMMARY

    summary = json.loads((snapshot / SUMMARY).read_text())
    state = json.loads((snapshot / STATE).read_text())
    return state["input_hist_raw"], {*summary["variables"], *summary["modules"]}


def _read_notebook(path: Path) -> list[tuple[int, str, int | None]]:
    """A notebook's code cells: index among all its cells, source, execution count.

    ValueError if it is not a valid notebook.
    """
    import nbformat  # only once a plan is made: it takes a while to import

    try:
        notebook = nbformat.read(path, as_version=4)
    except nbformat.ValidationError as exc:
        raise ValueError(f"{path} is not a valid notebook: {exc}") from exc
    return [
        (index, cell.source, cell.get("execution_count"))
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    ]


def _match(history: list[str], code: list[tuple[int, str, int | None]]) -> dict[int, int]:
    """Which notebook cell each history entry ran from: the cell showing its execution
    count, else the last cell with its source (a notebook not saved since the run shows
    no counts)."""
    by_count = {count: index for index, _, count in code if count}
    by_source = {source: index for index, source, _ in code}
    cells = {}
    for number, source in enumerate(history):
        index = by_count.get(number, by_source.get(source))
        if number and index is not None:
            cells[number] = index
    return cells


def _notebook_file(server: Any, path: str) -> Path:
    """The file of a session's notebook, which must be under the server's root directory
    (a session's path is whatever its client sent)."""
    root = Path(server.contents_manager.root_dir).resolve()
    file = (root / path).resolve()
    if not file.is_relative_to(root):
        raise ValueError(f"the notebook {path!r} is outside the server's root directory")
    return file


def lost_names(lost: Iterable[dict[str, str]]) -> list[str]:
    """The lost variables a cell could re-create: module state is not a name."""
    return sorted(entry["name"] for entry in lost if entry.get("type") != "module state")


class Recomputer:
    """Plans and runs recomputations for the kernels of one server."""

    def __init__(self, kernel_manager: Any, log: Any) -> None:
        self.kernel_manager = kernel_manager
        self.log = log
        # Kernel id -> execution count -> when the cell started (from its execute_input).
        self._ran: dict[str, dict[int, float]] = {}

    def cell_ran(self, kernel_id: str, number: int, when: float) -> None:
        self._ran.setdefault(kernel_id, {})[number] = when

    def forget(self, kernel_id: str) -> None:
        self._ran.pop(kernel_id, None)

    async def prepare(
        self, kernel_id: str, snapshot: Path, lost: list[dict[str, str]]
    ) -> dict[str, Any]:
        """The plan recorded in the image of a dill hibernation (empty if nothing was lost)."""
        names = lost_names(lost)
        if not names:
            return {}
        try:
            return await self._prepare(kernel_id, snapshot, names)
        except Exception as exc:  # the hibernation goes on: the loss is reported all the same
            self.log.warning("Kernel %s: no recompute plan: %s", kernel_id, exc)
            return {}

    async def _prepare(self, kernel_id: str, snapshot: Path, names: list[str]) -> dict[str, Any]:
        history, survived = await asyncio.to_thread(_read_snapshot, snapshot)
        notebook = await self._notebook(kernel_id)
        cells: dict[int, dict[str, Any]] = {}
        if notebook is not None:
            cells = {n: {"notebook_cell": i} for n, i in _match(history, notebook[1]).items()}
        known = self._ran.get(kernel_id, {})
        for number, when in known.items():
            cells.setdefault(number, {})["last_run"] = when
        offer = _offer(history, survived, names, cells)
        if notebook is not None:
            path, code = notebook
            offer["notebook"] = {
                "path": path,
                "fingerprint": recompute.notebook_fingerprint([s for _, s, _ in code]),
            }
        return offer

    async def at_wake(
        self, kernel_id: str, snapshot: Path, recorded: dict[str, Any], lost: list[dict[str, str]]
    ) -> dict[str, Any]:
        """The plan for what the wake lost: the recorded one, re-made from the image's
        history if the load lost more; and whether the notebook changed since."""
        names = lost_names(lost)
        if not names:
            return {}
        planned = {entry["name"] for entry in recorded.get("names", [])}
        if set(names) <= planned:
            offer = _subset(recorded, names)
        else:
            history, survived = await asyncio.to_thread(_read_snapshot, snapshot)
            cells = {c["number"]: c for c in recorded.get("cells", [])}
            offer = _offer(history, survived - set(names), names, cells)
            if "notebook" in recorded:
                offer["notebook"] = dict(recorded["notebook"])
        if "notebook" in offer:
            offer["notebook"]["changed"] = await self._changed(offer["notebook"])
        return offer

    async def _notebook(
        self, kernel_id: str
    ) -> tuple[str, list[tuple[int, str, int | None]]] | None:
        """The notebook the kernel's session points at, and its code cells; None if none."""
        server = getattr(self.kernel_manager, "parent", None)
        sessions = getattr(server, "session_manager", None)
        if sessions is None:
            return None
        try:
            for session in await sessions.list_sessions():
                path = session.get("path") or ""
                if session["kernel"]["id"] == kernel_id and path.endswith(".ipynb"):
                    file = _notebook_file(server, path)
                    return path, await asyncio.to_thread(_read_notebook, file)
        except (OSError, ValueError, KeyError) as exc:
            self.log.warning("Kernel %s: its notebook could not be read: %s", kernel_id, exc)
        return None

    async def _changed(self, notebook: dict[str, Any]) -> bool:
        """Whether the notebook's code differs from when the plan was made (or it is gone)."""
        server = getattr(self.kernel_manager, "parent", None)
        try:
            file = _notebook_file(server, notebook["path"])
            code = await asyncio.to_thread(_read_notebook, file)
        except (AttributeError, OSError, ValueError):
            return True
        return recompute.notebook_fingerprint([s for _, s, _ in code]) != notebook["fingerprint"]

    async def run(self, client: Any, offer: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run the plan's cells in the kernel, silently and out of its history; return the
        plan left: names recomputed, the first cell that failed, and what is still to run.

        A cell that ran is never run again by this plan, even if a later one failed.
        """
        sources = {cell["number"]: cell["source"] for cell in offer["cells"]}
        replayed = list(offer.get("replayed", []))
        failed: dict[str, Any] = {}
        for number in offer["run"]:
            error = await _execute(client, sources[number], timeout)
            if error:
                failed = {"cell": number, "error": error}
                break
            replayed.append(number)
        done = set(replayed)
        recomputed = [
            entry["name"]
            for entry in offer["names"]
            if "refused" not in entry and set(entry["cells"]) <= done
        ]
        left = dict(offer)
        left["names"] = [e for e in offer["names"] if e["name"] not in recomputed]
        left["run"] = [n for n in offer["run"] if n not in done]
        left["replayed"] = sorted(done)
        left["recomputed"] = sorted({*offer.get("recomputed", []), *recomputed})
        if failed:
            left["failed"] = failed
        else:
            left.pop("failed", None)
        return left


def _offer(
    history: list[str], survived: set[str], names: list[str], known: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The plan's model for ``names``; ``known`` adds last run times and notebook cells."""
    cells = recompute.analyse_history(history)
    plans = recompute.plan(cells, names, survived)
    by_number = {cell.number: cell for cell in cells}
    used = sorted({n for p in plans for n in p.cells})
    models = []
    for number in used:
        cell = by_number[number]
        model: dict[str, Any] = {
            "number": number,
            "source": cell.source,
            "last_run": known.get(number, {}).get("last_run"),
            "notebook_cell": known.get(number, {}).get("notebook_cell"),
        }
        if cell.refused:
            model["refused"] = cell.refused
        models.append(model)
    return {
        "names": [p.model() for p in plans],
        "cells": models,
        "run": recompute.cells_to_run(plans),
    }


def _subset(offer: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The recorded plan, for only some of its names."""
    wanted = [entry for entry in offer["names"] if entry["name"] in names]
    used = {n for entry in wanted for n in entry["cells"]}
    runnable = {n for entry in wanted if "refused" not in entry for n in entry["cells"]}
    subset = {
        "names": wanted,
        "cells": [cell for cell in offer["cells"] if cell["number"] in used],
        "run": [n for n in offer["run"] if n in runnable],
    }
    if "notebook" in offer:
        subset["notebook"] = dict(offer["notebook"])
    return subset


async def _execute(client: Any, code: str, timeout: float) -> str:
    """Run ``code`` silently in the kernel; the error it raised, or empty if it ran.

    Silent: no output reaches front ends, the execution count and ``In`` stay
    as they are, and the dill wake's notice waits for the user's own cell.
    """
    msg_id = client.execute(code, silent=True, store_history=False)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            reply = await client.get_shell_msg(timeout=max(left, 0.01))
        except queue.Empty:
            return f"it did not finish within {timeout:.0f} s"
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    content = reply["content"]
    if content["status"] == "ok":
        return ""
    return f"{content.get('ename', 'error')}: {content.get('evalue', '')}"[:300]
