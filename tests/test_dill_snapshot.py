"""The dill engine's kernel side: save a real kernel's namespace, load it into a fresh one.

No CRIU, no root: these tests run as any user. The main scenario calls the
module the way the server does, by sending its source in a user expression.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

from kernelhib.engines import dill, dill_snapshot

FILE_REASON = "open file handle: reopening it could overwrite the file"

SETUP = """
import os, sys, socket, sqlite3, threading
import numpy as np
import pandas as pd
import xml.dom.minidom  # loads a submodule that no name refers to

os.chdir(WORKDIR)
os.environ["KERNELHIB_TEST"] = "kept"
del os.environ["KERNELHIB_DROPPED"]
sys.path.append(LIBDIR)
import userlib

answer = 42
words = {"a": [1, 2], "b": ("x", None)}
a = [1]
b = a
b.append(2)

counter = 0
def bump():
    global counter
    counter += 1
    return counter

def twice(x):
    return helper(x) * 2
def helper(x):
    return x + 1

def make_adder(n):
    def add(x):
        return x + n
    return add
add3 = make_adder(3)
square = lambda x: x * x

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x ** 2 + self.y ** 2
point = Point(3, 4)

class Noisy:
    def __setstate__(self, state):
        print("noisy unpickled")
        sys.stderr.write("noisy on stderr")
        self.__dict__.update(state)
noisy = Noisy()
noisy.level = 11

thing = userlib.Thing(5)  # a class pickled by reference, from a module on LIBDIR
array = np.arange(12).reshape(3, 4)
big = np.arange(500_000, dtype=np.float64)  # 4 MB: loaded into memory of its own
evens = big[::2]  # a view of it
frame = pd.DataFrame({"n": [1, 2, 3], "s": ["x", "y", "z"]})

