"""QEMU monitor replies turned into typed values, refusing shapes QEMU never sends.

A reply is outside input: a QEMU of another version, a proxy or a bug may send
missing keys, wrong types or negative counters.  Each function here is pure and
either returns a well-typed value or raises `MalformedReply`, whose one-line message
names the command and the field.  Fields QEMU legitimately leaves out (`ram` before
a migration has started, `expected-downtime` when not active) take their defaults.
"""

from __future__ import annotations

import math
import re
from typing import Any

from haguard.core.strategy import MigrationSample
from haguard.errors import QmpError

PAGE_SIZE_DEFAULT = 4096
_MAX_COUNTER = 2**64 - 1                    # QEMU's counters are uint64
_STATUS = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


class MalformedReply(QmpError):
    """A monitor reply of the wrong shape (a QmpError: the monitor cannot be understood)."""

    def __init__(self, command: str, problem: str) -> None:
        self.command, self.problem = command, problem
        super().__init__(f"malformed {command} reply from QEMU: {problem}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(reply: object, command: str, where: str = "reply") -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise MalformedReply(command, f"{where} is {type(reply).__name__}, not an object")
    return reply


def counter(obj: dict[str, Any], key: str, command: str, *, prefix: str = "",
            default: int = 0) -> int:
    """A non-negative integer field (absent or null: `default`)."""
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is not int or not 0 <= value <= _MAX_COUNTER:
        raise MalformedReply(command, f"{prefix}{key} is {_short(value)}, not a counter")
    return value


def _rate(obj: dict[str, Any], key: str, command: str, *, prefix: str = "") -> float:
    value = obj.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 <= value <= _MAX_COUNTER:
        raise MalformedReply(command, f"{prefix}{key} is {_short(value)}, not a rate")
    return float(value)


def status_name(obj: dict[str, Any], command: str, *, default: str | None = None) -> str:
    """The `status` field: a lower-case QEMU state name."""
    value = obj.get("status", default)
    if value is None:
        raise MalformedReply(command, "status is missing")
    if not isinstance(value, str) or not _STATUS.fullmatch(value):
        raise MalformedReply(command, f"status is {_short(value)}, not a state name")
    return value


def migration_sample(reply: object, *, now_ms: int) -> MigrationSample:
    """A `query-migrate` reply as a sample for the convergence strategy.

    `{}` (no migration yet) is status "none"; `ram` may be absent (setup) and
    `expected-downtime` is only present while active.
    """
    cmd = "query-migrate"
    info = _object(reply, cmd)
    status = status_name(info, cmd, default="none")
    ram = _object(info.get("ram", {}), cmd, "ram")
    page = counter(ram, "page-size", cmd, prefix="ram.") or PAGE_SIZE_DEFAULT
    pages_rate = counter(ram, "dirty-pages-rate", cmd, prefix="ram.")
    expected = info.get("expected-downtime")
    return MigrationSample(
        now_ms=now_ms,
        status=status,
        passes=counter(ram, "dirty-sync-count", cmd, prefix="ram."),
        transferred_bytes=counter(ram, "transferred", cmd, prefix="ram."),
        remaining_bytes=counter(ram, "remaining", cmd, prefix="ram."),
        total_bytes=counter(ram, "total", cmd, prefix="ram."),
        dirty_rate_bps=min(pages_rate * page, _MAX_COUNTER),
        throughput_bps=min(int(_rate(ram, "mbps", cmd, prefix="ram.") * 1e6 / 8), _MAX_COUNTER),
        expected_downtime_ms=None if expected is None else counter(info, "expected-downtime", cmd),
    )


def optional_ms(reply: object, key: str) -> int | None:
    """`downtime`/`setup-time` of a finished `query-migrate`, or None when absent or malformed
    (these only go into the report)."""
    if not isinstance(reply, dict):
        return None
    value = reply.get(key)
    return value if type(value) is int and 0 <= value <= _MAX_COUNTER else None


def run_state(reply: object) -> str:
    """The run state in a `query-status` reply ("running", "paused", "inmigrate", ...)."""
    return status_name(_object(reply, "query-status"), "query-status")


def ram_size(reply: object) -> int:
    """`base-memory` of a `query-memory-size-summary` reply, in bytes."""
    cmd = "query-memory-size-summary"
    size = counter(_object(reply, cmd), "base-memory", cmd, default=-1)
    if size <= 0:
        raise MalformedReply(cmd, "base-memory is missing or zero")
    return size


def type_name(reply: object, command: str) -> str:
    """A QOM type name from `qom-get ... type`."""
    if not isinstance(reply, str) or not reply or len(reply) > 128 or not reply.isprintable():
        raise MalformedReply(command, f"type is {_short(reply)}, not a type name")
    return reply


def first_cpu_path(reply: object) -> str | None:
    """The QOM path of the first vCPU in a `query-cpus-fast` reply (None: no vCPU listed)."""
    cmd = "query-cpus-fast"
    if not isinstance(reply, list):
        raise MalformedReply(cmd, f"reply is {type(reply).__name__}, not a list")
    if not reply:
        return None
    path = _object(reply[0], cmd, "cpu 0").get("qom-path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise MalformedReply(cmd, f"qom-path is {_short(path)}, not a QOM path")
    return path
