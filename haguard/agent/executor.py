"""Executes the cluster core's outputs on this host, and serves the destination side of moves.

Runs inside the agent's core task (never concurrently with itself); the decisions are
the host core's (haguard/core/host.py), this module only does what they say:

    PersistState   written to state_dir (fsync, rename) in a thread (`persist`, awaited by the
                   core task) before anything after it
    Send           a signed "cluster" broadcast or a "direct" message to one host's inbox
    StartVm/StopVm/KillVm/MigrateVm/FenceHost   a task each; its result comes back
                   through the agent's queue as `CommandFinished`
    PetWatchdog/StopPettingWatchdog             the watchdog device, if configured
    RaiseAlert     the alert pipeline (journal, MQTT, webhooks)

What it learns while doing so goes back into the queue as facts (a QEMU's state after a
start or asked before a stop, a stop that began).  A command the core repeats while an
earlier one for the same VM still runs joins that one (a long migration outlives the
core's command expiry); both get its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from haguard.adapters import metrics
from haguard.adapters.fence import fence
from haguard.adapters.watchdog import Watchdog, WatchdogError
from haguard.agent.derive import watchdog_armed_here
from haguard.agent.durable import write_durably
from haguard.agent.migrate_rpc import PREPARE_TIMEOUT_S, DestinationServer, RemoteQmp, RpcClient, RpcError
from haguard.config.cluster import ClusterConfig
from haguard.core.alerts import Alert, AlertKind, RaiseAlert, alert_of, coordinator_alert, make_alert
from haguard.core.cluster import codec
from haguard.core.cluster.state import ClusterState
from haguard.core.cluster.types import (
    INCOMING_UNWANTED,
    MOVED_AWAY,
    CommandFinished,
    FenceHost,
    KillVm,
    MigrateVm,
    PersistedState,
    PersistState,
    PetWatchdog,
    PlacementDecided,
    Send,
    StartVm,
    StopPettingWatchdog,
    StopVm,
    WatchdogConfirmed,
)
from haguard.core.host_types import QemuStateObserved, VmStopBegan
from haguard.errors import ConfigError, HaguardError
from haguard.migration.engine import run_migration
from haguard.migration.options import MigrationOptions
from haguard.migration.result import Progress
from haguard.migration.uri import MigrationUri
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition

log = structlog.get_logger("haguard.cluster")

STATE_FILE = "cluster-state.json"
Offer = Callable[[Any], None]
Publish = Callable[..., bool]
AlertSink = Callable[[Alert], None]
ClusterOutputs = (PersistState | Send | StartVm | StopVm | KillVm | MigrateVm | FenceHost | PetWatchdog
                  | StopPettingWatchdog | PlacementDecided | RaiseAlert)


# ---- persistence --------------------------------------------------------------------------

def load_persisted(path: Path) -> PersistedState | None:
    """The votes and states saved before; a damaged file stops the agent (a forgotten vote
    could elect two coordinators in one term)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the saved cluster state: {exc}; move it away only if this "
                          "host's agent has been stopped for longer than the lease", file=str(path)) from None
    try:
        term, voted_for = data["term"], data["voted_for"]
        if not isinstance(term, int) or not (voted_for is None or isinstance(voted_for, str)):
            raise codec.CodecError("term/voted_for")
        return PersistedState(term=term, voted_for=voted_for,
                              accepted=codec.load(ClusterState, data["accepted"], "accepted"),
                              committed=codec.load(ClusterState, data["committed"], "committed"))
    except (KeyError, TypeError, codec.CodecError) as exc:
        raise ConfigError(f"the saved cluster state is malformed ({exc})", file=str(path)) from None


def save_persisted(path: Path, out: PersistState) -> None:
    data = {"term": out.term, "voted_for": out.voted_for, "accepted": codec.dump(out.accepted),
            "committed": codec.dump(out.committed), "saved_at": time.time()}
    write_durably(path, json.dumps(data, separators=(",", ":")))


# ---- the runtime --------------------------------------------------------------------------

@dataclass
class _Running:
    """A command's task, and every command id waiting for its result."""

    task: asyncio.Task[None] | None = None
    ids: list[str] = field(default_factory=list)
    progress: Progress | None = None
    target: str = ""


