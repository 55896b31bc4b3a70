"""The coordinator's duty for one term: plan, propose, broadcast, and catch hosts up.

A host that wins an election re-proposes what it accepted, in its own term (Raft's rule:
that commits everything committed before).  Then, while no proposal is in flight and
the followers have had the time to report to it, it plans (coordinator.py) from the
committed state and the hosts it hears; each new state is proposed, broadcast while in
flight, and sent alone to any host whose heartbeat, sent well after the last change,
shows it behind.  A state too large for one message goes in parts (parts.py), and a
round of parts is sent again at most every `PARTS_EVERY_MS`.  A dead host counts as
dead only when a quorum agrees: this host and fresh reporters that neither hear nor
reach it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from haguard.core.cluster.acks import AckBook
from haguard.core.cluster.coordinator import Coordinator, HostView
from haguard.core.cluster.parts import fits, split
from haguard.core.cluster.state import Proposer
from haguard.core.cluster.types import Ack, ClusterOutput, Proposal
from haguard.core.detector import PeerState

if TYPE_CHECKING:
    from haguard.core.cluster.member import ClusterMember

PARTS_EVERY_MS = 1000


class Duty:
    def __init__(self, member: ClusterMember, coordinator_class: type[Coordinator]) -> None:
        m = self.m = member
        term = m.election.term
        proposal = replace(m.accepted, term=term, version=m.accepted.version + 1)
        self.proposer = Proposer(m.quorum, m.me, m.committed, proposal)
        m.accepted = proposal
        self.coordinator = coordinator_class(m.config, term, m.new_id)
        self.acks = AckBook()
        self.caught_up: dict[str, int] = {}             # host -> catch-up proposal sent at
        self.changed_ms = -10**9                        # last proposal or commit
        self.since_ms = m.now_ms
        self.last_proposal_ms = -10**9                  # announce at once
        self._fit: tuple[tuple[object, ...], bool] = ((), True)     # the last size check

    def acked(self, message: Ack) -> None:
        if self.proposer.ack(message.sender, message.accepted):
            self.last_proposal_ms = -10**9              # tell everyone the commit at the next tick
        self.m.take_committed(self.proposer.committed)
        self.acks.record(message.sender, (message.incarnation, message.seq))

    def run(self, now: int) -> list[ClusterOutput]:
        m, proposer = self.m, self.proposer
        out: list[ClusterOutput] = []
        committed_before = proposer.committed.key
        # Followers start reporting to a new coordinator once its first heartbeat reaches them: plan
        # only when it has had the time to hear them (else it would place every VM on its neighbours).
        settled = now - self.since_ms >= m.config.timing.quorum_timeout_ms + m.lag_ms
        if not proposer.in_flight and settled:
            state, planned = self.coordinator.plan(proposer.committed, self.host_views(now), now)
            out += planned
            if state is not None:
                proposer.propose(state)
                m.accepted = state
                m.take_committed(proposer.committed)
                self.last_proposal_ms = -10**9
        if proposer.committed.key != committed_before:
            self.changed_ms = now
        return out + self._broadcast(now) + self._catch_up(now)

    def _whole(self, to: str | None = None, confirmed: dict[str, tuple[int, int]] | None = None) -> Proposal:
        m = self.m
        return Proposal(sender=m.me, term=m.election.term, state=self.proposer.proposal,
                        committed=self.proposer.committed, to=to, confirmed=confirmed or {})

    def _fits(self, proposal: Proposal) -> bool:
        """Whether the whole proposal fits one message (measured once per pair of states)."""
        ident = (proposal.state.key, proposal.committed.key)
        if self._fit[0] != ident:
            self._fit = (ident, fits(proposal))
        return self._fit[1]

    def _broadcast(self, now: int) -> list[ClusterOutput]:
        """While in flight (and once more when it was committed at once, alone)."""
        m = self.m
        whole = self._whole()
        small = self._fits(whole)
        every = m.config.timing.heartbeat_ms if small else max(m.config.timing.heartbeat_ms, PARTS_EVERY_MS)
        if not ((self.proposer.in_flight or self.last_proposal_ms == -10**9)
                and now - self.last_proposal_ms >= every):
            return []
        self.last_proposal_ms = self.changed_ms = now
        if small:
            return [m.send(whole)]
        committed = self.proposer.committed
        return [m.send(p) for p in split(sender=m.me, term=m.election.term, base=committed,
                                         state=self.proposer.proposal, committed=committed.key)]

    def _catch_up(self, now: int) -> list[ClusterOutput]:
        """A host whose heartbeat, sent well after the last change, shows it behind: the state to
        it alone."""
        m = self.m
        proposal, committed = self.proposer.proposal, self.proposer.committed
        grace = 3 * m.config.timing.heartbeat_ms
        out: list[ClusterOutput] = []
        for host, (at, beat) in m.beats.items():
            if (at > self.changed_ms + grace and now - at <= m.window(host)
                    and (beat.accepted < proposal.key or beat.committed < committed.key)
                    and now - self.caught_up.get(host, -10**9) >= grace):
                self.caught_up[host] = now
                seen = self.acks.seen.get(host)
                confirmed = {host: seen} if seen is not None else {}
                whole = self._whole(to=host, confirmed=confirmed)
                if self._fits(whole):
                    out.append(m.send(whole))
                else:
                    parts = split(sender=m.me, term=m.election.term, base=None, state=proposal,
                                  committed=committed.key, to=host, confirmed=confirmed)
                    out += [m.send(p) for p in parts]
        return out

    def host_views(self, now: int) -> dict[str, HostView]:
        m = self.m
        fresh = {p: b for p, (at, b) in m.beats.items()
                 if now - at <= m.window(p) and m.detector.state(p) is PeerState.ALIVE}
        own = m.heartbeat(now, True)
        views = {m.me: HostView(name=m.me, alive=True, dead=False, beat=own)}
        for host in m.config.hosts:
            if host == m.me:
                continue
            dead = False
            if m.detector.state(host) is PeerState.DEAD:
                # A quorum must agree: this agent and fresh reporters that neither hear nor reach it.
                agree = {m.me} | {p for p, b in fresh.items() if host not in b.hears | b.reaches}
                dead = m.quorum.reached(agree)
            views[host] = HostView(name=host, alive=host in fresh, dead=dead, beat=fresh.get(host))
        return views
