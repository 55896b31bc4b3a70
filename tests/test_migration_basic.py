"""The migration core on real QEMU: same-host moves through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.helpers.vms import VmLab, guest_status, guest_vm, run_state, wait_guest_ready


def _result(proc) -> dict:  # type: ignore[no-untyped-def]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON result; stderr: {proc.stderr}"
    return json.loads(lines[-1])


async def _moved_and_kept_counting(lab: VmLab, name: str, transport: str) -> None:
    before = await guest_status(lab.current(name))
    old_pid = lab.live_qemus()
    proc = lab.haguard("migrate", name, "--to", "local", "--transport", transport, "--json")
    res = _result(proc)
    assert proc.returncode == 0, proc.stderr
    assert res["status"] == "completed" and not res["postcopy"]
    assert res["downtime_ms"] is not None and res["downtime_ms"] < 300
    after = await guest_status(lab.current(name))
    assert after.alive and after.errors == 0
    # The same guest, still counting: its clock went on from where it was, not from zero.
    assert after.ms >= before.ms and after.loops > before.loops
    assert await run_state(lab.current(name)) == "running"
    now = lab.live_qemus()
    assert len(now) == 1 and set(now.values()).isdisjoint(old_pid.values())


@pytest.mark.timeout(90)
async def test_idle_vm_moves_over_unix_and_tcp_and_keeps_its_state(lab: VmLab) -> None:
    vm = lab.define(guest_vm("idle1"))
    lab.start(vm)
    await wait_guest_ready(lab.current("idle1"))
    await _moved_and_kept_counting(lab, "idle1", "unix")
    await _moved_and_kept_counting(lab, "idle1", "tcp")
    st = lab.haguard("vm", "status", "idle1", "--json")
    assert json.loads(st.stdout)["state"] == "running", st.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_dirtying_guest_postcopy_never_hits_deadline_auto_completes(lab: VmLab) -> None:
    vm = lab.define(guest_vm("dirty1", memory_mib=256, mib=64, rate=200))
    lab.start(vm)
    await wait_guest_ready(lab.current("dirty1"))
    before = await guest_status(lab.current("dirty1"))
    # 20 MiB/s against 200 MiB/s of dirtying: pre-copy alone can never finish.
    proc = lab.haguard("migrate", "dirty1", "--to", "local", "--max-bandwidth", "20",
                       "--postcopy", "never", "--timeout", "8", "--json")
    res = _result(proc)
    assert proc.returncode == 1
    assert res["status"] == "aborted" and "deadline" in res["error"]
    # Escalated before giving up (raising the downtime limit would not help here: throttle).
    assert any(s["action"] in ("SetDowntimeLimit", "StartThrottling") for s in res["steps"])
    assert len(lab.live_qemus()) == 1, "the destination must be cleaned up"
    mid = await guest_status(lab.current("dirty1"))
    assert await run_state(lab.current("dirty1")) == "running"
    assert mid.ms > before.ms and mid.errors == 0

    proc = lab.haguard("migrate", "dirty1", "--to", "local", "--max-bandwidth", "20",
                       "--postcopy", "auto", "--json")
    res = _result(proc)
    assert proc.returncode == 0, proc.stderr
    assert res["status"] == "completed" and res["postcopy"] is True
    after = await guest_status(lab.current("dirty1"))
    assert after.errors == 0 and after.ms > mid.ms and after.pages > mid.pages
    assert len(lab.live_qemus()) == 1


async def _start_slow_move(lab: VmLab, name: str):  # type: ignore[no-untyped-def]
    vm = lab.define(guest_vm(name, memory_mib=256, mib=64, rate=200))
    lab.start(vm)
    await wait_guest_ready(lab.current(name))
    proc = lab.haguard_bg("migrate", name, "--to", "local", "--max-bandwidth", "10",
                          "--postcopy", "never", "--json")
    deadline = time.monotonic() + 20
    while len(lab.live_qemus()) < 2 or not await _migrating(lab, name):
        assert time.monotonic() < deadline, "migration did not start"
        await asyncio.sleep(0.1)
    return proc


async def _migrating(lab: VmLab, name: str) -> bool:
    from haguard.adapters.qmp import Qmp
    async with Qmp.session(lab.current(name).ops, timeout_s=5) as qmp:
        return (await qmp.cmd("query-migrate")).get("status") == "active"


@pytest.mark.timeout(90)
async def test_cancel_leaves_source_running_and_destination_gone(lab: VmLab) -> None:
    proc = await _start_slow_move(lab, "cancel1")
    await asyncio.sleep(1.0)
    cancel = lab.haguard("migrate", "--cancel", "cancel1")
    assert cancel.returncode == 0, cancel.stderr
    out, _ = proc.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and res["status"] == "cancelled"
    assert res["transferred_bytes"] > 0
    assert await run_state(lab.current("cancel1")) == "running"
    assert len(lab.live_qemus()) == 1


@pytest.mark.timeout(90)
async def test_destination_killed_mid_precopy(lab: VmLab) -> None:
    src_pid = None
    proc = await _start_slow_move(lab, "dkill1")
    src_dir = lab.current("dkill1").dir.name
    for name, pid in lab.live_qemus().items():
        if name == src_dir:
            src_pid = pid
        else:
            os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and res["status"] == "failed", res
    assert "source" in res["error"]  # "... keeps running on the source"
    assert lab.live_qemus() == {src_dir: src_pid}
    st = await guest_status(lab.current("dkill1"))
    assert await run_state(lab.current("dkill1")) == "running" and st.errors == 0


@pytest.mark.timeout(60)
async def test_bad_input_gives_one_clear_line(lab: VmLab) -> None:
    # Unknown VM.
    proc = lab.haguard("migrate", "nosuchvm", "--to", "local")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown VM 'nosuchvm'" in proc.stderr
    assert "Traceback" not in proc.stderr

    vm = lab.define(guest_vm("bad1"))
    src = lab.start(vm)
    await wait_guest_ready(src.paths)

    # Destination not listening: attach mode towards a port nobody listens on.
    from haguard.migration.managed import free_tcp_port
    port = free_tcp_port()
    proc = lab.haguard("migrate", "--source-qmp", str(src.paths.qmp), "--uri",
                       f"tcp:127.0.0.1:{port}", "--json")
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "not listening" in err, err

    # A capability this QEMU does not have.
    from haguard.adapters.qmp import Qmp
    async with Qmp.session(src.paths.ops) as qmp:
        have = {c["capability"] for c in await qmp.cmd("query-migrate-capabilities")}
    newer = next(c for c in ("switchover-ack", "dirty-limit", "mapped-ram", "background-snapshot")
                 if c not in have)
    proc = lab.haguard("migrate", "bad1", "--to", "local", "--cap", newer)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and newer in proc.stderr and "not supported" in proc.stderr

    # Mismatched RAM: a destination started from another definition.
    other = guest_vm("bad1", memory_mib=256)
    dst = lab.start(other, incoming=True)
    proc = lab.haguard("migrate", "--source-qmp", str(src.paths.qmp), "--dest-qmp",
                       str(dst.paths.qmp), "--uri", f"unix:{dst.paths.dir}/m.sock")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "RAM differs" in proc.stderr, proc.stderr
    # Nothing moved: the source still runs, the operator's destination is untouched.
    assert await run_state(src.paths) == "running"
    assert await run_state(dst.paths) == "inmigrate"
    live = lab.live_qemus()
    assert set(live) == {src.paths.dir.name, dst.paths.dir.name}
    # Bad numbers are refused by the parser in one line.
    proc = lab.haguard("migrate", "bad1", "--to", "local", "--max-bandwidth", "-3")
    assert proc.returncode == 2 and "must be positive" in proc.stderr
