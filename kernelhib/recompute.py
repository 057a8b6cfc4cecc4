"""Which cells re-create the variables a dill snapshot lost: analysis and planning.

Pure functions on cell sources, nothing about servers or kernels, so that the
plan can be made at hibernation (and recorded in the image) and checked in
unit tests. A cell's names are read from its code as IPython runs it (magics
and ``!`` through IPython's input transformers). A cell whose effects cannot be
analysed safely (it writes files, runs shell commands or ``%run``) is never
replayed: the names that need it are reported with the reason instead.

The heuristics, in :data:`_FILE_WRITERS` and friends, err towards refusing: a
replay that is refused costs the user one click; one that overwrites a file
costs the file.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Names every IPython kernel has: never a variable a cell must re-create.
_IPYTHON_NAMES = re.compile(
    r"(In|Out|exit|quit|get_ipython|display|__IPYTHON__|_[iod]h|_i{1,3}|_i\d+|_\d*|__|___)\Z"
)
_BUILTINS = frozenset(dir(builtins))


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Magics that only display or configure the session: replaying them is harmless.
_HARMLESS_MAGICS = _words(
    "matplotlib load_ext reload_ext autoreload aimport config precision xmode colors pprint "
    "who who_ls whos pwd env lsmagic magic pinfo pinfo2 pdoc pdef psource pfile psearch "
    "history html markdown latex javascript js svg doctest_mode page timeit"
)
# Magics that run their code argument (line) or body (cell) in the user's namespace.
_CODE_MAGICS = _words("time capture")
_SHELL_MAGICS = _words(
    "system sx sh bash script perl ruby python python2 python3 pypy pip conda mamba"
)
_UNSAFE_MAGICS = {
    "run": "runs a script with %run, whose effects cannot be analysed",
    "writefile": "writes a file (%%writefile)",
    "save": "writes a file (%save)",
    "hibernate": "asks to hibernate the kernel (%hibernate)",
    "cd": "changes the working directory (%cd)",
    "reset": "deletes variables (%reset)",
    "reset_selective": "deletes variables (%reset_selective)",
    "xdel": "deletes variables (%xdel)",
    "store": "reads or writes IPython's store (%store)",
}
# Calls that write files whatever they are called on, once given where to write.
_FILE_WRITERS = _words(
    "to_csv to_excel to_parquet to_feather to_hdf to_pickle to_stata to_sql to_json to_html "
    "to_latex to_xml to_markdown to_orc savefig savez savez_compressed savetxt save tofile "
    "write_text write_bytes mkdir makedirs rmdir rmtree unlink touch symlink_to hardlink_to "
    "copyfile copy2 copytree"
)
# Those of them that write even without arguments.
_NO_ARG_WRITERS = _words("mkdir makedirs rmdir unlink touch rmtree")
# Calls that write files or run processes when called on these modules.
_MODULE_WRITERS = {
    "os": _words(
        "remove unlink rename renames replace rmdir removedirs mkdir makedirs system popen "
        "symlink link truncate chmod chown"
    ),
    "shutil": _words("copy copy2 copyfile copytree move rmtree make_archive"),
    "subprocess": _words("run call check_call check_output Popen getoutput"),
}
_WRITE_MODES = re.compile(r"[wax+]")
# `df.drop(..., inplace=True)` changes df.
_INPLACE = "inplace"


@dataclass
class Cell:
    """One execution in the kernel's history: what it reads, writes, and whether it may run again.

    ``reads`` are names it needs from before it ran; ``defines`` the names it
    binds; ``modifies`` those it changes in place (``df['a'] = 1``,
    ``model.fit(X)``): it needs them and changes them.
    """

    number: int  # its execution count: In[number]
    source: str
    reads: set[str] = field(default_factory=set)
    defines: set[str] = field(default_factory=set)
    modifies: set[str] = field(default_factory=set)
    imports: set[str] = field(default_factory=set)
    refused: str = ""  # why it must not be replayed; empty when it may

    @property
    def writes(self) -> set[str]:
        return self.defines | self.modifies

    @property
    def needs(self) -> set[str]:
        return self.reads | self.modifies


class _Names(ast.NodeVisitor):
    """The names one unit of code loads and stores, outside nested function scopes."""

    def __init__(self) -> None:
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.modified: set[str] = set()
        self.imports: set[str] = set()
        self.refusals: list[str] = []
        self.inner: list[str] = []  # code that magics run in the user's namespace

    def visit_Name(self, node: ast.Name) -> None:
        (self.loads if isinstance(node.ctx, ast.Load) else self.stores).add(node.id)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # Its body runs when called, not when defined: only what definition evaluates counts.
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
            self.stores.add(node.name)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        body = _Names()
        for stmt in node.body:
            body.visit(stmt)
        self.loads |= body.loads - body.stores
        self._take_findings(body)
        self.stores.add(node.name)

    def _comprehension(self, node: ast.AST) -> None:
        inner = _Names()
        inner.generic_visit(node)
        targets = _Names()
        for generator in node.generators:  # type: ignore[attr-defined]
            targets.visit(generator.target)
        self.loads |= inner.loads - targets.stores
        self.stores |= inner.stores - targets.stores  # := binds in the enclosing scope
        self._take_findings(inner)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.add(alias.asname or alias.name.split(".")[0])
        self.stores |= self.imports

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.refusals.append(
                    f"imports * from {node.module}: the names it binds are unknown"
                )
            else:
                self.imports.add(alias.asname or alias.name)
        self.stores |= self.imports

    def _targets(self, targets: Iterable[ast.expr]) -> None:
        for target in targets:
            if isinstance(target, (ast.Subscript, ast.Attribute)) and (root := _root(target)):
                self.modified.add(root)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._targets(node.targets)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._targets([node.target])
        if isinstance(node.target, ast.Name):
            self.loads.add(node.target.id)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._targets([node.target])
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)

    def visit_Delete(self, node: ast.Delete) -> None:
        self._targets(node.targets)
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        call = node.value
        # `model.fit(X)`, `items.append(x)`: called for its effect on the object.
        called = isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        if called and (root := _root(call.func.value)):  # type: ignore[union-attr]
            self.modified.add(root)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and _is_get_ipython(func.value):
            self._ipython_call(func.attr, node.args)
        else:
            self._check_writes(node)
            inplace = any(k.arg == _INPLACE and _literal(k.value) is True for k in node.keywords)
            if inplace and isinstance(func, ast.Attribute) and (root := _root(func.value)):
                self.modified.add(root)
            # `next(batches)` moves the iterator on.
            if getattr(func, "id", "") == "next" and node.args and (root := _root(node.args[0])):
                self.modified.add(root)
        self.generic_visit(node)

    def _ipython_call(self, method: str, args: list[ast.expr]) -> None:
        """What a magic or ``!`` command, as the input transformers wrote it, does."""
        values = [_literal(arg) for arg in args]
        if method in ("system", "getoutput"):
            self.refusals.append(f"runs a shell command (!{str(values[0] if values else '')[:40]})")
            return
        if method not in ("run_line_magic", "run_cell_magic") or not values:
            self.refusals.append(f"calls get_ipython().{method}, whose effects cannot be analysed")
            return
        name, line = str(values[0]), str(values[1] if len(values) > 1 else "")
        prefix = "%%" if method == "run_cell_magic" else "%"
        if name in _SHELL_MAGICS:
            self.refusals.append(f"runs shell commands ({prefix}{name})")
        elif name in _UNSAFE_MAGICS:
            self.refusals.append(_UNSAFE_MAGICS[name])
        elif name in _CODE_MAGICS:
            code = values[2] if method == "run_cell_magic" and len(values) > 2 else line
            if method == "run_line_magic" and name == "capture":
                code = ""
            self.inner.append(str(code))
            if name == "capture" and (target := line.split()[:1]) and not target[0].startswith("-"):
                self.stores.add(target[0])
        elif name not in _HARMLESS_MAGICS:
            self.refusals.append(f"uses {prefix}{name}, whose effects cannot be analysed")

    def _check_writes(self, node: ast.Call) -> None:
        """Heuristics for calls that write files or run processes."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else _keyword(node, "mode")
            if isinstance(func, ast.Attribute):  # Path.open(mode)
                mode = node.args[0] if node.args else _keyword(node, "mode")
            if mode is not None:
                value = _literal(mode)
                if not isinstance(value, str) or _WRITE_MODES.search(value):
                    self.refusals.append(f"writes files (open with mode {ast.unparse(mode)[:20]})")
            return
        owner = func.value if isinstance(func, ast.Attribute) else None
        if isinstance(owner, ast.Name) and name in _MODULE_WRITERS.get(owner.id, ()):
            self.refusals.append(f"writes files or runs processes ({owner.id}.{name})")
        elif name in _FILE_WRITERS and (node.args or node.keywords or name in _NO_ARG_WRITERS):
            self.refusals.append(f"writes files ({name})")
        elif name == "dump" and len(node.args) >= 2:  # pickle.dump(obj, file), json.dump...
            self.refusals.append("writes files (dump to a file)")

    def _take_findings(self, other: _Names) -> None:
        self.modified |= other.modified
        self.refusals += other.refusals
        self.inner += other.inner


