"""Alerts: what an operator must act on, deduplicated, in Alertmanager's format.  Pure.

An `Alert` has a stable `kind`, a `severity`, the host (and VM) it is about, and is
either firing or resolved.  Its identity is `alert_key()` = (kind, host, vm): a second
firing alert with the same key is the same alert.

`AlertTracker` decides what goes out (the clock comes in as wall-clock ms, because
Alertmanager wants real timestamps):
    firing, new key           -> sent now (startsAt = now)
    firing, key already open  -> dropped (a repeat is due only after `repeat_interval_ms`)
    resolved, key open        -> sent once (endsAt = now), key closed
    resolved, key not open    -> dropped (nothing to resolve)
    due(now_ms)               -> the open alerts last sent `repeat_interval_ms` ago or more,
                                 re-sent so Alertmanager keeps them firing
`alerts_for(output)` maps the agent's node outputs to alerts; `BrokerWatch` turns the
broker connection into a "broker-unreachable" alert after a grace period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from haguard.core.detector import IsolationChanged, PeerState, PeerStateChanged
from haguard.core.probes import HostHealthChanged
from haguard.core.vmhealth import ReportVmForRelocation, VmState, VmStateChanged


class Severity(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


# journald/syslog priority per severity (crit, warning, info).
PRIORITY: dict[Severity, int] = {Severity.CRITICAL: 2, Severity.WARNING: 4, Severity.INFO: 6}


class AlertKind(StrEnum):
    HOST_DEAD = "host-dead"
    HOST_DEGRADED = "host-degraded"
    ISOLATION = "isolation"
    BROKER_UNREACHABLE = "broker-unreachable"
    VM_RELOCATION_NEEDED = "vm-relocation-needed"
    VM_LOST = "vm-lost"
    FENCING_FAILED = "fencing-failed"
    FENCING_DONE = "fencing-done"
    RECOVERY_DONE = "recovery-done"
    MIGRATION_FAILED = "migration-failed"
    QUORUM_LOST = "quorum-lost"
    WATCHDOG_FAILED = "watchdog-failed"
    CONFIG_MISMATCH = "config-mismatch"
    BROKER_DOWN = "broker-down"
    FENCE_CONFIRMED_BY_OPERATOR = "fence-confirmed-by-operator"
    CONFIRM_OFF_REFUSED = "confirm-off-refused"
    FENCE_REFUSED = "fence-refused"
    MAINTENANCE = "maintenance"


# The severity each kind fires with (a resolve keeps it).
SEVERITY: dict[AlertKind, Severity] = {
    AlertKind.HOST_DEAD: Severity.CRITICAL,
    AlertKind.HOST_DEGRADED: Severity.WARNING,
    AlertKind.ISOLATION: Severity.CRITICAL,
    AlertKind.BROKER_UNREACHABLE: Severity.WARNING,
    AlertKind.VM_RELOCATION_NEEDED: Severity.CRITICAL,
    AlertKind.VM_LOST: Severity.CRITICAL,
    AlertKind.FENCING_FAILED: Severity.CRITICAL,
    AlertKind.FENCING_DONE: Severity.WARNING,
    AlertKind.RECOVERY_DONE: Severity.INFO,
    AlertKind.MIGRATION_FAILED: Severity.WARNING,
    AlertKind.QUORUM_LOST: Severity.CRITICAL,
    AlertKind.WATCHDOG_FAILED: Severity.CRITICAL,
    AlertKind.CONFIG_MISMATCH: Severity.WARNING,
    AlertKind.BROKER_DOWN: Severity.WARNING,
    # A fence on an operator's word: whoever reads alerts must know, and it must have been true.
    AlertKind.FENCE_CONFIRMED_BY_OPERATOR: Severity.CRITICAL,
    AlertKind.CONFIRM_OFF_REFUSED: Severity.WARNING,
    AlertKind.FENCE_REFUSED: Severity.WARNING,
    # Nothing is recovered while it lasts: firing until `haguard maintenance off`.
    AlertKind.MAINTENANCE: Severity.WARNING,
}

# Kinds the cluster coordinator raises (`RaiseAlert.kind`), by their names there.
_COORDINATOR_KINDS: dict[str, AlertKind] = {
    "fence-failed": AlertKind.FENCING_FAILED, "fencing-failed": AlertKind.FENCING_FAILED,
    "fenced": AlertKind.FENCING_DONE, "fencing-done": AlertKind.FENCING_DONE,
    "recovered": AlertKind.RECOVERY_DONE, "recovery-done": AlertKind.RECOVERY_DONE,
    "isolated": AlertKind.ISOLATION, "quorum-lost": AlertKind.QUORUM_LOST,
    "vm-lost": AlertKind.VM_LOST, "migration-failed": AlertKind.MIGRATION_FAILED,
}


@dataclass(frozen=True, kw_only=True)
class Alert:
    kind: AlertKind
    severity: Severity
    host: str                    # the host the alert is about
    vm: str = ""
    summary: str
    description: str = ""
    resolved: bool = False


AlertKey = tuple[str, str, str]


def alert_key(alert: Alert) -> AlertKey:
    """The identity of an alert: the same key is the same alert (firing or resolved)."""
    return (str(alert.kind), alert.host, alert.vm)


def make_alert(kind: AlertKind, *, host: str, vm: str = "", summary: str, description: str = "",
               resolved: bool = False) -> Alert:
    return Alert(kind=kind, severity=SEVERITY[kind], host=host, vm=vm, summary=summary,
                 description=description, resolved=resolved)


def resolve(alert: Alert, description: str = "") -> Alert:
    return replace(alert, resolved=True, description=description or alert.description)


@dataclass(frozen=True, kw_only=True)
class RaiseAlert:
    """An alert a pure part asks for: the migration strategy, the cluster core and the host's
    own rules all raise this one kind of output."""

    kind: str                   # an AlertKind value or one of the cluster's names for it
    reason: str
    host: str = ""              # the host it is about; "" for the host raising it
    vm: str = ""
    resolved: bool = False
    summary: str = ""           # "": made from the kind, host and VM
    id: str = ""                # the host core's outputs carry one; the strategy's actions do not


def alert_of(raised: RaiseAlert, *, me: str) -> Alert | None:
    """The `Alert` a `RaiseAlert` means (`me`: this host); None for a kind not known here."""
    host = raised.host or me
    return coordinator_alert(raised.kind, raised.reason, host=host, vm=raised.vm, resolved=raised.resolved,
                             summary=raised.summary)


def coordinator_alert(kind: str, reason: str, *, host: str, vm: str = "", resolved: bool = False,
                      summary: str = "") -> Alert | None:
    """An alert for a `RaiseAlert(kind=...)`; None for a kind not known here."""
    known = _COORDINATOR_KINDS.get(kind)
    if known is None:
        try:
            known = AlertKind(kind)
        except ValueError:
            return None
    summary = summary or f"{known} on {host}" + (f" ({vm})" if vm else "")
    return make_alert(known, host=host, vm=vm, summary=summary, description=reason, resolved=resolved)


def alerts_for(out: object, *, me: str) -> list[Alert]:
    """The alerts (firing or resolved) an output of the host core (`HostCore`) means; `me` is this host."""
    match out:
        case PeerStateChanged(host=host, old=old, new=new, reason=reason):
            if new is PeerState.DEAD:
                return [make_alert(AlertKind.HOST_DEAD, host=host, summary=f"host {host} is dead",
                                   description=reason)]
            if old is PeerState.DEAD:
                return [make_alert(AlertKind.HOST_DEAD, host=host, summary=f"host {host} is {new} again",
                                   description=reason, resolved=True)]
        case IsolationChanged(isolated=isolated, reason=reason):
            return [make_alert(AlertKind.ISOLATION, host=me, description=reason, resolved=not isolated,
                               summary=f"host {me} is " + ("isolated" if isolated else "no longer isolated"))]
        case HostHealthChanged(old=old_health, new=new_health):
            if not new_health.healthy:
                return [make_alert(AlertKind.HOST_DEGRADED, host=me, summary=f"host {me} is degraded",
                                   description=new_health.summary())]
            if not old_health.healthy:
                return [make_alert(AlertKind.HOST_DEGRADED, host=me, summary=f"host {me} is healthy again",
                                   description="all probes pass", resolved=True)]
        case ReportVmForRelocation(vm=vm, reason=reason):
            return [make_alert(AlertKind.VM_RELOCATION_NEEDED, host=me, vm=vm,
                               summary=f"VM {vm} on {me} needs relocation", description=reason)]
        case VmStateChanged(vm=vm, new=VmState.RUNNING):
            # Only resolves an open relocation alert (the tracker drops it otherwise).
            return [make_alert(AlertKind.VM_RELOCATION_NEEDED, host=me, vm=vm, resolved=True,
                               summary=f"VM {vm} runs on {me} again", description="running")]
    return []


# ---- deduplication -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Notice:
    """An alert as sent: with its start (and, when resolved, end) in wall-clock ms."""

    alert: Alert
    starts_ms: int
    ends_ms: int | None = None
    repeat: bool = False         # a periodic re-send of an alert already announced


@dataclass
class _Open:
    alert: Alert
    starts_ms: int
    sent_ms: int


class AlertTracker:
    """Which alerts are open, and what must be sent (see the module docstring)."""

    def __init__(self, repeat_interval_ms: int) -> None:
        if repeat_interval_ms <= 0:
            raise ValueError("repeat_interval_ms must be positive")
        self.repeat_interval_ms = repeat_interval_ms
        self._open: dict[AlertKey, _Open] = {}

    def offer(self, alert: Alert, now_ms: int) -> Notice | None:
        key = alert_key(alert)
        current = self._open.get(key)
        if alert.resolved:
            if current is None:
                return None
            del self._open[key]
            return Notice(alert=alert, starts_ms=current.starts_ms, ends_ms=now_ms)
        if current is not None:
            current.alert = alert            # the newest description is the one re-sent
            return None
        self._open[key] = _Open(alert=alert, starts_ms=now_ms, sent_ms=now_ms)
        return Notice(alert=alert, starts_ms=now_ms)

    def due(self, now_ms: int) -> list[Notice]:
        out = []
        for entry in self._open.values():
            if now_ms - entry.sent_ms >= self.repeat_interval_ms:
                entry.sent_ms = now_ms
                out.append(Notice(alert=entry.alert, starts_ms=entry.starts_ms, repeat=True))
        return out

    def next_due_ms(self) -> int | None:
        """When the earliest re-send falls due; None with nothing open."""
        return min((e.sent_ms + self.repeat_interval_ms for e in self._open.values()), default=None)

    def open_alerts(self) -> list[Alert]:
        return [e.alert for e in self._open.values()]


class BrokerWatch:
    """"broker-unreachable" once the broker has been down for `after_ms`; resolved when it is back."""

    def __init__(self, host: str, after_ms: int, now_ms: int) -> None:
        self.host = host
        self.after_ms = after_ms
        self.down_since_ms: int | None = now_ms      # no broker until the first connection
        self.raised = False

    def observe(self, connected: bool, now_ms: int) -> list[Alert]:
        if not connected:
            if self.down_since_ms is None:
                self.down_since_ms = now_ms
            return self.tick(now_ms)
        self.down_since_ms = None
        if not self.raised:
            return []
        self.raised = False
        return [self._alert(resolved=True, description="connected again")]

    def tick(self, now_ms: int) -> list[Alert]:
        if self.raised or self.down_since_ms is None or now_ms - self.down_since_ms < self.after_ms:
            return []
        self.raised = True
        return [self._alert(resolved=False,
                            description=f"no MQTT broker for {(now_ms - self.down_since_ms) / 1000:.1f} s")]

    def _alert(self, *, resolved: bool, description: str) -> Alert:
        return make_alert(AlertKind.BROKER_UNREACHABLE, host=self.host, resolved=resolved,
                          summary=f"host {self.host} cannot reach the MQTT broker", description=description)


class BrokerLinksWatch:
    """"broker-down" while some of several brokers has been unreachable from this host for
    `after_ms`: the others carry the gossip, so nothing else changes; raised again when the
    set of brokers down changes, resolved once every one is connected again."""

    def __init__(self, host: str, after_ms: int) -> None:
        self.host = host
        self.after_ms = after_ms
        self.down_since_ms: dict[str, int] = {}
        self.raised: tuple[str, ...] = ()

    def tick(self, links: Mapping[str, bool], now_ms: int) -> list[Alert]:
        for url, up in links.items():
            if up:
                self.down_since_ms.pop(url, None)
            else:
                self.down_since_ms.setdefault(url, now_ms)
        down = tuple(sorted(u for u, at in self.down_since_ms.items() if now_ms - at >= self.after_ms))
        if len(links) < 2 or down == self.raised or (not down and self.down_since_ms):
            return []
        self.raised = down
        if not down:
            return [make_alert(AlertKind.BROKER_DOWN, host=self.host, resolved=True,
                               summary=f"host {self.host} reaches every MQTT broker again",
                               description="every broker connected")]
        why = f"unreachable for {self.after_ms / 1000:.0f} s or more: {', '.join(down)}"
        return [make_alert(AlertKind.BROKER_DOWN, host=self.host, description=why,
                           summary=f"host {self.host} cannot reach {len(down)} of {len(links)} MQTT brokers")]


# ---- Alertmanager --------------------------------------------------------------------------

def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertmanager_payload(notices: Sequence[Notice], *, cluster: str, now_ms: int,
                         expire_after_ms: int) -> list[dict[str, Any]]:
    """The body of `POST /api/v2/alerts`.  A firing alert gets endsAt = now + `expire_after_ms`
    (Alertmanager resolves it by itself if this agent stops re-sending it); a resolved one
    its real end."""
    out: list[dict[str, Any]] = []
    for n in notices:
        a = n.alert
        labels = {"alertname": str(a.kind), "severity": str(a.severity), "host": a.host, "cluster": cluster}
        if a.vm:
            labels["vm"] = a.vm
        ends_ms = n.ends_ms if n.ends_ms is not None else now_ms + expire_after_ms
        out.append({"labels": labels,
                    "annotations": {"summary": a.summary, "description": a.description},
                    "startsAt": rfc3339(n.starts_ms), "endsAt": rfc3339(ends_ms)})
    return out


def mqtt_body(notice: Notice, *, now_ms: int) -> dict[str, Any]:
    """The body of the signed MQTT "alert" message (also read by other agents and tools)."""
    a = notice.alert
    return {"event": str(a.kind), "kind": str(a.kind), "severity": str(a.severity), "host": a.host,
            "vm": a.vm or None, "summary": a.summary, "reason": a.description,
            "status": "resolved" if a.resolved else "firing", "starts_ms": notice.starts_ms,
            "ends_ms": notice.ends_ms, "sent_ms": now_ms}
