"""Failure detection: alive / suspect / agent-down / unreachable / dead per peer host.

Evidence comes in as past-tense facts: gossip heard through the broker, ICMP
replies, a peer's signed "offline" (its MQTT last will or a clean stop), and the
state of this agent's own broker connection.  Other peers' heartbeats carry what
*they* hear and reach, which gives indirect confirmation (SWIM's idea, carried
passively in every heartbeat instead of by separate probe requests): a host that
this agent cannot reach but another peer still can is not dead, it is cut off
from us.

Rules, each with its reason in the output:
    alive        gossip within suspect_timeout_ms (relayed gossip, dated when its reporter
                 heard it: lag_ms longer, until every reporter with recent news says it
                 no longer hears the peer)
    unreachable  no gossip, but this agent itself has lost the broker (the peer's
                 silence says nothing then); "unreachable via broker"
    suspect      no gossip for suspect_timeout_ms; or worse, but still answering some
                 peer, or not yet enough pings tried
    agent-down   no gossip for dead_timeout_ms (or its offline will), host answers ping
    dead         no gossip for dead_timeout_ms, no ping reply for dead_timeout_ms, no
                 peer heard or reached it within suspect_timeout_ms, and this agent
                 hears some other peer (else it may be the one cut off: its broker
                 connection can look up for a keepalive or two after its link died)
Nothing is declared dead while this agent has no broker: then no quorum could act
on it anyway, and this agent may be the one cut off.  This agent is isolated when
it has had no broker and no ping reply from any peer for isolation_timeout_ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class PeerState(StrEnum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    SUSPECT = "suspect"
    UNREACHABLE = "unreachable"
    AGENT_DOWN = "agent-down"
    DEAD = "dead"


@dataclass(frozen=True, kw_only=True)
class DetectorTiming:
    suspect_timeout_ms: int = 900
    dead_timeout_ms: int = 1500
    isolation_timeout_ms: int = 5000
    min_failed_pings: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.suspect_timeout_ms <= self.dead_timeout_ms:
            raise ValueError("need 0 < suspect_timeout_ms <= dead_timeout_ms")


# ---- inputs --------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PeerHeard:
    host: str
    incarnation: int
    now_ms: int
    hears: frozenset[str] = frozenset()     # peers the sender heard lately
    reaches: frozenset[str] = frozenset()   # peers answering the sender's pings lately
    seq: int | None = None                  # numbers the sender's heartbeats (see PeerHeardRelayed)


@dataclass(frozen=True, kw_only=True)
class PeerHeardRelayed:
    """A peer's heartbeat relayed to this agent (a large cluster): `reporter` got it at
    `heard_ms` and said so at `built_ms` (both on this agent's clock, estimated from the
    ages in the digest).  Relayed news may be up to `lag_ms` late: the peer counts as
    heard that much longer, until its reporters say they no longer hear it."""

    host: str
    reporter: str
    incarnation: int
    heard_ms: int
    built_ms: int
    lag_ms: int
    now_ms: int
    hears: frozenset[str] = frozenset()
    reaches: frozenset[str] = frozenset()
    # The same heartbeat may come by several paths: each date is late by its path's transit
    # (not counted in the ages), so the earliest date of the newest heartbeat is kept.
    seq: int | None = None


@dataclass(frozen=True, kw_only=True)
class PeerWentOffline:
    host: str
    incarnation: int
    now_ms: int
    graceful: bool = False


@dataclass(frozen=True, kw_only=True)
class PingObserved:
    host: str                    # the peer's name
    ok: bool
    now_ms: int
    rtt_ms: float | None = None  # None when lost
    address: str = ""
    error: str = ""              # why it was lost, when known beyond "no reply"
    # A signed beat straight from the peer that hears this host (adapters/directbeat.py), not
    # an ICMP echo: only that is evidence in cluster mode.
    signed: bool = False


@dataclass(frozen=True, kw_only=True)
class BrokerConnectionChanged:
    connected: bool
    now_ms: int


DetectorInput = PeerHeard | PeerHeardRelayed | PeerWentOffline | PingObserved | BrokerConnectionChanged


# ---- outputs -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PeerStateChanged:
    host: str
    old: PeerState
    new: PeerState
    reason: str
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class IsolationChanged:
    isolated: bool
    reason: str
    now_ms: int


DetectorOutput = PeerStateChanged | IsolationChanged


@dataclass
class _Peer:
    incarnation: int = -1
    last_gossip_ms: int | None = None
    offline_ms: int | None = None        # offline seen after the last gossip
    graceful: bool = False
    last_ping_ok_ms: int | None = None
    failed_pings: int = 0                # since the last reply
    # Its signed beat said it hears this host (adapters/directbeat.py): its agent runs and the
    # path works both ways.  An echo reply proves only that some host answered.
    last_beat_ok_ms: int | None = None
    rtt_ms: float | None = None
    reached_by: dict[str, int] = field(default_factory=dict)   # reporter -> when
    known_ms: int = 0                    # when this agent started watching it
    lag_ms: int = 0                      # the latest gossip was relayed: how late it may be
    seq: int = 0                         # the newest heartbeat heard (when numbered)
    reports: dict[str, tuple[int, int]] = field(default_factory=dict)  # reporter -> (built, heard)
    state: PeerState = PeerState.UNKNOWN
    reason: str = "not heard yet"
    since_ms: int = 0                    # when the current state began


@dataclass(frozen=True)
class PeerView:
    host: str
    state: PeerState
    reason: str
    since_ms: int
    last_gossip_ms: int | None
    last_ping_ok_ms: int | None
    rtt_ms: float | None
    incarnation: int


class FailureDetector:
    def __init__(self, me: str, peers: list[str], timing: DetectorTiming, now_ms: int) -> None:
        self.me = me
        self.timing = timing
        self.started_ms = now_ms
        self._peers = {p: _Peer(since_ms=now_ms, known_ms=now_ms) for p in peers if p != me}
        self._broker = False
        self._broker_lost_ms: int | None = now_ms
        self._last_any_ping_ok_ms: int | None = None
        self._newest: list[tuple[int, str]] = []     # the two peers heard last: (when, host)
        self.isolated = False

    # ---- feeding --------------------------------------------------------------------

    def step(self, event: DetectorInput) -> list[DetectorOutput]:
        """Take one fact; re-judge the peers it is about (every peer on a broker change).

        Changes that come from time alone are reported by `tick`: a coordinator hears
        every host, so judging all peers on every heartbeat would cost O(N) per message.
        """
        touched: list[str] = []
        match event:
            case PeerHeard():
                touched = self._gossip(event)
            case PeerHeardRelayed():
                touched = self._relayed(event)
            case PeerWentOffline():
                peer = self._peers.get(event.host)
                if peer is not None and event.incarnation >= peer.incarnation:
                    peer.offline_ms, peer.graceful = event.now_ms, event.graceful
                touched = [event.host]
            case PingObserved(signed=True):
                peer = self._peers.get(event.host)
                if peer is not None and event.ok:
                    peer.last_beat_ok_ms = self._last_any_ping_ok_ms = event.now_ms
                touched = [event.host]
            case PingObserved():
                peer = self._peers.get(event.host)
                if peer is not None:
                    if event.ok:
                        peer.last_ping_ok_ms, peer.failed_pings = event.now_ms, 0
                        peer.rtt_ms = event.rtt_ms
                        self._last_any_ping_ok_ms = event.now_ms
                    else:
                        peer.failed_pings += 1
                touched = [event.host]
            case BrokerConnectionChanged():
                if event.connected != self._broker:
                    self._broker = event.connected
                    self._broker_lost_ms = None if event.connected else event.now_ms
                return self.tick(event.now_ms)
        out: list[DetectorOutput] = []
        for host in touched:
            peer = self._peers.get(host)
            if peer is not None:
                out += self._rejudge(host, peer, event.now_ms)
        return out + self._isolation(event.now_ms)

    def _current(self, host: str, incarnation: int) -> _Peer | None:
        """The watched peer news of this incarnation is about (its numbering and reports start
        again with a newer one); None for a peer not watched or an older life of it."""
        peer = self._peers.get(host)
        if peer is None or incarnation < peer.incarnation:
            return None
        if incarnation > peer.incarnation:
            peer.incarnation, peer.seq, peer.reports = incarnation, 0, {}
        return peer

    def _gossip(self, g: PeerHeard) -> list[str]:
        peer = self._current(g.host, g.incarnation)
        if peer is None:
            return []
        if g.seq is None or g.seq >= peer.seq:
            peer.lag_ms = 0
        return self._heard(g.host, peer, g.now_ms, g.hears | g.reaches, g.seq)

    def _heard(self, host: str, peer: _Peer, at_ms: int, saw: frozenset[str], seq: int | None) -> list[str]:
        if seq is not None and peer.last_gossip_ms is not None and seq <= peer.seq:
            if seq == peer.seq and at_ms < peer.last_gossip_ms:
                peer.last_gossip_ms = at_ms         # the same heartbeat by a quicker path
        elif peer.last_gossip_ms is None or at_ms >= peer.last_gossip_ms or seq is not None:
            peer.seq = seq if seq is not None else peer.seq
            peer.last_gossip_ms = at_ms
            peer.offline_ms = None
            newest = sorted([(at_ms, host), *(e for e in self._newest if e[1] != host)], reverse=True)
            self._newest = newest[:2]
        touched = [host]
        for other in saw:
            target = self._peers.get(other)
            if target is not None:
                target.reached_by[host] = max(at_ms, target.reached_by.get(host, at_ms))
                touched.append(other)
        return touched

    def _relayed(self, g: PeerHeardRelayed) -> list[str]:
        peer = self._current(g.host, g.incarnation)
        if peer is None:
            return []
        if g.built_ms >= peer.reports.get(g.reporter, (g.built_ms, 0))[0]:
            peer.reports[g.reporter] = (g.built_ms, g.heard_ms)
        newer = g.seq > peer.seq if g.seq is not None else (peer.last_gossip_ms is None
                                                              or g.heard_ms >= peer.last_gossip_ms)
        if newer:
            peer.lag_ms = g.lag_ms
        return self._heard(g.host, peer, g.heard_ms, g.hears | g.reaches, g.seq)

    def _lag(self, host: str, p: _Peer, now: int) -> int:
        """The allowance for relayed gossip: none once every reporter with recent news of the
        peer says it no longer hears it (that news travels at once, not a tier at a time)."""
        if not p.lag_ms:
            return 0
        t = self.timing.suspect_timeout_ms
        # A host's report of itself is just its heartbeat: the others say whether it went silent.
        recent = [(built, heard) for reporter, (built, heard) in p.reports.items()
                  if now - built <= t + p.lag_ms and reporter != host]
        if all(built - heard > t for built, heard in recent):
            return 0
        return p.lag_ms

    def tick(self, now_ms: int) -> list[DetectorOutput]:
        out: list[DetectorOutput] = []
        for host, peer in self._peers.items():
            out += self._rejudge(host, peer, now_ms)
        out += self._isolation(now_ms)
        return out

    def _rejudge(self, host: str, peer: _Peer, now_ms: int) -> list[DetectorOutput]:
        state, reason = self._judge(host, peer, now_ms)
        peer.reason = reason
        if state == peer.state:
            return []
        change = PeerStateChanged(host=host, old=peer.state, new=state, reason=reason, now_ms=now_ms)
        peer.state, peer.since_ms = state, now_ms
        return [change]

    # ---- judging --------------------------------------------------------------------

    def _judge(self, host: str, p: _Peer, now: int) -> tuple[PeerState, str]:
        t = self.timing
        heard_at = p.last_gossip_ms if p.last_gossip_ms is not None else p.known_ms
        silent = now - heard_at
        if (p.last_gossip_ms is not None and p.offline_ms is None
                and silent <= t.suspect_timeout_ms + self._lag(host, p, now)):
            return PeerState.ALIVE, "gossip fresh"
        pinged_at = p.last_ping_ok_ms
        beat_at = p.last_beat_ok_ms
        answers = ((pinged_at is not None and now - pinged_at <= t.dead_timeout_ms)
                   or (beat_at is not None and now - beat_at <= t.dead_timeout_ms))
        if not self._broker:
            if answers:
                return (PeerState.UNREACHABLE,
                        "unreachable via broker: this agent has no broker; host answers ping")
            return PeerState.SUSPECT, "this agent has no broker and the host does not answer ping"
        gone = "stopped cleanly" if p.graceful else "lost its broker connection"
        if p.offline_ms is None and silent <= t.dead_timeout_ms:
            return PeerState.SUSPECT, f"no gossip for {silent} ms"
        why = f"agent {gone}" if p.offline_ms is not None else f"no gossip for {silent} ms"
        if answers:
            return PeerState.AGENT_DOWN, f"{why}; host answers ping"
        witnesses = sorted(r for r, at in p.reached_by.items()
                           if now - at <= t.suspect_timeout_ms and r != host)
        if witnesses:
            return PeerState.SUSPECT, f"{why}; no ping reply here, but {', '.join(witnesses)} still reach it"
        if not self._hears_another(host, now):
            return PeerState.SUSPECT, (f"{why}; no ping reply here, but this agent hears no other peer "
                                       "either: it may be the one cut off")
        if p.failed_pings < t.min_failed_pings:
            return PeerState.SUSPECT, f"{why}; waiting for ping evidence"
        no_ping = "never answered ping" if pinged_at is None else f"no ping reply for {now - pinged_at} ms"
        return PeerState.DEAD, f"{why}, {no_ping}, and no peer reaches it"

    def _hears_another(self, host: str, now: int) -> bool:
        """Fresh gossip from some other peer: proof that our broker path works.  Our own
        connection may look up for a keepalive or two after a cut; with one peer only,
        that connection is all there is to go on."""
        if len(self._peers) <= 1:
            return True
        t = self.timing.suspect_timeout_ms
        # The two peers heard last suffice: one of them is not `host`.
        return any(h != host and now - at <= t for at, h in self._newest)

    def _isolation(self, now: int) -> list[DetectorOutput]:
        t = self.timing.isolation_timeout_ms
        no_broker = self._broker_lost_ms is not None and now - self._broker_lost_ms >= t
        pinged = self._last_any_ping_ok_ms
        no_peer = not self._peers or pinged is None or now - pinged >= t
        isolated = no_broker and no_peer and bool(self._peers)
        if isolated == self.isolated:
            return []
        self.isolated = isolated
        reason = (f"no broker and no peer answering ping for {t} ms" if isolated
                  else "broker or a peer reachable again")
        return [IsolationChanged(isolated=isolated, reason=reason, now_ms=now)]

    def reconfigure(self, peers: list[str], timing: DetectorTiming, now_ms: int) -> None:
        """New peer list and timing (a configuration reload); known peers keep their evidence."""
        self.timing = timing
        wanted = [p for p in peers if p != self.me]
        for gone in set(self._peers) - set(wanted):
            del self._peers[gone]
        for host in wanted:
            self._peers.setdefault(host, _Peer(since_ms=now_ms, known_ms=now_ms))
        keep = set(wanted)
        for peer in self._peers.values():
            for reporter in set(peer.reached_by) - keep:
                del peer.reached_by[reporter]
        heard = [(p.last_gossip_ms, h) for h, p in self._peers.items() if p.last_gossip_ms is not None]
        self._newest = sorted(heard, reverse=True)[:2]

    # ---- views ----------------------------------------------------------------------

    def hears(self, now_ms: int) -> frozenset[str]:
        t = self.timing.suspect_timeout_ms
        return frozenset(h for h, p in self._peers.items()
                         if p.last_gossip_ms is not None
                         and now_ms - p.last_gossip_ms <= t + (self._lag(h, p, now_ms) if p.lag_ms else 0))

    def lag(self, host: str, now_ms: int) -> int:
        """How late this agent's news of `host` may be (relayed gossip), 0 for direct."""
        peer = self._peers.get(host)
        return self._lag(host, peer, now_ms) if peer is not None else 0

    def reaches(self, now_ms: int) -> frozenset[str]:
        t = self.timing.suspect_timeout_ms
        return frozenset(h for h, p in self._peers.items()
                         if p.last_ping_ok_ms is not None and now_ms - p.last_ping_ok_ms <= t)

    @property
    def broker_connected(self) -> bool:
        return self._broker

    def state(self, host: str) -> PeerState:
        """A peer this detector does not watch is `unknown`."""
        peer = self._peers.get(host)
        return peer.state if peer is not None else PeerState.UNKNOWN

    def watches(self, host: str) -> bool:
        return host in self._peers

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def views(self) -> list[PeerView]:
        return [PeerView(host=h, state=p.state, reason=p.reason, since_ms=p.since_ms,
                         last_gossip_ms=p.last_gossip_ms, last_ping_ok_ms=p.last_ping_ok_ms,
                         rtt_ms=p.rtt_ms, incarnation=p.incarnation)
                for h, p in sorted(self._peers.items())]
