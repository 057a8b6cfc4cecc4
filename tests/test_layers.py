"""Nothing below a layer imports from above it: engines -> image store -> provisioner ->
hibernator -> server extension. Engines reach the kernel and the image only through
what the hibernator lends them (kernelhib.engines.base.Kernel, StoredImage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "kernelhib"
ABOVE_PROVISIONER = {"kernelhib.hibernator", "kernelhib.kernel_manager", "kernelhib.app"}
ABOVE_STORE = {"kernelhib.provisioner", *ABOVE_PROVISIONER}
ABOVE_ENGINES = {"kernelhib.image_store", "kernelhib.journal", *ABOVE_STORE}
JUPYTER_SERVING = ("jupyter_server", "jupyter_client")

# Module files -> the modules they must not import.
RULES = {
    "engines/*.py": (ABOVE_ENGINES, JUPYTER_SERVING),
    "image_store.py": (ABOVE_STORE, JUPYTER_SERVING),
    "provisioner.py": (ABOVE_PROVISIONER, ()),
}


def imported(path: Path) -> set[str]:
    """The modules a source file imports, relative imports resolved, anywhere in it."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("pattern", RULES)
def test_no_module_imports_a_layer_above_it(pattern: str) -> None:
    forbidden, foreign = RULES[pattern]
    files = sorted(PACKAGE.glob(pattern))
    assert files, f"no module matches {pattern}"
    offending = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in imported(path)
        if name in forbidden or name.split(".")[0] in foreign
    }
    assert not offending
