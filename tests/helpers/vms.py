"""Test VMs: the dirtying guest under real QEMU, in a private runtime directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from haguard.adapters.qmp import Qmp
from haguard.guest.build import XP_COMMAND, GuestStatus, build_guest, parse_status
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition

HAGUARD = [sys.executable, "-m", "haguard"]


def guest_vm(name: str, *, memory_mib: int = 128, mib: int = 16, rate: int = 0,
             **extra: object) -> VmDefinition:
    return VmDefinition(name=name, memory_mib=memory_mib, machine="pc-i440fx-7.2",
                        firmware="qboot", kernel=build_guest(), append=f"mib={mib} rate={rate}",
                        **extra)  # type: ignore[arg-type]


async def guest_status(paths: InstancePaths) -> GuestStatus:
    async with Qmp.session(paths.ops, timeout_s=5) as qmp:
        out = await qmp.cmd("human-monitor-command", {"command-line": XP_COMMAND})
    return parse_status(out)


async def run_state(paths: InstancePaths) -> str:
    return await launcher.query_status(paths, timeout_s=5)


async def wait_guest_ready(paths: InstancePaths, timeout_s: float = 20) -> GuestStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            st = await guest_status(paths)
            if st.alive and st.ms > 50:
                return st
        if time.monotonic() > deadline:
            raise AssertionError(f"guest in {paths.dir} did not come up")
        await asyncio.sleep(0.1)


def qemu_pids_in(run_dir: Path) -> dict[str, int]:
    """Live QEMU processes whose instance directory is under run_dir."""
    out: dict[str, int] = {}
    if not run_dir.exists():
        return out
    for d in run_dir.iterdir():
        if d.is_dir() and not d.is_symlink():
            pid = launcher.read_pid(InstancePaths(d))
            if pid:
                out[d.name] = pid
    return out


def qemu_pids_by_cmdline(marker: str) -> list[int]:
    """Every QEMU whose command line mentions `marker` (catches ones without a pidfile)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd:
            pids.append(int(proc.name))
    return pids


@dataclass
class VmLab:
    """A runtime dir plus the VM definitions written for the CLI; kills every QEMU at the end."""

    root: Path
    run_dir: Path = field(init=False)
    vm_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = self.root / "run"
        self.vm_dir = self.root / "vms"
        self.vm_dir.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HAGUARD_VM_DIR": str(self.vm_dir), "HAGUARD_RUN_DIR": str(self.run_dir)}

    def define(self, vm: VmDefinition) -> VmDefinition:
        import yaml
        data = vm.model_dump(mode="json", exclude_defaults=True)
        (self.vm_dir / f"{vm.name}.yaml").write_text(yaml.safe_dump(data))
        return vm

    def start(self, vm: VmDefinition, **kw: object) -> launcher.Instance:
        return launcher.start(vm, self.run_dir, **kw)  # type: ignore[arg-type]

    def current(self, name: str) -> InstancePaths:
        return launcher.current_paths(name, self.run_dir)

    def haguard(self, *args: str, timeout: float = 120, netns: str | None = None,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return subprocess.run([*prefix, *HAGUARD, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def haguard_bg(self, *args: str, netns: str | None = None) -> subprocess.Popen[str]:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return subprocess.Popen([*prefix, *HAGUARD, *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def live_qemus(self) -> dict[str, int]:
        return qemu_pids_in(self.run_dir)

    def cleanup(self) -> None:
        pids = set(qemu_pids_in(self.run_dir).values()) | set(qemu_pids_by_cmdline(str(self.root)))
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()
                    and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]}
            time.sleep(0.05)


class RunningOnceMonitor:
    """Samples every QEMU instance under some runtime directories and records any
    instant at which one VM name runs in more than one of them.

    Use as `async with RunningOnceMonitor([lab.run_dir]) as mon: ...`, then
    `mon.assert_never_twice()`.  Sessions use the operator monitor (ops.sock).
    """

    def __init__(self, run_dirs: list[Path], interval_s: float = 0.1) -> None:
        self.run_dirs = run_dirs
        self.interval_s = interval_s
        self.samples = 0
        self.violations: list[tuple[float, str, list[str]]] = []
        self.seen_running: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None

    async def _state(self, d: Path) -> str | None:
        with contextlib.suppress(Exception):
            async with Qmp.session(InstancePaths(d).ops, timeout_s=1.0) as qmp:
                return str((await qmp.cmd("query-status"))["status"])
        return None

    async def sample(self) -> None:
        running: dict[str, list[str]] = {}
        for base in self.run_dirs:
            if not base.exists():
                continue
            for d in base.iterdir():
                live = d.is_dir() and not d.is_symlink() and launcher.read_pid(InstancePaths(d))
                if live and await self._state(d) == "running":
                    name = d.name.split("@", 1)[0]
                    running.setdefault(name, []).append(str(d))
                    self.seen_running.setdefault(name, set()).add(str(d))
        self.samples += 1
        for name, where in running.items():
            if len(where) > 1 and await self._confirm(where):
                self.violations.append((time.monotonic(), name, where))

    async def _confirm(self, where: list[str]) -> bool:
        """Sampling is sequential: a copy seen running before a move's switchover and the
        destination seen running after it are not two at once.  Ask again in reverse order:
        still all running (a source never returns to running after postmigrate) is a real
        overlap."""
        for d in reversed(where):
            if await self._state(Path(d)) != "running":
                return False
        return True

    async def _loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> RunningOnceMonitor:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def assert_never_twice(self) -> None:
        assert self.samples > 0, "the monitor never sampled"
        assert not self.violations, f"a VM ran twice: {self.violations[:3]}"
