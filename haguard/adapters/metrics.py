"""Prometheus metrics of one agent, served on GET /metrics (prometheus-client).

Everything is updated where it changes (a peer's or VM's state change, a gossip
message, an alert), never by polling, so the agent's cost does not grow with VMs.
Each `AgentMetrics` has its own registry (several agents in one test process do not
collide) with the process collector (CPU, RSS, open fds) added.

    haguard_host_state{host,state}             1 for the peer's current state, 0 for the others
    haguard_vm_state{vm,state}                 the same for this host's VMs
    haguard_broker_connected, haguard_isolated 0/1
    haguard_broker_link_up{url}                0/1 per configured broker (all used at once)
    haguard_gossip_messages_total{direction}   received | rejected | sent
    haguard_detection_latency_seconds          last heard -> declared dead (histogram)
    haguard_migrations_total{result}           record_migration(); with the histograms
    haguard_migration_duration_seconds, haguard_migration_downtime_seconds,
    haguard_migration_transferred_bytes_total
    haguard_fence_actions_total{result}        record_fence()
    haguard_alerts_total{kind,severity,status} alerts announced (firing / resolved)
    haguard_alert_webhook_posts_total{result}  ok | retried | failed

The cluster as this host sees it (quorum, coordinator, hosts and VMs by state, moves,
watchdog, build info) comes from cluster_metrics.py, registered in the same registry.

The server binds only the configured address (prometheus-client's default is 0.0.0.0).
`record_migration(result, ...)` and `record_fence(result)` at module level record on the
agent's installed metrics (a no-op when there are none), for code that has no handle.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from haguard.core.detector import PeerState
from haguard.core.vmhealth import VmState

PEER_STATES = tuple(str(s) for s in PeerState)
VM_STATES = tuple(str(s) for s in VmState)
GOSSIP_DIRECTIONS = ("received", "rejected", "sent")
# Detection is designed for 1-2 s; the tail shows broker stalls and misconfigured timing.
DETECTION_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0)
MIGRATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.host_state = Gauge("haguard_host_state", "1 for the peer's current state as seen from here",
                                ["host", "state"], registry=r)
        self.vm_state = Gauge("haguard_vm_state", "1 for the VM's current state on this host",
                              ["vm", "state"], registry=r)
        self.broker_connected = Gauge("haguard_broker_connected", "1 while connected to an MQTT broker",
                                      registry=r)
        self.broker_link_up = Gauge("haguard_broker_link_up", "1 while this host is connected to this broker",
                                    ["url"], registry=r)
        self.isolated = Gauge("haguard_isolated", "1 while this host considers itself isolated", registry=r)
        self.gossip = Counter("haguard_gossip_messages", "Gossip messages by direction",
                              ["direction"], registry=r)
        for d in GOSSIP_DIRECTIONS:
            self.gossip.labels(direction=d)
        self.detection_latency = Histogram(
            "haguard_detection_latency_seconds", "From the last gossip heard to the peer declared dead",
            buckets=DETECTION_BUCKETS, registry=r)
        self.migrations = Counter("haguard_migrations", "Live migrations by result", ["result"], registry=r)
        self.migration_duration = Histogram("haguard_migration_duration_seconds",
                                            "Live migration duration", ["result"],
                                            buckets=MIGRATION_BUCKETS, registry=r)
        self.migration_downtime = Histogram("haguard_migration_downtime_seconds",
                                            "Guest downtime of completed migrations",
                                            buckets=DOWNTIME_BUCKETS, registry=r)
        self.migration_bytes = Counter("haguard_migration_transferred_bytes",
                                       "Bytes sent by live migrations", registry=r)
        self.fences = Counter("haguard_fence_actions", "Fence actions by result", ["result"], registry=r)
        self.alerts = Counter("haguard_alerts", "Alerts announced", ["kind", "severity", "status"],
                              registry=r)
        self.webhook_posts = Counter("haguard_alert_webhook_posts", "Alert webhook POSTs by result",
                                     ["result"], registry=r)
        self._host_states: dict[str, str] = {}
        self._vm_states: dict[str, str] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ---- state sets: one write per change --------------------------------------------

    def set_peer_state(self, host: str, state: str) -> None:
        _set_state(self.host_state, self._host_states, host, state, PEER_STATES)

    def forget_peer(self, host: str) -> None:
        _forget(self.host_state, self._host_states, host, PEER_STATES)

    def set_vm_state(self, vm: str, state: str) -> None:
        _set_state(self.vm_state, self._vm_states, vm, state, VM_STATES)

    def forget_vm(self, vm: str) -> None:
        _forget(self.vm_state, self._vm_states, vm, VM_STATES)

    # ---- events ------------------------------------------------------------------------

    def gossip_message(self, direction: str) -> None:
        self.gossip.labels(direction=direction).inc()

    def record_detection(self, latency_s: float) -> None:
        self.detection_latency.observe(max(0.0, latency_s))

    def record_migration(self, result: str, *, duration_s: float | None = None,
                         downtime_s: float | None = None, transferred_bytes: int | None = None) -> None:
        """One finished migration: `result` e.g. completed, failed, cancelled, recovered."""
        self.migrations.labels(result=result).inc()
        if duration_s is not None:
            self.migration_duration.labels(result=result).observe(duration_s)
        if downtime_s is not None:
            self.migration_downtime.observe(downtime_s)
        if transferred_bytes:
            self.migration_bytes.inc(transferred_bytes)

    def record_fence(self, result: str) -> None:
        """One fence action: `result` e.g. done, failed, timeout."""
        self.fences.labels(result=result).inc()

    def record_alert(self, kind: str, severity: str, resolved: bool) -> None:
        self.alerts.labels(kind=kind, severity=severity, status="resolved" if resolved else "firing").inc()

    # ---- the endpoint --------------------------------------------------------------------

    def serve(self, host: str, port: int) -> None:
        """Serve GET /metrics on host:port in prometheus-client's thread; raises OSError."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def _set_state(gauge: Gauge, current: dict[str, str], name: str, state: str, states: tuple[str, ...]) -> None:
    old = current.get(name)
    if old == state:
        return
    if old is None:
        for s in states:
            gauge.labels(name, s).set(0)
    else:
        gauge.labels(name, old).set(0)
    gauge.labels(name, state).set(1)
    current[name] = state


def _forget(gauge: Gauge, current: dict[str, str], name: str, states: tuple[str, ...]) -> None:
    if current.pop(name, None) is not None:
        for s in states:
            with contextlib.suppress(KeyError):
                gauge.remove(name, s)


# ---- for callers without a handle (the migration engine, fencing) ----------------------------

_installed: AgentMetrics | None = None


def install(metrics: AgentMetrics | None) -> None:
    """Make `metrics` the one the module-level functions record on (None: stop recording)."""
    global _installed
    _installed = metrics


def record_migration(result: str, *, duration_s: float | None = None, downtime_s: float | None = None,
                     transferred_bytes: int | None = None) -> None:
    if _installed is not None:
        _installed.record_migration(result, duration_s=duration_s, downtime_s=downtime_s,
                                    transferred_bytes=transferred_bytes)


def record_fence(result: str) -> None:
    if _installed is not None:
        _installed.record_fence(result)
