"""Which cells re-create lost variables: the analysis of cells and the plan, without a kernel."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kernelhib.recompute import (
    analyse,
    analyse_history,
    cells_to_run,
    notebook_fingerprint,
    plan,
    plan_name,
)
from kernelhib.recomputer import _match, _notebook_file


def test_a_cell_reads_the_names_it_uses_before_binding_them() -> None:
    cell = analyse(
        1, "y = x + 1\nz = y * 2\nfor i in range(n):\n    total += i\nq = [k for k in z]"
    )
    assert cell.reads == {"x", "n", "total"}
    assert cell.defines == {"y", "z", "i", "total", "q"}
    assert not cell.refused


def test_function_bodies_are_not_read_when_the_function_is_defined() -> None:
    cell = analyse(1, "def f(a, b=default):\n    return a + later\nclass C(Base):\n    x = seed")
    assert cell.reads == {"default", "Base", "seed"}
    assert cell.defines == {"f", "C"}


def test_changing_an_object_in_place_needs_and_writes_it() -> None:
    cell = analyse(
        1,
        "df['a'] = 1\nmodel.fit(X)\nitems.append(3)\nframe.drop(columns=['a'], inplace=True)\n"
        "first = next(batches)",
    )
    assert cell.modifies == {"df", "model", "items", "frame", "batches"}
    assert {"df", "model", "items", "frame", "X"} <= cell.needs


def test_changing_what_the_cell_made_itself_needs_nothing_from_before() -> None:
    cell = analyse(1, "acc = []\nacc.append(1)\nacc[0] = 2")
    assert cell.needs == set() and cell.defines == {"acc"}


def test_calls_on_modules_do_not_change_their_names() -> None:
    cells = analyse_history(["", "import numpy as np", "np.random.seed(0)\nplt.plot([1])"])
    assert cells[1].modifies == {"plt"}  # plt was never imported by a cell: it may be an object


def test_magics_go_through_ipythons_transformers() -> None:
    timed = analyse(1, "%time y = x + 1")
    assert timed.reads == {"x"} and "y" in timed.defines and not timed.refused
    captured = analyse(2, "%%capture out\nz = y")
    assert captured.defines >= {"out", "z"} and captured.reads == {"y"}
    assert not analyse(3, "%matplotlib inline\nw = 1").refused


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("!ls", "runs a shell command"),
        ("files = !ls", "runs a shell command"),
        ("%%bash\nrm -rf out", "runs shell commands (%%bash)"),
        ("%system ls", "runs shell commands (%system)"),
        ("%run prepare.py", "%run"),
        ("%%writefile a.py\nx = 1", "writes a file"),
        ("%hibernate", "hibernate the kernel"),
        ("with open('out.txt', 'w') as f:\n    f.write('x')", "writes files (open"),
        ("f = open(name, mode)", "writes files (open"),
        ("Path('a').open('a')", "writes files (open"),
        ("df.to_csv('out.csv')", "writes files (to_csv)"),
        ("plt.savefig('fig.png')", "writes files (savefig)"),
        ("np.save('a.npy', a)", "writes files (save)"),
        ("pickle.dump(obj, f)", "dump to a file"),
        ("os.remove('a')", "os.remove"),
        ("shutil.rmtree(d)", "shutil.rmtree"),
        ("subprocess.run(['ls'])", "subprocess.run"),
        ("from numpy import *", "imports *"),
        ("%unknownmagic", "cannot be analysed"),
        ("x = (", "cannot be parsed"),
    ],
)
def test_a_cell_that_cannot_be_replayed_safely_says_why(source: str, reason: str) -> None:
    assert reason in analyse(1, source).refused


@pytest.mark.parametrize(
    "source",
    [
        "text = open('in.txt').read()",
        "data = open(p, 'rb').read()",
        "s = df.to_csv()",
        "t = s.replace('a', 'b')",
    ],
)
def test_reading_files_and_pure_calls_are_safe(source: str) -> None:
    assert not analyse(1, source).refused


HISTORY = [
    "",
    "import threading\nbase = 20",  # 1
    "lock = threading.Lock()\ntotal = base + 1",  # 2
    "base = 99",  # 3
    "events = []\nevents.append(lock)",  # 4
    "unused = 5",  # 5
]


def test_a_lost_name_comes_back_from_the_cells_that_made_it() -> None:
    cells = analyse_history(HISTORY)
    survived = {"threading", "base", "total", "unused"}
    # Cell 2 read base before cell 3 changed it, and it overwrites total: cells 1 and 3
    # bring base and total back to their last values.
    assert plan_name(cells, "lock", survived).model() == {"name": "lock", "cells": [1, 2, 3]}


def test_a_value_kept_unchanged_is_used_not_recomputed() -> None:
    cells = analyse_history(["", "base = 20", "lock = make(base)"])
    assert plan_name(cells, "lock", {"base", "make"}).cells == [2]


def test_a_name_changed_in_place_needs_every_cell_that_changed_it() -> None:
    cells = analyse_history(HISTORY)
    survived = {"threading", "base", "total", "unused"}
    assert plan_name(cells, "events", survived | {"lock"}).cells == [4]
    assert plan_name(cells, "events", survived).cells == [1, 2, 3, 4]  # lock lost too


def test_a_name_nobody_defines_is_refused() -> None:
    cells = analyse_history(["", "x = helper(3)", "y = 1"])
    assert "depends on helper" in plan_name(cells, "x", set()).refused
    assert "no cell in the kernel's history defines z" in plan_name(cells, "z", {"x"}).refused


def test_a_plan_through_an_unsafe_cell_is_refused_with_its_reason() -> None:
    cells = analyse_history(["", "!ls\nlock = make()", "other = lock"])
    result = plan_name(cells, "other", {"make"})
    assert result.cells == [1, 2]
    assert result.refused == "cell [1] runs a shell command (!ls)"


def test_each_cell_runs_once_in_history_order() -> None:
    cells = analyse_history(["", "a = 1", "b = a + 1", "c = a + 2", "!ls\nd = 1"])
    plans = plan(cells, ["b", "c", "d"], set())
    assert [p.name for p in plans] == ["b", "c", "d"]
    assert cells_to_run(plans) == [1, 2, 3]  # d's cell is refused, the others run once


def test_the_fingerprint_follows_the_code_only() -> None:
    assert notebook_fingerprint(["a = 1", "b = 2"]) == notebook_fingerprint(["a = 1", "b = 2"])
    assert notebook_fingerprint(["a = 1", "b = 2"]) != notebook_fingerprint(["a = 1", "b = 3"])
    assert notebook_fingerprint(["a = 1"]) != notebook_fingerprint(["a = 1", ""])


def test_a_sessions_notebook_is_read_only_under_the_servers_root(tmp_path: Path) -> None:
    server = SimpleNamespace(contents_manager=SimpleNamespace(root_dir=str(tmp_path / "root")))
    assert _notebook_file(server, "work/a.ipynb") == tmp_path / "root" / "work" / "a.ipynb"
    with pytest.raises(ValueError, match="outside the server's root directory"):
        _notebook_file(server, "../secret.ipynb")


def test_history_entries_are_matched_to_notebook_cells_by_count_then_source() -> None:
    code = [(1, "a = 1", 5), (2, "b = 2", None), (4, "c = 3", None)]
    assert _match(["", "x = 0", "b = 2", "a = 1"], code) == {2: 2, 3: 1}
    assert _match(["", "x", "y", "z", "w", "changed since"], code) == {5: 1}
