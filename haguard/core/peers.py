"""What this host knows of its peers' own reports, and the status view built from it.

Peers publish a report (`heartbeat`: health, capacity, VMs, whom they hear and reach)
and now and then a retained `state` (information only, possibly old).  A report body is
peer data: malformed parts are dropped field by field, never raised on.  The status
view (`haguard status`) joins these reports with the detector's judgement and the
ping statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from haguard.core.detector import FailureDetector, PeerState
from haguard.core.probes import HostProbes, PingStats
from haguard.core.vmhealth import VmHealthView, VmState

MAX_LISTED = 256            # a peer's lists beyond this are cut: a bound on what we keep
# VM states that hold resources on this host.
_LOCAL = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.PANICKED,
                    VmState.HUNG, VmState.MIGRATING, VmState.UNKNOWN})
# Peers this host does not watch (a cluster larger than a full mesh watches its ring
# neighbours and the coordinator only): shown from their own reports.
NOT_WATCHED = "not watched here (bounded layout): see the coordinator's status"


@dataclass(frozen=True, kw_only=True)
class VmSize:
    memory_mib: int
    vcpus: int


@dataclass
class PeerReport:
    heartbeat: dict[str, Any] | None = None
    heartbeat_ms: int | None = None
    state: dict[str, Any] | None = None      # last "state" body (information only)


class PeerReports:
    def __init__(self, me: str, peers: Iterable[str]) -> None:
        self.me = me
        self.reports: dict[str, PeerReport] = {p: PeerReport() for p in peers if p != me}

    def known(self, host: str) -> bool:
        return host in self.reports

    def heard(self, host: str, body: Mapping[str, Any], now_ms: int) -> dict[str, Any] | None:
        """A peer's report: its cleaned body (None for a host not configured)."""
        report = self.reports.get(host)
        if report is None:
            return None
        report.heartbeat, report.heartbeat_ms = clean_report(body), now_ms
        return report.heartbeat

    def stated(self, host: str, body: Mapping[str, Any]) -> None:
        report = self.reports.get(host)
        if report is not None:
            report.state = dict(body)

    def reconfigure(self, peers: Iterable[str], pings: PingStats) -> None:
        wanted = {p for p in peers if p != self.me}
        for gone in set(self.reports) - wanted:
            del self.reports[gone]
            pings.forget(gone)
        for host in wanted:
            self.reports.setdefault(host, PeerReport())

    def heartbeat(self, host: str) -> dict[str, Any] | None:
        report = self.reports.get(host)
        return None if report is None else report.heartbeat

    def state(self, host: str) -> dict[str, Any] | None:
        report = self.reports.get(host)
        return None if report is None else report.state


def capacity(memory_mib: int, vcpus: int, sizes: Mapping[str, VmSize],
             snapshot: Mapping[str, VmHealthView]) -> dict[str, int]:
    used_mem = used_cpu = 0
    for name, view in snapshot.items():
        size = sizes.get(name)
        if size is not None and view.state in _LOCAL:
            used_mem += size.memory_mib
            used_cpu += size.vcpus
    return {"memory_mib": memory_mib, "vcpus": vcpus,
            "memory_mib_free": max(0, memory_mib - used_mem), "vcpus_free": max(0, vcpus - used_cpu)}


def report_body(probes: HostProbes, cap: dict[str, int], snapshot: Mapping[str, VmHealthView],
                detector: FailureDetector, now_ms: int) -> dict[str, Any]:
    """The body of this host's own report (also the retained "state")."""
    health = probes.health()
    return {
        "health": str(health.status),
        "failing": [{"name": p.name, "reason": p.reason} for p in health.failing],
        "capacity": cap,
        "vms": {name: str(v.state) for name, v in snapshot.items()},
        "hears": sorted(detector.hears(now_ms)),
        "reaches": sorted(detector.reaches(now_ms)),
    }


def status_view(me: str, mine: Mapping[str, Any], detector: FailureDetector, peers: PeerReports,
                pings: PingStats, now_ms: int) -> dict[str, Any]:
    """Everything `haguard status` shows of the hosts and VMs, as JSON data."""
    hosts: list[dict[str, Any]] = [{
        "name": me, "self": True, "state": "isolated" if detector.isolated else "alive",
        "reason": "this agent" + ("; isolated" if detector.isolated else ""),
        "last_heard_ms_ago": 0, "rtt_ms": None, "loss": None,
        "health": mine["health"], "failing": mine["failing"], "capacity": mine["capacity"]}]
    vms = [{"name": n, "state": s, "host": me} for n, s in mine["vms"].items()]
    watched = set()
    for view in detector.views():
        watched.add(view.host)
        report = peers.reports.get(view.host, PeerReport())
        hb = report.heartbeat or {}
        hosts.append({
            "name": view.host, "self": False, "state": str(view.state), "reason": view.reason,
            "since_ms_ago": now_ms - view.since_ms,
            "last_heard_ms_ago": None if view.last_gossip_ms is None else now_ms - view.last_gossip_ms,
            **_reported(view.host, hb, pings), "incarnation": view.incarnation})
        if view.state in (PeerState.ALIVE, PeerState.SUSPECT, PeerState.UNREACHABLE):
            vms += [{"name": n, "state": s, "host": view.host} for n, s in (hb.get("vms") or {}).items()]
    for host, report in sorted(peers.reports.items()):
        if host in watched:
            continue
        hosts.append({
            "name": host, "self": False, "state": str(PeerState.UNKNOWN), "reason": NOT_WATCHED,
            "last_heard_ms_ago": None if report.heartbeat_ms is None else now_ms - report.heartbeat_ms,
            **_reported(host, report.heartbeat or {}, pings)})
    return {"host": me, "broker": detector.broker_connected, "isolated": detector.isolated, "hosts": hosts,
            "vms": sorted(vms, key=lambda v: (v["name"], v["host"]))}


def _reported(host: str, hb: Mapping[str, Any], pings: PingStats) -> dict[str, Any]:
    """A peer's row as its pings and its own report show it."""
    stats = pings.stats(host)
    return {"rtt_ms": None if stats is None else stats.avg_rtt_ms,
            "loss": None if stats is None else round(stats.loss_ratio, 3),
            "health": hb.get("health"), "failing": hb.get("failing", []), "capacity": hb.get("capacity")}


def clean_report(body: Mapping[str, Any]) -> dict[str, Any]:
    """A peer's report body reduced to well-typed fields; anything malformed is dropped."""
    def names(key: str) -> list[str]:
        v = body.get(key)
        if not isinstance(v, list):
            return []
        return [x for x in v[:MAX_LISTED] if isinstance(x, str)]

    out: dict[str, Any] = {"hears": names("hears"), "reaches": names("reaches")}
    if isinstance(body.get("health"), str):
        out["health"] = body["health"][:32]
    failing = body.get("failing")
    if isinstance(failing, list):
        out["failing"] = [{"name": str(f.get("name", ""))[:64], "reason": str(f.get("reason", ""))[:200]}
                          for f in failing[:MAX_LISTED] if isinstance(f, dict)]
    cap = body.get("capacity")
    if isinstance(cap, dict):
        out["capacity"] = {k: v for k, v in cap.items()
                           if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}
    vms = body.get("vms")
    if isinstance(vms, dict):
        out["vms"] = {k: v for k, v in list(vms.items())[:MAX_LISTED]
                      if isinstance(k, str) and isinstance(v, str)}
    return out
