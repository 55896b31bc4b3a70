"""Cluster mode's configuration checks: `haguard check-config` refuses what could decide
twice or recover unfenced, with one line naming the file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _check(tmp: Path, hosts: str, ha: str) -> subprocess.CompletedProcess[str]:
    (tmp / "vms").mkdir(exist_ok=True)
    key = tmp / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    cfg = tmp / "cluster.yaml"
    cfg.write_text(f"cluster: c1\nhost: a\nhosts:\n{hosts}key_file: {key}\nmqtt:\n  urls: ['mqtt://127.0.0.1']\n"
                   f"vm_dir: {tmp / 'vms'}\nstate_dir: {tmp / 'state'}\nrun_dir: {tmp / 'run'}\n{ha}")
    return subprocess.run([sys.executable, "-m", "haguard", "check-config", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30, cwd=REPO, check=False)


FENCE = "fence: {kind: command, agent: /bin/true}"
TWO = f"  - {{name: a, address: 198.18.0.1, {FENCE}}}\n  - {{name: b, address: 198.18.0.2, {FENCE}}}\n"


@pytest.mark.timeout(60)
def test_two_equal_hosts_need_a_tie_breaker(tmp_path: Path) -> None:
    out = _check(tmp_path, TWO, "ha: {enabled: true}\n")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "cluster.yaml" in out.stderr and "witness" in out.stderr and "weight: 2" in out.stderr
    assert _check(tmp_path, TWO, "").returncode == 0, "without ha: no votes are taken"
    witness = TWO + "  - {name: w, address: 198.18.0.3, witness: true}\n"
    ok = _check(tmp_path, witness, "ha: {enabled: true}\n")
    assert ok.returncode == 0, ok.stderr
    weighted = TWO.replace("name: a,", "name: a, weight: 2,")
    assert _check(tmp_path, weighted, "ha: {enabled: true}\n").returncode == 0


@pytest.mark.timeout(60)
def test_a_host_without_fence_device_needs_the_watchdog(tmp_path: Path) -> None:
    hosts = TWO + "  - {name: c, address: 198.18.0.3}\n"
    out = _check(tmp_path, hosts, "ha: {enabled: true}\n")
    assert out.returncode == 2 and "host c has no fence device" in out.stderr, out.stderr
    device = tmp_path / "watchdog"
    device.touch()
    ok = _check(tmp_path, hosts, f"ha:\n  enabled: true\n  watchdog: {{device: {device}, timeout_s: 10}}\n")
    assert ok.returncode == 0, ok.stderr
    assert "not a character device" in ok.stderr, "a stand-in is named as one"
    bad = _check(tmp_path, hosts, "ha:\n  enabled: true\n  isolation: sometimes\n")
    assert bad.returncode == 2 and "ha.isolation" in bad.stderr and ":" in bad.stderr, bad.stderr


@pytest.mark.timeout(60)
def test_a_missing_watchdog_device_or_a_fractional_timeout_is_one_line(tmp_path: Path) -> None:
    hosts = TWO + "  - {name: c, address: 198.18.0.3}\n"
    ha = "ha:\n  enabled: true\n  watchdog: {{device: {}, timeout_s: {}}}\n"
    missing = _check(tmp_path, hosts, ha.format("/nonexistent", 10))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "ha.watchdog.device" in missing.stderr and "/nonexistent" in missing.stderr
    device = tmp_path / "watchdog"
    device.touch()
    for timeout in ("0.001", "0", "2.5", "1e9"):
        out = _check(tmp_path, hosts, ha.format(device, timeout))
        assert out.returncode == 2 and "timeout_s" in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.timeout(60)
def test_relay_transit_reaches_the_core_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    from haguard.agent.derive import core_config
    from haguard.config.cluster import ClusterConfig

    key = tmp_path / "key"
    key.write_text("k" * 32)
    cfg = ClusterConfig.model_validate({
        "cluster": "c1", "host": "a", "key_file": str(key), "mqtt": {"urls": ["mqtt://127.0.0.1"]},
        "hosts": [{"name": h, "address": f"198.18.0.{i + 1}", "fence": {"agent": "fence_dummy"}}
                  for i, h in enumerate("abcdefg")],
        "ha": {"enabled": True, "relay_transit_ms": 3}})
    core = core_config(cfg, {})
    assert core.timing.relay_transit_ms == 3
    bad = _check(tmp_path, TWO + "  - {name: w, address: 198.18.0.3, witness: true}\n",
                 "ha:\n  enabled: true\n  relay_transit_ms: -5\n")
    assert bad.returncode == 2 and "ha.relay_transit_ms" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr


@pytest.mark.timeout(60)
def test_the_watchdog_is_armed_only_where_it_is_the_fence_unless_asked(tmp_path: Path) -> None:
    from haguard.agent.derive import watchdog_armed_here
    from haguard.config.cluster import ClusterConfig

    def cfg(host: str, **ha: object) -> ClusterConfig:
        return ClusterConfig.model_validate({
            "cluster": "c1", "host": host, "key_file": str(tmp_path / "key"),
            "mqtt": {"urls": ["mqtt://127.0.0.1"]},
            "hosts": [{"name": "a", "address": "198.18.0.1", "fence": {"agent": "fence_dummy"}},
                      {"name": "b", "address": "198.18.0.2"}, {"name": "w", "address": "198.18.0.3",
                                                               "witness": True}],
            "ha": {"enabled": True, "watchdog": {"device": str(tmp_path / "wd"), "timeout_s": 10}, **ha}})

    assert not watchdog_armed_here(cfg("a")), "a has a fence device"
    assert watchdog_armed_here(cfg("b")), "b has none: its watchdog is its fence"
    assert watchdog_armed_here(cfg("a", isolation="self-fence"))
    assert watchdog_armed_here(cfg("a", watchdog={"device": str(tmp_path / "wd"), "timeout_s": 10,
                                                  "arm": "always"}))
