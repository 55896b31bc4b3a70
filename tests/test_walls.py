"""Walls that hold by themselves: the layering rules of docs/architecture.md, checked.

Every check reads the source with `ast` (nothing is imported), so a wall holds whatever
a module does at import time, and an import counts wherever it is written: at the top,
inside a function, or under `if TYPE_CHECKING:`.

- the core (haguard/core/) is pure: it imports no I/O module (asyncio, socket, time,
  random, os, ...), no third-party I/O library, and nothing of haguard outside the core;
- haguard's folders import each other one way only (the folder graph is acyclic), and
  so do the simulator's modules;
- every exception class haguard defines is drawn in the error tree of haguard/errors.py,
  where it hangs under the class it derives from, and every error derives from
  HaguardError.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "haguard"
ROOT = PACKAGE.parent

# What the core may not import: I/O, clocks and randomness (the core is given `now_ms` and
# facts; the agent and the simulator do the I/O).  datetime is allowed: core/alerts.py formats
# given timestamps with it (reading the clock through it is checked separately below).
CORE_FORBIDDEN_STDLIB = frozenset({
    "asyncio", "socket", "time", "random", "os", "subprocess", "threading", "select", "signal",
    "selectors", "multiprocessing", "concurrent", "ssl", "http", "urllib", "shutil", "tempfile",
})
CORE_FORBIDDEN_THIRD_PARTY = frozenset({
    "aiomqtt", "paho", "qemu", "icmplib", "prometheus_client", "structlog", "systemd", "tenacity",
    "yaml",
})
CLOCK_READS = frozenset({"now", "utcnow", "today"})


# ---- reading the package ---------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    target: str          # the imported module, resolved (relative imports made absolute)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_module(name: str) -> bool:
    return name in _modules()


def _imports(path: Path) -> list[Import]:
    """Every import in the file, at any level, with `from pkg import mod` resolved to the
    module when `mod` is one, and `importlib.import_module("literal")` counted too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append(Import(path, node.lineno, sub if _is_module(sub) else module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module",
                                                                             "__import__")))):
            found.append(Import(path, node.lineno, node.args[0].value))
    return found


def _in_haguard(target: str) -> bool:
    return target == "haguard" or target.startswith("haguard.")


def _folder(module: str) -> str:
    """The node of the folder graph: a sub-package of haguard (`vm`, `core`, ...; sub-folders
    count as their top folder), a top-level module (`cli.py`), or the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "haguard/__init__.py"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return f"{parts[1]}.py"


def _tangles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The graph's cycles, as its strongly connected components of more than one node
    (Tarjan's algorithm), each sorted; empty when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _describe(tangles: list[list[str]], edges: dict[str, dict[str, list[Import]]]) -> str:
    """Every arrow inside each cycle, with the imports that draw it."""
    lines: list[str] = []
    for nodes in tangles:
        lines.append("cycle among " + ", ".join(nodes) + ":")
        for a in nodes:
            for b in sorted(set(edges.get(a, {})) & set(nodes)):
                lines.append(f"  {a} -> {b}")
                lines += [f"      {where}" for where in sorted({imp.where() for imp in edges[a][b]})]
    return "\n".join(lines)


# ---- (i) the core is pure -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_core_imports_no_io_and_nothing_outside_the_core() -> None:
    bad: list[str] = []
    for module, path in _modules().items():
        if not module.startswith("haguard.core"):
            continue
        for imp in _imports(path):
            top = imp.target.split(".")[0]
            if top in CORE_FORBIDDEN_STDLIB or top in CORE_FORBIDDEN_THIRD_PARTY:
                bad.append(f"{imp.where()}: I/O in the core")
            elif _in_haguard(imp.target) and not (imp.target == "haguard.core"
                                                 or imp.target.startswith("haguard.core.")):
                bad.append(f"{imp.where()}: the core imports nothing of haguard outside haguard/core")
    assert not bad, "the core must stay pure:\n" + "\n".join(bad)


@pytest.mark.timeout(60)
def test_core_reads_no_clock_through_datetime() -> None:
    bad: list[str] = []
    for module, path in _modules().items():
        if not module.startswith("haguard.core"):
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and node.attr in CLOCK_READS:
                owner = node.value
                owner_name = (owner.id if isinstance(owner, ast.Name)
                              else owner.attr if isinstance(owner, ast.Attribute) else "")
                if owner_name in ("datetime", "date"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner_name}.{node.attr}")
    assert not bad, "the core is given now_ms; it never reads the clock:\n" + "\n".join(bad)


# ---- (ii) one-way imports ------------------------------------------------------------------------

def _folder_edges() -> dict[str, dict[str, list[Import]]]:
    edges: dict[str, dict[str, list[Import]]] = {}
    for module, path in _modules().items():
        src = _folder(module)
        for imp in _imports(path):
            if not _in_haguard(imp.target):
                continue
            dst = _folder(imp.target)
            if dst != src:
                edges.setdefault(src, {}).setdefault(dst, []).append(imp)
    return edges


@pytest.mark.timeout(60)
def test_folders_import_each_other_one_way() -> None:
    edges = _folder_edges()
    assert "vm" in edges and "adapters" in edges, "the graph reads no imports: the scan is broken"
    tangles = _tangles(edges)
    assert not tangles, ("import cycles between haguard's folders (move a module or a name so "
                         "that the arrows point one way):\n" + _describe(tangles, edges))


@pytest.mark.timeout(60)
def test_simulator_modules_import_each_other_one_way() -> None:
    edges: dict[str, dict[str, list[Import]]] = {}
    for module, path in _modules().items():
        if not module.startswith("haguard.sim."):
            continue
        for imp in _imports(path):
            if imp.target.startswith("haguard.sim.") and imp.target != module:
                edges.setdefault(module, {}).setdefault(imp.target, []).append(imp)
    assert edges, "the simulator's modules import nothing of each other: the scan is broken"
    tangles = _tangles(edges)
    assert not tangles, "import cycles between the simulator's modules:\n" + _describe(tangles, edges)


# ---- the error tree ----------------------------------------------------------------------------

ERRORS = PACKAGE / "errors.py"
# Errors whose file belongs to someone else's change in progress: the marker turns into a
# failure (strict) as soon as the error derives from HaguardError, so it cannot linger.
PENDING: dict[str, str] = {}     # class name -> why it is not in the tree yet (xfail, strict)


@dataclass(frozen=True)
class ExceptionClass:
    name: str
    path: Path
    line: int
    bases: tuple[str, ...]       # as written, last component ("aiomqtt.MqttError" -> "MqttError")


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


@cache
def _classes() -> dict[str, list[ExceptionClass]]:
    found: dict[str, list[ExceptionClass]] = {}
    for path in _modules().values():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(
                    ExceptionClass(node.name, path, node.lineno, tuple(map(_base_name, node.bases))))
    return found


def _builtin_exception(name: str) -> type[BaseException] | None:
    obj = getattr(builtins, name, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _derives_from(name: str, ancestor: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the project class `name` derives from `ancestor` (a project class or a builtin)."""
    if name == ancestor:
        return True
    if name in seen:
        return False
    if (builtin := _builtin_exception(name)) is not None:
        anc = _builtin_exception(ancestor)
        return anc is not None and issubclass(builtin, anc)
    if name not in _classes():
        # A third-party base: an exception by its name (SomeLibError), never a HaguardError.
        return ancestor in ("Exception", "BaseException") and name.endswith(("Error", "Exception"))
    return any(_derives_from(b, ancestor, seen | {name}) for c in _classes()[name] for b in c.bases)


