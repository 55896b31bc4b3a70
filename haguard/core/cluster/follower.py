"""Following a coordinator: its lease, its proposals, and the acks that make a read index.

A coordinator's heartbeat or proposal renews its lease (a term older than ours is
refused; a newer one ends our own coordination).  A proposal newer than what this host
accepted is accepted and acked; a heartbeat that says the state we accepted is committed
commits it here.  After (re)joining, this host acks at every coordinator heartbeat until
one ack is confirmed (acks.py), so that it knows nothing decided while it was away is
missing before it starts anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from haguard.core.cluster.acks import ReadIndex
from haguard.core.cluster.election import Role
from haguard.core.cluster.parts import PartsInbox, apply
from haguard.core.cluster.state import ClusterState, StateKey
from haguard.core.cluster.types import WHOLE, Ack, ClusterOutput, Heartbeat, Proposal, Send, StatePart

if TYPE_CHECKING:
    from haguard.core.cluster.member import ClusterMember


class Follower:
    def __init__(self, member: ClusterMember) -> None:
        self.m = member
        self.read_index = ReadIndex(member.incarnation)
        self.inbox = PartsInbox()

    def follow(self, coordinator: str, term: int) -> bool:
        """Renew the lease of `coordinator`; False when it is not the one to follow."""
        m = self.m
        if term < m.election.term:
            return False                            # an older term's coordinator: refused
        if term > m.election.term:
            m.drop_coordination()
        m.election.follow(coordinator, term, m.now_ms)
        if m.election.coordinator != coordinator or m.election.role is Role.COORDINATOR:
            return False
        if m.election.following_since_ms == m.now_ms:
            self.read_index.rejoined()
            m.retrack()
        return True

    def proposal(self, p: Proposal) -> list[ClusterOutput]:
        m = self.m
        if not self.follow(p.sender, p.term):
            return []
        self.read_index.confirm(p.confirmed.get(m.me), p.state.key, p.committed.key)
        m.take_committed(p.committed)
        if p.state.key > m.accepted.key:
            m.accepted = p.state
        if m.accepted.key != p.state.key:
            return []
        return [self._ack(p.sender, p.term)]

    def state_part(self, p: StatePart) -> list[ClusterOutput]:
        """One part of a large proposal or catch-up (parts.py): applied with the others once all
        are here and its base is one this host holds; acked like a proposal."""
        m = self.m
        if p.to not in (None, m.me) or not self.follow(p.sender, p.term):
            return []
        self.read_index.confirm(p.confirmed.get(m.me), p.key, p.committed)
        self._committed_is(p.committed)
        if p.key > m.accepted.key:
            done = self.inbox.add(p)
            base = None if done is None else self._base(p.base)
            if done is None or base is None:
                return []
            m.accepted = apply(base, done)
            self._committed_is(p.committed)
            return [self._ack(p.sender, p.term)]
        if m.accepted.key == p.key and p.part == 0:
            return [self._ack(p.sender, p.term)]      # once per round of parts, not per part
        return []

    def _base(self, key: StateKey) -> ClusterState | None:
        m = self.m
        if key == WHOLE:
            return ClusterState()
        return next((s for s in (m.accepted, m.committed) if s.key == key), None)

    def _committed_is(self, key: StateKey) -> None:
        """The coordinator's committed key: the state accepted here under it is committed."""
        if key == self.m.accepted.key:
            self.m.take_committed(self.m.accepted)

    def coordinator_beat(self, beat: Heartbeat) -> list[ClusterOutput]:
        """A coordinator's heartbeat: its lease, its confirmations, its committed key."""
        m = self.m
        if not self.follow(beat.sender, beat.term):
            return []
        self.read_index.confirm(beat.confirmed.get(m.me), beat.accepted, beat.committed)
        if beat.committed == m.accepted.key:
            m.take_committed(m.accepted)            # the state we accepted is committed now
        if (self.read_index.waiting()
                and m.now_ms - self.read_index.last_sent_ms >= m.config.timing.heartbeat_ms):
            return [self._ack(beat.sender, beat.term)]   # (re)joined: ask for a confirmation
        return []

    def _ack(self, coordinator: str, term: int) -> Send:
        m = self.m
        seq = self.read_index.next(m.now_ms)
        return m.send(Ack(sender=m.me, term=term, accepted=m.accepted.key, to=coordinator,
                          incarnation=m.incarnation, seq=seq))

    def synced(self) -> bool:
        """The coordinator has an ack we sent since (re)joining: its committed state is current."""
        m = self.m
        if m.election.role is Role.COORDINATOR:
            return True
        return self.read_index.synced(m.accepted.key, m.committed.key)
