"""Cluster-wide maintenance (`haguard maintenance on|off`), like Pacemaker's maintenance-mode.

While the committed state says `cluster.paused`:
- the coordinator starts, stops, moves, fences and recovers nothing.  It still records
  operators' requests, hosts' watchdog timeouts and the ends of moves already under way.
  Fences under way are dropped (one already confirmed is applied: that host is off), and
  operators' fence and confirm-off requests are refused with an alert;
- each host obeys nothing of the state (no start, stop or kill) and pets its armed
  watchdog whatever its quorum.  A broker or switch upgrade that cuts every link resets
  nobody, because nobody recovers anything elsewhere meanwhile.

Leaving maintenance is where a VM could run twice: a host cut off while the cluster
resumes still holds the paused state and goes on petting, so its watchdog deadline is no
fence.  So every host is marked `paused` when maintenance starts, and its mark is cleared
only once it reports a committed state at least as new as the one that resumed
(`resumed_at`).  While marked, only its fence device or an operator's confirm-off fences it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from haguard.core.cluster.state import ClusterRecord, HostRecord, StateKey
from haguard.core.cluster.types import Heartbeat

CLUSTER = "*"                       # the "host" of a cluster-wide request
ON, OFF = "maintenance-on", "maintenance-off"


def asked(requests: Iterable[tuple[str, str]]) -> bool | None:
    """What the reported requests ask (True: pause), None when none is about maintenance.
    Conflicting requests: `maintenance-on` wins (sorted last), the safer of the two."""
    wanted = None
    for action, host in sorted(requests):
        if host == CLUSTER and action in (ON, OFF):
            wanted = action == ON
    return wanted


def switched(cluster: ClusterRecord, hosts: dict[str, HostRecord], pause: bool,
             key: StateKey) -> ClusterRecord:
    """The cluster record after an operator's request, for the state keyed `key`; pausing marks
    every host (it may learn the paused state from now on)."""
    if pause == cluster.paused:
        return cluster
    if pause:
        for host, rec in hosts.items():
            hosts[host] = replace(rec, paused=True)
        return replace(cluster, paused=True)
    return replace(cluster, paused=False, resumed_at=key)


def clear_marks(cluster: ClusterRecord, hosts: dict[str, HostRecord],
                beats: Mapping[str, Heartbeat]) -> None:
    """Hosts that report a committed state no older than the one that resumed pet by quorum
    again: their watchdog deadline is a fence once more."""
    if cluster.paused:
        return
    for host, beat in beats.items():
        rec = hosts.get(host)
        if rec is not None and rec.paused and beat.committed >= cluster.resumed_at:
            hosts[host] = replace(rec, paused=False)
