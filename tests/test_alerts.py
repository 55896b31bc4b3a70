"""Alerts: the pure tracker and payloads, delivery to a real local HTTP receiver (with
failures to prove the retry), and a real agent raising and resolving alerts to
journald, the MQTT alert topic and a webhook."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from haguard.adapters.alerts import AlertNotifier
from haguard.adapters.metrics import AgentMetrics
from haguard.config.cluster import AlertsConfig
from haguard.core.alerts import (
    PRIORITY,
    AlertKind,
    AlertTracker,
    BrokerLinksWatch,
    BrokerWatch,
    Severity,
    alert_key,
    alertmanager_payload,
    alerts_for,
    coordinator_alert,
    make_alert,
    resolve,
    rfc3339,
)
from haguard.core.detector import IsolationChanged, PeerState, PeerStateChanged
from haguard.core.probes import FailingProbe, HostHealth, HostHealthChanged, HostStatus
from haguard.core.vmhealth import ReportVmForRelocation
from haguard.core.wire import Envelope, decode
from tests.helpers.cluster import LocalAgent
from tests.helpers.journald import Entry, journald
from tests.helpers.mosquitto import Mosquitto

DEAD = make_alert(AlertKind.HOST_DEAD, host="h2", summary="host h2 is dead", description="no ping")


# ---- a real HTTP receiver -------------------------------------------------------------------

class Receiver:
    """An http.server on 127.0.0.1 that records POSTed JSON; the first `fail_first` requests
    get `fail_status`."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        self.posts: list[Any] = []
        self.requests = 0
        self.paths: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests += 1
                    failing = outer.requests <= fail_first
                    outer.paths.append(self.path)
                    if not failing:
                        outer.posts.append(json.loads(body))
                self.send_response(fail_status if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/alerts"

    def alerts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [a for post in self.posts for a in post]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    try:
        yield r
    finally:
        r.close()


# ---- pure parts --------------------------------------------------------------------------------

def test_tracker_dedups_repeats_and_resolves_once() -> None:
    t = AlertTracker(repeat_interval_ms=1000)
    first = t.offer(DEAD, 10_000)
    assert first is not None and first.starts_ms == 10_000
    assert t.offer(DEAD, 10_100) is None                      # same key, still open
    assert t.due(10_900) == []
    again = t.due(11_000)
    assert [n.alert for n in again] == [DEAD] and again[0].repeat and again[0].starts_ms == 10_000
    assert t.due(11_500) == [] and t.next_due_ms() == 12_000
    done = t.offer(resolve(DEAD), 12_500)
    assert done is not None and done.ends_ms == 12_500 and done.starts_ms == 10_000
    assert t.offer(resolve(DEAD), 12_600) is None              # a resolve goes out once
    assert t.open_alerts() == [] and t.next_due_ms() is None
    other_vm = make_alert(AlertKind.VM_LOST, host="h2", vm="a", summary="x")
    assert alert_key(other_vm) != alert_key(make_alert(AlertKind.VM_LOST, host="h2", vm="b", summary="x"))


def test_node_outputs_map_to_alerts() -> None:
    dead = PeerStateChanged(host="h2", old=PeerState.SUSPECT, new=PeerState.DEAD, reason="r", now_ms=1)
    back = PeerStateChanged(host="h2", old=PeerState.DEAD, new=PeerState.ALIVE, reason="r", now_ms=2)
    suspect = PeerStateChanged(host="h2", old=PeerState.ALIVE, new=PeerState.SUSPECT, reason="r", now_ms=3)
    [a] = alerts_for(dead, me="h1")
    assert (a.kind, a.severity, a.host, a.resolved) == (AlertKind.HOST_DEAD, Severity.CRITICAL, "h2", False)
    [b] = alerts_for(back, me="h1")
    assert b.resolved and alert_key(b) == alert_key(a)
    assert alerts_for(suspect, me="h1") == []
    [iso] = alerts_for(IsolationChanged(isolated=True, reason="r", now_ms=1), me="h1")
    assert iso.kind is AlertKind.ISOLATION and iso.host == "h1" and not iso.resolved
    sick = HostHealth(status=HostStatus.DEGRADED, failing=(FailingProbe(name="disk", reason="full",
                                                                        since_ms=1),))
    ok = HostHealth(status=HostStatus.HEALTHY)
    [deg] = alerts_for(HostHealthChanged(old=ok, new=sick), me="h1")
    assert deg.kind is AlertKind.HOST_DEGRADED and deg.severity is Severity.WARNING
    assert "disk" in deg.description
    assert alerts_for(HostHealthChanged(old=sick, new=ok), me="h1")[0].resolved
    [vm] = alerts_for(ReportVmForRelocation(vm="web", reason="crashed 4 times"), me="h1")
    assert (vm.kind, vm.vm, vm.host) == (AlertKind.VM_RELOCATION_NEEDED, "web", "h1")
    fence = coordinator_alert("fence-failed", "ipmi timeout", host="h3")
    assert fence is not None and fence.kind is AlertKind.FENCING_FAILED
    assert fence.severity is Severity.CRITICAL
    assert coordinator_alert("no-such-kind", "x", host="h3") is None
    assert PRIORITY == {Severity.CRITICAL: 2, Severity.WARNING: 4, Severity.INFO: 6}


def test_broker_watch_fires_after_the_grace_and_resolves() -> None:
    w = BrokerWatch("h1", after_ms=1000, now_ms=0)
    assert w.tick(999) == []
    [down] = w.tick(1000)
    assert down.kind is AlertKind.BROKER_UNREACHABLE and not down.resolved
    assert w.tick(5000) == [] and w.observe(False, 5000) == []
    [up] = w.observe(True, 6000)
    assert up.resolved
    assert w.observe(False, 7000) == [] and w.observe(True, 7500) == []   # a short blip: nothing


def test_broker_down_names_the_brokers_down_and_resolves_when_all_are_back() -> None:
    a, b = "mqtt://198.18.1.1:1883", "mqtt://198.18.1.2:1883"
    w = BrokerLinksWatch("h3", after_ms=1000)
    assert w.tick({a: True, b: True}, 0) == []
    assert w.tick({a: False, b: True}, 100) == [] and w.tick({a: False, b: True}, 1099) == []
    [down] = w.tick({a: False, b: True}, 1100)
    assert down.kind is AlertKind.BROKER_DOWN and not down.resolved and a in down.description
    assert w.tick({a: False, b: True}, 5000) == []
    assert w.tick({a: False, b: False}, 6000) == []             # b not down for long yet
    [both] = w.tick({a: False, b: False}, 7000)
    assert a in both.description and b in both.description and not both.resolved
    [only_b] = w.tick({a: True, b: False}, 8000)
    assert a not in only_b.description and b in only_b.description and not only_b.resolved
    [up] = w.tick({a: True, b: True}, 9000)
    assert up.kind is AlertKind.BROKER_DOWN and up.resolved
    assert w.tick({a: False, b: True}, 9100) == [] and w.tick({a: True, b: True}, 9500) == []  # a blip
    # One broker configured: broker-unreachable says it all.
    single = BrokerLinksWatch("h3", after_ms=1000)
    assert single.tick({a: False}, 0) == [] and single.tick({a: False}, 5000) == []


def test_alertmanager_payload() -> None:
    t = AlertTracker(repeat_interval_ms=60_000)
    vm = make_alert(AlertKind.VM_LOST, host="h2", vm="web", summary="VM web lost", description="why")
    firing = t.offer(vm, 1_700_000_000_000)
    resolved = t.offer(DEAD, 1_700_000_000_000)
    assert firing is not None and resolved is not None
    resolved = t.offer(resolve(DEAD), 1_700_000_060_500)
    assert resolved is not None
    body = alertmanager_payload([firing, resolved], cluster="prod", now_ms=1_700_000_001_000,
                                expire_after_ms=240_000)
    assert body[0] == {"labels": {"alertname": "vm-lost", "severity": "critical", "host": "h2",
                                  "cluster": "prod", "vm": "web"},
                       "annotations": {"summary": "VM web lost", "description": "why"},
                       "startsAt": "2023-11-14T22:13:20.000Z", "endsAt": "2023-11-14T22:17:21.000Z"}
    assert "vm" not in body[1]["labels"] and body[1]["endsAt"] == rfc3339(1_700_000_060_500)
    json.dumps(body)


# ---- delivery to a real receiver -------------------------------------------------------------

def _notifier(url: str, published: list[tuple[str, dict[str, Any]]], **cfg: Any) -> AlertNotifier:
    def publish(kind: str, body: dict[str, Any]) -> bool:
        published.append((kind, body))
        return True
    return AlertNotifier(AlertsConfig(webhooks=(url,), **cfg), cluster="c1", host="h1", publish=publish,
                         metrics=AgentMetrics(), retry_initial_s=0.05, retry_cap_s=0.2)


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.timeout(20)
async def test_webhook_retries_dedups_repeats_and_resolves(receiver: Receiver) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    n = _notifier(receiver.url, published, repeat_interval_s=1.0)
    task = asyncio.create_task(n.run())
    try:
        assert n.raise_alert(DEAD) is not None
        assert n.raise_alert(DEAD) is None                            # duplicate: not announced
        await _until(lambda: receiver.alerts(), 5, "the alert after two failed POSTs")
        assert receiver.requests == 3 and receiver.paths[-1] == "/api/v2/alerts"
        [a] = receiver.alerts()
        assert a["labels"] == {"alertname": "host-dead", "severity": "critical", "host": "h2",
                               "cluster": "c1"}
        assert a["annotations"]["description"] == "no ping" and a["endsAt"] > a["startsAt"]
        # still firing: re-sent after the repeat interval, with the same start
        await _until(lambda: len(receiver.alerts()) >= 2, 3, "the repeat")
        assert receiver.alerts()[1]["startsAt"] == a["startsAt"]
        assert n.raise_alert(resolve(DEAD)) is not None
        assert n.raise_alert(resolve(DEAD)) is None
        await _until(lambda: any(x["endsAt"] < a["endsAt"] for x in receiver.alerts()[2:]), 3, "the resolve")
        assert [k for k, _ in published] == ["alert", "alert"]
        assert [b["status"] for _, b in published] == ["firing", "resolved"]
        assert n.failed == 0 and n.delivered >= 3
        samples = {(s.name, s.labels.get("result")): s.value
                   for m in n._metrics.registry.collect() if m.name == "haguard_alert_webhook_posts"  # type: ignore[union-attr]
                   for s in m.samples if s.name.endswith("_total")}
        assert samples[("haguard_alert_webhook_posts_total", "retried")] == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(20)
async def test_webhook_gives_up_within_bounds_and_never_retries_a_refusal() -> None:
    down = Receiver(fail_first=1000)
    refusing = Receiver(fail_first=1000, fail_status=400)
    try:
        n = _notifier(down.url, [], retry_attempts=3, retry_max_s=5)
        started = time.monotonic()
        assert not await n.deliver(down.url, [n.tracker.offer(DEAD, 1) or pytest.fail("no notice")])
        assert down.requests == 3 and time.monotonic() - started < 3
        assert not await n.deliver(refusing.url, n.tracker.due(10**12))
        assert refusing.requests == 1                                  # 400: not retried
        assert n.failed == 2
    finally:
        down.close()
        refusing.close()


# ---- a real agent: journald, MQTT and a webhook ------------------------------------------------

class AlertSubscriber:
    """A paho client (its own thread) on the alert topic, keeping every payload."""

    def __init__(self, port: int, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alert-observer")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = lambda _c, _u, msg: self.payloads.append(bytes(msg.payload))
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def envelopes(self, key: bytes, cluster: str) -> list[Envelope]:
        return [e for e in (decode(p, key, cluster) for p in list(self.payloads)) if isinstance(e, Envelope)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.timeout(50)
def test_agent_raises_and_resolves_alerts(tmp_path: Path, receiver: Receiver) -> None:
    probe = tmp_path / "load"
    probe.write_text("1\n")
    broker = Mosquitto()
    sub: AlertSubscriber | None = None
    agent: LocalAgent | None = None
    try:
        with journald() as jd:
            broker.start()
            extra = (f"alerts: {{webhooks: ['{receiver.url}'], broker_unreachable_after_s: 1, "
                     f"retry_max_s: 20}}\nmetrics: {{enabled: false}}\n"
                     f"probes:\n  - {{name: load, file: {probe}, max_value: 10, interval_s: 0.2}}\n")
            agent = LocalAgent(tmp_path, broker.port, extra=extra, log_format="journal",
                               env={"HAGUARD_JOURNAL_SOCKET": str(jd.socket)})
            cluster = agent.config.read_text().split("\n")[0].split(": ")[1]
            key = (tmp_path / "key").read_bytes().strip()
            sub = AlertSubscriber(broker.port, f"haguard/{cluster}/hosts/+/alerts")
            agent.start()
            agent.wait_for("ready", lambda: (agent.status() or {}).get("ready"), 10)

            def alert(name: str, status: str) -> list[dict[str, Any]]:
                return [a for a in receiver.alerts() if a["labels"]["alertname"] == name
                        and ((a["endsAt"] > rfc3339(int(time.time() * 1000))) == (status == "firing"))]

            # a failing probe: host-degraded (warning), then resolved when it passes again
            probe.write_text("50\n")
            agent.wait_for("host-degraded firing", lambda: alert("host-degraded", "firing"), 10)
            probe.write_text("1\n")
            agent.wait_for("host-degraded resolved", lambda: alert("host-degraded", "resolved"), 10)
            [fired] = alert("host-degraded", "firing")
            assert fired["labels"] == {"alertname": "host-degraded", "severity": "warning", "host": "h1",
                                       "cluster": cluster}
            assert "load" in fired["annotations"]["description"]
            agent.wait_for("the alerts on MQTT", lambda: len(sub.envelopes(key, cluster)) >= 2, 5)
            bodies = [e.body for e in sub.envelopes(key, cluster)]
            assert [(b["kind"], b["status"]) for b in bodies] == [("host-degraded", "firing"),
                                                                  ("host-degraded", "resolved")]
            assert receiver.requests >= 4                              # two failed POSTs, retried

            # the broker goes away for longer than the grace: broker-unreachable, then resolved
            broker.kill()
            agent.wait_for("broker-unreachable", lambda: alert("broker-unreachable", "firing"), 10)
            broker.start()
            agent.wait_for("broker back", lambda: alert("broker-unreachable", "resolved"), 15)

            def journal(kind: str) -> list[Entry]:
                return jd.wait_for(lambda e: e.get("HAGUARD_ALERT") == kind, count=2, timeout_s=5)
            deg, unreach = journal("host-degraded"), journal("broker-unreachable")
            assert [(e["PRIORITY"], e["HAGUARD_STATUS"]) for e in deg] == [("4", "firing"), ("6", "resolved")]
            assert [(e["PRIORITY"], e["HAGUARD_STATUS"]) for e in unreach] == [("4", "firing"),
                                                                               ("6", "resolved")]
            assert all(e["HAGUARD_EVENT"] == "alert" and e["HAGUARD_SUBJECT_HOST"] == "h1" for e in deg)
            assert len(alert("host-degraded", "firing")) == 1          # no duplicate announcements
    finally:
        if agent is not None:
            agent.stop()
        if sub is not None:
            sub.close()
        broker.stop()
