"""Load YAML so that validation errors can name the file, line and field.

PyYAML's composed nodes keep each value's start mark; we walk the node tree in
parallel with pydantic's error location to find the line of the offending value.
A key given twice in one mapping is refused (PyYAML would keep the last silently).
A model validator that checks several fields names the one at fault with `error_at`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from haguard.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _node_at(node: yaml.Node | None, loc: tuple[int | str, ...]) -> yaml.Node | None:
    """The deepest node along `loc` (pydantic error location) that exists."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def line_of(path: Path, loc: tuple[int | str, ...]) -> int | None:
    """The line of the value at `loc` in a YAML file (for checks made after validation)."""
    try:
        _, node = parse_yaml(path.read_text(), str(path))
    except (OSError, ConfigError):
        return None
    target = _node_at(node, loc)
    return target.start_mark.line + 1 if target is not None else None


_MERGE_TAG = "tag:yaml.org,2002:merge"
_AT = "haguard_field_error"


def error_at(loc: tuple[int | str, ...], message: str) -> PydanticCustomError:
    """An error for a model validator to raise at `loc` (below the model), so that the
    ConfigError names that field and its line rather than the model's."""
    return PydanticCustomError(_AT, "{message}", {"message": message, "loc": loc})


def _duplicate_key(root: yaml.Node | None) -> tuple[int, tuple[int | str, ...], int] | None:
    """The first key (in file order) given twice in one mapping: (its line, its path, the line
    of the first one), or None.  Keys compare as the values YAML makes of them ("a" and a,
    1 and 1.0), as a dict would.  Merge keys (<<) are not keys: an explicit key overrides a
    merged one.  Each node is visited once, so aliases cost nothing."""
    constructor = yaml.constructor.SafeConstructor()
    found: list[tuple[int, tuple[int | str, ...], int]] = []
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[int | str, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    stack.append((value_node, path))
                    continue
                name = "?"      # a sequence or mapping as a key: refused when loaded
                if isinstance(key_node, yaml.ScalarNode):
                    key = constructor.construct_object(key_node, deep=True)
                    name = key if isinstance(key, str) else str(key)
                    line = key_node.start_mark.line + 1
                    if key in first:
                        found.append((line, (*path, name), first[key]))
                    else:
                        first[key] = line
                stack.append((value_node, (*path, name)))
    return min(found, key=lambda f: f[0]) if found else None


# Errors where the value given tells why (`true` is no integer in strict mode, .inf no finite number).
_SHOW_INPUT = frozenset({"int_type", "float_type", "finite_number", "int_from_float", "int_parsing"})


def _got(value: object) -> str:
    """" (got VALUE)" for a scalar, as YAML spells it; nothing for a collection (it may be huge)."""
    if isinstance(value, bool):
        return f" (got {str(value).lower()})"
    if isinstance(value, int | float | str):
        return f" (got {_one_line(repr(value))[:40]})"
    return ""


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        name = str(part) if str(part).isprintable() and len(str(part)) <= 64 else _one_line(repr(part))[:64]
        out += f"[{part}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text into plain data plus the node tree (for line numbers)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicate = _duplicate_key(node)
        data = yaml.safe_load(text) if duplicate is None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"invalid YAML: {_one_line(exc.problem or exc)}", file=source, line=line) from None
    except yaml.reader.ReaderError as exc:    # a control character: its message spans lines
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(f"invalid YAML: control character #x{code:04x} is not allowed",
                          file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_one_line(exc)}", file=source) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deep", file=source) from None
    except ValueError:   # an integer past Python's digit limit
        raise ConfigError("invalid YAML: a number has too many digits", file=source) from None
    if duplicate is not None:
        line, path, first = duplicate
        raise ConfigError(f"duplicate key (first at line {first}): give each key once",
                          file=source, line=line, field=_field_name(path))
    return data, node


def read_text(path: Path) -> str:
    """The file's text, or ConfigError naming it (unreadable, not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=str(path)) from None


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 200 else text[:197] + "..."


def validate(model: type[M], data: Any, node: yaml.Node | None, source: str,
             prefix: tuple[int | str, ...] = ()) -> M:
    """Validate `data` against `model`, raising ConfigError at the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # A union's member appears in the path by its type's name (`FenceDevice`, `tuple[...]`):
        # not a field of the file, so left out (haguard's fields are lower case).
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p)))
        msg = err["msg"]
        if err["type"] == _AT:
            loc += tuple((err.get("ctx") or {}).get("loc", ()))
        target = _node_at(node, loc)
        line = target.start_mark.line + 1 if target is not None else None
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] in _SHOW_INPUT:
            msg += _got(err["input"])
        raise ConfigError(msg, file=source, line=line, field=_field_name(prefix + loc) or None) from None


def load_model(model: type[M], path: Path) -> M:
    data, node = parse_yaml(read_text(path), str(path))
    if data is None:
        raise ConfigError("file is empty", file=str(path))
    return validate(model, data, node, str(path))
