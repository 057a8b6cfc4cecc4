"""Measure recomputation of what the dill engine loses, on the project's sample notebooks.

For each notebook of ``notebooks/`` (the demo, and ``lost-values.ipynb``, which
holds values dill cannot keep), a real ``jupyter server`` with kernelhib opens
it in a session and runs its code cells up to the first one that uses
``%hibernate`` (where the notebook itself hibernates). The kernel is then
hibernated with dill and woken (``recompute = offer``), and the offered cells
are run (``POST /api/kernels/<id>/recompute``, the same cells ``auto`` runs
inside the wake). It reports the lost variables, the share that came back, the
wake's time and the recompute's: what ``auto`` adds to a wake.

Run from the repository root::

    .venv/bin/python benchmarks/recompute.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from hibernate import KernelChannel, running_server

REPO = Path(__file__).resolve().parent.parent


def measure(notebook: Path, workdir: Path) -> dict[str, Any]:
    """Hibernate a kernel of ``notebook`` with dill, wake it, recompute; the figures."""
    with running_server(workdir, workdir / "images") as server:
        shutil.copy(notebook, workdir / "root" / notebook.name)
        body = {"path": notebook.name, "type": "notebook", "kernel": {"name": "python3"}}
        kernel_id = server.request("POST", "api/sessions", body)["kernel"]["id"]
        server.kernels.add(kernel_id)
        channel = KernelChannel(server, kernel_id)
        try:
            cells = nbformat.read(notebook, as_version=4).cells
            for cell in cells:
                if cell.cell_type != "code":
                    continue
                if "%hibernate" in cell.source:
                    break
                channel.execute(cell.source)
            kernel = f"api/kernels/{kernel_id}"
            hibernation = server.request("POST", f"{kernel}/hibernate", {"engine": "dill"})
            lost = [entry["name"] for entry in hibernation["hibernation"].get("lost", [])]
            started = time.perf_counter()
            woken = server.request("POST", f"{kernel}/wake")["hibernation"]
            wake_s = time.perf_counter() - started
            plan = woken.get("recompute", {})
            recompute_s = 0.0
            if plan.get("run"):
                started = time.perf_counter()
                plan = server.request("POST", f"{kernel}/recompute")["hibernation"]["recompute"]
                recompute_s = time.perf_counter() - started
        finally:
            channel.close()
    back = plan.get("recomputed", [])
    return {
        "notebook": str(notebook.relative_to(REPO)),
        "lost": lost,
        "recomputed": back,
        "refused": {e["name"]: e["refused"] for e in plan.get("names", []) if "refused" in e},
        "cells_run": plan.get("replayed", []),
        "share_back": len(back) / len(lost) if lost else None,
        "wake_s": round(wake_s, 2),
        "recompute_s": round(recompute_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    results = []
    for notebook in notebooks:
        with tempfile.TemporaryDirectory(prefix="kernelhib-recompute-") as workdir:
            results.append(measure(notebook.resolve(), Path(workdir)))
    print(json.dumps(results, indent=2))
    lost = sum(len(r["lost"]) for r in results)
    back = sum(len(r["recomputed"]) for r in results)
    print(f"{back} of {lost} lost variables came back", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
