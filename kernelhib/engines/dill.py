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
import importlib.util
import json
import queue
from pathlib import Path
from typing import Any

from .base import Availability, Engine, EngineError

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
    """Pickle the user's variables one by one; reload them into a fresh kernel."""

    name = "dill"

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

    async def save(self, client: Any, directory: Path, timeout: float) -> dict[str, Any]:
        """Snapshot the kernel's namespace into ``directory``; the kernel runs on untouched."""
        return await self._call(client, "save", directory, timeout)

    async def load(self, client: Any, directory: Path, timeout: float) -> dict[str, Any]:
        """Load a snapshot into a fresh kernel; return what was restored and what was lost."""
        return await self._call(client, "load", directory, timeout)

    async def _call(
        self, client: Any, function: str, directory: Path, timeout: float
    ) -> dict[str, Any]:
        expression = call_expression(function, str(directory))
        msg_id = client.execute(
            "", silent=True, store_history=False, user_expressions={"snapshot": expression}
        )
        while True:
            try:
                reply = await client.get_shell_msg(timeout=timeout)
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