class ClusterExecutor:
    def __init__(self, cfg: ClusterConfig, vms: dict[str, VmDefinition], *, publish: Publish, offer: Offer,
                 alert: AlertSink, clock: Callable[[], int], rescan: Callable[[], None],
                 may_receive: Callable[[str, str, int], str | None],
                 nothing_here: Callable[[], bool]) -> None:
        self.cfg, self.vms = cfg, vms
        self.me = cfg.this_host().name
        self.publish, self.offer, self.alert, self.clock, self.rescan = publish, offer, alert, clock, rescan
        self.nothing_here = nothing_here
        self.state_file = cfg.state_dir / STATE_FILE
        self.watchdog: Watchdog | None = None
        if cfg.ha.watchdog is not None and watchdog_armed_here(cfg):
            self.watchdog = Watchdog(cfg.ha.watchdog.device, timeout_s=cfg.ha.watchdog.timeout_s)
        self.running: dict[str, _Running] = {}      # vm or "fence:HOST" -> its command's task
        self.rpc = RpcClient(self.me, lambda to, body: self.publish("direct", body, to=to))
        self.server = DestinationServer(
            me=self.me, address=cfg.this_host().address, base=cfg.run_dir, vms=lambda: self.vms,
            authorise=lambda vm, sender, generation: may_receive(vm, sender, generation),
            reply=lambda to, body: self.publish("direct", body, to=to), started=self._incoming_started,
            tls_dir=cfg.ha.migration_tls_dir)
        self._watchdog_failing = False
        self._closed = False

    def tick(self) -> None:
        for sid in self.server.stale():         # a move given up: let go of its monitor
            self._spawn(f"close-{sid}", self.server.close_session(sid))

    def on_rpc(self, sender: str, body: dict[str, Any]) -> None:
        """A migration request or reply (they bypass the core: a live move makes a dozen of these
        round trips, and they neither feed nor change it)."""
        if body.get("rpc") == "request":
            self._spawn(f"rpc-{body.get('id')}", self.server.handle(sender, body))
        else:
            self.rpc.on_reply(sender, body)

    def _observed(self, vm: str, status: str | None) -> None:
        self.offer(QemuStateObserved(vm=vm, status=status, now_ms=self.clock()))

    def _stop_began(self, vm: str) -> None:
        self.offer(VmStopBegan(vm=vm, now_ms=self.clock()))

    # ---- outputs --------------------------------------------------------------------------

    def execute(self, out: ClusterOutputs) -> None:
        match out:
            case PersistState():
                raise TypeError("PersistState goes through persist(): awaited before what follows")
            case Send(message=message):
                body = {"msg": codec.to_data(message)}
                if message.to is None:
                    self.publish("cluster", body)
                else:
                    self.publish("direct", body, to=message.to)
            case StartVm():
                self._command(out.vm, out.id, partial(self._start, out))
            case StopVm():
                self._command(out.vm, out.id, partial(self._stop, out.vm, out.reason))
            case KillVm():
                self._command(out.vm, out.id, partial(self._kill, out))
            case MigrateVm():
                self._command(out.vm, out.id, partial(self._migrate, out), target=out.target)
            case FenceHost():
                self._command(f"fence:{out.host}", out.id, partial(self._fence, out))
            case PetWatchdog():
                self._pet()
            case StopPettingWatchdog():
                log.critical("watchdog-stop-petting", reason=out.reason)
                if self.watchdog is not None:
                    self.watchdog.stop_petting(out.reason)
            case PlacementDecided():
                # Why this host and why not the others, for every choice the coordinator makes.
                level = log.info if out.host is not None else log.warning
                level("placement", vm=out.vm, chosen=out.host, kind=out.kind, reasons=out.reasons)
            case RaiseAlert():
                if out.kind not in ("quorum-lost", "recovery-done"):
                    log.error("cluster-alert", kind=out.kind, reason=out.reason, about=out.host or self.me)
                alert = alert_of(out, me=self.me)
                if alert is not None:
                    self.alert(alert)

    def _alert(self, kind: str, reason: str, *, host: str = "", vm: str = "") -> None:
        """An alert of a known kind into the pipeline (other kinds are only logged)."""
        alert = coordinator_alert(kind, reason, host=host or self.me, vm=vm)
        if alert is not None:
            self.alert(alert)

    def _command(self, key: str, cid: str, factory: Callable[[], Awaitable[tuple[bool, str]]],
                 target: str = "") -> None:
        running = self.running.get(key)
        if running is not None and running.task is not None and not running.task.done():
            if running.target == target:
                running.ids.append(cid)         # the same work is under way: share its result
                return
            # Another move of this VM is still finishing (its target was fenced, say): the new
            # one starts once it has ended, never beside it.
            after: asyncio.Task[None] | None = running.task
        else:
            after = None
        entry = _Running(ids=[cid], target=target)
        entry.task = asyncio.create_task(self._run(key, entry, factory, after), name=f"cluster-{key}")
        self.running[key] = entry

    async def _run(self, key: str, entry: _Running, factory: Callable[[], Awaitable[tuple[bool, str]]],
                   after: asyncio.Task[None] | None) -> None:
        if after is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(after)
        try:
            ok, reason = await factory()
        except HaguardError as exc:
            ok, reason = False, str(exc)
        except Exception as exc:                # a bug: report the command failed, keep the agent
            log.exception("cluster-command-crashed", key=key)
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if self.running.get(key) is entry:
            del self.running[key]
        for cid in entry.ids:
            self.offer(CommandFinished(id=cid, ok=ok, now_ms=self.clock(), reason=reason))

    def _spawn(self, name: str, coro: Any) -> None:
        key = f"side:{name}"
        self.running[key] = _Running(task=asyncio.create_task(self._side(key, coro), name=name))

    async def _side(self, key: str, coro: Any) -> None:
        try:
            await coro
        except Exception:
            log.exception("cluster-task-crashed", task=key)
        finally:
            self.running.pop(key, None)

    # ---- commands -------------------------------------------------------------------------

    async def _start(self, cmd: StartVm) -> tuple[bool, str]:
        vm = self.vms.get(cmd.vm)
        if vm is None:
            return False, f"VM {cmd.vm} is not in this host's inventory"
        log.info("vm-start", vm=cmd.vm, generation=cmd.generation, term=cmd.term)
        instance = await asyncio.to_thread(launcher.start, vm, self.cfg.run_dir)
        self._observed(cmd.vm, "running")
        self.rescan()
        log.info("vm-started", vm=cmd.vm, pid=instance.pid, generation=cmd.generation)
        return True, ""

    async def _live_status(self, paths: InstancePaths) -> str | None:
        """The QEMU's run state asked now (the watchers' view may be a poll old); None: no answer."""
        try:
            return await launcher.query_status(paths, timeout_s=2.0)
        except (HaguardError, OSError):
            return None

    async def _stop(self, vm: str, reason: str) -> tuple[bool, str]:
        paths = launcher.current_paths(vm, self.cfg.run_dir)
        moving = reason == MOVED_AWAY
        if moving:
            status = await self._live_status(paths)
            if status is not None and status not in ("postmigrate", "inmigrate", "shutdown"):
                self._observed(vm, status)
                log.warning("vm-stop-skipped", vm=vm, reason=reason, status=status)
                return False, f"QEMU is {status}: not stopped"
        graceful = 0.0 if moving else self.cfg.ha.shutdown_grace_s
        log.info("vm-stop", vm=vm, reason=reason)
        self._stop_began(vm)
        await launcher.stop(paths, graceful_timeout_s=graceful)
        return True, ""

    async def _kill(self, cmd: KillVm) -> tuple[bool, str]:
        paths = launcher.current_paths(cmd.vm, self.cfg.run_dir)
        if cmd.reason == INCOMING_UNWANTED:
            # Decided on the state last reported: an incoming QEMU that has just taken over runs.
            status = await self._live_status(paths)
            if status != "inmigrate":
                if status is not None:
                    self._observed(cmd.vm, status)
                log.warning("vm-kill-skipped", vm=cmd.vm, reason=cmd.reason, status=status)
                return False, f"QEMU is {status or 'not answering'}, not inmigrate: not killed"
        log.warning("vm-kill", vm=cmd.vm, reason=cmd.reason)
        self._stop_began(cmd.vm)
        await asyncio.to_thread(launcher.kill, paths)
        await launcher.stop(paths)              # reaps it and removes its directory
        return True, ""

    async def _fence(self, cmd: FenceHost) -> tuple[bool, str]:
        """The host's fence devices in order (fencing levels) until one powers it off."""
        host = self.cfg.peer(cmd.host)
        if host is None or not host.fence_devices:
            return False, f"host {cmd.host} has no fence device"
        failed: list[str] = []
        for level, device in enumerate(host.fence_devices, 1):
            log.warning("fence", host=cmd.host, term=cmd.term, agent=device.agent, fence_level=level)
            result = await fence(device, "off", host=cmd.host, confirm_off=True)
            level_log = log.warning if result.ok else log.error
            level_log("fence-result", host=cmd.host, ok=result.ok, detail=result.detail, fence_level=level,
                      duration_s=round(result.duration_s, 3))
            metrics.record_fence("done" if result.ok else "failed")
            if result.ok:
                self.alert(make_alert(AlertKind.FENCING_DONE, host=cmd.host,
                                      summary=f"{cmd.host} fenced (powered off) by {self.me}",
                                      description=f"level {level}, {device.agent}: {result.detail}"))
                self.alert(make_alert(AlertKind.FENCING_FAILED, host=cmd.host, resolved=True,
                                      summary=f"fencing {cmd.host} succeeded", description=result.detail))
                return True, result.detail
            failed.append(f"level {level} ({device.agent}): {result.detail}")
        return False, "; ".join(failed)

    async def _migrate(self, cmd: MigrateVm) -> tuple[bool, str]:
        vm = self.vms.get(cmd.vm)
        if vm is None:
            return False, f"VM {cmd.vm} is not in this host's inventory"
        log.info("migration-start", vm=cmd.vm, target=cmd.target, generation=cmd.generation)
        try:
            ask = {"op": "prepare", "vm": cmd.vm, "generation": cmd.generation, "term": cmd.term}
            prep = await self.rpc.call(cmd.target, ask, timeout_s=PREPARE_TIMEOUT_S)
        except RpcError as exc:
            return False, str(exc)
        if prep.get("ok") is not True:
            why = (prep.get("error") or {}).get("desc", "refused") if isinstance(prep.get("error"), dict) \
                else "refused"
            log.warning("migration-refused", vm=cmd.vm, target=cmd.target, reason=why)
            return False, f"{cmd.target} refused: {why}"
        address, port, session = prep.get("address"), prep.get("port"), prep.get("session")
        if not isinstance(address, str) or not isinstance(port, int) or not isinstance(session, str):
            return False, f"{cmd.target} answered a malformed prepare"
        opts = MigrationOptions(uri=MigrationUri("tcp", host=address, port=port), vm_name=cmd.vm,
                                quit_source=False,   # the core stops the source once the move is committed
                                tls_dir=self.cfg.ha.migration_tls_dir, tls_hostname=address)
        src = launcher.current_paths(cmd.vm, self.cfg.run_dir)
        entry = self.running.get(cmd.vm)

        def progress(p: Progress) -> None:
            if entry is not None:
                entry.progress = p

        def engine_alert(kind: str, why: str) -> None:
            log.warning("migration-alert", vm=cmd.vm, kind=kind, reason=why)
            self._alert(kind, why, vm=cmd.vm)  # vm-lost, among others

        result = await run_migration(str(src.qmp), RemoteQmp(self.rpc, cmd.target, session), opts,
                                     on_progress=progress, on_alert=engine_alert)
        downtime = result.downtime_ms
        metrics.record_migration(result.status or "failed",
                                 duration_s=result.total_time_ms / 1000 if result.total_time_ms else None,
                                 downtime_s=downtime / 1000 if downtime is not None else None,
                                 transferred_bytes=result.transferred_bytes)
        level = log.info if result.ok else log.error
        level("migration-end", vm=cmd.vm, target=cmd.target, status=result.status, error=result.error,
              total_ms=result.total_time_ms, downtime_ms=result.downtime_ms)
        if not result.ok:
            self._alert("migration-failed", f"{cmd.vm} to {cmd.target}: {result.error}", vm=cmd.vm)
        return result.ok, result.error or ""

    # ---- the destination side ---------------------------------------------------------------

    def _incoming_started(self, vm: str) -> None:
        self._observed(vm, "inmigrate")
        self.rescan()

    # ---- watchdog -----------------------------------------------------------------------------

    def _pet(self) -> None:
        if self.watchdog is None or self._closed:
            return
        try:
            if not self.watchdog.is_open:
                self.watchdog.open()
                self._confirmed(self.watchdog.confirmed_timeout_s)
            self.watchdog.pet()
        except WatchdogError as exc:
            if not self._watchdog_failing:      # once per failure, not at every tick
                log.error("watchdog-failed", error=str(exc))
                self._confirmed(None, why=str(exc))
            self._watchdog_failing = True
        else:
            if self._watchdog_failing:
                log.info("watchdog-ok", device=str(self.watchdog.path))
            self._watchdog_failing = False

    def _confirmed(self, timeout_s: float | None, why: str = "") -> None:
        """Tell the core what the device will really wait (0: nothing confirmed), and the
        operator when that is not the configured timeout: a host without a fence device then
        takes no VMs, and its VMs are recovered only after the device's own timeout."""
        assert self.watchdog is not None
        configured = self.watchdog.configured_timeout_s
        confirmed_ms = int(timeout_s * 1000) if timeout_s else 0
        self.offer(WatchdogConfirmed(timeout_ms=confirmed_ms, now_ms=self.clock()))
        ok = timeout_s == configured
        if not ok:
            why = why or (f"{self.watchdog.path} confirms {timeout_s:g} s, configured {configured:g} s"
                          if timeout_s else f"{self.watchdog.path} does not confirm its timeout "
                          "(WDIOC_SETTIMEOUT/WDIOC_GETTIMEOUT unanswered)")
            log.error("watchdog-mismatch", device=str(self.watchdog.path), confirmed_s=timeout_s,
                      configured_s=configured, reason=why)
        state = "confirms its timeout" if ok else "unusable"
        self.alert(make_alert(AlertKind.WATCHDOG_FAILED, host=self.me, resolved=ok,
                              summary=f"{self.me}: watchdog {state}",
                              description=why or f"{self.watchdog.path}: {timeout_s:g} s confirmed"))

    # ---- views and shutdown -------------------------------------------------------------------

    def status(self, cluster: dict[str, Any]) -> None:
        """Adds what only the executor knows to the core's cluster status: moves' progress,
        fences under way, relayed commands refused, the watchdog device's real state and
        confirmed timeout."""
        for row in cluster.get("migrations", []):
            entry = self.running.get(row["vm"])
            if entry is not None and entry.progress is not None:
                p = entry.progress
                row.update(status=p.status, percent=round(p.percent, 1), step=p.step,
                           transferred_bytes=p.transferred_bytes)
        cluster["fencing"] = sorted(k.split(":", 1)[1] for k in self.running if k.startswith("fence:"))
        cluster["relay_refused"] = self.server.refused      # peers' commands this host refused
        # What the device really gets, not what the core asked for.
        wd = self.watchdog
        if wd is None:
            cluster["watchdog"] = "none"
        elif self._watchdog_failing:
            cluster["watchdog"] = "failed"
        elif not wd.is_open:
            cluster["watchdog"] = "closed"
        else:
            cluster["watchdog"] = "petting" if wd.petting else "stopped"
        cluster["watchdog_timeout_s"] = wd.confirmed_timeout_s if wd is not None else None

    async def persist(self, out: PersistState) -> None:
        """Votes and state on stable storage (fsync, rename) before anything after them."""
        await asyncio.to_thread(save_persisted, self.state_file, out)

    def watchdog_open(self) -> bool:
        return self.watchdog is not None and self.watchdog.is_open

    async def close(self, *, disarm: bool) -> None:
        """Agent going down: cancel the commands under way (a migration cancelled here is
        cancelled in QEMU by the engine before postcopy: the VM stays on the source); the
        watchdog gets the magic close when `disarm` (the cluster knows), else stays armed.
        Nothing opens it again afterwards (a pet still queued would re-arm it)."""
        self._closed = True
        tasks = [r.task for r in self.running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.close()
        if self.watchdog is not None and self.watchdog.is_open:
            if disarm:
                with contextlib.suppress(WatchdogError):
                    self.watchdog.disarm()
            else:
                log.critical("watchdog-left-armed", device=str(self.watchdog.path),
                             reason="the cluster could not be told; VMs run here",
                             reset_within_s=self.watchdog.confirmed_timeout_s)
