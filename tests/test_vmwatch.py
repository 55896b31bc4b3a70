"""The VM watcher and the restart executor against real QEMU, driven through the health core."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from haguard.adapters.qmp import Qmp
from haguard.adapters.vmwatch import (
    VmWatcher,
    health_policy,
    live_pid,
    monotonic_ms,
    poll_delay_s,
    restart_in_place,
)
from haguard.config.cluster import VmRestartPolicy
from haguard.core.vmhealth import (
    ReportVmForRelocation,
    RestartVmInPlace,
    VmExpected,
    VmFact,
    VmHealth,
    VmHealthPolicy,
    VmInput,
    VmOutput,
    VmProcessGone,
    VmRestarted,
    VmRestartFailed,
    VmState,
    VmStatusTimedOut,
)
from haguard.errors import QmpError, QmpTimeout
from haguard.guest.build import XP_COMMAND, build_guest, parse_status
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition
from haguard.vm.monitor import LeanQmp
from tests.helpers.tasks import cancel_all

INTERVAL_S = 0.2
HUNG_MS = 1000


@pytest.fixture(scope="module")
def kernel() -> Path:
    return build_guest()


@pytest.fixture
def base() -> Iterator[Path]:
    """A private run dir (short: socket paths are limited to 108 bytes); every QEMU started
    in it is killed afterwards, SIGCONT first in case a test stopped it."""
    d = Path(tempfile.mkdtemp(prefix="hg-vw-"))
    try:
        yield d
    finally:
        for inst in d.glob("*@*"):
            if pid := live_pid(InstancePaths(inst)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm(kernel: Path) -> VmDefinition:
    return VmDefinition(name="t1", memory_mib=64, machine="pc-i440fx-7.2", firmware="qboot",
                        kernel=kernel, append="mib=8 rate=0")


@dataclass
class Agent:
    """The agent's loop in miniature: facts in, core stepped and ticked, restarts executed."""

    vm: VmDefinition
    base: Path
    core: VmHealth
    queue: asyncio.Queue[VmInput] = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    outputs: list[VmOutput] = field(default_factory=list)
    facts: list[VmInput] = field(default_factory=list)

    async def drive(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                outs: list[VmOutput] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        fact = await self.queue.get()
                        self.facts.append(fact)
                        outs += self.core.step(fact)
                outs += self.core.tick(monotonic_ms())
                for o in outs:
                    self.outputs.append(o)
                    if isinstance(o, RestartVmInPlace):
                        tg.create_task(self._restart(o))

    async def _restart(self, cmd: RestartVmInPlace) -> None:
        await self.queue.put(await restart_in_place(self.vm, self.base, kill_existing=cmd.kill_existing))

    def restarts(self) -> list[RestartVmInPlace]:
        return [o for o in self.outputs if isinstance(o, RestartVmInPlace)]

    async def wait_state(self, state: VmState, timeout_s: float) -> float:
        t0 = time.monotonic()
        while self.core.state(self.vm.name) is not state:
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"not {state} within {timeout_s} s: {self.core.snapshot()}")
            await asyncio.sleep(0.02)
        return time.monotonic() - t0


@contextlib.asynccontextmanager
async def agent_for(vm: VmDefinition, base: Path, *, owned: bool = True, max_restarts: int = 3,
                    start_watcher: bool = True, interval_s: float = INTERVAL_S,
                    hung_ms: int = HUNG_MS) -> AsyncIterator[Agent]:
    core = VmHealth(VmHealthPolicy(max_restarts=max_restarts, window_ms=60_000, hung_timeout_ms=hung_ms))
    core.step(VmExpected(vm=vm.name, should_run=owned))
    agent = Agent(vm, base, core)
    facts: asyncio.Queue[VmFact] = agent.queue  # type: ignore[assignment]
    watcher = VmWatcher(vm.name, base, facts, interval_s=interval_s, reply_timeout_s=0.3)
    tasks = [asyncio.create_task(agent.drive())]
    if start_watcher:
        tasks.append(asyncio.create_task(watcher.run()))
    try:
        yield agent
    finally:
        await cancel_all(tasks)


