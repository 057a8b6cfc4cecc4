"""The dill engine: save the kernel's namespace, not its process.

It works where CRIU cannot (no root, no CRIU, a kernel not launched
restorable, a process holding something CRIU refuses), at a price: a wake
starts a fresh kernel process and loads the variables into it, so threads,
comms and open handles are gone, and what could not be pickled is reported.

The work inside the kernel is done by :mod:`dill_snapshot`, whose source is
sent to the kernel: kernelhib need not be installed in the kernel's
environment, only dill.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import queue
from pathlib import Path
from typing import Any

from ..kernel_process import gpu_memory, tree_memory
from .base import Availability, Engine, EngineError, Kernel, StoredImage, Woken
from .criu_stream import ImageSink

_SNAPSHOT_SOURCE = Path(__file__).with_name("dill_snapshot.py")


def call_expression(function: str, directory: str) -> str:
    """The user expression that runs ``dill_snapshot.save`` or ``.load`` in a kernel.

    It runs the module's source in a namespace of its own, so no name is added
    to the user's. Send it in ``user_expressions`` of a silent execute request
    with empty code; read the reply with :func:`read_result`.
    """
    if function not in ("save", "load"):
        raise ValueError(f"no function {function!r} to call in a kernel")
    source = _SNAPSHOT_SOURCE.read_text()
    code = f"compile({source!r}, '<kernelhib dill_snapshot>', 'exec')"
    call = f"(lambda ns: (exec({code}, ns), ns[{function!r}]({directory!r}))[1])"
    return f"__import__('json').dumps({call}({{'__name__': 'kernelhib_dill_snapshot'}}))"


def read_result(expression: dict[str, Any]) -> dict[str, Any]:
    """The value returned in the kernel, from the reply's entry for :func:`call_expression`."""
    if expression.get("status") != "ok":
        raise EngineError(f"{expression.get('ename')}: {expression.get('evalue')}")
    return json.loads(ast.literal_eval(expression["data"]["text/plain"]))


class DillEngine(Engine):
    """Pickle the user's variables one by one; reload them into a fresh kernel.

    ``timeout``: seconds a kernel has to save or load its snapshot.
    """

    name = "dill"
    saves_running_cells = False  # the snapshot is taken by a request the kernel runs
    graceful_end = True  # a dill wake does not reopen the kernel's files

    def __init__(self, timeout: float = 600) -> None:
        self.timeout = timeout

    def availability(self) -> Availability:
        if importlib.util.find_spec("dill") is None:
            return Availability(
                False,
                "dill is not installed",
                "pip install dill, in the server's and the kernels' environments",
            )
        return Availability(
            True,
            "saves the namespace with dill (needs dill in the kernel's environment too); "
            "a wake starts a fresh kernel: threads, comms and open handles are not kept",
        )

    def estimate(self, pid: int) -> int:
        """The kernel's private memory bounds its variables (the interpreter's own is
        not saved), plus the GPU memory it copies out."""
        return tree_memory(pid) + gpu_memory(pid)

    async def write(
        self, kernel: Kernel, staging: Path, sink: ImageSink | None = None
    ) -> dict[str, Any]:
        """Snapshot the kernel into ``staging``: pickles, each checked before it is
        loaded, never streamed (``sink`` is not used)."""
        meta: dict[str, Any] = {"freed_bytes": 0}
        if pid := kernel.pid:
            # Measured while the kernel still runs: it ends after the commit.
            meta["freed_bytes"] = await asyncio.to_thread(tree_memory, pid)
        meta["lost"] = await self.save(kernel, staging)
        return meta

    async def save(self, kernel: Kernel, directory: Path) -> list[dict[str, str]]:
        """Snapshot the kernel's namespace into ``directory``; the kernel runs on untouched.
        Return what could not be saved."""
        directory.mkdir(mode=0o700, exist_ok=True)
        async with kernel.client() as client:
            result = await self._call(client, "save", directory)
        return result["lost"]

    async def wake(self, kernel: Kernel, image: StoredImage) -> Woken:
        return Woken(restarted=True, lost=await self.load(kernel, image.path))

    async def load(self, kernel: Kernel, snapshot: Path) -> list[dict[str, str]]:
        """Start a fresh kernel on the same ports and key, and load the snapshot into it;
        return what could not be restored."""
        await kernel.start()
        try:
            await kernel.until_responsive()
            async with kernel.client() as client:
                result = await self._call(client, "load", snapshot)
        except BaseException:
            await kernel.end()
            raise
        return result["lost"]

    async def _call(self, client: Any, function: str, directory: Path) -> dict[str, Any]:
        expression = call_expression(function, str(directory))
        msg_id = client.execute(
            "", silent=True, store_history=False, user_expressions={"snapshot": expression}
        )
        while True:
            try:
                reply = await client.get_shell_msg(timeout=self.timeout)
            except queue.Empty as exc:
                raise EngineError(f"the kernel did not answer the dill {function} in time") from exc
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        content = reply["content"]
        if content["status"] != "ok":
            raise EngineError(f"dill {function} failed: {content.get('evalue', content)}")
        try:
            return read_result(content["user_expressions"]["snapshot"])
        except EngineError as exc:
            raise EngineError(f"dill {function} failed in the kernel: {exc}") from exc
