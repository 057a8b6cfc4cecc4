"""Recomputing what the dill engine lost, through a real server and kernel.

A lock cannot be pickled, so a dill hibernation loses it; ``Fragile`` pickles
but fails to load while a flag file exists, so a wake loses it. Both are made
by cells that can simply run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from kernelhib.hibernator import EVENT_SCHEMA_ID

from .conftest import KernelChannel

DILL = {"engine": "dill"}

SETUP = """
import os, threading
def _rebuild(flag):
    if os.path.exists(flag):
        raise ValueError('injected: this value cannot load now')
    return Fragile(flag)
class Fragile:
    def __init__(self, flag):
        self.flag = flag
    def __reduce__(self):
        return _rebuild, (self.flag,)
base = 20
"""
MAKE_LOCK = "lock = threading.Lock()\ntotal = base + 1"


async def run_cells(channel: KernelChannel, cells: list[str]) -> list[int]:
    """Run cells as a notebook does; their execution counts."""
    counts = []
    for code in cells:
        reply = await channel.execute(code)
        assert reply["status"] == "ok", reply
        counts.append(reply["execution_count"])
    return counts


async def start_notebook(api: Any, open_channel: Any, root: Path, cells: list[str]) -> Any:
    """A notebook file with ``cells`` and a session (kernel) for it, as JupyterLab makes them."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(notebook, root / "analysis.ipynb")
    body = {"path": "analysis.ipynb", "name": "analysis.ipynb", "type": "notebook",
            "kernel": {"name": "python3"}}  # fmt: skip
    session = await api("POST", "sessions", body=body, expect=201)
    return session["kernel"]["id"], await open_channel(session["kernel"]["id"])


def names(recompute: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in recompute["names"]}


async def _append(events: list[dict[str, Any]], data: Any) -> None:
    events.append(dict(data))


async def test_offer_lists_the_cells_that_recreate_a_lost_name_and_one_action_runs_them(
    api: Any, open_channel: Any, jp_root_dir: Path, jp_serverapp: Any
) -> None:
    events: list[dict[str, Any]] = []
    jp_serverapp.event_logger.add_listener(
        schema_id=EVENT_SCHEMA_ID, listener=lambda logger, schema_id, data: _append(events, data)
    )
    cells = [SETUP, MAKE_LOCK, "kept = total * 2"]
    kernel_id, channel = await start_notebook(api, open_channel, jp_root_dir, cells)
    _, lock_cell, _ = await run_cells(channel, cells)

    model = await api("POST", "kernels", kernel_id, "hibernate", body=DILL)

    plan = model["hibernation"]["recompute"]
    assert names(plan)["lock"] == {"name": "lock", "cells": [lock_cell]}
    assert plan["run"] == [lock_cell]
    [cell] = plan["cells"]
    assert cell["source"] == MAKE_LOCK and cell["notebook_cell"] == 1 and cell["last_run"] > 0
    assert plan["notebook"]["path"] == "analysis.ipynb"

    woken = (await api("POST", "kernels", kernel_id, "wake"))["hibernation"]
    assert woken["state"] == "running" and woken["recompute"]["run"] == [lock_cell]
    assert woken["recompute"]["notebook"]["changed"] is False
    missing = await channel.execute("lock")
    assert missing["status"] == "error" and missing["ename"] == "NameError"

    done = (await api("POST", "kernels", kernel_id, "recompute"))["hibernation"]["recompute"]

    assert done["recomputed"] == ["lock"] and done["run"] == []
    assert done["replayed"] == [lock_cell]
    check = await channel.execute("type(lock).__name__, total, kept")
    assert check["result"] == "('lock', 21, 42)"
    # The replay ran silently: the next cell's count follows the user's own cells.
    assert check["execution_count"] == missing["execution_count"] + 1
    again = await api("POST", "kernels", kernel_id, "recompute", expect=409)
    assert again["reason"] == "nothing-to-recompute"
    [wake] = [e for e in events if e["action"] == "wake"]
    assert wake["recompute"]["run"] == [lock_cell]
    [recomputed] = [e for e in events if e["action"] == "recompute"]
    assert recomputed["recompute"]["recomputed"] == ["lock"]


