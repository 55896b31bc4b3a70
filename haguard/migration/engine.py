"""Run one live migration between two QEMU monitors.

    preflight -> configure both sides -> (mirror local disks) -> migrate-incoming
    -> migrate -> watch and converge by policy -> verify -> quit the source

Every failure before switchover leaves the source running and the destination
cleaned up.  Once postcopy has started neither side is ever stopped by haguard:
the guest's memory is split between them until the move completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.core.alerts import RaiseAlert
from haguard.core.strategy import (
    FINAL_STATES,
    Abort,
    Action,
    ConvergenceStrategy,
    GiveUpRecovery,
    MigrationSample,
    PausePostcopy,
    RecoverPostcopy,
    SetDowntimeLimit,
    StartPostcopy,
    StartThrottling,
)
from haguard.errors import HaguardError, MigrationError, PreflightError, QmpCommandError, QmpError
from haguard.migration import preflight, replies
from haguard.migration.features import QemuFeatures, detect
from haguard.migration.options import MigrationOptions
from haguard.migration.plan import Plan, apply_plan, make_plan
from haguard.migration.postcopy import PostcopyRecovery, event_times, guest_pause_ms
from haguard.migration.result import MigrationResult, Progress
from haguard.migration.storage import DiskMirror

log = logging.getLogger("haguard.migration")

ProgressFn = Callable[[Progress], None]
AlertFn = Callable[[str, str], None]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Migration:
    def __init__(self, source: Qmp, dest: Qmp | None, opts: MigrationOptions, *,
                 on_progress: ProgressFn | None = None, on_alert: AlertFn | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.dest, self.opts = source, dest, opts
        self.on_progress = on_progress or (lambda p: None)
        self.on_alert = on_alert or (lambda kind, msg: log.warning("%s: %s", kind, msg))
        self.clock = clock
        self._t0 = 0.0
        self._result = MigrationResult(status="failed", vm=opts.vm_name, uri=str(opts.uri))
        self._strategy: ConvergenceStrategy | None = None
        self._mirror: DiskMirror | None = None
        self._source_was: str = "running"
        self._step = "preflight"
        self._recovery: PostcopyRecovery | None = None
        self._completed = False  # QEMU said "completed": the destination may run the guest
        self._migrate_started = False
        self._src_commands: frozenset[str] = frozenset()
        self._last_moving: MigrationSample | None = None  # last sample before the final state
        # Run-state events, for the guest's real pause after a postcopy (see _finish).
        self._src_events: Any = None
        self._dst_events: Any = None

    # ---- public ---------------------------------------------------------------------

    async def run(self, cancel: asyncio.Event | None = None) -> MigrationResult:
        cancel = cancel or asyncio.Event()
        self._t0 = self.clock()
        res = self._result
        try:
            plan = await self._preflight()
            self._step = "configure"
            await apply_plan(plan, self.opts, self.source, self.dest)
            res.capabilities = plan.enabled
            if self.opts.local_disks:
                await self._start_storage(cancel)
            await self._start(plan)
            await self._watch(plan, cancel)
        except PreflightError as exc:
            res.status, res.error = "failed", str(exc)
        except (MigrationError, QmpError) as exc:
            res.status = "failed"
            res.error = res.error or str(exc)
            await self._after_failure()
        except asyncio.CancelledError:
            # Our caller gave up: never leave a half-started pre-copy behind.
            res.status, res.error = "cancelled", "interrupted"
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._cancel_and_clean())
            raise
        finally:
            res.total_time_ms = _ms(self.clock() - self._t0)
            if self._strategy:
                res.steps = [{"at_ms": s.at_ms, "action": type(s.action).__name__,
                              **{k: v for k, v in vars(s.action).items()}}
                             for s in self._strategy.steps]
        return res

    # ---- phases ---------------------------------------------------------------------

    async def _preflight(self) -> Plan:
        self._step = "preflight"
        self._source_was = await preflight.check_source(self.source)
        src_feats = await detect(self.source, compressions=self.opts.compression != "none")
        self._src_commands = src_feats.commands
        dst_feats: QemuFeatures | None = None
        ram_bytes = 0
        src_id = await preflight.vm_identity(self.source)
        ram_bytes = int(src_id["ram_bytes"])
        if self.dest:
            await preflight.check_destination(self.dest)
            dst_feats = await detect(self.dest, compressions=self.opts.compression != "none")
            preflight.compare_identity(src_id, await preflight.vm_identity(self.dest))
        plan = make_plan(self.opts, src_feats, dst_feats)
        self._strategy = ConvergenceStrategy(plan.policy, ram_bytes, _ms(self.clock() - self._t0))
        return plan

    async def _start_storage(self, cancel: asyncio.Event) -> None:
        if not self.dest or not self.opts.nbd_uri:
            raise PreflightError("local disks need a destination monitor and an NBD address")
        self._step = "copy disks"
        self._mirror = DiskMirror(self.source, self.dest, self.opts.local_disks, self.opts.nbd_uri)
        await self._mirror.start()

        def progress(done: int, total: int) -> None:
            self.on_progress(Progress(status="mirror", elapsed_ms=self._elapsed_ms(),
                                      transferred_bytes=done, total_bytes=total,
                                      remaining_bytes=total - done, step="copy disks"))

        deadline_s = self.opts.policy.completion_deadline_ms(1 << 30) / 1000 * 4
        waiter = asyncio.create_task(self._mirror.wait_ready(deadline_s, progress))
        stopper = asyncio.create_task(cancel.wait())
        try:
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if waiter not in done:
            waiter.cancel()
            self._result.status = "cancelled"
            raise MigrationError("cancelled while copying disks")
        try:
            waiter.result()
        except TimeoutError:
            raise MigrationError("disk copy did not become ready in time") from None

    async def _start(self, plan: Plan) -> None:
        self._step = "start"
        uri = self.opts.uri
        if self.dest:
            mig = await self.dest.cmd("query-migrate")
            if not mig.get("status") or mig.get("status") == "none":
                await preflight.probe_path_before_listen(uri)
                await self.dest.cmd("migrate-incoming", {"uri": str(uri)})
        try:
            await self.source.cmd("migrate", {"uri": str(uri)})
        except QmpCommandError as exc:
            why = await preflight.diagnose_connect_failure(uri)
            raise MigrationError(why or f"migrate refused: {exc.desc}") from None
        self._migrate_started = True
        self._step = "pre-copy"

    async def _sample(self) -> tuple[MigrationSample, dict[str, Any]]:
        info = await self.source.cmd("query-migrate")
        return replies.migration_sample(info, now_ms=self._elapsed_ms()), info

    async def _watch(self, plan: Plan, cancel: asyncio.Event) -> None:
        assert self._strategy is not None
        strategy, res = self._strategy, self._result
        cancel_requested = False
        with contextlib.ExitStack() as stack:
            events = stack.enter_context(
                self.source.listener(["MIGRATION", "MIGRATION_PASS", "STOP"]))
            self._src_events = events
            if self.dest is not None:
                with contextlib.suppress(HaguardError):  # a relayed monitor has no events
                    self._dst_events = stack.enter_context(self.dest.listener(["RESUME"]))
            while True:
                try:
                    sample, info = await self._sample()
                except replies.MalformedReply as exc:
                    raise MigrationError(f"cannot follow the migration: {exc}") from None
                except QmpError as exc:
                    raise MigrationError(self._source_lost_message(exc)) from None
                for action in strategy.observe(sample):
                    await self._apply(action, sample)
                if strategy.postcopy_started:
                    res.postcopy = True
                if sample.status == "postcopy-active" and self._recovery:
                    self._recovery.stream_restored()
                if strategy.postcopy_started and not await self._dest_alive():
                    msg = ("destination QEMU died during postcopy: the VM is lost (its memory "
                           "was split between the hosts); the source is kept for inspection")
                    self.on_alert("vm-lost", msg)
                    raise MigrationError(msg)
                if sample.status not in FINAL_STATES:
                    self._last_moving = sample
                self._report(sample)
                if sample.status == "pre-switchover" and self._mirror:
                    await self._mirror.complete_at_switchover()
                    await self.source.cmd("migrate-continue", {"state": "pre-switchover"})
                if sample.status in FINAL_STATES:
                    await self._finish(sample, info)
                    return
                if res.status == "postcopy-paused":  # recovery given up: both sides kept
                    return
                if cancel.is_set() and not cancel_requested:
                    cancel_requested = True
                    if strategy.postcopy_started:
                        self.on_alert("migration-cancel-refused",
                                      "cannot cancel: postcopy has started, the guest lives on "
                                      "both hosts until it completes")
                    else:
                        res.status, res.error = "cancelled", "cancelled by operator"
                        await self._cancel_qemu()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.opts.poll_interval_s):
                        await events.get()
                events.clear()

    async def _apply(self, action: Action, s: MigrationSample) -> None:
        log.info("migration step: %s", action)
        res = self._result
        match action:
            case SetDowntimeLimit(downtime_ms=ms):
                self._step = f"downtime limit {ms} ms"
                await self.source.cmd("migrate-set-parameters", {"downtime-limit": ms})
            case StartThrottling():
                self._step = "throttling guest"
                await self.source.cmd("migrate-set-parameters", {
                    "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                    "max-cpu-throttle": 99})
            case StartPostcopy():
                self._step = "postcopy"
                try:
                    await self.source.cmd("migrate-start-postcopy")
                except QmpCommandError as exc:
                    # The migration may have just completed on its own; that is fine.
                    log.info("migrate-start-postcopy refused: %s", exc.desc)
            case Abort(reason=reason):
                self._step = "aborting"
                res.status, res.error = "aborted", reason
                await self._cancel_qemu()
            case PausePostcopy():
                # Pause the source only: it closes its end, and the destination sees the
                # error as soon as the path carries its next page request (a monitor
                # command to a destination cut off from us might not arrive anyway).
                self._step = "postcopy stalled: pausing"
                with contextlib.suppress(HaguardError):
                    await self.source.cmd("migrate-pause", oob=True, timeout_s=5)
            case RecoverPostcopy():
                self._step = "postcopy paused: recovering"
                if self.dest is not None:
                    self._recovery = self._recovery or PostcopyRecovery(
                        self.source, self.dest, self.opts.uri)
                    await self._recovery.attempt(self._elapsed_ms())
                    res.postcopy_recoveries = self._recovery.resumes
            case RaiseAlert(kind=kind, reason=reason):
                self.on_alert(kind, reason)
            case GiveUpRecovery(reason=reason):
                res.status, res.error = "postcopy-paused", reason
                self.on_alert("migration-postcopy-stuck", reason)

    async def _dest_alive(self) -> bool:
        if self.dest is None or self.dest.connected:
            return True
        try:
            await self.dest.reconnect()
        except HaguardError:
            return False
        return True

    # ---- endings --------------------------------------------------------------------

    async def _finish(self, s: MigrationSample, info: dict[str, Any]) -> None:
        res = self._result
        # A cancelled or failed migration reports no RAM figures: keep the last ones seen.
        figures = s if s.transferred_bytes or self._last_moving is None else self._last_moving
        res.transferred_bytes = figures.transferred_bytes
        res.passes = figures.passes
        res.setup_time_ms = replies.optional_ms(info, "setup-time")
        if s.status == "completed":
            self._completed = True
            res.downtime_ms = replies.optional_ms(info, "downtime")
            if res.postcopy:
                # QEMU's figure for a postcopy ends when the source has queued the device
                # state, before the destination has loaded it and started the guest (long
                # before this point: the destination runs the guest during postcopy).
                pause = guest_pause_ms(event_times(self._src_events, "STOP"),
                                       event_times(self._dst_events, "RESUME"))
                res.downtime_ms = pause if pause is not None else res.downtime_ms
            await self._verify_and_release()
            return
        if res.status not in ("aborted", "cancelled"):
            if s.status == "cancelled":  # `haguard migrate --cancel` or another monitor client
                res.status, res.error = "cancelled", "cancelled by operator"
            else:
                res.status = "failed"
                res.error = res.error or await self._failure_reason(s)
        await self._after_failure()

    async def _failure_reason(self, s: MigrationSample) -> str:
        if self._strategy and self._strategy.postcopy_started:
            return "migration failed during postcopy: the VM's state is split and may be lost"
        if s.transferred_bytes == 0:
            why = await preflight.diagnose_connect_failure(self.opts.uri)
            if why:
                return why
        if self.dest is not None:
            try:
                await self.dest.cmd("query-status", timeout_s=2)
            except HaguardError:
                return "destination QEMU died during pre-copy; the VM keeps running on the source"
        return "migration failed during pre-copy (network or destination error); " \
               "the VM keeps running on the source"

    async def _verify_and_release(self) -> None:
        res = self._result
        want = "running" if self._source_was == "running" else "paused"
        if self.dest is not None:
            status = await self._settle(self.dest, want, 10.0)
            if status != want:
                res.status = "failed"
                res.error = f"migration completed but the destination is {status!r}, not {want!r}"
                return  # the source stays in postmigrate for the operator: never run twice
            if self._mirror:
                await self._mirror.release_destination()
        # "completed" comes a moment before the source's run state leaves finish-migrate.
        src = await self._settle(self.source, "postmigrate", 5.0)
        if src != "postmigrate":
            res.status = "failed"
            res.error = f"migration completed but the source is {src!r}, not 'postmigrate'"
            return
        res.status = "completed"
        if not res.postcopy:
            # QEMU 7.2 reports `completed` before it has set `downtime`: read it again now.
            with contextlib.suppress(HaguardError):
                again = replies.optional_ms(await self.source.cmd("query-migrate"), "downtime")
                res.downtime_ms = again if again else res.downtime_ms
        if self.opts.quit_source:
            with contextlib.suppress(HaguardError):
                await self.source.cmd("quit")

    @staticmethod
    async def _settle(qmp: Qmp, want: str, timeout_s: float) -> str:
        """Poll a QEMU's run state until it is `want` (or the time is up); the last state."""
        status = ""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while (status := replies.run_state(await qmp.cmd("query-status"))) != want:
                    await asyncio.sleep(0.02)
        return status

    async def _cancel_qemu(self) -> None:
        """migrate_cancel, and `yank` the migration's sockets if the cancel hangs.

        On a stalled link a cancel can stay in `cancelling` for as long as TCP keeps
        retrying (multifd channels blocked in send); yank shuts every channel down.
        """
        with contextlib.suppress(HaguardError):
            await self.source.cmd("migrate_cancel")
        if await self._wait_not_cancelling(2.0):
            return
        if "yank" in self._src_commands:
            log.warning("migration cancel is stuck: yanking the migration channels")
            with contextlib.suppress(HaguardError):
                await self.source.cmd("yank", {"instances": [{"type": "migration"}]})

    async def _wait_not_cancelling(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                while (await self.source.cmd("query-migrate")).get("status") == "cancelling":
                    await asyncio.sleep(0.1)
        except (HaguardError, TimeoutError):
            return False
        return True

    async def _cancel_and_clean(self) -> None:
        if self._strategy and self._strategy.postcopy_started:
            return
        if self._migrate_started:
            await self._cancel_qemu()
            with contextlib.suppress(HaguardError, TimeoutError):
                async with asyncio.timeout(10):
                    while (await self.source.cmd("query-migrate")).get("status") not in FINAL_STATES:
                        await asyncio.sleep(0.05)
        await self._after_failure()

    async def _after_failure(self) -> None:
        """Pre-copy failed or was cancelled: destination gone, source running again.

        The source is resumed only when the destination provably cannot run the guest:
        never after the migration completed (the destination may be running it), never
        once postcopy started, and only after the destination QEMU is gone.
        """
        if self._completed or (self._strategy and self._strategy.postcopy_started):
            return
        if self._mirror:
            await self._mirror.abort()
        dest_gone = await self._quit_destination()
        with contextlib.suppress(HaguardError):
            mig = (await self.source.cmd("query-migrate")).get("status")
            status = replies.run_state(await self.source.cmd("query-status"))
            safe = dest_gone or mig in ("failed", "cancelled")
            if mig != "completed" and status == "paused" and self._source_was == "running" and safe:
                await self.source.cmd("cont")

    async def _quit_destination(self) -> bool:
        """Quit the destination QEMU; True once its monitor has gone (the process with it)."""
        if self.dest is None:
            return False
        with contextlib.suppress(HaguardError):
            await self.dest.cmd("quit", timeout_s=3)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while self.dest.connected:
                    await asyncio.sleep(0.02)
        return not self.dest.connected

    def _source_lost_message(self, exc: Exception) -> str:
        if self._strategy and self._strategy.postcopy_started:
            return f"source QEMU lost during postcopy ({exc}): the VM's state is incomplete"
        return f"source QEMU lost during migration ({exc})"

    # ---- progress -------------------------------------------------------------------

    def _elapsed_ms(self) -> int:
        return _ms(self.clock() - self._t0)

    def _report(self, s: MigrationSample) -> None:
        strategy = self._strategy
        self.on_progress(Progress(
            status=s.status, elapsed_ms=s.now_ms, passes=s.passes,
            transferred_bytes=s.transferred_bytes, remaining_bytes=s.remaining_bytes,
            total_bytes=s.total_bytes, dirty_rate_bps=s.dirty_rate_bps,
            throughput_bps=s.throughput_bps,
            downtime_limit_ms=strategy.downtime_ms if strategy else 0, step=self._step))


async def run_migration(source_qmp: str, dest_qmp: str | Qmp | None, opts: MigrationOptions, *,
                        on_progress: ProgressFn | None = None, on_alert: AlertFn | None = None,
                        cancel: asyncio.Event | None = None,
                        qmp_timeout_s: float = 10.0) -> MigrationResult:
    """Connect to both monitors and run one migration; the one entry point used everywhere.

    `dest_qmp` is a socket path, or a monitor object speaking `Qmp`'s interface (the
    agent passes one that relays to the destination host's agent)."""
    try:
        source = Qmp(source_qmp, timeout_s=qmp_timeout_s, name="haguard-migrate-src")
        await source.connect()
    except QmpError as exc:
        return MigrationResult(status="failed", vm=opts.vm_name, uri=str(opts.uri),
                               error=f"source: {exc}")
    dest: Qmp | None = None
    try:
        if isinstance(dest_qmp, str):
            dest = Qmp(dest_qmp, timeout_s=qmp_timeout_s, name="haguard-migrate-dst") if dest_qmp else None
        else:
            dest = dest_qmp
        if dest is not None:
            try:
                await dest.connect()
            except QmpError as exc:
                return MigrationResult(status="failed", vm=opts.vm_name, uri=str(opts.uri),
                                       error=f"destination: {exc}")
        return await Migration(source, dest, opts, on_progress=on_progress,
                               on_alert=on_alert).run(cancel)
    finally:
        await source.close()
        if dest is not None:
            await dest.close()