async def guest_alive(paths: InstancePaths, timeout_s: float = 5.0) -> bool:
    """The test guest's status block says it booted and runs (read on the control monitor)."""
    deadline = time.monotonic() + timeout_s
    async with Qmp.session(paths.qmp, timeout_s=2.0) as qmp:
        while time.monotonic() < deadline:
            out = await qmp.cmd("human-monitor-command", {"command-line": XP_COMMAND})
            if parse_status(out).alive:
                return True
            await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(20)
async def test_running_then_paused_and_resumed_over_qmp(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    async with agent_for(vm, base) as agent:
        await agent.wait_state(VmState.RUNNING, 3)
        async with Qmp.session(inst.paths.qmp) as ctl:
            await ctl.cmd("stop")
            await agent.wait_state(VmState.PAUSED, 2)
            await ctl.cmd("cont")
            await agent.wait_state(VmState.RUNNING, 2)
    assert not agent.restarts()
    assert any(getattr(f, "event", None) == "STOP" for f in agent.facts)


@pytest.mark.timeout(20)
async def test_sigstop_is_hung_not_restarted_then_sigcont_runs(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    async with agent_for(vm, base) as agent:
        await agent.wait_state(VmState.RUNNING, 3)
        os.kill(inst.pid, signal.SIGSTOP)
        try:
            took = await agent.wait_state(VmState.HUNG, 3)
            assert took <= HUNG_MS / 1000 + 0.3  # the last reply came before the stop
            await asyncio.sleep(1.0)  # long enough for a wrong restart to show
            assert agent.core.state(vm.name) is VmState.HUNG
            assert not agent.restarts() and not any(isinstance(o, ReportVmForRelocation)
                                                    for o in agent.outputs)
            assert launcher.current_paths(vm.name, base) == inst.paths
        finally:
            os.kill(inst.pid, signal.SIGCONT)
        await agent.wait_state(VmState.RUNNING, 3)
    assert live_pid(inst.paths) == inst.pid


@pytest.mark.timeout(20)
async def test_hung_at_connect_is_a_timeout_not_an_error(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    os.kill(inst.pid, signal.SIGSTOP)
    try:
        async with agent_for(vm, base) as agent:
            await agent.wait_state(VmState.HUNG, 3)
            assert isinstance(agent.facts[0], VmStatusTimedOut)
            assert not agent.restarts()
    finally:
        os.kill(inst.pid, signal.SIGCONT)


@pytest.mark.timeout(30)
async def test_kill9_is_restarted_in_place_and_boots(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    async with agent_for(vm, base, max_restarts=1) as agent:
        await agent.wait_state(VmState.RUNNING, 3)
        os.kill(inst.pid, signal.SIGKILL)  # no waiting: the executor may meet an unreaped zombie
        await agent.wait_state(VmState.CRASHED, 3)
        await agent.wait_state(VmState.RUNNING, 10)
        assert [r.attempt for r in agent.restarts()] == [1]
        assert any(isinstance(f, VmRestarted) for f in agent.facts)
        new = launcher.current_paths(vm.name, base)
        assert new != inst.paths and not inst.paths.dir.exists()
        new_pid = live_pid(new)
        assert new_pid is not None and new_pid != inst.pid
        assert await guest_alive(new)

        # The budget (1 in the window) is spent: the next crash is reported, not restarted.
        launcher.kill(new)
        await agent.wait_state(VmState.CRASHED, 3)
        deadline = time.monotonic() + 3
        while not any(isinstance(o, ReportVmForRelocation) for o in agent.outputs):
            assert time.monotonic() < deadline, agent.outputs
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * INTERVAL_S)
        assert len(agent.restarts()) == 1
        assert live_pid(launcher.current_paths(vm.name, base)) is None


@pytest.mark.timeout(20)
async def test_crash_of_a_vm_not_owned_here_is_not_restarted(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    async with agent_for(vm, base, owned=False) as agent:
        await agent.wait_state(VmState.RUNNING, 3)
        launcher.kill(inst.paths)
        await agent.wait_state(VmState.STOPPED, 3)
        await asyncio.sleep(3 * INTERVAL_S)
        assert not agent.restarts()
    assert live_pid(launcher.current_paths(vm.name, base)) is None


@pytest.mark.timeout(20)
async def test_restart_in_place_never_doubles_a_live_vm(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    result = await restart_in_place(vm, base)
    assert isinstance(result, VmRestartFailed)
    assert f"pid {inst.pid}" in result.reason
    assert launcher.current_paths(vm.name, base) == inst.paths
    assert sorted(p.name for p in base.glob("t1@*")) == [inst.paths.dir.name]

    # Told to replace it (a panicked guest), it stops the old QEMU first.
    result = await restart_in_place(vm, base, kill_existing=True)
    assert isinstance(result, VmRestarted), result
    new = launcher.current_paths(vm.name, base)
    assert new != inst.paths and live_pid(inst.paths) is None
    assert await guest_alive(new)


@pytest.mark.timeout(5)
def test_health_policy_from_the_cluster_config() -> None:
    p = health_policy(VmRestartPolicy(max_restarts=2, window_s=90.5, hung_timeout_ms=1500))
    assert (p.max_restarts, p.window_ms, p.hung_timeout_ms, p.restart_on_panic) == (2, 90_500, 1500, True)


@pytest.mark.timeout(20)
async def test_a_crash_is_seen_when_the_monitor_closes_not_at_the_next_poll(
        vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    # Polls 10 s apart: only the monitor's end can tell the watcher this early.
    async with agent_for(vm, base, max_restarts=0, interval_s=10.0, hung_ms=30_000) as agent:
        await agent.wait_state(VmState.RUNNING, 3)
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        os.kill(inst.pid, signal.SIGKILL)
        await agent.wait_state(VmState.CRASHED, 3)
        took = time.monotonic() - killed
        assert took < 1.0, f"crash seen after {took:.2f} s"
        gone = [f for f in agent.facts if isinstance(f, VmProcessGone)]
        assert gone and "monitor closed" in gone[0].reason
        assert not agent.restarts()


@pytest.mark.timeout(20)
async def test_lean_qmp_drops_a_late_reply_and_reports_the_end(vm: VmDefinition, base: Path) -> None:
    inst = launcher.start(vm, base)
    events: list[dict[str, object]] = []
    qmp = LeanQmp(inst.paths.watch, timeout_s=2.0, on_event=events.append)
    await qmp.connect()
    try:
        assert (await qmp.cmd("query-status"))["status"] == "running"
        os.kill(inst.pid, signal.SIGSTOP)
        try:
            with pytest.raises(QmpTimeout):
                await qmp.cmd("query-name", timeout_s=0.3)
        finally:
            os.kill(inst.pid, signal.SIGCONT)
        # query-name's late reply arrives first and must not pass for query-status's.
        assert (await qmp.cmd("query-status"))["status"] == "running"
        async with Qmp.session(inst.paths.qmp) as ctl:
            await ctl.cmd("stop")
            deadline = time.monotonic() + 2
            while not any(e.get("event") == "STOP" for e in events):
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.02)
        assert not qmp.closed.done()
        os.kill(inst.pid, signal.SIGKILL)
        async with asyncio.timeout(2):
            await qmp.closed
        with pytest.raises(QmpError):
            await qmp.cmd("query-status")
    finally:
        qmp.close()


@pytest.mark.timeout(10)
async def test_lean_qmp_closes_on_a_broken_monitor() -> None:
    """A monitor that sends something other than JSON lines (no QEMU does this: a socket
    server stands in for one) ends the session instead of confusing it."""
    d = Path(tempfile.mkdtemp(prefix="hg-lq-"))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        await reader.readline()
        writer.write(b'{"return": {}, "id": 1}\r\n')
        await reader.readline()
        writer.write(b"<html>not a monitor</html>\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(d / "m.sock"))
    try:
        qmp = LeanQmp(d / "m.sock", timeout_s=2.0)
        await qmp.connect()
        with pytest.raises(QmpError, match="connection lost"):
            await qmp.cmd("query-status")
        assert qmp.closed.done()
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(5)
def test_every_watcher_polls_on_the_same_grid() -> None:
    for interval in (0.2, 1.5, 2.0):
        for now in (0.0, 0.01, 7.31, 1234.5678, 98765.4321):
            delay = poll_delay_s(now, interval)
            assert 0 < delay <= interval
            phase = (now + delay) % interval
            assert min(phase, interval - phase) < 1e-6
