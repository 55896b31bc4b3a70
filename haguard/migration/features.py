"""What a QEMU can do, detected from its monitor (never guessed from its version)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from haguard.adapters.qmp import QmpCommands
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


def _schema_lookup(schema: object) -> tuple[frozenset[str], frozenset[str]]:
    """Commands, and the values of the multifd-compression enum, from query-qmp-schema.

    The schema is outside input: entries of the wrong shape are skipped, so a damaged
    schema means fewer detected features (and clear preflight refusals), never a crash.
    """
    entries = [e for e in schema if isinstance(e, dict) and isinstance(e.get("name"), str)] \
        if isinstance(schema, list) else []
    by_name: dict[str, dict[str, Any]] = {e["name"]: e for e in entries}
    commands = frozenset(e["name"] for e in entries if e.get("meta-type") == "command")
    values: frozenset[str] = frozenset()
    cmd = by_name.get("migrate-set-parameters", {})
    args = by_name.get(cmd["arg-type"]) if isinstance(cmd.get("arg-type"), str) else None
    members = (args or {}).get("members")
    for member in members if isinstance(members, list) else []:
        if isinstance(member, dict) and member.get("name") == "multifd-compression" \
                and isinstance(member.get("type"), str):
            enum = by_name.get(member["type"], {})
            listed = enum.get("members", enum.get("values", []))
            values = frozenset(n for v in (listed if isinstance(listed, list) else [])
                               if isinstance(n := v.get("name") if isinstance(v, dict) else v, str))
    return commands, values


async def detect(qmp: QmpCommands, *, compressions: bool = False) -> QemuFeatures:
    """Capabilities, parameters and commands; the compression methods (from the large
    QMP schema, a tenth of a second to fetch) only when asked for."""
    ver = await qmp.cmd("query-version")
    q = ver["qemu"]
    caps = await qmp.cmd("query-migrate-capabilities")
    params = await qmp.cmd("query-migrate-parameters")
    commands = frozenset(str(c.get("name")) for c in await qmp.cmd("query-commands")
                         if isinstance(c, dict))
    methods: frozenset[str] = frozenset()
    if compressions:
        try:
            schema = await qmp.cmd("query-qmp-schema", timeout_s=15.0)
            _, methods = _schema_lookup(schema)
        except QmpCommandError:
            pass
    return QemuFeatures(
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        capabilities=frozenset(c["capability"] for c in caps),
        parameters=frozenset(params),
        multifd_compressions=methods,
        commands=commands,
        oob=qmp.has_oob,
    )
