"""A VM with a local disk moves to a host that does not have that disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from haguard.adapters.qmp import Qmp
from haguard.vm.definition import DiskSpec
from tests.helpers.vms import VmLab, guest_status, guest_vm, run_state, wait_guest_ready


def _img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60, check=False)


async def _hmp_qemu_io(path: Path, cmd: str) -> str:
    async with Qmp.session(path, timeout_s=10) as qmp:
        return str(await qmp.cmd("human-monitor-command",
                                 {"command-line": f'qemu-io disk0 "{cmd}"'}))


@pytest.mark.timeout(120)
async def test_local_qcow2_disk_is_copied_and_identical(lab: VmLab) -> None:
    src_disk = lab.root / "src-disks" / "data.qcow2"
    dest_dir = lab.root / "dest-disks"
    src_disk.parent.mkdir(parents=True)
    assert _img("create", "-q", "-f", "qcow2", str(src_disk), "64M").returncode == 0
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 8M", str(src_disk)],
                   check=True, capture_output=True, timeout=30)
    vm = lab.define(guest_vm("disk1", disks=(DiskSpec(path=src_disk),)))
    src = lab.start(vm)
    await wait_guest_ready(src.paths)
    before = await guest_status(src.paths)
    # Writes while the VM runs, before and during the move, must all arrive.
    await _hmp_qemu_io(src.paths.ops, "write -P 0xcd 16M 4M")
    proc = lab.haguard_bg("migrate", "disk1", "--to", "local", "--dest-disk-dir", str(dest_dir),
                          "--json")
    await asyncio.sleep(0.3)
    # The move may already have finished: the write then simply does not happen.
    with contextlib.suppress(Exception):
        await _hmp_qemu_io(src.paths.ops, "write -P 0xef 40M 1M")
    out, err = proc.communicate(timeout=90)
    res = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and res["status"] == "completed", err
    dest_disk = dest_dir / "data.qcow2"
    assert dest_disk.exists()
    cmp = _img("compare", "-U", str(src_disk), str(dest_disk))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # The VM now runs from the copy, once.
    now = lab.current("disk1")
    assert await run_state(now) == "running"
    async with Qmp.session(now.ops) as qmp:
        blocks = await qmp.cmd("query-named-block-nodes")
    files = {b.get("file") for b in blocks}
    assert str(dest_disk) in files and str(src_disk) not in files
    assert len(lab.live_qemus()) == 1
    after = await guest_status(now)
    assert after.ms > before.ms and after.errors == 0