def _root(node: ast.expr) -> str | None:
    """The variable at the root of ``a.b[c].d``, if it is one."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_get_ipython(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "get_ipython"
    )


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def _units(statements: list[ast.stmt]) -> Iterator[ast.AST]:
    """The parts of the code in the order they run, compound statements opened up:
    a loop's variable is bound before its body reads it."""
    for stmt in statements:
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            yield stmt.iter
            yield stmt.target
            yield from _units(stmt.body + stmt.orelse)
        elif isinstance(stmt, (ast.While, ast.If)):
            yield stmt.test
            yield from _units(stmt.body + stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                yield item.context_expr
                if item.optional_vars is not None:
                    yield item.optional_vars
            yield from _units(stmt.body)
        elif isinstance(stmt, ast.Try):
            yield from _units(stmt.body)
            for handler in stmt.handlers:
                if handler.type is not None:
                    yield handler.type
                if handler.name:
                    yield ast.Name(handler.name, ast.Store())
                yield from _units(handler.body)
            yield from _units(stmt.orelse + stmt.finalbody)
        else:
            yield stmt


def analyse(number: int, source: str) -> Cell:
    """The names a cell reads, defines and modifies, and why it must not be replayed, if so."""
    cell = Cell(number, source)
    try:
        _analyse_into(cell, source, set())
    except RecursionError:  # code nested deeper than the analysis goes
        cell.refused = "is nested too deeply to be analysed"
    return cell


def _analyse_into(cell: Cell, source: str, defined: set[str]) -> None:
    # Here, not at the top: importing IPython takes the server and the command line
    # a fifth of a second, which only a recompute plan needs.
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        code = TransformerManager().transform_cell(source)
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError) as exc:
        cell.refused = f"cannot be parsed: {exc}"
        return
    for unit in _units(tree.body):
        names = _Names()
        names.visit(unit)
        cell.reads |= names.loads - defined
        # Changing what the cell itself made earlier needs nothing from before it.
        cell.modifies |= names.modified - defined
        defined |= names.stores
        cell.defines |= names.stores
        cell.imports |= names.imports
        if names.refusals and not cell.refused:
            cell.refused = names.refusals[0]
        for inner in names.inner:
            _analyse_into(cell, inner, defined)
    cell.reads = {name for name in cell.reads if not _is_ambient(name)}
    cell.modifies = {name for name in cell.modifies if not _is_ambient(name)}