@pytest.mark.parametrize("hibernator_config", [{"recompute": "auto"}])
async def test_auto_recomputes_during_the_wake_what_hibernation_and_wake_lost(
    start_kernel: Any, api: Any, tmp_path: Path
) -> None:
    kernel_id, channel = await start_kernel()
    flag, written = tmp_path / "fragile-cannot-load", tmp_path / "written.txt"
    unsafe = f"sock_lock = threading.Lock()\nopen({str(written)!r}, 'w').write('once')"
    await run_cells(channel, [SETUP, MAKE_LOCK, f"fragile = Fragile({str(flag)!r})", unsafe])
    await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    flag.touch()  # fragile will not load
    written.unlink()

    # The first request wakes the kernel: the lost names are back when it runs.
    check = await channel.execute("type(lock).__name__, type(fragile).__name__")

    assert check["status"] == "ok", check
    assert check["result"] == "('lock', 'Fragile')"
    model = (await api("GET", "kernels", kernel_id))["hibernation"]["recompute"]
    assert model["recomputed"] == ["fragile", "lock"]
    assert "writes files (open with mode 'w')" in names(model)["sock_lock"]["refused"]
    assert not written.exists(), "a cell that writes files must never be replayed"


async def test_a_cell_that_runs_shell_commands_is_offered_but_refused(
    start_kernel: Any, api: Any
) -> None:
    kernel_id, channel = await start_kernel()
    await run_cells(channel, ["import threading\nfiles = !ls\nlock = threading.Lock()"])

    model = await api("POST", "kernels", kernel_id, "hibernate", body=DILL)

    plan = model["hibernation"]["recompute"]
    assert "runs a shell command (!ls)" in names(plan)["lock"]["refused"]
    assert plan["run"] == []
    await api("POST", "kernels", kernel_id, "wake")
    refused = await api("POST", "kernels", kernel_id, "recompute", expect=409)
    assert refused["reason"] == "nothing-to-recompute"


async def test_a_notebook_changed_since_hibernation_is_reported_and_the_recorded_plan_kept(
    api: Any, open_channel: Any, jp_root_dir: Path
) -> None:
    cells = [SETUP, MAKE_LOCK]
    kernel_id, channel = await start_notebook(api, open_channel, jp_root_dir, cells)
    _, lock_cell = await run_cells(channel, cells)
    await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    edited = nbformat.read(jp_root_dir / "analysis.ipynb", as_version=4)
    edited.cells[1].source = "lock = None  # edited after the kernel hibernated"
    nbformat.write(edited, jp_root_dir / "analysis.ipynb")

    plan = (await api("POST", "kernels", kernel_id, "wake"))["hibernation"]["recompute"]

    assert plan["notebook"]["changed"] is True
    assert plan["run"] == [lock_cell]
    await api("POST", "kernels", kernel_id, "recompute")
    assert (await channel.execute("type(lock).__name__"))["result"] == "'lock'"


@pytest.mark.parametrize("hibernator_config", [{"recompute": "off"}])
async def test_off_only_reports_the_loss(start_kernel: Any, api: Any) -> None:
    kernel_id, channel = await start_kernel()
    await run_cells(channel, ["import threading\nlock = threading.Lock()"])
    model = await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    assert [e["name"] for e in model["hibernation"]["lost"]] == ["lock"]
    assert "recompute" not in model["hibernation"]


async def test_a_cell_that_raises_stops_the_recompute_and_the_next_action_runs_the_rest(
    start_kernel: Any, api: Any, tmp_path: Path
) -> None:
    kernel_id, channel = await start_kernel()
    flag = tmp_path / "fails-now"
    checked = f"assert not os.path.exists({str(flag)!r}), 'flag'\nsecond = [first]"
    made, uses = await run_cells(
        channel, ["import os, threading\nfirst = threading.Lock()", checked]
    )
    await api("POST", "kernels", kernel_id, "hibernate", body=DILL)
    await api("POST", "kernels", kernel_id, "wake")
    flag.touch()

    error = await api("POST", "kernels", kernel_id, "recompute", expect=500)

    assert error["reason"] == "recompute-failed"
    assert f"cell [{uses}] failed while recomputing: AssertionError: flag" in error["message"]
    plan = (await api("GET", "kernels", kernel_id))["hibernation"]["recompute"]
    assert plan["failed"]["cell"] == uses and plan["run"] == [uses]
    assert plan["recomputed"] == ["first"] and plan["replayed"] == [made]
    first_id = (await channel.execute("id(first)"))["result"]
    flag.unlink()
    done = (await api("POST", "kernels", kernel_id, "recompute"))["hibernation"]["recompute"]
    assert done["recomputed"] == ["first", "second"] and "failed" not in done
    check = await channel.execute("id(first), second[0] is first")
    assert check["result"] == f"({first_id}, True)", "the cell that ran must not run again"
