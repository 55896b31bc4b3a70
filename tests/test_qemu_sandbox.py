"""Confined QEMU: every VM runs under QEMU's seccomp filter when the binary has one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from haguard.vm import launcher
from haguard.vm.cmdline import SANDBOX
from tests.helpers.vms import VmLab, guest_vm, wait_guest_ready


def _seccomp(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return line.split()[1]
    return "?"


@pytest.mark.timeout(60)
def test_a_vm_runs_under_the_seccomp_filter(lab: VmLab) -> None:
    vm = guest_vm("boxed", memory_mib=64, mib=8)
    inst = lab.start(vm)
    argv = Path(f"/proc/{inst.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in argv and SANDBOX.encode() in argv, argv
    assert _seccomp(inst.pid) == "2", "QEMU runs with a seccomp filter (mode 2)"
    st = asyncio.run(wait_guest_ready(inst.paths))
    assert st.alive, "the guest runs inside the sandbox"


@pytest.mark.timeout(30)
def test_a_qemu_without_seccomp_is_asked_and_vms_start_without_the_sandbox(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A stand-in binary that refuses the option as a QEMU built without seccomp does.
    fake = tmp_path / "qemu-no-seccomp"
    fake.write_text("#!/bin/sh\necho \"qemu: -sandbox: There is no option group 'sandbox'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        assert launcher.sandbox_supported(str(fake)) is False
    assert "refuses -sandbox" in caplog.text and "no option group" in caplog.text
    assert launcher.sandbox_supported(str(tmp_path / "missing")) is False
