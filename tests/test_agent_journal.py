"""`haguard run --log-format journal` against a private, real journald.

The agent (host h1 on loopback, a real mosquitto) watches one real QEMU VM of its
inventory with max_restarts 0; the VM is killed, so the journal gets info, warning
and error entries, some about the VM.  Each entry of the agent's own events must
carry HAGUARD_HOST, HAGUARD_EVENT, a MESSAGE_ID that depends on the kind only,
PRIORITY from the level, and HAGUARD_VM on the VM events.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from haguard.adapters.journal import message_id
from haguard.adapters.vmwatch import live_pid
from tests.helpers.cluster import LocalAgent
from tests.helpers.journald import Entry, Journald, journald
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.vms import VmLab, guest_vm

VM = "vm-j"
EXTRA = "vm_restart: {max_restarts: 0, window_s: 600, hung_timeout_ms: 1500}\n"


@pytest.fixture
def running(lab: VmLab) -> Iterator[tuple[LocalAgent, Journald, VmLab]]:
    broker = Mosquitto()
    agent: LocalAgent | None = None
    try:
        with journald() as jd:
            broker.start()
            lab.start(lab.define(guest_vm(VM, memory_mib=64, mib=1)))
            agent = LocalAgent(lab.root, broker.port, extra=EXTRA, log_format="journal",
                               env={"HAGUARD_JOURNAL_SOCKET": str(jd.socket)})
            agent.start()
            try:
                yield agent, jd, lab
            finally:
                agent.stop()
    finally:
        lab.cleanup()
        broker.stop()


def _kind(jd: Journald, kind: str, count: int = 1, **match: str) -> list[Entry]:
    def ok(e: Entry) -> bool:
        return e.get("HAGUARD_EVENT") == kind and all(e.get(k) == v for k, v in match.items())
    return jd.wait_for(ok, count=count, timeout_s=12)


@pytest.mark.timeout(45)
def test_agent_events_reach_journald_with_their_fields(running: tuple[LocalAgent, Journald, VmLab]) -> None:
    agent, jd, lab = running
    started = _kind(jd, "agent-started")
    assert started, f"no agent-started entry; log: {agent.log.read_text(errors='replace')[-2000:]}"
    e = started[0]
    assert e["HAGUARD_HOST"] == "h1" and e["SYSLOG_IDENTIFIER"] == "haguard"
    assert e["PRIORITY"] == "6" and e["MESSAGE_ID"] == message_id("agent-started")
    # A first start counts its incarnations from the wall clock in ms (state_dir/incarnation).
    incarnation = (agent.root / "state" / "incarnation").read_text().strip()
    assert "agent-started" in e["MESSAGE"] and e["HAGUARD_INCARNATION"] == incarnation
    assert agent.proc is not None and int(e["_PID"]) == agent.proc.pid

    # VM events: watched, running; then killed -> crashed (warning), relocation (error)
    running_ = _kind(jd, "vm-state", HAGUARD_VM=VM, HAGUARD_NEW="running")
    assert running_, "the VM was never reported running"
    pid = live_pid(lab.current(VM))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    crashed = _kind(jd, "vm-state", HAGUARD_VM=VM, HAGUARD_NEW="crashed")
    relocation = _kind(jd, "vm-relocation-needed", HAGUARD_VM=VM)
    assert crashed and relocation, [x.get("HAGUARD_EVENT") for x in jd.entries()]
    assert crashed[0]["PRIORITY"] == "4" and relocation[0]["PRIORITY"] == "3"
    assert _kind(jd, "vm-watch", HAGUARD_VM=VM)
    assert live_pid(lab.current(VM)) is None, "max_restarts 0: no restart"

    # Every agent event: its host, and a MESSAGE_ID that is a function of its kind alone.
    agent.stop()
    assert _kind(jd, "agent-stopped")
    ours = [x for x in jd.entries() if x.get("HAGUARD_EVENT")]
    kinds = {x["HAGUARD_EVENT"] for x in ours}
    assert {"agent-started", "broker", "vm-watch", "vm-state", "vm-relocation-needed", "agent-ready",
            "agent-stopping", "agent-stopped"} <= kinds, kinds
    for x in ours:
        assert x["HAGUARD_HOST"] == "h1", x
        assert x["MESSAGE_ID"] == message_id(x["HAGUARD_EVENT"]), x
        # critical alerts are 2 (crit), errors 3, warnings 4, the rest 6 (info)
        assert x["PRIORITY"] in ("2", "3", "4", "6"), x
    alerts = [x for x in ours if x["HAGUARD_EVENT"] == "alert"]
    assert all(x.get("HAGUARD_ALERT") for x in alerts), alerts
    vm_states = [x for x in ours if x["HAGUARD_EVENT"] == "vm-state"]
    assert len(vm_states) >= 2 and len({x["MESSAGE_ID"] for x in vm_states}) == 1
    assert all(x.get("HAGUARD_VM") == VM for x in vm_states)
    assert len({message_id(k) for k in kinds}) == len(kinds)
    print(f"{len(ours)} agent entries in the journal, kinds {sorted(kinds)}")
