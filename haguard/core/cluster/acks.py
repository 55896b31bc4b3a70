"""Acks and the read index: whether this host may act on the committed state it holds.

A follower acks a proposal when it accepts it and, after (re)joining a coordinator,
until one of its acks is confirmed.  The coordinator confirms the acks it received in
its next heartbeat (or a catch-up proposal), with the state keys it held then.  A
follower whose ack sent since (re)joining is confirmed, and who holds at least those
keys, knows that nothing decided while it was cut off is missing (Raft's read index):
only then may it start a VM (grants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from haguard.core.cluster.state import StateKey

NO_KEY: StateKey = (-1, -1)
AckId = tuple[int, int]             # (incarnation, sequence): numbers one host's acks for good


@dataclass
class ReadIndex:
    """The follower's side."""

    incarnation: int
    seq: int = 0                                # acks sent in this incarnation
    sync_seq: int | None = None                 # the first ack since (re)joining
    confirmed: AckId = (-1, -1)                 # the newest ack the coordinator has of ours
    # What the confirming coordinator held when it confirmed: (accepted, committed) keys.
    need: tuple[StateKey, StateKey] = (NO_KEY, NO_KEY)
    last_sent_ms: int = -10**9

    def rejoined(self) -> None:
        """A coordinator followed anew: wait for a fresh ack to be confirmed."""
        self.sync_seq = None

    def confirm(self, seen: AckId | None, accepted: StateKey, committed: StateKey) -> None:
        if seen is not None and seen > self.confirmed:
            self.confirmed, self.need = seen, (accepted, committed)

    def waiting(self) -> bool:
        """No ack sent since (re)joining is confirmed yet."""
        return self.sync_seq is None or self.confirmed < (self.incarnation, self.sync_seq)

    def next(self, now_ms: int) -> int:
        """The number of the ack about to be sent."""
        self.seq += 1
        self.last_sent_ms = now_ms
        if self.sync_seq is None:
            self.sync_seq = self.seq
        return self.seq

    def synced(self, accepted: StateKey, committed: StateKey) -> bool:
        """The coordinator has an ack we sent since (re)joining, and we hold what it held."""
        need_accepted, need_committed = self.need
        return (self.sync_seq is not None and self.confirmed >= (self.incarnation, self.sync_seq)
                and accepted >= need_accepted and committed >= need_committed)


class AckBook:
    """The coordinator's side: the newest ack of each host, and those to confirm next."""

    def __init__(self) -> None:
        self.seen: dict[str, AckId] = {}
        self.new: dict[str, AckId] = {}         # received since our last heartbeat

    def record(self, host: str, ack: AckId) -> None:
        self.seen[host] = max(ack, self.seen.get(host, ack))
        self.new[host] = self.seen[host]

    def confirmed(self) -> None:
        """The heartbeat confirming `new` went out."""
        self.new = {}
