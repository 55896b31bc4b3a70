"""One host's view of the cluster: the pure parts composed behind one `step`/`tick`.

`Node` owns a `FailureDetector` (peers), a `VmHealth` (local VMs), a `HostProbes`
(local probes) and a `PingStats` (ICMP bookkeeping).  The agent runtime feeds it
past-tense facts, calls `tick(now_ms)` regularly and executes what comes out; the
parts' outputs are passed through unchanged (`PeerStateChanged`, `IsolationChanged`,
`VmStateChanged`, `RestartVmInPlace`, `ReportVmForRelocation`, `HostHealthChanged`).

Gossip (`GossipReceived`, already verified by the transport):
    heartbeat  liveness evidence; its body (health, capacity, VMs, hears/reaches) is
               remembered for the status view
    offline    the peer's last will or clean stop: `PeerWentOffline`
    state      retained and possibly old: remembered as information, never as liveness
A heartbeat body is peer data: malformed parts are ignored, never raised on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from haguard.core.detector import (
    BrokerStatus,
    DetectorOutput,
    DetectorTiming,
    FailureDetector,
    GossipHeard,
    PeerState,
    PeerWentOffline,
    PingObserved,
)
from haguard.core.probes import (
    HostHealthChanged,
    HostProbes,
    PingResult,
    PingStats,
    ProbeFailed,
    ProbeInput,
    ProbePassed,
    ProbePolicy,
    ProbeTimedOut,
)
from haguard.core.vmhealth import VmHealth, VmHealthPolicy, VmHealthView, VmInput, VmOutput, VmState

HEARTBEAT = "heartbeat"
STATE = "state"
OFFLINE = "offline"
MAX_LISTED = 256            # a peer's lists beyond this are cut: a bound on what we keep
# VM states that hold resources on this host.
_LOCAL = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.PANICKED,
                    VmState.HUNG, VmState.MIGRATING, VmState.UNKNOWN})


@dataclass(frozen=True, kw_only=True)
class GossipReceived:
    host: str
    incarnation: int
    kind: str
    body: Mapping[str, Any]
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class VmSize:
    memory_mib: int
    vcpus: int


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    me: str
    peers: tuple[str, ...]
    timing: DetectorTiming = field(default_factory=DetectorTiming)
    vm_policy: VmHealthPolicy = field(default_factory=VmHealthPolicy)
    probe_policy: ProbePolicy = field(default_factory=ProbePolicy)
    memory_mib: int = 0                     # this host's capacity for VMs
    vcpus: int = 0
    vm_sizes: Mapping[str, VmSize] = field(default_factory=dict)   # from the VM inventory


NodeInput = GossipReceived | BrokerStatus | PingResult | ProbeInput | VmInput
NodeOutput = DetectorOutput | VmOutput | HostHealthChanged


@dataclass
class _PeerInfo:
    heartbeat: dict[str, Any] | None = None
    heartbeat_ms: int | None = None
    state: dict[str, Any] | None = None      # last "state" body (information only)


class Node:
    def __init__(self, cfg: NodeConfig, now_ms: int) -> None:
        self.cfg = cfg
        self.detector = FailureDetector(cfg.me, list(cfg.peers), cfg.timing, now_ms)
        self.vms = VmHealth(cfg.vm_policy)
        self.probes = HostProbes(cfg.probe_policy)
        self.pings = PingStats()
        self._info: dict[str, _PeerInfo] = {p: _PeerInfo() for p in cfg.peers if p != cfg.me}
        self.last_now_ms = now_ms

    # ---- feeding ------------------------------------------------------------------------

    def step(self, event: NodeInput) -> list[NodeOutput]:
        out: list[NodeOutput] = []
        match event:
            case GossipReceived():
                self.last_now_ms = max(self.last_now_ms, event.now_ms)
                out += self._gossip(event)
            case BrokerStatus():
                self.last_now_ms = max(self.last_now_ms, event.now_ms)
                out += self.detector.step(event)
            case PingResult():
                self.last_now_ms = max(self.last_now_ms, event.now_ms)
                if event.host in self._info:
                    self.pings.record(event)
                    out += self.detector.step(PingObserved(host=event.host, ok=event.ok,
                                                           now_ms=event.now_ms, rtt_ms=event.rtt_ms))
            case ProbePassed() | ProbeFailed() | ProbeTimedOut():
                out += self.probes.step(event)
            case _:
                out += self.vms.step(event)
        return out

    def tick(self, now_ms: int) -> list[NodeOutput]:
        self.last_now_ms = max(self.last_now_ms, now_ms)
        out: list[NodeOutput] = []
        out += self.detector.tick(now_ms)
        out += self.vms.tick(now_ms)
        return out

    def reconfigure(self, cfg: NodeConfig, now_ms: int) -> None:
        """A reloaded configuration: peers, timing and capacities; evidence is kept."""
        if cfg.me != self.cfg.me:
            raise ValueError("a node cannot change its host name")
        self.detector.reconfigure(list(cfg.peers), cfg.timing, now_ms)
        self.vms.policy = cfg.vm_policy
        self.probes.policy = cfg.probe_policy
        for gone in set(self._info) - set(cfg.peers):
            del self._info[gone]
            self.pings.forget(gone)
        for host in cfg.peers:
            if host != cfg.me:
                self._info.setdefault(host, _PeerInfo())
        self.cfg = cfg

    def _gossip(self, g: GossipReceived) -> list[NodeOutput]:
        info = self._info.get(g.host)
        if info is None:
            return []
        match g.kind:
            case "heartbeat":
                body = _clean_heartbeat(g.body)
                info.heartbeat, info.heartbeat_ms = body, g.now_ms
                return list(self.detector.step(GossipHeard(
                    host=g.host, incarnation=g.incarnation, now_ms=g.now_ms,
                    hears=frozenset(body["hears"]), reaches=frozenset(body["reaches"]))))
            case "offline":
                graceful = g.body.get("reason") == "stopped"
                return list(self.detector.step(PeerWentOffline(
                    host=g.host, incarnation=g.incarnation, now_ms=g.now_ms, graceful=graceful)))
            case "state":
                info.state = dict(g.body)
        return []

    # ---- views --------------------------------------------------------------------------

    def capacity(self, snapshot: Mapping[str, VmHealthView] | None = None) -> dict[str, int]:
        used_mem = used_cpu = 0
        for name, view in (self.vms.snapshot() if snapshot is None else snapshot).items():
            size = self.cfg.vm_sizes.get(name)
            if size is not None and view.state in _LOCAL:
                used_mem += size.memory_mib
                used_cpu += size.vcpus
        return {"memory_mib": self.cfg.memory_mib, "vcpus": self.cfg.vcpus,
                "memory_mib_free": max(0, self.cfg.memory_mib - used_mem),
                "vcpus_free": max(0, self.cfg.vcpus - used_cpu)}

    def heartbeat(self, now_ms: int) -> dict[str, Any]:
        """The body of this host's heartbeat (also the retained "state")."""
        health = self.probes.health()
        snapshot = self.vms.snapshot()
        return {
            "health": str(health.status),
            "failing": [{"name": p.name, "reason": p.reason} for p in health.failing],
            "capacity": self.capacity(snapshot),
            "vms": {name: str(v.state) for name, v in snapshot.items()},
            "hears": sorted(self.detector.hears(now_ms)),
            "reaches": sorted(self.detector.reaches(now_ms)),
        }

    def status(self, now_ms: int, heartbeat: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything `haguard status` shows, as JSON data (`heartbeat`: this instant's
        `heartbeat(now_ms)` when the caller has it already)."""
        mine = self.heartbeat(now_ms) if heartbeat is None else heartbeat
        hosts: list[dict[str, Any]] = [{
            "name": self.cfg.me, "self": True, "state": "isolated" if self.detector.isolated else "alive",
            "reason": "this agent" + ("; isolated" if self.detector.isolated else ""),
            "last_heard_ms_ago": 0, "rtt_ms": None, "loss": None,
            "health": mine["health"], "failing": mine["failing"], "capacity": mine["capacity"]}]
        vms = [{"name": n, "state": s, "host": self.cfg.me} for n, s in mine["vms"].items()]
        for view in self.detector.views():
            info = self._info.get(view.host, _PeerInfo())
            stats = self.pings.stats(view.host)
            hb = info.heartbeat or {}
            hosts.append({
                "name": view.host, "self": False, "state": str(view.state), "reason": view.reason,
                "since_ms_ago": now_ms - view.since_ms,
                "last_heard_ms_ago": None if view.last_gossip_ms is None else now_ms - view.last_gossip_ms,
                "rtt_ms": None if stats is None else stats.avg_rtt_ms,
                "loss": None if stats is None else round(stats.loss_ratio, 3),
                "health": hb.get("health"), "failing": hb.get("failing", []),
                "capacity": hb.get("capacity"), "incarnation": view.incarnation})
            if view.state in (PeerState.ALIVE, PeerState.SUSPECT, PeerState.UNREACHABLE):
                vms += [{"name": n, "state": s, "host": view.host}
                        for n, s in (hb.get("vms") or {}).items()]
        return {"host": self.cfg.me, "broker": self.detector.broker_connected,
                "isolated": self.detector.isolated, "hosts": hosts,
                "vms": sorted(vms, key=lambda v: (v["name"], v["host"]))}

    def peer_heartbeat(self, host: str) -> dict[str, Any] | None:
        info = self._info.get(host)
        return None if info is None else info.heartbeat

    def peer_state(self, host: str) -> dict[str, Any] | None:
        info = self._info.get(host)
        return None if info is None else info.state


def _clean_heartbeat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A peer's heartbeat body reduced to well-typed fields; anything malformed is dropped."""
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
