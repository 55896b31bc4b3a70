"""FailureDetector: table-driven scenarios and properties (haguard/core/detector.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core.detector import (
    BrokerConnectionChanged,
    DetectorInput,
    DetectorTiming,
    FailureDetector,
    IsolationChanged,
    PeerHeard,
    PeerHeardRelayed,
    PeerState,
    PeerStateChanged,
    PeerWentOffline,
    PingObserved,
)

T = DetectorTiming(suspect_timeout_ms=900, dead_timeout_ms=1500, isolation_timeout_ms=5000)
PEERS = ["h1", "h2", "h3"]


@dataclass
class World:
    """h1's detector; each 100 ms h2 (always fine) and h3 do what the scenario says."""

    det: FailureDetector
    now: int = 0

    def run(self, until_ms: int, *, h3_gossip: bool, h3_ping: bool, h2_reaches_h3: bool = False,
            broker: bool = True) -> list[PeerStateChanged]:
        out: list[PeerStateChanged] = []
        while self.now < until_ms:
            self.now += 100
            evs: list[DetectorInput] = [BrokerConnectionChanged(connected=broker, now_ms=self.now)]
            if broker:
                reaches = frozenset({"h3"}) if h2_reaches_h3 else frozenset()
                evs.append(PeerHeard(host="h2", incarnation=1, now_ms=self.now, reaches=reaches))
                if h3_gossip:
                    evs.append(PeerHeard(host="h3", incarnation=1, now_ms=self.now))
            if self.now % 200 == 0:
                evs.append(PingObserved(host="h2", ok=True, now_ms=self.now, rtt_ms=0.1))
                evs.append(PingObserved(host="h3", ok=h3_ping, now_ms=self.now,
                                        rtt_ms=0.1 if h3_ping else None))
            for e in evs:
                out += [o for o in self.det.step(e) if isinstance(o, PeerStateChanged)]
        return out


def world() -> World:
    w = World(FailureDetector("h1", PEERS, T, 0))
    w.run(1000, h3_gossip=True, h3_ping=True)
    assert w.det.state("h3") is PeerState.ALIVE
    return w


@pytest.mark.parametrize(("fault", "kw", "final", "within_ms"), [
    ("agent killed, host up", {"h3_gossip": False, "h3_ping": True}, PeerState.AGENT_DOWN, 1600),
    ("host gone", {"h3_gossip": False, "h3_ping": False}, PeerState.DEAD, 2300),
    ("cut from us, h2 still reaches it", {"h3_gossip": False, "h3_ping": False, "h2_reaches_h3": True},
     PeerState.SUSPECT, None),
    ("our broker gone, h3 pings", {"h3_gossip": False, "h3_ping": True, "broker": False},
     PeerState.UNREACHABLE, None),
    ("our broker gone, no pings", {"h3_gossip": False, "h3_ping": False, "broker": False},
     PeerState.SUSPECT, None),
])
def test_scenarios(fault: str, kw: dict[str, bool], final: PeerState, within_ms: int | None) -> None:
    w = world()
    start = w.now
    changes = [c for c in w.run(start + 4000, **kw) if c.host == "h3"]
    assert w.det.state("h3") is final, (fault, changes)
    assert changes[0].new in (PeerState.SUSPECT, PeerState.UNREACHABLE), changes
    if within_ms is not None:
        reached = next(c.now_ms for c in changes if c.new is final)
        assert reached - start <= within_ms, (fault, changes)
    assert all(c.new is not PeerState.DEAD for c in changes) or final is PeerState.DEAD


def test_offline_will_gives_agent_down_at_once_and_gossip_revives() -> None:
    w = world()
    out = w.det.step(PeerWentOffline(host="h3", incarnation=1, now_ms=w.now + 10))
    assert [(c.host, c.new) for c in out if isinstance(c, PeerStateChanged)] == [("h3", PeerState.AGENT_DOWN)]
    # A stale will from an older incarnation after a restart changes nothing.
    w.det.step(PeerHeard(host="h3", incarnation=2, now_ms=w.now + 20))
    assert w.det.state("h3") is PeerState.ALIVE
    w.det.step(PeerWentOffline(host="h3", incarnation=1, now_ms=w.now + 30))
    assert w.det.state("h3") is PeerState.ALIVE


def test_cut_off_agent_declares_nobody_dead_before_it_notices() -> None:
    # Our broker connection still looks up, but nothing comes in and nothing answers.
    det = FailureDetector("h1", PEERS, T, 0)
    det.step(BrokerConnectionChanged(connected=True, now_ms=0))
    for h in ("h2", "h3"):
        det.step(PeerHeard(host=h, incarnation=1, now_ms=100))
        det.step(PingObserved(host=h, ok=True, now_ms=100))
    for now in range(200, 6000, 200):
        for h in ("h2", "h3"):
            det.step(PingObserved(host=h, ok=False, now_ms=now))
    assert det.state("h2") is PeerState.SUSPECT and det.state("h3") is PeerState.SUSPECT
    assert "may be the one cut off" in det.views()[0].reason


