"""Save an IPython kernel's namespace with dill, and load it into a fresh kernel.

The fallback for kernels CRIU cannot checkpoint. This file runs inside the
kernel: the server sends its source in a silent execute request and calls
:func:`save` or :func:`load` there. So it imports nothing from kernelhib, only
the standard library, dill and IPython, and it never prints while it works:
the server reads the return value.

A snapshot is the values of the user's variables, not the process, plus the
module state of :data:`_MODULE_STATE` (random streams, library options).
Threads, comms, open handles and other state kept inside imported modules are
gone after a load, so the first cell run after it says so, once.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import contextlib
import importlib
import io
import itertools
import json
import mmap
import os
import pickle
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

import dill
from IPython import get_ipython
from IPython.core.interactiveshell import InteractiveShell

SUMMARY = "snapshot.json"
STATE = "state.json"
_PICKLE = "namespace.pkl"
_DATA = "namespace.data"  # the arrays' data, out of band
_FORMAT = 1
_BIG = 1 << 20  # arrays from this size get memory of their own (mmap) on load

# IPython's own names: history is restored as history, the rest exists in any kernel.
_IPYTHON_NAMES = re.compile(r"(In|Out|exit|quit|get_ipython|_[iod]h|_i{1,3}|_i\d+|_\d+|_{1,3})\Z")
_UNDERS = ("_", "__", "___")
# The per-launch variables of the new kernel process win over the saved ones.
_LAUNCH_ENV = "JPY_"
_FILE_REASON = "file handle: reopening it could overwrite the file"
_REFUSED: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (socket.socket, "open socket: its connection ended with the old kernel"),
    (
        (type(threading.Lock()), type(threading.RLock()), threading.Thread),
        "thread or lock: the threads that used it are gone",
    ),
    (
        (types.GeneratorType, types.AsyncGeneratorType),
        "generator: its paused frame cannot be saved",
    ),
    (types.CoroutineType, "coroutine: its paused frame cannot be saved"),
    ((sqlite3.Connection, sqlite3.Cursor), "sqlite3 connection: reconnect after wake"),
    (subprocess.Popen, "child process: it ended with the old kernel"),
    (InteractiveShell, "the IPython shell: call get_ipython() again after wake"),
)
# Objects of these packages belong to the kernel process: its comms and ZMQ sockets.
_KERNEL_PACKAGES = ("ipykernel.", "zmq.", "comm.")
_KERNEL_REASON = "part of the old kernel process (a comm or ZMQ socket)"
_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
_FILE_BACKENDS = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})

# A pickled item is keyed by its kind and name: a variable, an output or one of _ __ ___.
_Key = tuple[str, Any]


# Types that can neither be refused nor need numpy's reduction.
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None), tuple, list, dict, set})


class _Refused(Exception):
    """An object that must never be written to a snapshot was reached."""

    def __init__(self, obj: object, reason: str) -> None:
        super().__init__(reason)
        self.obj = obj
        self.reason = reason


def _refusal(obj: object) -> str | None:
    """Why ``obj`` must not be pickled, or None if dill may try.

    dill pickles an open file by name and mode and reopens it on load: a file
    opened for writing comes back truncated. In-memory buffers are safe.
    """
    if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
        try:
            return f"{'closed' if obj.closed else 'open'} {_FILE_REASON}"
        except Exception:  # a detached or half-built file object
            return _FILE_REASON
    for kinds, reason in _REFUSED:
        if isinstance(obj, kinds):
            return reason
    if type(obj).__module__.startswith(_KERNEL_PACKAGES) and not isinstance(obj, type):
        return _KERNEL_REASON
    return None


class _Pickler(dill.Pickler):
    """dill, one value at a time into one stream, refusing what must not come back.

    The memo is kept from one value to the next, so an object two values share
    is written once and comes back shared; a value that fails is cut out of the
    stream and its memo entries forgotten. ``recurse`` stays off: a function
    defined in a cell then pickles its globals as a reference to ``__main__``,
    so after load it sees the restored namespace, later redefinitions and its
    own ``global`` writes, as before.
    """

    def __init__(self, file: IO[bytes], main: types.ModuleType) -> None:
        self.arrays: list[pickle.PickleBuffer] = []
        self.references: set[int] = set()
        super().__init__(
            file, protocol=dill.HIGHEST_PROTOCOL, buffer_callback=self.arrays.append, recurse=False
        )
        self._main = main

    def reducer_override(self, obj: object) -> Any:
        if type(obj) in _PLAIN:  # most objects of a big namespace: skip the checks
            return NotImplemented
        reason = _refusal(obj)
        if reason:
            raise _Refused(obj, reason)
        kind = type(obj)
        if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
            # numpy's own reduction puts the data out of band; dill's copies it.
            return obj.__reduce_ex__(5)  # type: ignore[attr-defined]
        return NotImplemented

    def get(self, i: int) -> bytes:
        self.references.add(i)  # an object met before: perhaps in an earlier value
        return super().get(i)

    def forget(self, memo: int, arrays: int) -> None:
        """Drop what a failed value left in the memo and the array list."""
        while len(self.memo) > memo:
            self.memo.popitem()
        del self.arrays[arrays:]
        self._postproc.clear()


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, which takes over once a value fails to load.

    Its memo is a plain dict, so the entries the failed value should have made
    can be filled with placeholders and the later values' memo numbers stay
    right; the C unpickler's memo cannot be set. Like dill, it maps
    ``__main__``'s namespace to the user's.
    """

    def __init__(
        self, file: IO[bytes], buffers: _Feed, main: types.ModuleType, memo: dict[int, Any]
    ) -> None:
        super().__init__(file, buffers=buffers)
        self.main = main
        self.memo = memo

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("__builtin__", "__main__"):
            return self.main.__dict__
        return super().find_class(module, name)


