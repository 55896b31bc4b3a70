"""Watch one local VM over its watch monitor; restart a crashed VM in place.

`VmWatcher.run()` keeps one QMP session on the watch socket (migrations hold the
control one), sends `query-status` every interval with a deadline and listens to
QEMU's events.  What it sees goes to the caller's callback or bounded queue as
core facts (haguard/core/vmhealth.py): `VmStatusReplied`, `VmStatusTimedOut`,
`VmEventSeen`, `VmProcessGone`.  It follows the VM's link, so a QEMU restarted in
place or migrated in is picked up at the next poll.

Cost: the session is `LeanQmp` (haguard/vm/monitor.py: one write and one read per poll,
no tasks), and every watcher polls on the same time grid (`poll_delay_s`), so a hundred
VMs wake the agent once per interval instead of a hundred times.  A crash is seen when
the monitor's connection ends (QEMU's sockets close as it exits), not at the next poll:
the poll is only the hung check, so its interval follows the hung timeout alone.

A SIGSTOPped QEMU still accepts connections at the kernel level but never greets:
the connect deadline turns that into `VmStatusTimedOut` (hung), never an error.

`restart_in_place()` is the executor of `RestartVmInPlace`: it never starts a VM
whose QEMU is alive, unless told to replace it (a panicked guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.config.cluster import VmRestartPolicy
from haguard.core.vmhealth import (
    VmEventSeen,
    VmFact,
    VmHealthPolicy,
    VmProcessGone,
    VmRestarted,
    VmRestartFailed,
    VmStatusReplied,
    VmStatusTimedOut,
)
from haguard.errors import HaguardError, QmpError, QmpTimeout
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition
from haguard.vm.monitor import LeanQmp

log = logging.getLogger(__name__)

WATCHED_EVENTS = ("SHUTDOWN", "STOP", "RESUME", "GUEST_PANICKED", "RESET")

Clock = Callable[[], int]
FactSink = Callable[[VmFact], None] | asyncio.Queue[VmFact]


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def health_policy(cfg: VmRestartPolicy, *, restart_on_panic: bool = True) -> VmHealthPolicy:
    return VmHealthPolicy(max_restarts=cfg.max_restarts, window_ms=round(cfg.window_s * 1000),
                          hung_timeout_ms=cfg.hung_timeout_ms, restart_on_panic=restart_on_panic)


def live_pid(paths: InstancePaths) -> int | None:
    """The instance's QEMU pid if that process is alive (a zombie is dead: nobody may have
    reaped a daemonized QEMU yet)."""
    pid = launcher.read_pid(paths)
    if pid is None:
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()  # the state follows the command name
    return bool(fields) and fields[0] not in ("Z", "X")


def poll_delay_s(now_s: float, interval_s: float) -> float:
    """Seconds until the next multiple of `interval_s` on the loop's clock.  Every watcher
    polls on that same grid, so the agent wakes once per interval for all its VMs: on a
    VM host (this test machine is one) each wake-up costs more than the poll itself."""
    return interval_s - now_s % interval_s


class VmWatcher:
    def __init__(self, vm: str, base: Path, sink: FactSink, *, interval_s: float = 1.0,
                 reply_timeout_s: float = 1.0, clock: Clock = monotonic_ms,
                 exit_grace_s: float = 1.0) -> None:
        self.vm = vm
        self.base = base
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.clock = clock
        # After the monitor closed, how long QEMU may take to exit before it is asked again.
        self.exit_grace_s = exit_grace_s
        self._link = base / vm
        self._emit: Callable[[VmFact], Awaitable[None]] = _emitter(sink)

    async def run(self) -> None:
        """Watch until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            if not await self._round():
                await asyncio.sleep(poll_delay_s(loop.time(), self.interval_s))

    async def _round(self) -> bool:
        """One connect-and-watch attempt; True when the VM's link moved (look again now)."""
        seen_ms = self.clock()  # before reading the link: see VmRestarted's contract
        paths = launcher.current_paths(self.vm, self.base)
        pid = live_pid(paths)
        if pid is None:
            await self._emit(VmProcessGone(vm=self.vm, now_ms=seen_ms, reason="QEMU process gone"))
            return False
        if not paths.watch.exists():
            await self._emit(VmProcessGone(vm=self.vm, now_ms=seen_ms,
                                           reason=f"watch socket {paths.watch} gone"))
            return False
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") in WATCHED_EVENTS:
                events.put_nowait(ev)
        qmp = LeanQmp(paths.watch, timeout_s=self.reply_timeout_s, on_event=on_event)
        try:
            await qmp.connect()
        except QmpError as exc:
            # No greeting in time (hung, or someone else holds the monitor) or refused while
            # the pid lives: no reply.  Refused because it just died: gone.
            if not isinstance(exc, QmpTimeout) and live_pid(paths) is None:
                await self._emit(VmProcessGone(vm=self.vm, now_ms=self.clock(),
                                               reason="QEMU process gone"))
            else:
                log.debug("VM %s: %s", self.vm, exc)
                await self._emit(VmStatusTimedOut(vm=self.vm, now_ms=self.clock()))
            return False
        pump = asyncio.create_task(self._pump_events(events), name=f"vmwatch-events-{self.vm}")
        try:
            moved = await self._poll(qmp, paths)
        finally:
            qmp.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        while not events.empty():   # what QEMU said before it closed the monitor
            await self._emit(self._event_fact(events.get_nowait()))
        if moved is None:
            return await self._monitor_closed(pid)
        return moved

    async def _poll(self, qmp: LeanQmp, paths: InstancePaths) -> bool | None:
        """Poll until the link moves (True), a malformed reply (False) or the monitor
        closes (None)."""
        loop = asyncio.get_running_loop()
        link = self._read_link()
        if link is None or self.base / link != paths.dir:
            return True
        while True:
            if self._read_link() != link:
                return True
            try:
                reply = await qmp.cmd("query-status")
                status = reply["status"]
                if not isinstance(status, str):
                    raise TypeError(status)
            except QmpTimeout:
                await self._emit(VmStatusTimedOut(vm=self.vm, now_ms=self.clock()))
            except QmpError as exc:
                log.debug("VM %s: %s", self.vm, exc)
                return None
            except (TypeError, KeyError) as exc:
                log.warning("VM %s: malformed query-status reply (%r), reconnecting", self.vm, exc)
                return False
            else:
                await self._emit(VmStatusReplied(vm=self.vm, now_ms=self.clock(), status=status))
            # The monitor's end wakes this at once: a crash is seen without waiting for a poll.
            await qmp.idle_until(loop.time() + poll_delay_s(loop.time(), self.interval_s))
            if qmp.closed.done():
                return None

    def _read_link(self) -> str | None:
        try:
            return os.readlink(self._link)
        except OSError:
            return None

    async def _monitor_closed(self, pid: int) -> bool:
        """The monitor closed: QEMU exited (or is exiting).  Report it gone as soon as the
        process is; if it still lives after the grace, look again (False: at the next poll)."""
        deadline = time.monotonic() + self.exit_grace_s
        while _alive(pid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        await self._emit(VmProcessGone(vm=self.vm, now_ms=self.clock(),
                                       reason=f"QEMU process {pid} gone (its monitor closed)"))
        return False

    async def _pump_events(self, events: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            await self._emit(self._event_fact(await events.get()))

    def _event_fact(self, ev: dict[str, Any]) -> VmEventSeen:
        name = str(ev.get("event", ""))
        data = ev.get("data") or {}
        detail = ""
        if isinstance(data, dict):
            detail = str(data.get("reason") or data.get("action") or "")
        return VmEventSeen(vm=self.vm, now_ms=self.clock(), event=name, detail=detail)


def _emitter(sink: FactSink) -> Callable[[VmFact], Awaitable[None]]:
    if isinstance(sink, asyncio.Queue):
        queue = sink

        async def put(fact: VmFact) -> None:
            await queue.put(fact)  # bounded by the caller: a slow consumer slows the watcher
        return put

    callback = sink

    async def call(fact: VmFact) -> None:
        callback(fact)
    return call


# ---- the restart executor ---------------------------------------------------------------

async def restart_in_place(vm: VmDefinition, base: Path, *, kill_existing: bool = False,
                           clock: Clock = monotonic_ms) -> VmRestarted | VmRestartFailed:
    """Start `vm` again on this host.  A live QEMU for it is never doubled: without
    `kill_existing` that is a failure; with it (a panicked guest) the old QEMU is
    stopped first.  The result is the core's input for this restart."""
    paths = launcher.current_paths(vm.name, base)
    try:
        if (pid := live_pid(paths)) is not None:
            if not kill_existing:
                return VmRestartFailed(vm=vm.name, now_ms=clock(),
                                       reason=f"QEMU still runs (pid {pid}): not starting a second copy")
            if not await _stop_instance(paths, pid):
                return VmRestartFailed(vm=vm.name, now_ms=clock(),
                                       reason=f"old QEMU (pid {pid}) did not stop")
        await _discard_dead_instance(paths)
        await asyncio.to_thread(launcher.start, vm, base)
    except HaguardError as exc:
        return VmRestartFailed(vm=vm.name, now_ms=clock(), reason=str(exc))
    except OSError as exc:
        return VmRestartFailed(vm=vm.name, now_ms=clock(), reason=f"restart failed: {exc}")
    return VmRestarted(vm=vm.name, now_ms=clock())


async def _stop_instance(paths: InstancePaths, pid: int) -> bool:
    """`quit`, then SIGKILL; True once the process is dead (zombies count as dead)."""
    with contextlib.suppress(HaguardError, OSError):
        async with Qmp.session(paths.qmp, timeout_s=2.0) as qmp:
            await qmp.cmd("quit")
    if await _wait_dead(pid, 5.0):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return await _wait_dead(pid, 5.0)


async def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _discard_dead_instance(paths: InstancePaths) -> None:
    """Remove a dead instance's files so that the launcher sees no QEMU there: a stale
    pidfile may still name an unreaped zombie, which the launcher takes for a live VM."""
    if live_pid(paths) is not None:
        raise HaguardError(f"{paths.dir} still holds a live QEMU")
    paths.pidfile.unlink(missing_ok=True)
    await launcher.stop(paths)  # no live pid: only removes the directory and the VM's link