def _is_ambient(name: str) -> bool:
    """Names no cell needs to define: builtins and IPython's own."""
    return name in _BUILTINS or bool(_IPYTHON_NAMES.match(name))


def analyse_history(sources: list[str]) -> list[Cell]:
    """Analyse ``In``: entry n is the cell run with execution count n (``In[0]`` is empty).

    Calls on imported modules (``np.random.seed(0)``, ``plt.plot()``) do not
    count as changing the module's name: modules come back by import.
    """
    cells = [analyse(number, source) for number, source in enumerate(sources) if number and source]
    imported = set().union(*(cell.imports for cell in cells))
    for cell in cells:
        cell.modifies -= imported
    return cells


@dataclass
class NamePlan:
    """How one lost name comes back: the cells to run, or why it cannot."""

    name: str
    cells: list[int]  # execution counts, in order
    refused: str = ""

    def model(self) -> dict[str, Any]:
        model: dict[str, Any] = {"name": self.name, "cells": self.cells}
        if self.refused:
            model["refused"] = self.refused
        return model


def _slice(cells: list[Cell], targets: set[str], survived: set[str]) -> tuple[set[int], set[str]]:
    """The cells whose replay re-creates ``targets``, and the names nobody defines.

    Walks the history backwards from its end. A cell is needed when it writes
    a name needed at that point; then the names it reads are needed before it,
    unless the snapshot kept that very value: the name survived and neither this
    cell nor a later one wrote it.
    """
    needed = set(targets)
    chosen: set[int] = set()
    written_later: set[str] = set()
    for cell in reversed(cells):
        written_later |= cell.writes
        if cell.writes & needed:
            chosen.add(cell.number)
            kept = survived - written_later
            needed = (needed - cell.defines) | (cell.needs - kept)
    return chosen, needed


def plan_name(cells: list[Cell], name: str, survived: set[str]) -> NamePlan:
    """The cells that re-create ``name``, with the survivors they overwrite re-created too.

    A replayed cell that also assigns a variable that survived would leave it
    with an older value: the cells that bring that one to its last value run
    as well.
    """
    targets = {name}
    by_number = {cell.number: cell for cell in cells}
    while True:
        chosen, unresolved = _slice(cells, targets, survived)
        overwritten = set().union(*(by_number[n].writes for n in chosen)) & survived
        if overwritten <= targets:
            break
        targets |= overwritten
    order = sorted(chosen)
    if unresolved:
        names = ", ".join(sorted(unresolved))
        if unresolved == {name}:
            return NamePlan(name, order, f"no cell in the kernel's history defines {name}")
        return NamePlan(name, order, f"depends on {names}, which no cell in the history defines")
    refused = [by_number[n] for n in order if by_number[n].refused]
    if refused:
        return NamePlan(name, order, f"cell [{refused[0].number}] {refused[0].refused}")
    return NamePlan(name, order)


def plan(cells: list[Cell], lost: Iterable[str], survived: set[str]) -> list[NamePlan]:
    """A plan for each lost name, in name order."""
    return [plan_name(cells, name, survived - {name}) for name in sorted(set(lost))]


def cells_to_run(plans: list[NamePlan]) -> list[int]:
    """The cells the recomputable names need, each once, in the order they ran."""
    return sorted({n for p in plans if not p.refused for n in p.cells})


def notebook_fingerprint(code_cells: list[str]) -> str:
    """A digest of a notebook's code: it changes when a cell is edited, added or removed,
    not when outputs or execution counts do."""
    digest = hashlib.sha256()
    for source in code_cells:
        digest.update(hashlib.sha256(source.encode()).digest())
    return digest.hexdigest()
