"""HostCore: the one pure core of a host (haguard/core/host.py), stepped directly."""

from __future__ import annotations

import json

from haguard.core.detector import (
    BrokerConnectionChanged,
    DetectorTiming,
    PeerState,
    PeerStateChanged,
    PingObserved,
)
from haguard.core.host import HostCore
from haguard.core.host_types import EnvelopeReceived, HostConfig
from haguard.core.peers import VmSize
from haguard.core.probes import HostHealthChanged, ProbeFailed
from haguard.core.vmhealth import RestartVmInPlace, VmExpected, VmProcessGone, VmStatusReplied

CFG = HostConfig(me="h1", peers=("h1", "h2", "h3"),
                 timing=DetectorTiming(suspect_timeout_ms=900, dead_timeout_ms=1500),
                 memory_mib=8192, vcpus=8, vm_sizes={"web": VmSize(memory_mib=2048, vcpus=2)})


def hb(host: str, now: int, body: dict | None = None) -> EnvelopeReceived:  # type: ignore[type-arg]
    return EnvelopeReceived(host=host, incarnation=1, kind="heartbeat", body=body or {}, now_ms=now)


def test_heartbeats_make_peers_alive_and_are_remembered() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    body = {"health": "healthy", "vms": {"db": "running"}, "capacity": {"memory_mib": 4096, "vcpus": 4},
            "hears": ["h1"], "reaches": ["h1", "h3"]}
    out = n.step(hb("h2", 100, body))
    assert [(o.host, o.new) for o in out if isinstance(o, PeerStateChanged)] == [("h2", PeerState.ALIVE)]
    assert n.peer_report("h2")["vms"] == {"db": "running"}  # type: ignore[index]
    st = n.status(200)
    assert {"name": "db", "state": "running", "host": "h2"} in st["vms"]
    assert next(h for h in st["hosts"] if h["name"] == "h2")["capacity"]["vcpus"] == 4
    json.dumps(st)  # the status file is JSON


def test_retained_state_is_not_liveness_and_offline_is() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    out = n.step(EnvelopeReceived(host="h2", incarnation=1, kind="state", body={"health": "healthy"},
                                now_ms=100))
    assert not [o for o in out if isinstance(o, PeerStateChanged) and o.new is PeerState.ALIVE]
    assert n.peer_state("h2") == {"health": "healthy"}
    n.step(hb("h2", 200))
    n.step(PingObserved(host="h2", address="198.18.1.2", ok=True, rtt_ms=0.3, now_ms=250))
    out = n.step(EnvelopeReceived(host="h2", incarnation=1, kind="offline", body={"reason": "stopped"},
                                now_ms=300))
    assert [(o.host, o.new) for o in out if isinstance(o, PeerStateChanged)] == [("h2", PeerState.AGENT_DOWN)]
    assert "stopped cleanly" in next(h for h in n.status(300)["hosts"] if h["name"] == "h2")["reason"]


def test_malformed_heartbeat_bodies_are_ignored_not_raised() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    for body in ({"hears": "h1"}, {"reaches": [1, None, {}]}, {"vms": ["x"]}, {"capacity": {"vcpus": "8"}},
                 {"failing": [3, {"name": 7}]}):
        n.step(hb("h2", 100, body))
    assert n.detector.state("h2") is PeerState.ALIVE
    n.status(200)
    # Gossip from a host not in the cluster changes nothing.
    assert n.step(hb("stranger", 300)) == []


def test_heartbeat_body_capacity_probes_and_hears() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    n.step(hb("h2", 100))
    n.step(PingObserved(host="h3", address="198.18.1.3", ok=True, rtt_ms=0.2, now_ms=100))
    n.step(VmExpected(vm="web", should_run=True))
    n.step(VmStatusReplied(vm="web", now_ms=100, status="running"))
    out = n.step(ProbeFailed(probe="disk", now_ms=100, reason="full"))
    out += n.step(ProbeFailed(probe="disk", now_ms=200, reason="full"))
    assert [o for o in out if isinstance(o, HostHealthChanged)]
    body = n.report(300)
    assert body["hears"] == ["h2"] and body["reaches"] == ["h3"]
    assert body["capacity"] == {"memory_mib": 8192, "vcpus": 8, "memory_mib_free": 6144, "vcpus_free": 6}
    assert body["health"] == "degraded" and body["failing"][0]["name"] == "disk"
    assert body["vms"] == {"web": "running"}


def test_vm_crash_passes_the_restart_through() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(VmExpected(vm="web", should_run=True))
    n.step(VmStatusReplied(vm="web", now_ms=100, status="running"))
    out = n.step(VmProcessGone(vm="web", now_ms=200))
    assert [o.vm for o in out if isinstance(o, RestartVmInPlace)] == ["web"]


def test_reconfigure_keeps_evidence_and_adds_peers() -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    n.step(hb("h2", 100))
    n.reconfigure(HostConfig(me="h1", peers=("h1", "h2", "h4")), 150)
    assert n.detector.state("h2") is PeerState.ALIVE
    assert [h["name"] for h in n.status(200)["hosts"]] == ["h1", "h2", "h4"]