@cache
def _exception_classes() -> tuple[ExceptionClass, ...]:
    return tuple(c for name, defs in sorted(_classes().items()) for c in defs
                 if any(_derives_from(b, "BaseException", frozenset({name})) for b in c.bases))


def _errors_docstring() -> str:
    doc = ast.get_docstring(_tree(ERRORS))
    assert doc, "haguard/errors.py has lost its docstring (the error tree)"
    return doc


def _drawn_tree() -> dict[str, str | None]:
    """The tree in errors.py's docstring: each drawn class -> the class it hangs under."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []          # (column of the name, name)
    for line in _errors_docstring().splitlines():
        if m := re.match(r"^(\s*)(HaguardError)\b", line):
            stack = [(len(m.group(1)), "HaguardError")]
            parents["HaguardError"] = None
        elif stack and (m := re.match(r"^([\s|]*)\+-- (\w+)", line)):
            col = len(m.group(1))
            while stack and stack[-1][0] >= col:
                stack.pop()
            assert stack, f"errors.py: {line.strip()!r} hangs under nothing"
            parents[m.group(2)] = stack[-1][1]
            stack.append((col + 4, m.group(2)))
        elif line.strip() and not line.startswith((" ", "|")):
            stack = []                           # prose after the tree
    return parents


@pytest.mark.timeout(60)
def test_every_exception_is_named_in_the_error_tree() -> None:
    doc = _errors_docstring()
    missing = [f"{c.name} ({c.path.relative_to(ROOT)}:{c.line})" for c in _exception_classes()
               if not re.search(rf"(?<![\w.]){re.escape(c.name)}\b", doc)]
    assert not missing, ("exception classes missing from the error tree in haguard/errors.py's "
                         "docstring: " + ", ".join(missing))


@pytest.mark.timeout(60)
def test_the_drawn_tree_names_only_classes_that_exist() -> None:
    names = {c.name for c in _exception_classes()}
    stale = sorted(set(_drawn_tree()) - names)
    assert not stale, f"haguard/errors.py draws classes that no longer exist: {stale}"


def _error_params() -> list[object]:
    params: list[object] = []
    for c in _exception_classes():
        if c.name == "HaguardError":
            continue
        marks = ([pytest.mark.xfail(strict=True, reason=PENDING[c.name])] if c.name in PENDING else [])
        params.append(pytest.param(c, id=c.name, marks=marks))
    return params


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", _error_params())
def test_every_error_derives_from_haguard_error_where_the_tree_draws_it(cls: ExceptionClass) -> None:
    where = f"{cls.name} ({cls.path.relative_to(ROOT)}:{cls.line}, bases {', '.join(cls.bases)})"
    if not _derives_from(cls.name, "Exception"):
        # Not an error (a BaseException such as an interrupt): named beside the tree, not in it.
        assert cls.name not in _drawn_tree(), f"{where} is no Exception but drawn in the error tree"
        return
    assert _derives_from(cls.name, "HaguardError"), f"{where} does not derive from HaguardError"
    parent = _drawn_tree().get(cls.name)
    assert parent is not None, f"{where} is not drawn in the tree of haguard/errors.py"
    assert parent in cls.bases, f"{where} is drawn under {parent}"
