"""Whom a host counts towards quorum, and whether it holds one.

- broker quorum: peers heard through the broker lately whose heartbeat says they hear
  this host (mutual); a new coordinator also counts the voters that have just granted it
  their vote (they are not sending to it yet); a follower also holds quorum while it is
  mutual with a coordinator of its term whose heartbeat says the coordinator holds one.
  Decisions need this kind (votes and acks travel through the broker).
- connected quorum: the above, or peers whose signed direct beat says they hear this host
  (never a bare echo reply: one that goes one way, or is forged, would keep an isolated host
  petting while the others recover its VMs).  Keeps the watchdog petted.  Beats go to every
  host up to `direct_mesh` hosts, so a host reaching a majority shows it with no broker;
  its heartbeat lists them (`reaches`), so a coordinator holding a majority hears of it
  from a host both majorities share and never declares it dead.
- standing: may stand for election: broker quorum, or (a large cluster, where nobody hears
  a majority before a coordinator exists) mutual with a majority of its own neighbourhood.

Each view is computed once per fact and instant (asked several times a tick): a
coordinator of 1,000 hosts would otherwise walk every peer again for each question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from haguard.core.cluster.election import Role
from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.types import Heartbeat
from haguard.core.detector import PingObserved

if TYPE_CHECKING:
    from haguard.core.cluster.member import ClusterMember


def heard_by(beat: Heartbeat, host: str) -> bool:
    """Whether the heartbeat's sender says it hears `host`."""
    if host in beat.hears:
        return True
    return beat.unheard is not None and host != beat.sender and host not in beat.unheard


class QuorumViews:
    def __init__(self, member: ClusterMember) -> None:
        self.m = member
        c = member.config
        self._local_quorum = Quorum({h: c.hosts[h].weight for h in member.neighbours | {member.me}})
        self._cache_key: tuple[object, ...] = ()
        self._cache: dict[str, object] = {}
        self._direct: dict[str, int] = {}           # host -> its latest signed beat that hears us
        everyone = frozenset(h for h in c.hosts if h != member.me)
        self._mesh = everyone if len(c.hosts) <= c.direct_mesh else None

    def beat_targets(self) -> frozenset[str]:
        """Whom this host sends signed beats: everyone in a mesh, else the hosts it watches."""
        return self._mesh if self._mesh is not None else self.m.detector.peers

    def observe(self, event: PingObserved) -> None:
        if event.signed and event.ok and event.host in self.m.config.hosts and event.host != self.m.me:
            self._direct[event.host] = event.now_ms

    def direct_reaches(self, now_ms: int) -> frozenset[str]:
        """Hosts whose signed beat lately said they hear this one (watched or not)."""
        t = self.m.config.detector.suspect_timeout_ms
        return frozenset(h for h, at in self._direct.items() if now_ms - at <= t)

    def _cached(self, name: str, now_ms: int) -> object | None:
        """A view computed since the last fact at this instant."""
        e = self.m.election
        key = (now_ms, self.m.steps, e.role, e.term, e.coordinator, e.lease_until_ms)
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
        return self._cache.get(name)

    def mutual_peers(self, now_ms: int) -> set[str]:
        cached = self._cached("mutual", now_ms)
        if isinstance(cached, frozenset):
            return set(cached)
        m = self.m
        heard = m.detector.hears(now_ms)
        mutual = {p for p in heard if p in m.beats and now_ms - m.beats[p][0] <= m.window(p)
                  and heard_by(m.beats[p][1], m.me)}
        if m.election.role is Role.COORDINATOR:
            # Voters' heartbeats reach a new coordinator once they follow it (relayed: later).
            window = m.config.timing.quorum_timeout_ms + m.lag_ms
            mutual |= {p for p, at in m.granted_at.items() if now_ms - at <= window}
        self._cache["mutual"] = frozenset(mutual)
        return mutual

    def _lease_quorate(self, mutual: set[str]) -> bool:
        """Mutual with the coordinator we follow, whose latest heartbeat says it holds quorum."""
        m = self.m
        c = m.election.following(m.now_ms)
        if c is None or c == m.me or c not in mutual:
            return False
        beat = m.beats[c][1]
        return beat.coordinator and beat.quorate and beat.term == m.election.term

    def broker_quorate(self, now_ms: int) -> bool:
        cached = self._cached("broker", now_ms)
        if cached is None:
            mutual = self.mutual_peers(now_ms)
            cached = self._cache["broker"] = (self.m.quorum.reached(mutual | {self.m.me})
                                              or self._lease_quorate(mutual))
        return bool(cached)

    def connected_quorate(self, now_ms: int) -> bool:
        if self.broker_quorate(now_ms):
            return True
        cached = self._cached("connected", now_ms)
        if cached is None:
            cached = self._cache["connected"] = self.m.quorum.reached(
                self.mutual_peers(now_ms) | self.direct_reaches(now_ms) | {self.m.me})
        return bool(cached)

    def standing_quorate(self, now_ms: int) -> bool:
        if self.broker_quorate(now_ms):
            return True
        return (self.m.detector.broker_connected
                and self._local_quorum.reached(self.mutual_peers(now_ms) | {self.m.me}))
