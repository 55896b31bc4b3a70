"""Cluster messages <-> JSON data, by reflection over the message dataclasses.

Pure.  `to_data(message)` gives JSON data (`{"type": "Heartbeat", ...fields}`);
`from_data(data)` rebuilds the message and checks every field against its declared
type: a missing field, a wrong type, a value outside a `Literal` or a malformed nested
state raise `CodecError` with the path of the field.  A message from a peer is signed
(haguard.core.wire) before it gets here; this is the second gate, so a signed but
malformed message is still rejected, never acted on.  A field this version does not know
is ignored when it looks like a field name (a newer release's addition: a rolling upgrade
must not split the cluster), refused otherwise or beyond MAX_UNKNOWN_FIELDS per object.

frozenset and tuple travel as JSON lists, Mapping as a JSON object when its keys are
str, else as a list of [key, value] pairs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from haguard.core.cluster.types import (
    Ack,
    Digest,
    Handover,
    Heartbeat,
    Message,
    Proposal,
    StatePart,
    VoteGranted,
    VoteRequest,
)
from haguard.core.errors import HaguardError

MESSAGE_TYPES: dict[str, type[Any]] = {t.__name__: t for t in (Heartbeat, VoteRequest, VoteGranted,
                                                                Proposal, StatePart, Ack, Digest, Handover)}
MAX_DEPTH = 12
MAX_UNKNOWN_FIELDS = 8
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")
MAX_ITEMS = 100_000
_HINTS: dict[type[Any], dict[str, Any]] = {}


class CodecError(HaguardError, ValueError):
    """A message that does not match its declared types."""


def to_data(message: Message) -> dict[str, Any]:
    data = _encode(message)
    assert isinstance(data, dict)
    return {"type": type(message).__name__, **data}


def from_data(data: object) -> Message:
    if not isinstance(data, dict):
        raise CodecError("message: not an object")
    name = data.get("type")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(name, str):
        raise CodecError(f"message: unknown type {str(name)[:40]!r}")
    fields = {k: v for k, v in data.items() if k != "type"}
    message = _decode_dataclass(cls, fields, name, 0)
    return typing.cast(Message, message)


def dump(value: object) -> object:
    """Any message part (a ClusterState, say) as JSON data."""
    return _encode(value)


def load(tp: type[Any], data: object, what: str) -> Any:
    """`data` as a `tp` (a dataclass of the core), checked like a message."""
    return _decode(tp, data, what, 0)


# ---- encoding ---------------------------------------------------------------------------

_SCALARS = (type(None), bool, int, str)
_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _field_names(cls: type[Any]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _encode(value: object) -> object:
    # Scalars first: most values are (every message of the simulator goes through here).
    if type(value) in _SCALARS:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _encode(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, frozenset | set):
        items = [_encode(v) for v in value]
        return sorted(items, key=repr)
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in sorted(value.items())}
        return [[_encode(k), _encode(v)] for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]
    if value is None or isinstance(value, bool | int | str):
        return value
    raise CodecError(f"cannot encode {type(value).__name__}")


# ---- decoding ---------------------------------------------------------------------------

def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


_FIELD_MAPS: dict[type[Any], dict[str, dataclasses.Field[Any]]] = {}


def _field_map(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    fields = _FIELD_MAPS.get(cls)
    if fields is None:
        fields = _FIELD_MAPS[cls] = {f.name: f for f in dataclasses.fields(cls)}
    return fields


def _decode_dataclass(cls: type[Any], data: object, path: str, depth: int) -> object:
    if not isinstance(data, dict):
        raise CodecError(f"{path}: not an object")
    fields = _field_map(cls)
    unknown = data.keys() - fields.keys()
    if unknown:
        # A field added by a newer release, during a rolling upgrade: ignored (this agent
        # decides as its own version does).  Anything that does not look like one is refused.
        odd = sorted(k for k in unknown if not isinstance(k, str) or not _FIELD_NAME.match(k))
        if odd or len(unknown) > MAX_UNKNOWN_FIELDS:
            raise CodecError(f"{path}: unknown field {str((odd or sorted(unknown))[0])[:40]!r}")
    hints = _hints(cls)
    kwargs: dict[str, object] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CodecError(f"{path}.{name}: missing")
            continue
        kwargs[name] = _decode(hints[name], data[name], f"{path}.{name}", depth + 1)
    return cls(**kwargs)


def _decode(tp: Any, value: object, path: str, depth: int) -> object:
    if tp is int or tp is str or tp is bool:        # the common case, before the general one
        return _decode_scalar(tp, value, path)
    if depth > MAX_DEPTH:
        raise CodecError(f"{path}: nested too deep")
    origin = get_origin(tp)
    if tp is Any:
        raise CodecError(f"{path}: untyped field")
    if origin is Literal:
        return _decode_literal(tp, value, path)
    if origin in (Union, types.UnionType):
        return _decode_union(tp, value, path, depth)
    if tp is type(None) or tp is bool or tp is int or tp is str:
        return _decode_scalar(tp, value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_dataclass(tp, value, path, depth)
    if origin is frozenset:
        (item,) = get_args(tp)
        return frozenset(_decode(item, v, f"{path}[{i}]", depth + 1)
                         for i, v in enumerate(_items(value, path)))
    if origin is tuple:
        return _decode_tuple(get_args(tp), value, path, depth)
    if origin in (Mapping, dict):
        return _decode_mapping(tp, value, path, depth)
    raise CodecError(f"{path}: unsupported type {tp!r}")


def _decode_literal(tp: Any, value: object, path: str) -> object:
    if value not in get_args(tp) or type(value) not in {type(a) for a in get_args(tp)}:
        raise CodecError(f"{path}: {str(value)[:40]!r} is not one of {list(get_args(tp))}")
    return value


def _decode_union(tp: Any, value: object, path: str, depth: int) -> object:
    """The first of the union's types `value` decodes as."""
    errors = []
    for option in get_args(tp):
        try:
            return _decode(option, value, path, depth)
        except CodecError as exc:
            errors.append(str(exc))
    raise CodecError(errors[0] if len(errors) == 1 else f"{path}: matches none of its types")


