"""`haguard status --check` (haguard/agent/check.py): the codes a monitoring system reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from haguard.agent.check import CRITICAL, OK, UNKNOWN, WARNING, check

NOW = 1_000_000.0
REPO = Path(__file__).resolve().parents[1]


def _cluster(**over: object) -> dict[str, object]:
    cluster: dict[str, object] = {
        "term": 4, "coordinator": "h1", "quorum_lost_ms": 0, "watchdog": "petting", "migrations": [],
        "peers": {"h2": "alive", "h3": "alive"}, "definition_differs": [],
        "vms": {"vm1": {"owner": "h2", "desired": "running"}, "vm2": {"owner": None, "desired": "stopped"}}}
    cluster.update(over)
    return {"written_at": NOW - 1, "brokers": {"mqtt://b1": True}, "config_needs_restart": [],
            "cluster": cluster}


@pytest.mark.timeout(10)
def test_each_state_gets_its_code_and_one_line() -> None:
    assert check(_cluster(), NOW) == (OK, "HAGUARD OK - term 4, coordinator h1, 3 hosts alive, "
                                          "1 VMs placed, 0 moves in flight")
    code, line = check(_cluster(peers={"h2": "alive", "h3": "dead"}), NOW)
    assert (code, line) == (WARNING, "HAGUARD WARNING - peers h3 dead")
    data = _cluster()
    data["brokers"] = {"mqtt://b1": True, "mqtt://b2": False}
    assert check(data, NOW) == (WARNING, "HAGUARD WARNING - broker down: mqtt://b2")
    code, line = check(_cluster(quorum_lost_ms=12_300, watchdog="stopped"), NOW)
    assert code == CRITICAL and "quorum lost for 12.3 s" in line and "no longer petted" in line
    code, line = check(_cluster(coordinator=None), NOW)
    assert (code, line) == (CRITICAL, "HAGUARD CRITICAL - no coordinator")
    lost = _cluster(vms={"vm1": {"owner": None, "desired": "running"}}, peers={"h2": "dead"})
    assert check(lost, NOW) == (CRITICAL, "HAGUARD CRITICAL - 1 VM should run and run nowhere: vm1; "
                                          "peers h2 dead")
    assert check(_cluster(maintenance=True), NOW) == (
        WARNING, "HAGUARD WARNING - cluster maintenance on: nothing is recovered (haguard maintenance off)")
    assert check(_cluster(), NOW + 30)[0] == UNKNOWN, "a stale status tells nothing"
    assert check(None, NOW) == (UNKNOWN, "HAGUARD UNKNOWN - no status file: is the agent running?")


@pytest.mark.timeout(30)
def test_no_agent_and_a_bad_file_are_unknown_not_a_traceback(tmp_path: Path) -> None:
    def run(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "haguard", "status", "--check", "--config", str(config)],
                              capture_output=True, text=True, timeout=20, cwd=REPO)

    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [\n")
    out = run(bad)
    assert out.returncode == UNKNOWN and out.stdout.startswith("HAGUARD UNKNOWN - "), out
    assert "Traceback" not in out.stderr
    good = tmp_path / "c.yaml"
    good.write_text(f"cluster: c1\nhost: a\nhosts:\n  - {{name: a, address: 198.18.0.1}}\n"
                    f"key_file: {tmp_path}/k\nmqtt: {{urls: ['mqtt://127.0.0.1']}}\n"
                    f"run_dir: {tmp_path}/run/vms\n")
    out = run(good)
    assert (out.returncode, out.stdout.strip()) == (UNKNOWN, "HAGUARD UNKNOWN - no status file: is the agent "
                                                             "running?"), out
