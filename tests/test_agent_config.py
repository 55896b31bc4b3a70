"""`haguard check-config`, secret file permissions, and SIGHUP reloads of a running agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mosquitto import Mosquitto

REPO = Path(__file__).resolve().parents[1]


def _haguard(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "haguard", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _config(d: Path, url: str, *, peer: str = "127.0.0.2", heartbeat_ms: int = 200) -> str:
    return (f"cluster: cfgtest\nhost: h1\nhosts:\n  - {{name: h1, address: 127.0.0.1}}\n"
            f"  - {{name: h2, address: {peer}}}\n"
            f"key_file: {d / 'key'}\nmqtt:\n  urls: ['{url}']\n  keepalive_s: 2\n"
            f"timing:\n  heartbeat_interval_ms: {heartbeat_ms}\n  suspect_timeout_ms: 800\n"
            f"  dead_timeout_ms: 1500\n"
            f"vm_dir: {d / 'vms'}\nrun_dir: {d / 'run' / 'vms'}\nstate_dir: {d / 'state'}\n")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Mosquitto]]:
    (tmp_path / "vms").mkdir()
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    with Mosquitto() as broker:
        (tmp_path / "cluster.yaml").write_text(_config(tmp_path, broker.url))
        yield tmp_path, broker


@pytest.mark.timeout(30)
def test_check_config_good_and_bad(setup: tuple[Path, Mosquitto]) -> None:
    d, _ = setup
    ok = _haguard("check-config", "--config", str(d / "cluster.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok")
    bad = d / "bad.yaml"
    bad.write_text((d / "cluster.yaml").read_text().replace("dead_timeout_ms: 1500", "dead_timeout_ms: -3"))
    out = _haguard("check-config", "--config", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line_no = next(i + 1 for i, t in enumerate(bad.read_text().splitlines()) if "dead_timeout_ms" in t)
    assert f"{bad}:{line_no}: timing.dead_timeout_ms:" in lines[0]
    # A field check beyond the schema still names file, line and field.
    bad.write_text((d / "cluster.yaml").read_text().replace("127.0.0.2", "not-an-ip"))
    out = _haguard("check-config", "--config", str(bad))
    assert out.returncode == 2 and "hosts[1].address" in out.stderr and f"{bad}:5:" in out.stderr, out.stderr


@pytest.mark.timeout(30)
def test_world_readable_key_is_refused(setup: tuple[Path, Mosquitto]) -> None:
    d, _ = setup
    (d / "key").chmod(0o644)
    out = _haguard("run", "--config", str(d / "cluster.yaml"))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and str(d / "key") in out.stderr, out.stderr
    assert "readable by every user" in out.stderr


def _status(d: Path) -> dict:  # type: ignore[type-arg]
    try:
        return json.loads((d / "run" / "agent-status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def _wait(pred, timeout_s: float, what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


@pytest.mark.timeout(40)
def test_sighup_bad_file_keeps_old_config_good_file_applies(setup: tuple[Path, Mosquitto]) -> None:
    d, _ = setup
    cfg = d / "cluster.yaml"
    good = cfg.read_text()
    log = d / "agent.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify.sock"))
    notify.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=str(d / "notify.sock"), WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "haguard", "run", "--config", str(cfg),
                                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True, env=env)
    try:
        _wait(lambda: _status(d).get("ready") and _status(d).get("broker"), 15, "the agent to join", log)
        time.sleep(1.2)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(notify.recv(4096).decode())
        assert any("READY=1" in m and "STATUS=joined" in m for m in got), got
        assert any(m == "WATCHDOG=1" for m in got), got
        cfg.write_text(good.replace("suspect_timeout_ms: 800", "suspect_timeout_ms: lots"))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: "config-reload-failed" in log.read_text(), 10, "the reload failure", log)
        fail = next(json.loads(x) for x in log.read_text().splitlines() if "config-reload-failed" in x)
        line_no = next(i + 1 for i, t in enumerate(good.splitlines()) if "suspect_timeout_ms" in t)
        assert fail["file"] == str(cfg) and fail["line"] == line_no, fail
        assert fail["field"] == "timing.suspect_timeout_ms", fail
        time.sleep(0.5)
        assert proc.poll() is None
        written = _status(d)["written_at"]
        _wait(lambda: _status(d)["written_at"] > written, 5, "heartbeats on the old config", log)
        # A good file: a third peer appears in the status.
        h2 = "  - {name: h2, address: 127.0.0.2}\n"
        cfg.write_text(good.replace(h2, h2 + "  - {name: h3, address: 127.0.0.3}\n"))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: {h["name"] for h in _status(d).get("hosts", [])} == {"h1", "h2", "h3"}, 10,
              "the new peer", log)
        assert "config-reloaded" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "agent-stopped" in log.read_text()
    finally:
        notify.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.timeout(30)
def test_a_reload_that_needs_a_restart_keeps_the_running_value_and_keeps_saying_so(
        setup: tuple[Path, Mosquitto]) -> None:
    # The agent once took such a file as its configuration (half applied: the broker connection
    # stayed as it was), and the next reload compared with it and said nothing more.
    d, _ = setup
    cfg = d / "cluster.yaml"
    good = cfg.read_text()
    log = d / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "haguard", "run", "--config", str(cfg),
                                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
    try:
        _wait(lambda: _status(d).get("ready") and _status(d).get("broker"), 15, "the agent to join", log)

        def warnings() -> list[dict]:  # type: ignore[type-arg]
            return [json.loads(x) for x in log.read_text().splitlines() if "config-needs-restart" in x]

        cfg.write_text(good.replace("keepalive_s: 2", "keepalive_s: 7"))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: len(warnings()) == 1, 10, "the first warning", log)
        assert warnings()[0]["fields"] == ["mqtt"], warnings()
        _wait(lambda: _status(d).get("config_needs_restart") == ["mqtt"], 5, "the status to say so", log)
        # Another reload, with a change it can apply: mqtt still differs from what runs.
        cfg.write_text(good.replace("keepalive_s: 2", "keepalive_s: 7").replace(
            "heartbeat_interval_ms: 200", "heartbeat_interval_ms: 250"))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: len(warnings()) == 2, 10, "the second warning", log)
        assert warnings()[1]["fields"] == ["mqtt"], warnings()
        # The file back as it was: nothing left to restart for.
        cfg.write_text(good)
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: _status(d).get("config_needs_restart") == [], 10, "the status to clear", log)
        assert len(warnings()) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
