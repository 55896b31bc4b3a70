"""A real `haguard run` watching real QEMU VMs of its inventory, and a failing host probe.

One agent (host h1 on loopback, a real mosquitto), two VMs started before it:
    vm-hang   SIGSTOP -> hung within the hung timeout, never restarted; SIGCONT -> running
    vm-crash  kill -9 -> restarted in place (a new pid, the guest boots, running);
              after max_restarts restarts in the window: reported for relocation,
              not restarted again
A command probe that always fails makes the host degraded in its status and heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from haguard.adapters.vmwatch import live_pid
from tests.helpers.cluster import REPO, LocalAgent
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.vms import VmLab, guest_vm, wait_guest_ready

HUNG_MS = 1500
MAX_RESTARTS = 2
SLACK_S = 1.0   # status file every heartbeat (300 ms), ticks every 100 ms, a loaded machine

EXTRA = f"""vm_restart: {{max_restarts: {MAX_RESTARTS}, window_s: 600, hung_timeout_ms: {HUNG_MS}}}
probes:
  - {{name: always-fails, command: [sh, -c, 'echo disk gone; exit 1'], interval_s: 0.3, timeout_s: 2}}
"""


def _at(rec: dict[str, object]) -> float:
    return datetime.fromisoformat(str(rec["timestamp"])).timestamp()


@pytest.fixture
def agent(lab: VmLab) -> Iterator[tuple[LocalAgent, VmLab]]:
    broker = Mosquitto()
    a: LocalAgent | None = None
    try:
        broker.start()
        for name in ("vm-hang", "vm-crash"):
            lab.start(lab.define(guest_vm(name, memory_mib=64, mib=1)))
        a = LocalAgent(lab.root, broker.port, extra=EXTRA)
        a.start()
        a.wait_for("both VMs running", lambda: a.vm_state("vm-hang") == a.vm_state("vm-crash") == "running",
                   15)
        yield a, lab
    finally:
        if a is not None:
            a.stop()
        lab.cleanup()   # SIGCONT, then SIGKILL, every QEMU under the lab
        broker.stop()


def _pid(lab: VmLab, vm: str) -> int | None:
    return live_pid(lab.current(vm))


@pytest.mark.timeout(50)
def test_hung_crashed_restarted_relocated_and_degraded(agent: tuple[LocalAgent, VmLab]) -> None:
    a, lab = agent

    # -- a failing probe: the host is degraded, in the status and in what it publishes
    a.wait_for("host degraded", lambda: a.me().get("health") == "degraded", 5)
    assert a.me()["failing"][0]["name"] == "always-fails"
    assert "disk gone" in a.me()["failing"][0]["reason"]
    out = subprocess.run([sys.executable, "-m", "haguard", "status", "--json", "--config", str(a.config)],
                         capture_output=True, text=True, timeout=20, cwd=REPO)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert next(h for h in status["hosts"] if h["self"])["health"] == "degraded"
    assert a.events("host-health")

    # -- SIGSTOP: hung within the hung timeout, never restarted; SIGCONT: running again
    pid = _pid(lab, "vm-hang")
    assert pid is not None
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        took = a.wait_for("vm-hang hung", lambda: a.vm_state("vm-hang") == "hung",
                          HUNG_MS / 1000 + SLACK_S + 3)
        hung = a.events("vm-state", vm="vm-hang", new="hung")
        assert hung, a.events("vm-state")
        logged = _at(hung[0]) - stopped_at
        print(f"hung logged {logged:.2f} s after SIGSTOP, in the status file after {took:.2f} s")
        assert logged <= HUNG_MS / 1000 + 0.3, f"hung after {logged:.2f} s (hung timeout {HUNG_MS} ms)"
        assert took <= HUNG_MS / 1000 + SLACK_S
        time.sleep(2.0)     # a hung QEMU may still hold the guest: it must be left alone
        assert a.vm_state("vm-hang") == "hung"
        assert _pid(lab, "vm-hang") == pid
        assert not a.events("vm-restart", vm="vm-hang")
    finally:
        os.kill(pid, signal.SIGCONT)
    a.wait_for("vm-hang running after SIGCONT", lambda: a.vm_state("vm-hang") == "running", 5)
    assert _pid(lab, "vm-hang") == pid

    # -- kill -9: restarted in place, max_restarts times; then relocation, no more restarts
    pids = [_pid(lab, "vm-crash")]
    for attempt in range(1, MAX_RESTARTS + 1):
        old = pids[-1]
        assert old is not None
        os.kill(old, signal.SIGKILL)
        a.wait_for(f"restart {attempt}",
                   lambda old=old: (p := _pid(lab, "vm-crash")) is not None and p != old, 10)
        a.wait_for(f"vm-crash running after restart {attempt}",
                   lambda n=attempt: len(a.events("vm-state", vm="vm-crash", new="running")) == n + 1, 10)
        a.wait_for("the status file to follow", lambda: a.vm_state("vm-crash") == "running", 2)
        new = _pid(lab, "vm-crash")
        assert new is not None and new not in pids
        ready = asyncio.run(wait_guest_ready(lab.current("vm-crash"), timeout_s=10))
        assert ready.alive
        pids.append(new)
    restarts = a.events("vm-restart", vm="vm-crash")
    assert [r["attempt"] for r in restarts] == list(range(1, MAX_RESTARTS + 1)), restarts
    last = pids[-1]
    assert last is not None
    os.kill(last, signal.SIGKILL)
    a.wait_for("relocation reported", lambda: a.events("vm-relocation-needed", vm="vm-crash"), 10)
    a.wait_for("vm-crash crashed", lambda: a.vm_state("vm-crash") == "crashed", 5)
    time.sleep(3.0)     # past the next scans and ticks: nothing restarts it
    assert _pid(lab, "vm-crash") is None
    assert len(a.events("vm-restart", vm="vm-crash")) == MAX_RESTARTS
    assert len(a.events("vm-relocation-needed", vm="vm-crash")) == 1
    assert a.vm_state("vm-crash") == "crashed"
    # The other VM was never touched.
    assert _pid(lab, "vm-hang") == pid and a.vm_state("vm-hang") == "running"
    assert a.stop() == 0
    assert _pid(lab, "vm-hang") == pid, "stopping the agent must not stop a VM"

