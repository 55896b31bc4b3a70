"""Killing haguard never stops a VM, and never makes one run twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from haguard.adapters.qmp import Qmp
from haguard.vm.cmdline import InstancePaths
from tests.helpers.vms import RunningOnceMonitor, VmLab, guest_status, guest_vm, wait_guest_ready


async def _migration_status(path) -> str:  # type: ignore[no-untyped-def]
    async with Qmp.session(path, timeout_s=5) as qmp:
        return str((await qmp.cmd("query-migrate")).get("status", "none"))


@pytest.mark.timeout(120)
async def test_haguard_killed_mid_migration_leaves_the_vm_running_once(lab: VmLab) -> None:
    vm = lab.define(guest_vm("orphan1", memory_mib=128, mib=32, rate=5))
    src = lab.start(vm)
    before = await wait_guest_ready(src.paths)
    async with RunningOnceMonitor([lab.run_dir]) as mon:
        proc = lab.haguard_bg("migrate", "orphan1", "--to", "local", "--max-bandwidth", "20",
                              "--postcopy", "never", "--json")
        deadline = time.monotonic() + 20
        while await _migration_status(src.paths.ops) != "active":
            assert time.monotonic() < deadline, "the migration did not start"
            await asyncio.sleep(0.1)
        # A crash of the agent or the CLI: no chance to clean up anything.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # QEMU carries on by itself; wait until it settles either way.
        deadline = time.monotonic() + 60
        while (st := await _migration_status(src.paths.ops)) in ("active", "setup", "device"):
            assert time.monotonic() < deadline, f"migration stuck in {st}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
    mon.assert_never_twice()
    # Exactly one QEMU runs the guest, and it is the same guest, still counting.
    runners = mon.seen_running.get("orphan1", set())
    assert runners, "the VM stopped running"
    live = lab.live_qemus()
    running_now = []
    for name in live:
        paths = InstancePaths(lab.run_dir / name)
        async with Qmp.session(paths.ops, timeout_s=5) as qmp:
            if (await qmp.cmd("query-status"))["status"] == "running":
                running_now.append(paths)
    assert len(running_now) == 1
    after = await guest_status(running_now[0])
    assert after.ms > before.ms and after.errors == 0
