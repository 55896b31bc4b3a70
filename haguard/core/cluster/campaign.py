"""Standing for election and granting votes (the rules of a vote are election.py's).

A host stands when no lease is valid, it holds quorum (or, in a large cluster, a
majority of its own neighbourhood), its last attempt has timed out, and it is the
preferred candidate it knows of: the alive, quorate host with the newest state, then
the highest priority, then the first name.  Vote requests seen lately count as
candidates too: in a large cluster a host does not hear every other.

A coordinator that stops cleanly hands over (Raft's leadership transfer): it names the
preferred of the hosts it is mutual with, steps down and never stands again; the
successor stands at once, and voters grant it although the old lease still holds.  A
follower therefore sees a new coordinator within a message round trip or two, well
inside the self-fence grace (selffence.py), and nothing else happens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from haguard.core.cluster.acks import NO_KEY
from haguard.core.cluster.election import Role
from haguard.core.cluster.state import StateKey
from haguard.core.cluster.types import ClusterOutput, Handover, VoteGranted, VoteRequest
from haguard.core.detector import PeerState

if TYPE_CHECKING:
    from haguard.core.cluster.member import ClusterMember


HANDOVER_WAIT_MS = 3000        # a stopping coordinator waits this long at most for its successor


class Campaign:
    def __init__(self, member: ClusterMember) -> None:
        self.m = member
        self.candidates: dict[str, tuple[int, StateKey]] = {}   # vote requests seen: host -> (at, key)
        self.leaving = False                                    # this agent stops: never stands again
        self.handing_over_since: int | None = None              # stopped as coordinator then

    def vote_requested(self, message: VoteRequest) -> list[ClusterOutput]:
        m, now = self.m, self.m.now_ms
        self.candidates[message.sender] = (now, message.accepted)
        if m.lost_votes.abstaining() or not m.definition.agrees(message.definition):
            return []
        # A candidate this agent does not watch: its request is the news that it lives.
        alive = (m.detector.state(message.sender) is PeerState.ALIVE
                 or not m.detector.watches(message.sender))
        my_key = max(m.accepted.key, m.lost_votes.floor_key)
        ok, _why = m.election.should_grant(message.sender, message.term, message.accepted,
                                           my_key, alive, now, handover=message.handover)
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
        if (e.role is Role.COORDINATOR or e.lease_valid(now) or not quorate or self.leaving
                or m.lost_votes.abstaining()):
            return []
        if e.role is Role.CANDIDATE and now - e.started_ms < timeout:
            return []
        if e.started_ms >= 0 and now - e.started_ms < timeout:
            return []
        if self.preferred(now) != m.me:
            e.role = Role.FOLLOWER
            return []
        term = e.stand(now)
        return [m.send(VoteRequest(sender=m.me, term=term, accepted=m.accepted.key,
                                   definition=m.definition.mine))]

    def hand_over(self, now: int) -> list[ClusterOutput]:
        """This agent stops cleanly: a coordinator names its successor and steps down."""
        m = self.m
        self.leaving = True
        if m.election.role is not Role.COORDINATOR:
            return []
        self.handing_over_since = now
        mutual = m.mutual_peers(now)
        successor = self.preferred(now, among=mutual)
        m.drop_coordination()
        if successor == m.me:
            return []                           # nobody to hand over to: the lease lapses
        return [m.send(Handover(sender=m.me, term=m.election.term, to=successor))]

    def handover_done(self, now: int) -> bool:
        """The agent may go: it was no coordinator, or a successor leads now (or it waited
        `HANDOVER_WAIT_MS`: its lease lapses on its own)."""
        m, since = self.m, self.handing_over_since
        if not self.leaving:
            return False
        if since is None or now - since >= HANDOVER_WAIT_MS:
            return True
        return m.election.following(now) not in (None, m.me)

    def handed_over(self, message: Handover) -> list[ClusterOutput]:
        """Our coordinator named us its successor: stand at once."""
        m, e = self.m, self.m.election
        if (message.to != m.me or message.term != e.term or e.following(m.now_ms) != message.sender
                or self.leaving or m.lost_votes.abstaining()):
            return []
        term = e.stand(m.now_ms)
        return [m.send(VoteRequest(sender=m.me, term=term, accepted=m.accepted.key, handover=True,
                                   definition=m.definition.mine))]

    def preferred(self, now: int, among: set[str] | None = None) -> str:
        """The alive, quorate host with the newest state, then highest priority, then first name
        (this agent, or one of `among`)."""
        m = self.m
        keys = {m.me: m.accepted.key}
        for peer, (at, beat) in m.beats.items():
            if among is not None and peer not in among:
                continue
            if beat.quorate and now - at <= m.window(peer) and m.detector.state(peer) is PeerState.ALIVE:
                keys[peer] = beat.accepted
        for peer, (_at, key) in self.candidates.items():    # candidates seen lately (large clusters)
            if among is None and peer != m.me and key > keys.get(peer, NO_KEY):
                keys[peer] = key
        hosts = sorted(keys)
        hosts.sort(key=lambda h: (keys[h], m.config.hosts[h].priority), reverse=True)
        if among is not None and len(hosts) > 1:
            hosts.remove(m.me)
        return hosts[0]
