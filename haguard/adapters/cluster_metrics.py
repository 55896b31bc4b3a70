"""The cluster as this agent sees it, as Prometheus metrics, read from its last status.

The per-host metrics (metrics.py) change where they happen; the cluster's view is a
snapshot the agent already builds for its status file (at most once a second), so this
collector reads that snapshot when Prometheus scrapes: no extra work between scrapes, and
the figures agree with `haguard status`.

    haguard_build_info{version}                    1
    haguard_cluster_member                         1 in cluster mode (the rest only then)
    haguard_quorum_held                            1 while this host holds connected quorum
    haguard_quorum_lost_seconds                    how long it has not (0: held)
    haguard_term                                   the election term
    haguard_coordinator{host}                      1 for the coordinator this host follows
    haguard_coordinator_known                      0 while it follows none
    haguard_role{role}                             1 for this host's role
    haguard_hosts{state}                           peers by this host's detector state, itself alive
    haguard_hosts_fenced, haguard_hosts_in_maintenance
    haguard_cluster_maintenance                    1 while `haguard maintenance on` holds
    haguard_vms{desired}                           committed VMs by desired state
    haguard_vms_by_owner{owner}                    committed VMs per owner ("" : none)
    haguard_vms_unplaced                           desired running, no owner: down
    haguard_moves_in_flight                        committed live moves not finished
    haguard_state_version                          the committed state's version
    haguard_definition_mismatch_hosts              peers heard with another cluster definition
    haguard_watchdog{state}                        1 for petting | stopped | none

Cardinality stays bounded at 1,000 hosts and 20,000 VMs: no series is per VM (the
cluster's VMs are counted, by desired state and by owner), so the largest family is
`haguard_vms_by_owner`, one series per host; `haguard_vm_state{vm}` (metrics.py) holds only
the VMs running on this host.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from haguard import __version__
from haguard.core.detector import PeerState

WATCHDOG_STATES = ("petting", "stopped", "none")
ROLES = ("follower", "candidate", "coordinator")


class ClusterCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.snapshot = snapshot        # the agent's last status (None before the first)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily("haguard_build_info", "haguard's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        status = self.snapshot() or {}
        cluster = status.get("cluster")
        yield _gauge("haguard_cluster_member", "1 in cluster mode", 1 if isinstance(cluster, dict) else 0)
        if isinstance(cluster, dict):
            yield from _cluster(cluster)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _cluster(c: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    lost_ms = int(c.get("quorum_lost_ms") or 0)
    yield _gauge("haguard_quorum_held", "1 while this host holds connected quorum", 1 if lost_ms == 0 else 0)
    yield _gauge("haguard_quorum_lost_seconds", "How long this host has lacked connected quorum",
                 lost_ms / 1000)
    yield _gauge("haguard_term", "The election term", int(c.get("term") or 0))
    coordinator = c.get("coordinator")
    yield _labelled("haguard_coordinator", "1 for the coordinator this host follows", "host",
                    {str(coordinator): 1} if coordinator else {})
    yield _gauge("haguard_coordinator_known", "1 while this host follows a coordinator",
                 1 if coordinator else 0)
    role = str(c.get("role") or "")
    yield _labelled("haguard_role", "1 for this host's role", "role", {r: int(r == role) for r in ROLES})
    states = Counter({str(s): 0 for s in PeerState})
    states.update(str(s) for s in (c.get("peers") or {}).values())
    states[str(PeerState.ALIVE)] += 1                           # this host
    yield _labelled("haguard_hosts", "Hosts by this host's view of them", "state", dict(states))
    hosts = (c.get("hosts") or {}).values()
    yield _gauge("haguard_hosts_fenced", "Hosts fenced and not back",
                 sum(bool(h.get("fenced")) for h in hosts))
    yield _gauge("haguard_hosts_in_maintenance", "Hosts drained or draining",
                 sum(bool(h.get("maintenance")) for h in hosts))
    yield _gauge("haguard_cluster_maintenance", "1 while the cluster is in maintenance (nothing recovered)",
                 1 if c.get("maintenance") else 0)
    vms = list((c.get("vms") or {}).values())
    yield _labelled("haguard_vms", "Committed VMs by desired state", "desired",
                    dict(Counter(str(v.get("desired")) for v in vms)))
    yield _labelled("haguard_vms_by_owner", "Committed VMs per owner", "owner",
                    dict(Counter(str(v.get("owner") or "") for v in vms)))
    yield _gauge("haguard_vms_unplaced", "VMs that should run and have no owner",
                 sum(1 for v in vms if v.get("desired") == "running" and not v.get("owner")))
    yield _gauge("haguard_moves_in_flight", "Committed live moves not finished",
                 len(c.get("migrations") or ()))
    version = c.get("state_version") or [0]
    yield _gauge("haguard_state_version", "The committed cluster state's version", int(version[-1]))
    yield _gauge("haguard_definition_mismatch_hosts", "Peers heard with another cluster definition",
                 len(c.get("definition_differs") or ()))
    watchdog = str(c.get("watchdog") or "none")
    yield _labelled("haguard_watchdog", "1 for this host's watchdog state", "state",
                    {s: int(s == watchdog) for s in WATCHDOG_STATES})
