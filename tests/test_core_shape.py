"""The pure core stays readable: small modules made of short functions.

Read with `ast` only (the code is not imported).  Every module under haguard/core/ has at
most MAX_MODULE_LINES lines and every function (methods and nested functions included,
from its `def` line to its last line) at most MAX_FUNCTION_LINES.  A module whose
docstring has a line starting with `Size:` and giving the reason is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "haguard" / "core"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _exempt(tree: ast.Module) -> bool:
    """The module's docstring says why it is larger: a line `Size: <reason>`."""
    doc = ast.get_docstring(tree) or ""
    return any(line.strip().startswith("Size:") and line.strip()[len("Size:"):].strip()
               for line in doc.splitlines())


def _offences(path: Path) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    if _exempt(tree):
        return []
    name = path.relative_to(CORE.parent.parent).as_posix()
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno}: function {node.name}: {length} lines "
                             f"(at most {MAX_FUNCTION_LINES})")
    return found


def test_core_modules_and_functions_stay_small() -> None:
    modules = sorted(CORE.rglob("*.py"))
    assert modules, f"no modules under {CORE}"
    offences = [o for path in modules for o in _offences(path)]
    assert not offences, ("too large (split it, or say why in a `Size:` line of the module's "
                          "docstring):\n" + "\n".join(offences))
