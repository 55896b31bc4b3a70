"""Standing for election and granting votes (the rules of a vote are election.py's).

A host stands when no lease is valid, it holds quorum (or, in a large cluster, a
majority of its own neighbourhood), its last attempt has timed out, and it is the
preferred candidate it knows of: the alive, quorate host with the newest state, then
the highest priority, then the first name.  Vote requests seen lately count as
candidates too: in a large cluster a host does not hear every other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from haguard.core.cluster.acks import NO_KEY
from haguard.core.cluster.election import Role
from haguard.core.cluster.state import StateKey
from haguard.core.cluster.types import ClusterOutput, VoteGranted, VoteRequest
from haguard.core.detector import PeerState

if TYPE_CHECKING:
    from haguard.core.cluster.member import ClusterMember


class Campaign:
    def __init__(self, member: ClusterMember) -> None:
        self.m = member
        self.candidates: dict[str, tuple[int, StateKey]] = {}   # vote requests seen: host -> (at, key)

    def vote_requested(self, message: VoteRequest) -> list[ClusterOutput]:
        m, now = self.m, self.m.now_ms
        self.candidates[message.sender] = (now, message.accepted)
        # A candidate this agent does not watch: its request is the news that it lives.
        alive = (m.detector.state(message.sender) is PeerState.ALIVE
                 or not m.detector.watches(message.sender))
        ok, _why = m.election.should_grant(message.sender, message.term, message.accepted,
                                           m.accepted.key, alive, now)
        if not ok:
            return []
        m.drop_coordination()
        m.election.grant(message.sender, message.term)
        return [m.send(VoteGranted(sender=m.me, term=message.term, to=message.sender))]

    def forget_old(self, now: int) -> None:
        for host, (at, _key) in list(self.candidates.items()):
            if now - at > 2 * self.m.config.timing.election_timeout_ms:
                del self.candidates[host]

    def maybe_stand(self, now: int, quorate: bool) -> list[ClusterOutput]:
        m = self.m
        e, timeout = m.election, m.config.timing.election_timeout_ms
        if e.role is Role.COORDINATOR or e.lease_valid(now) or not quorate:
            return []
        if e.role is Role.CANDIDATE and now - e.started_ms < timeout:
            return []
        if e.started_ms >= 0 and now - e.started_ms < timeout:
            return []
        if self.preferred(now) != m.me:
            e.role = Role.FOLLOWER
            return []
        term = e.stand(now)
        return [m.send(VoteRequest(sender=m.me, term=term, accepted=m.accepted.key))]

    def preferred(self, now: int) -> str:
        """The alive, quorate host with the newest state, then highest priority, then first name."""
        m = self.m
        keys = {m.me: m.accepted.key}
        for peer, (at, beat) in m.beats.items():
            if beat.quorate and now - at <= m.window(peer) and m.detector.state(peer) is PeerState.ALIVE:
                keys[peer] = beat.accepted
        for peer, (_at, key) in self.candidates.items():    # candidates seen lately (large clusters)
            if peer != m.me and key > keys.get(peer, NO_KEY):
                keys[peer] = key
        hosts = sorted(keys)
        hosts.sort(key=lambda h: (keys[h], m.config.hosts[h].priority), reverse=True)
        return hosts[0]
