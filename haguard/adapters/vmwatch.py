"""Watch one local VM over its watch monitor; restart a crashed VM in place.

`VmWatcher.run()` keeps one QMP session on the watch socket (migrations hold the
control one), sends `query-status` every interval with a deadline and listens to
QEMU's events.  What it sees goes to the caller's callback or bounded queue as
core facts (haguard/core/vmhealth.py): `VmStatusReplied`, `VmStatusTimedOut`,
`VmEventSeen`, `VmProcessGone`.  It follows the VM's link, so a QEMU restarted in
place or migrated in is picked up at the next poll.

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

from qemu.qmp import EventListener

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


class VmWatcher:
    def __init__(self, vm: str, base: Path, sink: FactSink, *, interval_s: float = 1.0,
                 reply_timeout_s: float = 1.0, clock: Clock = monotonic_ms,
                 session_max_s: float = 3600.0) -> None:
        self.vm = vm
        self.base = base
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.clock = clock
        # qemu.qmp's default listener keeps every event of a session: start a fresh one now and then.
        self.session_max_s = session_max_s
        self._emit: Callable[[VmFact], Awaitable[None]] = _emitter(sink)

    async def run(self) -> None:
        """Watch until cancelled."""
        while True:
            if not await self._round():
                await asyncio.sleep(self.interval_s)

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
        qmp = Qmp(paths.watch, timeout_s=self.reply_timeout_s)
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
        try:
            with qmp.listener(WATCHED_EVENTS) as listener:
                pump = asyncio.create_task(self._pump_events(listener), name=f"vmwatch-events-{self.vm}")
                try:
                    return await self._poll(qmp, paths, pid)
                finally:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
        finally:
            await qmp.close()

    async def _poll(self, qmp: Qmp, paths: InstancePaths, pid: int) -> bool:
        opened = time.monotonic()
        while True:
            started = time.monotonic()
            seen_ms = self.clock()
            if launcher.current_paths(self.vm, self.base) != paths:
                return True
            if not _alive(pid):
                await self._emit(VmProcessGone(vm=self.vm, now_ms=seen_ms,
                                               reason=f"QEMU process {pid} gone"))
                return False
            try:
                reply = await qmp.cmd("query-status", timeout_s=self.reply_timeout_s)
                status = reply["status"]
                if not isinstance(status, str):
                    raise TypeError(status)
            except QmpTimeout:
                await self._emit(VmStatusTimedOut(vm=self.vm, now_ms=self.clock()))
            except QmpError as exc:
                log.debug("VM %s: %s", self.vm, exc)
                return False  # connection lost: the next round says why
            except (TypeError, KeyError) as exc:
                log.warning("VM %s: malformed query-status reply (%r), reconnecting", self.vm, exc)
                return False
            else:
                await self._emit(VmStatusReplied(vm=self.vm, now_ms=self.clock(), status=status))
            if time.monotonic() - opened >= self.session_max_s:
                return True
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _pump_events(self, listener: EventListener) -> None:
        async for ev in listener:
            name = str(ev.get("event", ""))
            data = ev.get("data") or {}
            detail = ""
            if isinstance(data, dict):
                detail = str(data.get("reason") or data.get("action") or "")
            await self._emit(VmEventSeen(vm=self.vm, now_ms=self.clock(), event=name, detail=detail))


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