def _decode_scalar(tp: Any, value: object, path: str) -> object:
    """None, bool, int (a bool is none) or str."""
    if tp is type(None):
        if value is not None:
            raise CodecError(f"{path}: expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise CodecError(f"{path}: expected a boolean")
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise CodecError(f"{path}: expected an integer")
    elif not isinstance(value, str):
        raise CodecError(f"{path}: expected a string")
    return value


def _decode_tuple(args: tuple[Any, ...], value: object, path: str, depth: int) -> object:
    """`tuple[X, ...]` or a fixed `tuple[X, Y]`, from a JSON list."""
    items = _items(value, path)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_decode(args[0], v, f"{path}[{i}]", depth + 1) for i, v in enumerate(items))
    if len(items) != len(args):
        raise CodecError(f"{path}: expected {len(args)} items")
    pairs_ = enumerate(zip(args, items, strict=True))
    return tuple(_decode(a, v, f"{path}[{i}]", depth + 1) for i, (a, v) in pairs_)


def _decode_mapping(tp: Any, value: object, path: str, depth: int) -> object:
    """A Mapping, from a JSON object or a list of [key, value] pairs."""
    key_t, val_t = get_args(tp)
    out: dict[object, object] = {}
    for k, v in _pairs(value, path):
        key = _decode(key_t, k, f"{path}.key", depth + 1)
        if not isinstance(key, str | int | tuple):
            raise CodecError(f"{path}: unusable key")
        out[key] = _decode(val_t, v, f"{path}[{str(k)[:40]}]", depth + 1)
    return out


def _pairs(value: object, path: str) -> list[tuple[object, object]]:
    if isinstance(value, dict):
        return list(value.items())
    pairs = []
    for i, pair in enumerate(_items(value, path)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CodecError(f"{path}[{i}]: expected a [key, value] pair")
        pairs.append((pair[0], pair[1]))
    return pairs


def _items(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise CodecError(f"{path}: expected a list")
    if len(value) > MAX_ITEMS:
        raise CodecError(f"{path}: too many items")
    return value