def test_isolation_and_recovery() -> None:
    det = FailureDetector("h1", PEERS, T, 0)
    out = det.step(BrokerConnectionChanged(connected=False, now_ms=0)) + det.tick(5000)
    assert [o.isolated for o in out if isinstance(o, IsolationChanged)] == [True]
    out = det.step(PingObserved(host="h2", ok=True, now_ms=5100))
    assert [o.isolated for o in out if isinstance(o, IsolationChanged)] == [False]


def test_reconfigure_adds_and_removes_peers() -> None:
    det = FailureDetector("h1", PEERS, T, 0)
    det.reconfigure(["h1", "h2", "h4"], T, 500)
    assert [v.host for v in det.views()] == ["h2", "h4"]


# ---- properties ---------------------------------------------------------------------------

EVENTS = st.lists(st.tuples(
    st.integers(min_value=1, max_value=400),                    # time step
    st.sampled_from(["gossip2", "gossip3", "gossip2-reaches3", "ping3-ok", "ping3-lost",
                     "ping2-ok", "ping2-lost", "broker-up", "broker-down", "offline3", "tick"])),
    max_size=120)


def _apply(det: FailureDetector, now: int, what: str) -> None:
    match what:
        case "gossip2":
            det.step(PeerHeard(host="h2", incarnation=1, now_ms=now))
        case "gossip3":
            det.step(PeerHeard(host="h3", incarnation=1, now_ms=now))
        case "gossip2-reaches3":
            det.step(PeerHeard(host="h2", incarnation=1, now_ms=now, reaches=frozenset({"h3"})))
        case "ping3-ok" | "ping3-lost" | "ping2-ok" | "ping2-lost":
            det.step(PingObserved(host=what[4], ok=what.endswith("ok"), now_ms=now))
        case "broker-up" | "broker-down":
            det.step(BrokerConnectionChanged(connected=what == "broker-up", now_ms=now))
        case "offline3":
            det.step(PeerWentOffline(host="h3", incarnation=1, now_ms=now))
        case _:
            det.tick(now)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_never_dead_while_pings_answer_or_without_broker_or_reached_by_a_peer(
        events: list[tuple[int, str]]) -> None:
    det = FailureDetector("h1", PEERS, T, 0)
    now = 0
    last_ping_ok: int | None = None
    last_reached: int | None = None
    for dt, what in events:
        now += dt
        _apply(det, now, what)
        if what == "ping3-ok":
            last_ping_ok = now
        if what == "gossip2-reaches3":
            last_reached = now
        dead = det.state("h3") is PeerState.DEAD
        if last_ping_ok is not None and now - last_ping_ok <= T.dead_timeout_ms:
            assert not dead, "dead while its pings answer"
        if not det.broker_connected:
            assert not dead, "dead while this agent has no broker"
        if last_reached is not None and now - last_reached <= T.suspect_timeout_ms:
            assert not dead, "dead while another peer reaches it"


def test_relayed_gossip_is_dated_by_its_quickest_path_and_its_allowance_ends_with_the_news() -> None:
    det = FailureDetector("h1", ["h1", "h2", "h3", "h4"], T, 0)
    det.step(BrokerConnectionChanged(connected=True, now_ms=0))

    def relayed(reporter: str, seq: int, heard: int, built: int, now: int) -> None:
        det.step(PeerHeardRelayed(host="h3", reporter=reporter, incarnation=1, heard_ms=heard, built_ms=built,
                              lag_ms=1000, now_ms=now, seq=seq))

    relayed("h2", 5, heard=900, built=950, now=1400)        # by a slow path
    relayed("h4", 5, heard=880, built=890, now=1000 + 500)  # the same heartbeat, a quicker path
    relayed("h3", 5, heard=1200, built=1200, now=1500)      # h3's own report of it: no better date
    view = next(v for v in det.views() if v.host == "h3")
    assert view.last_gossip_ms == 880, "one heartbeat: its earliest date"
    # Relayed news may be late: heard 880 + suspect 900 + lag 1000.
    assert "h3" in det.hears(2780) and "h3" not in det.hears(2781)
    # Both reporters now say they have not heard it for longer than suspect_timeout (its own
    # report does not count): the allowance goes at once.
    relayed("h2", 5, heard=900, built=1850, now=1900)
    assert "h3" in det.hears(1900) and det.lag("h3", 1900) == 1000, "h4 has not said so yet"
    relayed("h4", 5, heard=880, built=1800, now=1900)
    assert det.lag("h3", 1900) == 0 and "h3" not in det.hears(1900)
    # A newer heartbeat by any path brings it back, with the allowance.
    relayed("h2", 6, heard=1950, built=1960, now=2000)
    assert "h3" in det.hears(2000) and det.lag("h3", 2000) == 1000