class _Feed:
    """The out-of-band array data of the value being loaded, taken by the unpickler in order."""

    def __init__(self) -> None:
        self._buffers: Iterator[bytearray | mmap.mmap] = iter(())

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> bytearray | mmap.mmap:
        return next(self._buffers)

    def read(self, data: IO[bytes], offset: int, sizes: list[int]) -> None:
        data.seek(offset)
        buffers = [_array_memory(size) for size in sizes]
        for buffer in buffers:
            if data.readinto(buffer) != len(buffer):
                raise EOFError(f"{data.name} is truncated")
        self._buffers = iter(buffers)


def _array_memory(size: int) -> bytearray | mmap.mmap:
    """Memory for an array's data, to read it into: a big bytearray is zero-filled
    first, so each of its pages would be touched twice (1 GiB loaded in 1.2 s
    instead of 0.65 s here). Fresh private anonymous memory is zero already."""
    if size < _BIG:
        return bytearray(size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _nbytes(buffer: pickle.PickleBuffer) -> int:
    with buffer.raw() as view:
        return view.nbytes


def _shell() -> Any:
    shell = get_ipython()
    if shell is None:
        raise RuntimeError("kernelhib's dill snapshot runs only inside an IPython kernel")
    return shell


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what imports and unpickling print: the server reads the return value."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _type_name(obj: object) -> str:
    kind = type(obj)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _why_not(value: object, exc: Exception) -> str:
    """A short reason a value cannot be kept, for the user to read."""
    if isinstance(exc, _Refused):
        if exc.obj is value:
            return exc.reason
        return f"refers to a {_type_name(exc.obj)} ({exc.reason})"
    if isinstance(exc, dill.PicklingWarning):
        return f"dill could only save it by name, which a new kernel lacks ({exc})"
    return (str(exc) or type(exc).__name__)[:200]


def _write(directory: str, name: str, write: Callable[[IO[bytes]], None]) -> int:
    """Write a private file whole or not at all; return its size."""
    path = os.path.join(directory, name)
    partial = path + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return os.path.getsize(path)


def _write_json(directory: str, name: str, data: dict[str, Any]) -> int:
    return _write(directory, name, lambda f: f.write(json.dumps(data).encode()))


def _namespace(shell: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The user's variables, and separately the modules they name (alias -> module)."""
    hidden = shell.user_ns_hidden
    missing = object()
    variables: dict[str, Any] = {}
    modules: dict[str, str] = {}
    for name, value in shell.user_ns.items():
        if _IPYTHON_NAMES.match(name) or (name.startswith("__") and name.endswith("__")):
            continue
        if hidden.get(name, missing) is value:
            continue
        if isinstance(value, types.ModuleType) and sys.modules.get(value.__name__) is value:
            modules[name] = value.__name__
        else:
            variables[name] = value
    return variables, modules


def _imports(shell: Any) -> list[str]:
    """The modules named by the import statements of the cells run so far that are loaded.

    Reading the cells, rather than comparing ``sys.modules`` with the modules
    loaded at kernel start, keeps out what IPython and libraries load for
    themselves (jedi after a completion) and keeps imports done only for their
    side effects (a pandas accessor). Imports in ``%run`` scripts are missed;
    the modules they bound to names are still restored.
    """
    names: set[str] = set()
    for source in shell.history_manager.input_hist_parsed:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return sorted(name for name in names if name in sys.modules)


def _items(shell: Any, variables: dict[str, Any]) -> dict[_Key, Any]:
    """Everything to pickle together: variables, outputs and ``_ __ ___``.

    One pickle keeps shared references shared: two names for one list stay one
    list, and ``Out[3]`` stays the very DataFrame that ``df`` names.
    """
    items: dict[_Key, Any] = {("var", name): value for name, value in variables.items()}
    items.update(
        (("out", number), value) for number, value in shell.history_manager.output_hist.items()
    )
    items.update(
        (("under", name), shell.user_ns[name]) for name in _UNDERS if name in shell.user_ns
    )
    return items


def _label(kind: str, name: Any) -> str:
    return f"Out[{name}]" if kind == "out" else str(name)


def _lost(kind: str, name: Any, type_name: str, reason: str) -> list[dict[str, str]]:
    """The ``lost`` entry for an item that was not kept: variables and module state are
    reported; outputs and ``_ __ ___`` are history only."""
    if kind == "var":
        return [{"name": name, "type": type_name, "reason": reason}]
    if kind == "state":
        return [{"name": name, "type": "module state", "reason": reason}]
    return []


def _pickle(
    directory: str, items: dict[_Key, Any], main: types.ModuleType
) -> tuple[list[dict[str, Any]], dict[_Key, str], int]:
    """Pickle ``items`` one by one into one stream; return its index, the failures, bytes.

    Each entry of the index says where a value starts, how many memo entries
    exist after it, the sizes of its array data, and which earlier values it
    shares objects with: if one of those fails to load, it cannot load either.
    dill's warnings that it falls back to a reference by name are errors here,
    as a new kernel has no such name.
    """
    entries: list[dict[str, Any]] = []
    failures: dict[_Key, str] = {}
    arrays: list[pickle.PickleBuffer] = []
    starts: list[int] = []  # memo size when each entry began, to find who owns an object

    def write(f: IO[bytes]) -> None:
        pickler = _Pickler(f, main)
        for (kind, name), value in items.items():
            offset, memo, first_array = f.tell(), len(pickler.memo), len(pickler.arrays)
            pickler.references.clear()
            try:
                pickler.dump(value)
            except Exception as exc:
                pickler.forget(memo, first_array)
                f.seek(offset)
                f.truncate()
                failures[(kind, name)] = _why_not(value, exc)
                continue
            owners = {bisect.bisect_right(starts, i) - 1 for i in pickler.references if i < memo}
            starts.append(memo)
            entries.append(
                {
                    "kind": kind,
                    "name": name,
                    "type": _type_name(value),
                    "offset": offset,
                    "memo": len(pickler.memo),
                    "after": sorted(owners),
                    "buffers": [_nbytes(array) for array in pickler.arrays[first_array:]],
                }
            )
        arrays.extend(pickler.arrays)

    def write_arrays(f: IO[bytes]) -> None:
        for array in arrays:
            with array.raw() as view:
                f.write(view)

    with warnings.catch_warnings():
        warnings.simplefilter("error", dill.PicklingWarning)
        size = _write(directory, _PICKLE, write)
    return entries, failures, size + _write(directory, _DATA, write_arrays)


def _same(value: object, default: object) -> bool:
    try:
        return bool(value == default)
    except Exception:  # an array-like value: keep it
        return False


def _set_each(assign: Callable[[str, Any], None], values: dict[str, Any]) -> None:
    """Set every value that takes; then name those that did not."""
    failed: dict[str, str] = {}
    for key, value in values.items():
        try:
            assign(key, value)
        except Exception as exc:
            failed[key] = _why_not(None, exc)
    if failed:
        raise ValueError("; ".join(f"{key}: {reason}" for key, reason in failed.items()))


def _changed_rc_params(mpl: Any) -> dict[str, Any] | None:
    """rcParams that differ from matplotlib's defaults, read raw: reading ``backend``
    through rcParams would pick a backend (and import pyplot); the backend is kept apart."""
    defaults = mpl.rcParamsDefault
    changed = {
        key: value
        for key, value in dict.items(mpl.rcParams)
        if not key.startswith("backend") and not _same(value, dict.get(defaults, key))
    }
    return changed or None


def _set_rc_params(mpl: Any, changed: dict[str, Any]) -> None:
    _set_each(mpl.rcParams.__setitem__, changed)


def _changed_pandas_options(pd: Any) -> dict[str, Any] | None:
    """Options set away from their defaults (deprecated ones warn when read: skipped)."""
    config = sys.modules["pandas._config.config"]
    deprecated = getattr(config, "_deprecated_options", {})
    changed = {}
    for key, option in config._registered_options.items():
        if key not in deprecated:
            value = pd.get_option(key)
            if not _same(value, option.defval):
                changed[key] = value
    return changed or None


def _set_pandas_options(pd: Any, changed: dict[str, Any]) -> None:
    _set_each(pd.set_option, changed)


def _set_warning_filters(module: Any, filters: list[tuple[Any, ...]]) -> None:
    module.resetwarnings()  # also forgets which warnings were already shown under the old filters
    module.filters.extend(filters)


def _logger_levels(logging: Any) -> dict[str, int]:
    """The root logger's level and those of loggers given one (``""`` is the root)."""
    levels = {"": logging.root.level}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _set_logger_levels(logging: Any, levels: dict[str, int]) -> None:
    _set_each(lambda name, level: logging.getLogger(name or None).setLevel(level), levels)


def _cuda_generators(torch: Any) -> list[Any] | None:
    """Each GPU's default generator, once CUDA has started in the kernel (asking
    before would start it, in a kernel that may never use the GPU)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_cuda_generators(torch: Any, states: list[Any]) -> None:
    """Set each GPU's generator; torch does it when CUDA starts, if it has not yet."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count != len(states):
        raise RuntimeError(f"saved for {len(states)} GPU(s), and this kernel sees {count}")
    torch.cuda.set_rng_state_all(states)


# State kept inside modules, saved with the variables when the module was imported:
# (name in ``lost``, module, read it from the module or None if at its default, set it).
_MODULE_STATE: tuple[tuple[str, str, Callable[[Any], Any], Callable[[Any, Any], None]], ...] = (
    ("random state", "random", lambda r: r.getstate(), lambda r, s: r.setstate(s)),
    ("numpy.random state", "numpy.random", lambda r: r.get_state(), lambda r, s: r.set_state(s)),
    ("matplotlib.rcParams", "matplotlib", _changed_rc_params, _set_rc_params),
    ("pandas options", "pandas", _changed_pandas_options, _set_pandas_options),
    ("warnings filters", "warnings", lambda module: list(module.filters), _set_warning_filters),
    ("logging levels", "logging", _logger_levels, _set_logger_levels),
    ("torch generator", "torch", lambda t: t.get_rng_state(), lambda t, s: t.set_rng_state(s)),
    ("torch CUDA generators", "torch", _cuda_generators, _set_cuda_generators),
)


def _module_state() -> tuple[dict[_Key, Any], dict[_Key, str]]:
    """The state of the imported modules of :data:`_MODULE_STATE`, and what could not be read.

    A module not imported is left alone: reading its state would import it.
    """
    state: dict[_Key, Any] = {}
    failures: dict[_Key, str] = {}
    for name, module, read, _ in _MODULE_STATE:
        if module not in sys.modules:
            continue
        try:
            value = read(sys.modules[module])
        except Exception as exc:
            failures[("state", name)] = f"could not be read: {_why_not(None, exc)}"
            continue
        if value is not None:
            state[("state", name)] = value
    return state, failures


def _restore_module_state(items: dict[_Key, Any], lost: list[dict[str, str]]) -> None:
    """Set the module state that was saved and loaded; what does not take is lost."""
    for name, module, _, apply in _MODULE_STATE:
        if ("state", name) in items:
            try:
                apply(importlib.import_module(module), items[("state", name)])
            except Exception as exc:
                reason = f"could not be restored: {_why_not(None, exc)}"
                lost.extend(_lost("state", name, "", reason))


def _matplotlib_backend() -> str | None:
    """The backend in use, if pyplot was imported (before that there is none to keep)."""
    if "matplotlib.pyplot" not in sys.modules:
        return None
    return str(sys.modules["matplotlib"].get_backend())


def save(directory: str) -> dict[str, Any]:
    """Snapshot the kernel's user namespace, history and process settings into ``directory``.

    Returns, and writes as ``snapshot.json``: ``variables`` (names kept),
    ``lost`` (``{"name", "type", "reason"}`` of each variable not kept),
    ``modules`` (alias -> module name), ``execution_count`` (the number of
    the last cell run) and ``bytes`` (size of the other files written).
    """
    shell = _shell()
    with _quiet():
        variables, modules = _namespace(shell)
        items = _items(shell, variables)
        state_items, unread = _module_state()
        items.update(state_items)
        entries, failures, size = _pickle(directory, items, shell.user_module)
        failures.update(unread)
        history = shell.history_manager
        state = {
            "format": _FORMAT,
            "cwd": os.getcwd(),
            "environ": dict(os.environ),
            "sys_path": list(sys.path),
            "imports": _imports(shell),
            "input_hist_raw": list(history.input_hist_raw),
            "input_hist_parsed": list(history.input_hist_parsed),
            "last_inputs": {name: getattr(history, name) for name in ("_i00", "_i", "_ii", "_iii")},
            "matplotlib": _matplotlib_backend(),
            "items": entries,
        }
        size += _write_json(directory, STATE, state)
        lost = [
            entry
            for (kind, name), reason in failures.items()
            for entry in _lost(kind, name, _type_name(items.get((kind, name))), reason)
        ]
        summary = {
            "variables": sorted(name for name in variables if ("var", name) not in failures),
            "lost": sorted(lost, key=lambda entry: entry["name"]),
            "modules": modules,
            "execution_count": shell.execution_count - 1,
            "bytes": size,
        }
        _write_json(directory, SUMMARY, summary)
    return summary


def _restore_process(state: dict[str, Any], problems: list[str]) -> None:
    """Working directory, environment and ``sys.path``, before anything is imported."""
    try:
        os.chdir(state["cwd"])
    except OSError as exc:
        problems.append(f"working directory not restored: {exc}")
    environ = {k: v for k, v in state["environ"].items() if not k.startswith(_LAUNCH_ENV)}
    for name in [k for k in os.environ if k not in environ and not k.startswith(_LAUNCH_ENV)]:
        del os.environ[name]
    os.environ.update(environ)
    sys.path[:] = state["sys_path"] + [p for p in sys.path if p not in state["sys_path"]]
    for name in state["imports"]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems.append(f"import {name} failed: {_why_not(None, exc)}")


class _Blocked(Exception):
    """A value was not loaded because one it shares objects with did not load."""

    def __init__(self, culprits: list[int]) -> None:
        super().__init__(culprits)
        self.culprits = culprits


def _missing_name(exc: Exception, main: types.ModuleType) -> str | None:
    """The name a value failed on that the namespace lacks yet (an imported function that a
    class's ``__init__`` calls, restored later in the stream), or None."""
    name = getattr(exc, "name", None) if isinstance(exc, (NameError, AttributeError)) else None
    if not isinstance(name, str) or name in main.__dict__ or hasattr(builtins, name):
        return None
    return name


def _unpickle(
    directory: str,
    main: types.ModuleType,
    entries: list[dict[str, Any]],
    lost: list[dict[str, str]],
) -> dict[_Key, Any]:
    """Every value that loads; one that does not is lost with those that share its objects.

    Each variable goes into the namespace as soon as it loads, so the values
    after it find it; a value that failed on a name the namespace lacked, and
    those sharing its objects, are tried again once the name is there. The fast
    C unpickler reads the stream until a value fails; the pure-Python one,
    given its memo, carries on from the next value and does the retries.
    """
    items: dict[_Key, Any] = {}
    failed: dict[int, Exception] = {}
    missing: dict[int, str | None] = {}
    feed = _Feed()
    offsets = list(itertools.accumulate((sum(e["buffers"]) for e in entries), initial=0))
    with (
        open(os.path.join(directory, _PICKLE), "rb") as f,
        open(os.path.join(directory, _DATA), "rb") as data,
    ):

        def attempt(index: int, unpickler: Any) -> None:
            entry = entries[index]
            feed.read(data, offsets[index], entry["buffers"])
            value = unpickler.load()
            items[(entry["kind"], entry["name"])] = value
            if entry["kind"] == "var":
                main.__dict__[entry["name"]] = value

        unpickler: Any = dill.Unpickler(f, buffers=feed, ignore=True)
        unpickler._main = main  # globals of functions pickled by reference to __main__
        for index, entry in enumerate(entries):
            try:
                culprits = [i for i in entry["after"] if i in failed]
                if culprits:
                    raise _Blocked(culprits)
                if isinstance(unpickler, _Unpickler):
                    f.seek(entry["offset"])
                attempt(index, unpickler)
            except Exception as exc:
                _raise_if_out_of_memory(exc, _label(entry["kind"], entry["name"]))
                failed[index], missing[index] = exc, _missing_name(exc, main)
                if not isinstance(unpickler, _Unpickler):
                    unpickler = _Unpickler(f, feed, main, unpickler.memo.copy())
                unpickler.memo.update((i, None) for i in range(len(unpickler.memo), entry["memo"]))
        retried = True
        while retried:
            retried = False
            for index in sorted(failed):
                exc, entry = failed[index], entries[index]
                blocked = isinstance(exc, _Blocked) and failed.keys().isdisjoint(exc.culprits)
                if not (blocked or missing[index] in main.__dict__):
                    continue
                start = entries[index - 1]["memo"] if index else 0  # memo numbers follow on
                retry = _Unpickler(f, feed, main, {i: unpickler.memo[i] for i in range(start)})
                f.seek(entry["offset"])
                try:
                    attempt(index, retry)
                except Exception as again:
                    _raise_if_out_of_memory(again, _label(entry["kind"], entry["name"]))
                    failed[index], missing[index] = again, _missing_name(again, main)
                    continue
                unpickler.memo.update(retry.memo)
                del failed[index]
                retried = True
    for index, exc in sorted(failed.items()):
        entry = entries[index]
        if isinstance(exc, _Blocked):
            labels = [
                _label(entries[i]["kind"], entries[i]["name"]) for i in exc.culprits if i in failed
            ]
            reason = f"shares objects with {', '.join(labels)}, which did not load"
        else:
            reason = f"could not be unpickled: {_why_not(None, exc)}"
        lost.extend(_lost(entry["kind"], entry["name"], entry["type"], reason))
    return items


def _raise_if_out_of_memory(exc: Exception, label: str) -> None:
    """Lack of memory, host or GPU (torch's and CuPy's OutOfMemoryError), fails the wake:
    unlike a missing module, waking later may succeed, so the image is kept rather than
    the value lost."""
    if not (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "out of memory" in str(exc).lower()  # "CUDA error: out of memory", a RuntimeError
    ):
        return
    first_line = (str(exc) or type(exc).__name__).splitlines()[0]
    raise MemoryError(
        f"{label} did not fit in the memory free now ({first_line}). "
        "Nothing was lost: free memory (GPU memory, for a tensor on the GPU) "
        "and wake the kernel again"
    ) from exc


def _restore_history(shell: Any, state: dict[str, Any], items: dict[_Key, Any]) -> None:
    """``In``, ``Out``, ``_i<N>``, ``_<N>``, ``_i``... and ``_ __ ___``, as IPython keeps them."""
    history = shell.history_manager
    history.input_hist_raw[:] = state["input_hist_raw"]
    history.input_hist_parsed[:] = state["input_hist_parsed"]  # the very list In names
    for name, source in state["last_inputs"].items():
        setattr(history, name, source)
    outputs = {number: value for (kind, number), value in items.items() if kind == "out"}
    history.output_hist.update(outputs)
    unders = {name: value for (kind, name), value in items.items() if kind == "under"}
    for name, value in unders.items():
        setattr(shell.displayhook, name, value)  # else the next output stops updating _
    names = {f"_i{n}": source for n, source in enumerate(state["input_hist_raw"]) if n}
    names.update((f"_{n}", value) for n, value in outputs.items())
    names.update({name: state["last_inputs"][name] for name in ("_i", "_ii", "_iii")})
    shell.push({**names, **unders}, interactive=False)


def _restore_matplotlib(shell: Any, backend: str | None, problems: list[str]) -> None:
    """Inline and file backends come back; a GUI or widget backend needs ``%matplotlib``."""
    if backend is None:
        return
    gui = "inline" if backend == _INLINE_BACKEND else backend.lower()
    if gui != "inline" and gui not in _FILE_BACKENDS:
        problems.append(f"matplotlib backend {backend} not restored: run %matplotlib again")
        return
    try:
        shell.enable_matplotlib(gui)
    except Exception as exc:
        problems.append(f"matplotlib backend {backend} not restored: {_why_not(None, exc)}")


def _notice(lost: list[dict[str, str]], problems: list[str]) -> str:
    """What the first cell after a load tells the user, even if nothing was lost.

    Even then the kernel is a new process: threads, comms and the state inside
    imported modules beyond :data:`_MODULE_STATE` did not come back.
    """
    text = "kernelhib: this kernel was restored from a dill snapshot into a new process."
    if lost:
        text += " Not kept: " + ", ".join(f"{e['name']} ({e['reason']})" for e in lost) + "."
    text += (
        " Threads, comms and widgets, open handles and state held inside imported modules"
        " (other than random streams, torch's generators, matplotlib and pandas options,"
        " warning filters and logging levels) are gone."
    )
    return "\n".join([text, *(f"kernelhib: {problem}" for problem in problems)])


def _announce(shell: Any, text: str) -> None:
    """Print ``text`` to stderr in the next cell the user runs, once.

    ``pre_run_cell`` does not fire for silent requests, so the server's own
    requests (the load itself included) do not use it up.
    """

    def announce(info: object) -> None:
        shell.events.unregister("pre_run_cell", announce)
        print(text, file=sys.stderr, flush=True)

    shell.events.register("pre_run_cell", announce)


def load(directory: str) -> dict[str, Any]:
    """Restore a snapshot written by :func:`save` into this (fresh) kernel.

    Returns ``lost`` (what :func:`save` could not keep, plus variables whose
    pickle or module did not load), ``restored`` (names now in the namespace)
    and ``warnings`` (process settings that could not be restored).
    """
    shell = _shell()
    with _quiet():
        with open(os.path.join(directory, SUMMARY)) as f:
            summary = json.load(f)
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        if state.get("format") != _FORMAT:
            raise ValueError(f"unknown snapshot format {state.get('format')!r} in {directory}")
        problems: list[str] = []
        lost: list[dict[str, str]] = list(summary["lost"])
        _restore_process(state, problems)
        namespace: dict[str, Any] = {}
        for alias, module in summary["modules"].items():
            try:
                namespace[alias] = importlib.import_module(module)
            except Exception as exc:
                reason = f"import {module} failed: {_why_not(None, exc)}"
                lost.append({"name": alias, "type": "module", "reason": reason})
        shell.push(namespace)  # first: code run by unpickling may use the modules
        items = _unpickle(directory, shell.user_module, state["items"], lost)
        variables = {name: value for (kind, name), value in items.items() if kind == "var"}
        shell.push(variables)
        namespace.update(variables)
        _restore_history(shell, state, items)
        shell.execution_count = summary["execution_count"] + 1
        _restore_matplotlib(shell, state["matplotlib"], problems)
        _restore_module_state(items, lost)
        _announce(shell, _notice(lost, problems))
    return {"lost": lost, "restored": sorted(namespace), "warnings": problems}
