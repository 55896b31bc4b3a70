"""A cluster state too large for one message travels as parts.

A `Proposal` carries the whole proposed state and the whole committed state: about 130
bytes a VM, twice, so a cluster of a few hundred VMs reached the wire's 64 KiB limit and
its proposals could not be sent at all.  A coordinator therefore sends a `Proposal` only
while it fits (`fits`, measured with the real codec: the previous release understands
nothing else), and otherwise `StatePart`s:

- broadcast, the records that changed from its committed state to the proposed one (a
  follower that holds the committed state, as every host that acked it does, applies
  them);
- to one host that is behind (a catch-up), the whole state from nothing (`WHOLE`).

A relay digest (relay.py) is cut the same way (`split_entries`): a top aggregator of
1,000 hosts relays about 500 hosts' entries, up to 225 KB at a refresh.

Each part holds at most `PART_RECORDS` records: with names of up to 63 characters a
record encodes to at most about 240 bytes, so a part stays under 50 KiB whatever the
state's size.  A follower collects the parts of one (key, base) and applies them once
it holds every part and the base; a part of another (key, base) starts over.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import TypeVar

from haguard.core.cluster import codec
from haguard.core.cluster.state import ClusterState, StateKey
from haguard.core.cluster.types import WHOLE, Message, RelayEntry, StatePart

PART_RECORDS = 200
MAX_PARTS = 1000                # 200,000 records: beyond any configured cluster
# The wire's limit (64 KiB, core/wire.py) less room for the signed envelope around the body.
MESSAGE_BUDGET = 60 * 1024

T = TypeVar("T")


def encoded_size(message: Message) -> int:
    """Bytes of `message` as the wire carries it (canonical JSON, as core/wire.py writes it)."""
    return len(json.dumps(codec.to_data(message), sort_keys=True, separators=(",", ":")))


def fits(message: Message) -> bool:
    return encoded_size(message) <= MESSAGE_BUDGET


def split_entries(entries: tuple[RelayEntry, ...]) -> list[tuple[RelayEntry, ...]]:
    """A digest's entries in chunks that each fit one message (each entry measured)."""
    chunks: list[tuple[RelayEntry, ...]] = []
    chunk: list[RelayEntry] = []
    size = 0
    for e in entries:
        n = len(json.dumps(codec.dump(e), separators=(",", ":"))) + 1
        if chunk and size + n > MESSAGE_BUDGET:
            chunks.append(tuple(chunk))
            chunk, size = [], 0
        chunk.append(e)
        size += n
    return [*chunks, tuple(chunk)] if chunk else chunks


def _changed(old: Mapping[str, T], new: Mapping[str, T]) -> dict[str, T | None]:
    out: dict[str, T | None] = {k: v for k, v in new.items() if old.get(k) != v}
    out.update({k: None for k in old if k not in new})
    return out


def split(*, sender: str, term: int, base: ClusterState | None, state: ClusterState,
          committed: StateKey, to: str | None = None,
          confirmed: Mapping[str, tuple[int, int]] | None = None) -> list[StatePart]:
    """`state` as the changes from `base` (None: the whole state), in parts."""
    empty = ClusterState()
    old = base or empty
    records: list[tuple[str, str, object]] = []
    for table, before, after in (("vms", old.vms, state.vms), ("hosts", old.hosts, state.hosts),
                                 ("migrations", old.migrations, state.migrations),
                                 ("kills", old.kills, state.kills)):
        changed = _changed(before, after)
        if table == "hosts":            # hosts are never removed: the configured set
            changed = {k: v for k, v in changed.items() if v is not None}
        records += [(table, name, value) for name, value in sorted(changed.items())]
    chunks = [records[i:i + PART_RECORDS] for i in range(0, len(records), PART_RECORDS)] or [[]]
    key_base = WHOLE if base is None else base.key
    parts = []
    for i, chunk in enumerate(chunks):
        tables: dict[str, dict[str, object]] = {"vms": {}, "hosts": {}, "migrations": {}, "kills": {}}
        for table, name, value in chunk:
            tables[table][name] = value
        parts.append(StatePart(sender=sender, term=term, key=state.key, base=key_base, part=i,
                               parts=len(chunks), committed=committed, to=to,
                               confirmed=dict(confirmed or {}) if i == 0 else {},
                               cluster=state.cluster if i == 0 else None,
                               **tables))  # type: ignore[arg-type]
    return parts


def _merged(old: Mapping[str, T], *changes: Mapping[str, T | None]) -> dict[str, T]:
    out = dict(old)
    for change in changes:
        for name, value in change.items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = value
    return out


def apply(base: ClusterState, parts: list[StatePart]) -> ClusterState:
    """The state the complete `parts` make from `base`."""
    key = parts[0].key
    return replace(base, term=key[0], version=key[1],
                   vms=_merged(base.vms, *(p.vms for p in parts)),
                   hosts=_merged(base.hosts, *(p.hosts for p in parts)),
                   migrations=_merged(base.migrations, *(p.migrations for p in parts)),
                   kills=_merged(base.kills, *(p.kills for p in parts)),
                   cluster=parts[0].cluster or base.cluster)


class PartsInbox:
    """The parts of one (key, base) being collected."""

    def __init__(self) -> None:
        self.ident: tuple[StateKey, StateKey, int] | None = None
        self.parts: dict[int, StatePart] = {}

    def add(self, part: StatePart) -> list[StatePart] | None:
        """Every part, in order, once `part` completes them; None until then (or for a
        malformed part)."""
        if not (0 < part.parts <= MAX_PARTS and 0 <= part.part < part.parts):
            return None
        ident = (part.key, part.base, part.parts)
        if ident != self.ident:
            self.ident, self.parts = ident, {}
        self.parts[part.part] = part
        if len(self.parts) < part.parts:
            return None
        done = [self.parts[i] for i in range(part.parts)]
        self.ident, self.parts = None, {}
        return done
