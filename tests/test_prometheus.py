"""The shipped Prometheus alert rules and Grafana dashboard: the rules pass `promtool check
rules` and their unit tests (`promtool test rules`, Debian's promtool fetched by `make
setup`), and every metric the rules and the dashboard query is one an agent exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from haguard.adapters.cluster_metrics import ClusterCollector
from haguard.adapters.metrics import AgentMetrics
from tests.helpers.prom import samples

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "packaging" / "prometheus" / "haguard-alerts.yml"
RULE_TESTS = REPO / "packaging" / "prometheus" / "haguard-alerts.test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "haguard-dashboard.json"
PROMTOOL = Path(sys.executable).parent / "promtool"
# Names in PromQL that are not metrics: functions, keywords, and Prometheus' own `up`.
NOT_METRICS = {"sum", "max", "min", "count", "by", "without", "and", "on", "or", "unless", "rate",
               "increase", "histogram_quantile", "up", "le"}
ALERTS = {"HaguardAgentDown", "HaguardQuorumLost", "HaguardWatchdogStopped", "HaguardNoCoordinator",
          "HaguardFenceFailing", "HaguardVmDown", "HaguardBrokerDown", "HaguardConfigMismatch",
          "HaguardMigrationTooSlow"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.is_file(), f"{PROMTOOL} missing: run `make setup` (packaging/fetch-promtool.sh)"
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.timeout(90)
def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == ALERTS
    covered = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert covered == ALERTS, f"alerts without a unit test: {ALERTS - covered}"


def _exported() -> set[str]:
    """Every sample name an agent in cluster mode exports (histogram buckets included)."""
    metrics = AgentMetrics()
    metrics.record_migration("completed", duration_s=12.0, downtime_s=0.02, transferred_bytes=1)
    metrics.record_fence("done")
    metrics.record_alert("quorum-lost", "critical", resolved=False)
    metrics.broker_link_up.labels(url="mqtt://b1:1883").set(1)
    cluster = {"role": "coordinator", "term": 3, "coordinator": "h1", "quorum_lost_ms": 0,
               "state_version": [3, 9], "definition_differs": [], "watchdog": "none",
               "vms": {"vm1": {"owner": "h1", "desired": "running"}},
               "hosts": {"h1": {"maintenance": False, "fenced": False}},
               "migrations": [], "peers": {"h2": "alive"}}
    metrics.registry.register(ClusterCollector(lambda: {"cluster": cluster}))
    text = generate_latest(metrics.registry).decode()
    return {name for name, _labels in samples(text)}


def _queried(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        # Label matchers, strings, ranges and grouping clauses hold label names, not metrics.
        bare = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)', "", expr)
        names |= {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
                  if n not in NOT_METRICS and not n.isdigit()}
    return names


@pytest.mark.timeout(30)
def test_every_metric_the_rules_and_the_dashboard_query_is_exported() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = _queried([r["expr"] for r in rules] + [t["expr"] for p in panels for t in p["targets"]])
    assert "haguard_quorum_held" in queried and "haguard_migration_duration_seconds_bucket" in queried
    missing = queried - _exported()
    assert not missing, f"queried but not exported: {sorted(missing)}"
