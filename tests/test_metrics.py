"""Prometheus metrics: the endpoint binds only the configured address, and a real agent's
/metrics (scraped over HTTP, parsed with prometheus_client's parser) follows its peers."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pydantic
import pytest

from haguard.adapters import metrics as metrics_mod
from haguard.adapters.metrics import AgentMetrics
from haguard.config.cluster import MetricsConfig
from tests.helpers.cluster import LocalAgent
from tests.helpers.mosquitto import Mosquitto, free_port
from tests.helpers.prom import Samples, samples


def scrape(port: int) -> Samples:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return samples(resp.read().decode())


def value(data: Samples, name: str, **labels: str) -> float | None:
    return data.get((name, tuple(sorted(labels.items()))))


def test_metrics_config_defaults_to_loopback() -> None:
    assert MetricsConfig().address == ("127.0.0.1", 9464)
    assert MetricsConfig(listen="[::1]:9000").address == ("::1", 9000)
    for bad in ("9464", "host:", ":9464", "h:70000"):
        with pytest.raises(pydantic.ValidationError):
            MetricsConfig(listen=bad)


@pytest.mark.timeout(10)
def test_endpoint_binds_the_given_address_and_records() -> None:
    m = AgentMetrics()
    try:
        m.serve("127.0.0.1", 0)
        assert m._server is not None and m._server.server_address[0] == "127.0.0.1"
        port = m.port
        assert port
        metrics_mod.install(m)
        metrics_mod.record_migration("completed", duration_s=12.0, downtime_s=0.08, transferred_bytes=1 << 30)
        metrics_mod.record_migration("failed", duration_s=3.0)
        metrics_mod.record_fence("failed")
        m.set_peer_state("h2", "alive")
        m.set_peer_state("h2", "dead")
        m.record_detection(1.6)
        d = scrape(port)
        assert value(d, "haguard_migrations_total", result="completed") == 1
        assert value(d, "haguard_migrations_total", result="failed") == 1
        assert value(d, "haguard_migration_transferred_bytes_total") == 1 << 30
        assert value(d, "haguard_migration_downtime_seconds_count") == 1
        assert value(d, "haguard_migration_duration_seconds_sum", result="completed") == 12.0
        assert value(d, "haguard_fence_actions_total", result="failed") == 1
        assert value(d, "haguard_host_state", host="h2", state="dead") == 1
        assert value(d, "haguard_host_state", host="h2", state="alive") == 0
        assert value(d, "haguard_detection_latency_seconds_bucket", le="2.0") == 1
        assert value(d, "haguard_detection_latency_seconds_bucket", le="1.5") == 0
        m.forget_peer("h2")
        assert value(scrape(port), "haguard_host_state", host="h2", state="dead") is None
    finally:
        metrics_mod.install(None)
        m.close()


def _two_host_config(agent: LocalAgent, me: str, key: Path, port: int, metrics: str) -> None:
    root = agent.root
    agent.config.write_text(
        f"cluster: m{os.getpid() % 100000}\nhost: {me}\nhosts:\n"
        f"  - {{name: h1, address: 127.0.0.1}}\n  - {{name: h2, address: 127.0.0.1}}\n"
        f"key_file: {key}\nmqtt:\n  urls: ['mqtt://127.0.0.1:{port}']\n  keepalive_s: 2\n"
        f"timing: {{heartbeat_interval_ms: 200, suspect_timeout_ms: 800, dead_timeout_ms: 1500}}\n"
        f"vm_dir: {root / 'vms'}\nrun_dir: {root / 'run'}\nstate_dir: {root / 'state'}\n{metrics}")


@pytest.mark.timeout(40)
def test_agent_metrics_scrape_follows_peers_and_gossip(tmp_path: Path) -> None:
    broker = Mosquitto()
    agents: list[LocalAgent] = []
    try:
        broker.start()
        port = free_port()
        for host in ("h1", "h2"):
            (tmp_path / host).mkdir()
            agents.append(LocalAgent(tmp_path / host, broker.port))
        h1, h2 = agents
        key = tmp_path / "h1" / "key"
        _two_host_config(h1, "h1", key, broker.port, f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
        _two_host_config(h2, "h2", key, broker.port, "metrics: {enabled: false}\n")
        h1.start()
        h2.start()
        h1.wait_for("h1 sees h2 alive", lambda: any(h["name"] == "h2" and h["state"] == "alive"
                                                    for h in (h1.status() or {}).get("hosts", [])), 15)
        first = scrape(port)
        assert value(first, "haguard_host_state", host="h2", state="alive") == 1
        assert value(first, "haguard_host_state", host="h2", state="dead") == 0
        assert value(first, "haguard_broker_connected") == 1
        assert value(first, "haguard_isolated") == 0
        received = value(first, "haguard_gossip_messages_total", direction="received") or 0
        sent = value(first, "haguard_gossip_messages_total", direction="sent") or 0
        assert received > 0 and sent > 0
        assert value(first, "process_resident_memory_bytes")
        time.sleep(1.0)                                   # ~5 heartbeats each way at 200 ms
        second = scrape(port)
        assert (value(second, "haguard_gossip_messages_total", direction="received") or 0) >= received + 3
        assert (value(second, "haguard_gossip_messages_total", direction="sent") or 0) >= sent + 3

        # h2 stops: its "offline" makes it agent-down at h1 (it still answers ping)
        assert h2.stop() == 0
        h1.wait_for("h2 agent-down in the metrics", lambda: value(
            scrape(port), "haguard_host_state", host="h2", state="agent-down") == 1, 10)
        assert value(scrape(port), "haguard_host_state", host="h2", state="alive") == 0
        assert h1.stop() == 0
        with pytest.raises(OSError):
            scrape(port)                                  # the endpoint goes with the agent
    finally:
        for a in agents:
            a.stop()
        broker.stop()
