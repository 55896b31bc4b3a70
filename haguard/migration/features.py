"""What a QEMU can do, detected from its monitor (never guessed from its version)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.errors import QmpCommandError


@dataclass(frozen=True)
class QemuFeatures:
    version: str
    capabilities: frozenset[str]
    parameters: frozenset[str]
    multifd_compressions: frozenset[str]
    commands: frozenset[str]
    oob: bool

    def has_param(self, name: str) -> bool:
        return name in self.parameters


def _schema_lookup(schema: list[dict[str, Any]]) -> tuple[frozenset[str], frozenset[str]]:
    """Commands, and the values of the multifd-compression enum, from query-qmp-schema."""
    by_name = {e["name"]: e for e in schema}
    commands = frozenset(e["name"] for e in schema if e.get("meta-type") == "command")
    values: frozenset[str] = frozenset()
    cmd = by_name.get("migrate-set-parameters")
    args = by_name.get(cmd["arg-type"]) if cmd else None
    for member in (args or {}).get("members", []):
        if member["name"] == "multifd-compression":
            enum = by_name.get(member["type"], {})
            values = frozenset(v["name"] if isinstance(v, dict) else v
                               for v in enum.get("members", enum.get("values", [])))
    return commands, values


async def detect(qmp: Qmp) -> QemuFeatures:
    ver = await qmp.cmd("query-version")
    q = ver["qemu"]
    caps = await qmp.cmd("query-migrate-capabilities")
    params = await qmp.cmd("query-migrate-parameters")
    try:
        schema = await qmp.cmd("query-qmp-schema", timeout_s=15.0)
        commands, compressions = _schema_lookup(schema)
    except QmpCommandError:
        commands, compressions = frozenset(), frozenset()
    return QemuFeatures(
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        capabilities=frozenset(c["capability"] for c in caps),
        parameters=frozenset(params),
        multifd_compressions=compressions,
        commands=commands,
        oob=qmp.has_oob,
    )