gen = (i for i in range(3))
sock = socket.socket()
lock = threading.Lock()
db = sqlite3.connect(":memory:")
fh = open("precious.txt", "w")
fh.write("precious")
fh.flush()
holder = {"handle": fh}
shell = get_ipython()
"""

EXPECTED_LOST = [
    {
        "name": "db",
        "type": "sqlite3.Connection",
        "reason": "sqlite3 connection: reconnect after wake",
    },
    {"name": "fh", "type": "_io.TextIOWrapper", "reason": FILE_REASON},
    {"name": "gen", "type": "generator", "reason": "generator: its paused frame cannot be saved"},
    {"name": "holder", "type": "dict", "reason": f"refers to a _io.TextIOWrapper ({FILE_REASON})"},
    {
        "name": "lock",
        "type": "_thread.lock",
        "reason": "thread or lock: the threads that used it are gone",
    },
    {
        "name": "shell",
        "type": "ipykernel.zmqshell.ZMQInteractiveShell",
        "reason": "the IPython shell: call get_ipython() again after wake",
    },
    {
        "name": "sock",
        "type": "socket.socket",
        "reason": "open socket: its connection ended with the old kernel",
    },
]
KEPT = sorted(
    [
        *("WORKDIR", "LIBDIR", "answer", "words", "a", "b", "counter", "bump", "twice", "helper"),
        *("make_adder", "add3", "square", "Point", "point", "Noisy", "noisy", "thing", "array"),
        *("big", "evens", "frame"),
    ]
)
MODULES = {
    "os": "os",
    "sys": "sys",
    "socket": "socket",
    "sqlite3": "sqlite3",
    "threading": "threading",
    "np": "numpy",
    "pd": "pandas",
    "xml": "xml",
    "userlib": "userlib",
}


@dataclass
class Outputs:
    """What one execution sent on IOPub."""

    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)


class Kernel:
    """A real ipykernel of this venv, with a blocking client."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd), env=env)

    def execute(self, code: str, **options: Any) -> tuple[dict[str, Any], Outputs]:
        outputs = Outputs()

        def collect(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                setattr(
                    outputs, content["name"], getattr(outputs, content["name"]) + content["text"]
                )
            elif msg["msg_type"] in ("execute_result", "display_data"):
                outputs.results.append(content["data"]["text/plain"])

        reply = self.kc.execute_interactive(code, output_hook=collect, timeout=120, **options)
        content = reply["content"]
        assert content["status"] == "ok", "\n".join(content.get("traceback", []))
        return content, outputs

    def run(self, code: str) -> Outputs:
        return self.execute(code)[1]

    def value(self, expression: str) -> Any:
        """A JSON-able value computed in the kernel, without touching its history."""
        content, _ = self.execute(
            "", silent=True, user_expressions={"v": f"__import__('json').dumps(({expression}))"}
        )
        return dill.read_result(content["user_expressions"]["v"])

    def call(self, function: str, directory: Path) -> dict[str, Any]:
        """Call ``save`` or ``load`` exactly as the server does: source in a user expression."""
        expression = dill.call_expression(function, str(directory))
        content, outputs = self.execute("", silent=True, user_expressions={"r": expression})
        assert outputs == Outputs(), "save and load must print nothing"
        return dill.read_result(content["user_expressions"]["r"])

    def import_and_call(self, function: str, directory: Path) -> dict[str, Any]:
        """Call ``save`` or ``load`` through a normal import of the module."""
        module = "__import__('kernelhib.engines.dill_snapshot', fromlist=['_'])"
        return self.value(f"{module}.{function}({str(directory)!r})")

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@dataclass
class Scenario:
    """One kernel saved after SETUP, and a fresh kernel that loaded it."""

    kernel: Kernel
    root: Path
    image: Path
    saved: dict[str, Any]
    loaded: dict[str, Any]
    first: Outputs
    first_count: int
    second: Outputs


def kernel_env(root: Path) -> dict[str, str]:
    """This process's environment, with IPython's files kept under ``root``."""
    return {
        **os.environ,
        "IPYTHONDIR": str(root / "ipython"),
        "KERNELHIB_DROPPED": "1",
    }


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("dill")
    (root / "lib").mkdir()
    (root / "lib" / "userlib.py").write_text(
        "class Thing:\n    def __init__(self, n):\n        self.n = n\n"
    )
    (root / "work").mkdir()
    image = root / "image"
    image.mkdir(mode=0o700)
    env = kernel_env(root)

    old = Kernel(root, env)
    try:
        old.run(f"WORKDIR, LIBDIR = {str(root / 'work')!r}, {str(root / 'lib')!r}")
        old.run(SETUP)
        assert old.run("frame").results
        assert old.run("answer + 1").results == ["43"]
        saved = old.call("save", image)
    finally:
        old.shutdown()

    kernel = Kernel(root, env)
    loaded = kernel.call("load", image)
    reply, first = kernel.execute("print('first')")
    second = kernel.run("print('second')")
    yield Scenario(kernel, root, image, saved, loaded, first, reply["execution_count"], second)
    kernel.shutdown()


def test_save_reports_what_it_kept_and_lost(scenario: Scenario) -> None:
    saved = scenario.saved
    assert saved["variables"] == KEPT
    assert saved["lost"] == EXPECTED_LOST
    assert saved["modules"] == MODULES
    assert saved["execution_count"] == 4
    files = sorted(p.name for p in scenario.image.iterdir())
    # The arrays' data goes next to the pickle, out of band.
    assert files == ["namespace.data", "namespace.pkl", "snapshot.json", "state.json"]
    assert json.loads((scenario.image / "snapshot.json").read_text()) == saved
    assert saved["bytes"] == sum(
        (scenario.image / name).stat().st_size for name in files if name != "snapshot.json"
    )
    for file in scenario.image.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_load_restores_the_rest(scenario: Scenario) -> None:
    assert scenario.loaded["lost"] == EXPECTED_LOST
    assert scenario.loaded["restored"] == sorted(KEPT + list(MODULES))
    assert scenario.loaded["warnings"] == []


def test_values_functions_and_classes(scenario: Scenario) -> None:
    kernel = scenario.kernel
    assert kernel.value("answer, words['a'], words['b']") == [42, [1, 2], ["x", None]]
    assert kernel.value("twice(1), add3(4), square(5)") == [4, 7, 25]
    assert kernel.value("point.norm2(), isinstance(point, Point), thing.n") == [25, True, 5]
    assert kernel.value("type(thing).__module__") == "userlib"
    # Functions see the restored namespace itself: global writes and redefinitions.
    assert kernel.value("bump(), bump(), counter") == [1, 2, 2]
    kernel.run("def helper(x):\n    return 100")
    assert kernel.value("twice(1)") == 200


def test_aliases_stay_shared(scenario: Scenario) -> None:
    assert scenario.kernel.value("a is b, a") == [True, [1, 2]]
    assert scenario.kernel.value("Out[3] is frame") is True


def test_numpy_and_pandas(scenario: Scenario) -> None:
    kernel = scenario.kernel
    assert kernel.value("array.tolist(), str(array.dtype)") == [
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
        "int64",
    ]
    assert kernel.value("float(big.sum()), float(evens[-1]), big.flags.writeable") == [
        124999750000.0,
        499998.0,
        True,
    ]
    # numpy pickles a view's data, not its base: it comes back as an array of its own
    # (docs/engines.md says so).
    assert kernel.value("big.__setitem__(2, -1.0), float(evens[1])") == [None, 2.0]
    assert kernel.value("frame.to_dict('list')") == {"n": [1, 2, 3], "s": ["x", "y", "z"]}
    assert kernel.value("np.ones(2).sum(), pd.__name__") == [2.0, "pandas"]


def test_history_and_execution_count(scenario: Scenario) -> None:
    kernel = scenario.kernel
    assert kernel.value("In[1]").startswith("WORKDIR, LIBDIR = ")
    assert kernel.value("In[3], _i3, _ih[4]") == ["frame", "frame", "answer + 1"]
    assert kernel.value("Out[4], _4, _, __ is frame") == [43, 43, 43, True]
    # The saved kernel ran 4 cells: the first cell after load is the 5th.
    assert scenario.first_count == 5
    assert kernel.value("In[5], In[6]") == ["print('first')", "print('second')"]


def test_process_settings(scenario: Scenario) -> None:
    kernel = scenario.kernel
    assert kernel.value("os.getcwd()") == str(scenario.root / "work")
    assert kernel.value("os.environ.get('KERNELHIB_TEST'), 'KERNELHIB_DROPPED' in os.environ") == [
        "kept",
        False,
    ]
    assert kernel.value("sys.path[-1]") == str(scenario.root / "lib")
    assert kernel.value("'xml.dom.minidom' in sys.modules") is True


def test_an_open_file_is_never_reopened(scenario: Scenario) -> None:
    assert (scenario.root / "work" / "precious.txt").read_text() == "precious"
    assert scenario.kernel.value("'fh' in globals()") is False


def test_the_first_cell_after_load_says_what_was_lost_once(scenario: Scenario) -> None:
    notice = scenario.first.stderr
    assert notice.startswith("kernelhib: this kernel was restored from a dill snapshot")
    for entry in EXPECTED_LOST:
        assert f"{entry['name']} ({entry['reason']})" in notice
    assert "Threads, comms and widgets, open handles" in notice
    assert scenario.first.stdout == "first\n"
    assert scenario.second == Outputs(stdout="second\n")


def test_a_restored_kernel_can_hibernate_again(scenario: Scenario) -> None:
    image = scenario.root / "again"
    image.mkdir(mode=0o700)
    saved = scenario.kernel.call("save", image)
    assert saved["lost"] == []
    assert set(saved["variables"]) >= set(KEPT)
    kernel = Kernel(scenario.root, kernel_env(scenario.root))
    try:
        loaded = kernel.call("load", image)
        assert loaded["lost"] == loaded["warnings"] == []
        assert kernel.value("In[4], Out[4], In[5], a is b") == [
            "answer + 1",
            43,
            "print('first')",
            True,
        ]
        assert kernel.value("thing.n, frame.shape, os.getcwd()") == [
            5,
            [3, 2],
            str(scenario.root / "work"),
        ]
        assert kernel.run("1").stderr.startswith("kernelhib: this kernel was restored")
    finally:
        kernel.shutdown()


@pytest.mark.parametrize(
    ("backend", "warnings"),
    [
        ("agg", []),
        ("webagg", ["matplotlib backend webagg not restored: run %matplotlib again"]),
    ],
)
def test_matplotlib_backend(
    tmp_path: Path, kernels: list[Kernel], backend: str, warnings: list[str]
) -> None:
    pytest.importorskip("matplotlib")
    code = f"import matplotlib\nmatplotlib.use({backend!r})\nimport matplotlib.pyplot as plt"
    _, loaded, kernel = save_then_load(tmp_path, kernels, code)
    assert loaded["warnings"] == warnings
    restored = "agg" if backend == "agg" else "module://matplotlib_inline.backend_inline"
    assert kernel.value("plt.get_backend()") == restored


@pytest.fixture
def kernels(tmp_path: Path) -> Iterator[list[Kernel]]:
    """Kernels started by a test, shut down after it."""
    started: list[Kernel] = []
    yield started
    for kernel in started:
        kernel.shutdown()


def save_then_load(tmp_path: Path, kernels: list[Kernel], code: str) -> tuple[dict, dict, Kernel]:
    """Run ``code`` in a kernel, save it, load it into another: through a normal import."""
    image = tmp_path / "image"
    image.mkdir(mode=0o700)
    kernels.append(Kernel(tmp_path, kernel_env(tmp_path)))
    kernels[0].run(code)
    saved = kernels[0].import_and_call("save", image)
    kernels.append(Kernel(tmp_path, kernel_env(tmp_path)))
    return saved, kernels[1].import_and_call("load", image), kernels[1]


def test_with_nothing_lost_the_notice_is_short(tmp_path: Path, kernels: list[Kernel]) -> None:
    saved, loaded, kernel = save_then_load(tmp_path, kernels, "x = {'k': [1.5]}")
    assert saved["lost"] == loaded["lost"] == []
    assert loaded["restored"] == ["x"]
    notice = kernel.run("x").stderr
    assert notice.startswith("kernelhib: this kernel was restored from a dill snapshot")
    assert "Not kept" not in notice


FAILS_HALF_WAY = """
import enum, threading
holder = {"data": [1, 2], "lock": threading.Lock()}  # fails after pickling data
later = holder["data"]
class Color(enum.Enum):  # dill can only pickle it by name, which a new kernel lacks
    RED = 1
red = Color.RED
shared = [3]
also = shared
"""


def test_a_value_that_fails_half_way_is_cut_out(tmp_path: Path, kernels: list[Kernel]) -> None:
    saved, loaded, kernel = save_then_load(tmp_path, kernels, FAILS_HALF_WAY)
    lock_reason = "thread or lock: the threads that used it are gone"
    by_name = "dill could only save it by name, which a new kernel lacks"
    assert [(e["name"], e["reason"]) for e in saved["lost"]] == [
        ("Color", f"{by_name} (Cannot locate reference to <enum 'Color'>.)"),
        ("holder", f"refers to a _thread.lock ({lock_reason})"),
        ("red", f"{by_name} (Cannot locate reference to <enum 'Color'>.)"),
    ]
    assert loaded["lost"] == saved["lost"]
    assert loaded["restored"] == ["also", "enum", "later", "shared", "threading"]
    assert kernel.value("later, shared is also") == [[1, 2], True]


def test_a_value_that_cannot_load_takes_only_what_shares_its_objects(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    (tmp_path / "gone.py").write_text("class Gone:\n    pass\n")
    image = tmp_path / "image"
    image.mkdir(mode=0o700)
    kernels.append(Kernel(tmp_path, kernel_env(tmp_path)))
    kernels[0].run(
        f"import sys; sys.path.append({str(tmp_path)!r})\n"
        "import numpy as np, gone\n"
        "before = [0]\n"
        "obj = gone.Gone()\n"
        "pair = [obj, before]\n"  # needs obj
        "after = [before, np.arange(3)]\n"  # loaded past the failure, with array data
        "alias = after\n"
        "def get_before():\n"  # its globals are the namespace, also past the failure
        "    return before"
    )
    kernels[0].call("save", image)
    (tmp_path / "gone.py").unlink()
    kernels.append(Kernel(tmp_path, kernel_env(tmp_path)))
    loaded = kernels[1].call("load", image)
    missing = "No module named 'gone'"
    assert loaded["lost"] == [
        {"name": "gone", "type": "module", "reason": f"import gone failed: {missing}"},
        {"name": "obj", "type": "gone.Gone", "reason": f"could not be unpickled: {missing}"},
        {
            "name": "pair",
            "type": "list",
            "reason": "shares objects with obj, which did not load",
        },
    ]
    assert loaded["restored"] == ["after", "alias", "before", "get_before", "np", "sys"]
    assert loaded["warnings"] == [f"import gone failed: {missing}"]
    value = "after[0] is before, alias is after, after[1].tolist(), get_before() is before"
    assert kernels[1].value(value) == [True, True, [0, 1, 2], True]


def test_outside_ipython_it_refuses_to_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="only inside an IPython kernel"):
        dill_snapshot.save(str(tmp_path))


NEEDS_NAMES = """
from collections import Counter
from statistics import mean

class Tally(Counter):
    # Counter pickles as Tally(dict): loading it runs __init__, which needs mean and scale.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.average = scale(mean(self.values())) if self else 0

def scale(x):
    return x * 10

early = Tally()  # empty, so built before its helper existed; filled below
pair = [early, "shared"]  # shares early
del scale
def scale(x):  # redefined: now after early and pair in the namespace
    return x * 10
early.update("aab")
late = Tally("xyyzzz")
"""


def test_values_that_need_names_to_load_find_them(tmp_path: Path, kernels: list[Kernel]) -> None:
    saved, loaded, kernel = save_then_load(tmp_path, kernels, NEEDS_NAMES)
    assert saved["lost"] == loaded["lost"] == []
    assert loaded["restored"] == ["Counter", "Tally", "early", "late", "mean", "pair", "scale"]
    # late found mean and scale loaded before it; early and pair (which shares it) were
    # tried again once scale, saved after them, was back.
    assert kernel.value("dict(early), late.average, pair[0] is early") == [
        {"a": 2, "b": 1},
        20.0,
        True,
    ]


MODULE_STATE = """
import logging, random, warnings
import matplotlib
import numpy as np
import pandas as pd

random.seed(7)
np.random.seed(7)
rng = np.random.default_rng(7)
legacy = np.random.RandomState(7)
started = [random.random(), np.random.random(), rng.random(), legacy.random()]  # not at seed

def peek(draw, get, put):
    # The next three draws, with the stream put back where it was.
    state = get()
    values = [float(draw()) for _ in range(3)]
    put(state)
    return values
expected = {
    "random": peek(random.random, random.getstate, random.setstate),
    "np": peek(np.random.random, np.random.get_state, np.random.set_state),
    "rng": peek(rng.random, lambda: rng.bit_generator.state,
                lambda s: setattr(rng.bit_generator, "state", s)),
    "legacy": peek(legacy.random, legacy.get_state, legacy.set_state),
}

matplotlib.rcParams["lines.linewidth"] = 4.5
pd.set_option("display.max_rows", 7)
warnings.filterwarnings("ignore", message="kernelhib-noise")
logging.getLogger("mylib").setLevel(logging.DEBUG)
logging.getLogger().setLevel(logging.ERROR)
"""


def test_module_state_is_kept(tmp_path: Path, kernels: list[Kernel]) -> None:
    saved, loaded, kernel = save_then_load(tmp_path, kernels, MODULE_STATE)
    assert saved["lost"] == loaded["lost"] == []
    draws = {
        "random": "[random.random() for _ in range(3)]",
        "np": "np.random.random(3).tolist()",
        "rng": "rng.random(3).tolist()",
        "legacy": "legacy.random(3).tolist()",
    }
    for stream, draw in draws.items():
        assert kernel.value(draw) == kernel.value(f"expected[{stream!r}]"), stream
    assert kernel.value("matplotlib.rcParams['lines.linewidth']") == 4.5
    assert kernel.value("pd.get_option('display.max_rows')") == 7
    assert kernel.value("warnings.filters[0][1].pattern") == "kernelhib-noise"
    levels = "logging.getLogger('mylib').level, logging.getLogger().level"
    assert kernel.value(levels) == [logging.DEBUG, logging.ERROR]


def test_module_state_imports_nothing_the_user_did_not(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    _, loaded, kernel = save_then_load(tmp_path, kernels, "x = 1")
    assert loaded["lost"] == []
    imported = "[m for m in ('numpy', 'pandas', 'matplotlib') if m in __import__('sys').modules]"
    assert kernel.value(imported) == []


def test_module_state_that_cannot_be_kept_is_listed_as_lost(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    code = (
        "import threading, warnings\n"
        "class Noisy(UserWarning):\n"
        "    guard = threading.Lock()\n"
        "warnings.simplefilter('ignore', Noisy)"
    )
    saved, loaded, _ = save_then_load(tmp_path, kernels, code)
    reason = "refers to a _thread.lock (thread or lock: the threads that used it are gone)"
    assert saved["lost"] == [
        {"name": "Noisy", "type": "type", "reason": reason},
        {"name": "warnings filters", "type": "module state", "reason": reason},
    ]
    assert loaded["lost"] == saved["lost"]


TORCH_STREAM = """
import torch
torch.manual_seed(7)
torch.rand(2)  # not at the seed
def peek():
    state = torch.get_rng_state()
    values = torch.rand(3).tolist()
    torch.set_rng_state(state)
    return values
expected = peek()
"""


def test_a_seeded_torch_generator_continues_its_stream(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    # The CPU build of torch (scripts/setup.sh installs it where one is at hand). A fresh
    # kernel's generator starts from torch's fixed default seed, not from this stream.
    pytest.importorskip("torch", reason="torch is not installed (scripts/setup.sh)")
    saved, loaded, kernel = save_then_load(tmp_path, kernels, TORCH_STREAM)
    assert saved["lost"] == loaded["lost"] == []
    assert kernel.value("torch.rand(3).tolist()") == kernel.value("expected")


def test_gpu_generators_for_gpus_the_new_kernel_lacks_are_listed_as_lost(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    # A kernel that had started CUDA on one GPU, stood in for: its GPU generator's state
    # is the CPU one's. The new kernel sees no GPU.
    pytest.importorskip("torch", reason="torch is not installed (scripts/setup.sh)")
    code = (
        "import torch\n"
        "torch.cuda.is_initialized = lambda: True\n"
        "torch.cuda.get_rng_state_all = lambda: [torch.get_rng_state()]"
    )
    saved, loaded, _ = save_then_load(tmp_path, kernels, code)
    assert saved["lost"] == []
    reason = "could not be restored: saved for 1 GPU(s), and this kernel sees 0"
    assert loaded["lost"] == [
        {"name": "torch CUDA generators", "type": "module state", "reason": reason}
    ]
