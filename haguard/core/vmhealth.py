"""Health of the VMs on this host: QMP heartbeats and events in, remediation out.

The VM watcher (adapters/vmwatch.py) reports what it saw as past-tense facts; the
agent feeds them to `VmHealth.step` and calls `tick(now_ms)` regularly.  Outputs
are commands (`RestartVmInPlace`, `ReportVmForRelocation`) and `VmStateChanged`
notes for logs and gossip.

States (`VmState`):
    unknown    nothing heard yet
    starting   restarted in place; its first reply is awaited
    running, paused, panicked, shutdown, migrating
               from QEMU's run state and events (inmigrate/postmigrate are migrating)
    hung       the QEMU is there but its watch monitor has not answered for hung_timeout_ms
    crashed    the process or its socket went away while the VM ran here
    stopped    not running, and not restarted by this module: not owned here, or never
               seen alive by this agent (the agent's reconciliation starts those)

Rules, because a VM must never run twice:
- Only owned VMs (`VmExpected(should_run=True)`) are remediated.
- Only a witnessed crash (or a panic, when the policy says so) is restarted.  A hung
  or paused QEMU may still hold the guest: it is reported, never restarted.
- At most `max_restarts` restarts in any `window_ms` (sliding); after that one
  `ReportVmForRelocation` per episode and no more restarts here.
- One restart in flight per VM: the executor must answer every `RestartVmInPlace`
  with `VmRestarted` (now_ms taken after the new QEMU took the VM's link) or
  `VmRestartFailed`.  Facts observed before that `now_ms` describe the old
  instance and are ignored.
- A VM gone during a migration is reported crashed but not restarted: the migration's
  outcome decides where it runs.
- A VM gone before this agent ever saw it alive is `stopped`, not crashed: whether
  it should run is the agent's reconciliation to decide, not a restart's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class VmState(StrEnum):
    UNKNOWN = "unknown"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    PANICKED = "panicked"
    SHUTDOWN = "shutdown"
    HUNG = "hung"
    CRASHED = "crashed"
    MIGRATING = "migrating"
    STOPPED = "stopped"


# QEMU run states (query-status) -> health states; an unknown one counts as paused:
# the guest is not known to run, and nothing is remediated.
STATUS_STATES: dict[str, VmState] = {
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "suspended": VmState.PAUSED,
    "io-error": VmState.PAUSED,
    "watchdog": VmState.PAUSED,
    "debug": VmState.PAUSED,
    "prelaunch": VmState.PAUSED,
    "restore-vm": VmState.PAUSED,
    "save-vm": VmState.PAUSED,
    "inmigrate": VmState.MIGRATING,
    "postmigrate": VmState.MIGRATING,
    "finish-migrate": VmState.MIGRATING,
    "colo": VmState.MIGRATING,
    "shutdown": VmState.SHUTDOWN,
    "guest-panicked": VmState.PANICKED,
    "internal-error": VmState.PANICKED,
}

# States in which the guest may still be running or be resumed: losing the process
# from one of these is a crash.
_LIVE = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.PANICKED,
                   VmState.HUNG})
# A STOP event moves only these to paused: QEMU also sends STOP after GUEST_PANICKED,
# after SHUTDOWN (with -no-shutdown) and at the end of an outgoing migration.
_STOPPABLE = frozenset({VmState.UNKNOWN, VmState.STARTING, VmState.RUNNING, VmState.HUNG})


@dataclass(frozen=True, kw_only=True)
class VmHealthPolicy:
    max_restarts: int = 3
    window_ms: int = 600_000
    hung_timeout_ms: int = 3_000
    restart_on_panic: bool = True
    # Wait before another attempt after a failed restart.
    restart_backoff_ms: int = 1_000

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError("max_restarts must not be negative")
        if self.window_ms <= 0 or self.hung_timeout_ms <= 0 or self.restart_backoff_ms < 0:
            raise ValueError("window_ms and hung_timeout_ms must be positive, restart_backoff_ms >= 0")


# ---- inputs ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class VmStatusReplied:
    vm: str
    now_ms: int
    status: str                  # QEMU run state from query-status


@dataclass(frozen=True, kw_only=True)
class VmStatusTimedOut:
    """No reply (or no greeting) from the watch monitor within the watcher's deadline."""

    vm: str
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class VmEventSeen:
    vm: str
    now_ms: int
    event: str                   # SHUTDOWN, STOP, RESUME, GUEST_PANICKED, RESET, ...
    detail: str = ""             # e.g. SHUTDOWN's reason


@dataclass(frozen=True, kw_only=True)
class VmProcessGone:
    vm: str
    now_ms: int
    reason: str = "QEMU process gone"


@dataclass(frozen=True, kw_only=True)
class VmRestarted:
    vm: str
    now_ms: int                  # taken once the new QEMU holds the VM's link


@dataclass(frozen=True, kw_only=True)
class VmRestartFailed:
    vm: str
    now_ms: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class VmExpected:
    vm: str
    should_run: bool             # this host owns the VM


@dataclass(frozen=True, kw_only=True)
class VmForgotten:
    """The VM left this host's inventory: drop its state."""

    vm: str


VmFact = VmStatusReplied | VmStatusTimedOut | VmEventSeen | VmProcessGone
VmInput = VmFact | VmRestarted | VmRestartFailed | VmExpected | VmForgotten


# ---- outputs ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RestartVmInPlace:
    vm: str
    attempt: int                 # 1-based, within the current window
    reason: str
    # The old QEMU still exists (a panicked guest): stop it before starting anew.
    kill_existing: bool = False


@dataclass(frozen=True, kw_only=True)
class ReportVmForRelocation:
    vm: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class VmStateChanged:
    vm: str
    old: VmState
    new: VmState
    reason: str


VmOutput = RestartVmInPlace | ReportVmForRelocation | VmStateChanged


@dataclass(frozen=True, kw_only=True)
class VmHealthView:
    """One VM's health for heartbeats and `status`."""

    vm: str
    state: VmState
    reason: str
    since_ms: int | None
    should_run: bool
    last_heard_ms: int | None
    restarts_in_window: int
    restart_pending: bool
    relocation_reported: bool


@dataclass
class _Vm:
    name: str
    state: VmState = VmState.UNKNOWN
    reason: str = "nothing heard yet"
    since_ms: int | None = None
    should_run: bool = False
    now_ms: int | None = None             # newest time seen for this VM
    alive: bool | None = None             # process present (None: not known)
    heard_ms: int | None = None           # last reply/event, or when waiting for one began
    last_reply_ms: int | None = None
    restart_times_ms: list[int] = field(default_factory=list)
    pending_attempt: int | None = None
    next_attempt_ms: int = 0
    relocation_reported: bool = False
    remediable: bool = True
    restarted_ms: int | None = None       # facts older than this describe the old instance


class VmHealth:
    def __init__(self, policy: VmHealthPolicy | None = None) -> None:
        self.policy = policy or VmHealthPolicy()
        self._vms: dict[str, _Vm] = {}

    # ---- public ---------------------------------------------------------------------

    def step(self, event: VmInput) -> list[VmOutput]:
        match event:
            case VmExpected():
                return self._expected(event)
            case VmForgotten():
                self._vms.pop(event.vm, None)
                return []
            case VmRestarted() | VmRestartFailed():
                v = self._vm(event.vm)
                v.now_ms = max(v.now_ms or event.now_ms, event.now_ms)
                out = self._restart_result(v, event)
            case _:
                v = self._vm(event.vm)
                if v.restarted_ms is not None and event.now_ms < v.restarted_ms:
                    return []  # seen before the restart: about the old instance
                v.now_ms = max(v.now_ms or event.now_ms, event.now_ms)
                out = self._fact(v, event)
        return out + self._remediate(v, v.now_ms)

    def tick(self, now_ms: int) -> list[VmOutput]:
        out: list[VmOutput] = []
        for v in list(self._vms.values()):
            v.now_ms = max(v.now_ms or now_ms, now_ms)
            out += self._check_hung(v, now_ms)
            out += self._remediate(v, now_ms)
        return out

    def snapshot(self) -> dict[str, VmHealthView]:
        return {name: self._view(v) for name, v in sorted(self._vms.items())}

    def state(self, vm: str) -> VmState | None:
        v = self._vms.get(vm)
        return v.state if v else None

    # ---- facts ----------------------------------------------------------------------

    def _vm(self, name: str) -> _Vm:
        v = self._vms.get(name)
        if v is None:
            v = self._vms[name] = _Vm(name)
        return v

    def _fact(self, v: _Vm, f: VmFact) -> list[VmOutput]:
        now = f.now_ms
        match f:
            case VmStatusReplied():
                self._heard(v, now)
                v.last_reply_ms = now
                new = STATUS_STATES.get(f.status, VmState.PAUSED)
                why = f"QEMU run state {f.status}"
                if f.status not in STATUS_STATES:
                    why = f"unknown QEMU run state {f.status!r}"
                return self._set(v, new, why, now)
            case VmEventSeen():
                self._heard(v, now)
                return self._event(v, f)
            case VmStatusTimedOut():
                out: list[VmOutput] = []
                if v.alive is not True:
                    # A socket took the connection: a QEMU is there; start the hung timer.
                    v.alive = True
                    v.heard_ms = now
                    if v.state in (VmState.CRASHED, VmState.STOPPED):
                        out = self._set(v, VmState.UNKNOWN, "a QEMU is back but has not answered", now)
                elif v.heard_ms is None:
                    v.heard_ms = now
                return out + self._check_hung(v, now)
            case VmProcessGone():
                return self._gone(v, f)
        return []

    def _heard(self, v: _Vm, now: int) -> None:
        v.alive = True
        v.heard_ms = now

    def _event(self, v: _Vm, e: VmEventSeen) -> list[VmOutput]:
        detail = f" ({e.detail})" if e.detail else ""
        match e.event:
            case "SHUTDOWN":
                return self._set(v, VmState.SHUTDOWN, f"SHUTDOWN event{detail}", e.now_ms)
            case "GUEST_PANICKED":
                return self._set(v, VmState.PANICKED, f"GUEST_PANICKED event{detail}", e.now_ms)
            case "STOP" if v.state in _STOPPABLE:
                return self._set(v, VmState.PAUSED, "STOP event", e.now_ms)
            case "RESUME":
                return self._set(v, VmState.RUNNING, "RESUME event", e.now_ms)
        return []  # RESET and others: proof of life, no change of state

    def _gone(self, v: _Vm, f: VmProcessGone) -> list[VmOutput]:
        v.alive = False
        v.heard_ms = None
        if not v.should_run:
            return self._set(v, VmState.STOPPED, f"{f.reason}; not expected to run here", f.now_ms)
        if v.state is VmState.SHUTDOWN:
            return []  # the guest powered off: its wish, not a crash
        if v.state is VmState.MIGRATING:
            v.remediable = False
            return self._set(v, VmState.CRASHED, f"{f.reason} during a migration", f.now_ms)
        if v.state in _LIVE:
            return self._set(v, VmState.CRASHED, f.reason, f.now_ms)
        if v.state is VmState.UNKNOWN:
            return self._set(v, VmState.STOPPED, f"{f.reason}; never seen running by this agent",
                             f.now_ms)
        return []  # already crashed or stopped

    def _check_hung(self, v: _Vm, now: int) -> list[VmOutput]:
        if v.alive is False or v.heard_ms is None:
            return []
        if v.state in (VmState.HUNG, VmState.CRASHED, VmState.STOPPED):
            return []
        silent = now - v.heard_ms
        if silent < self.policy.hung_timeout_ms:
            return []
        return self._set(v, VmState.HUNG, f"watch monitor silent for {silent} ms", now)

    def _expected(self, e: VmExpected) -> list[VmOutput]:
        v = self._vm(e.vm)
        if e.should_run == v.should_run:
            return []
        v.should_run = e.should_run
        # A new ownership is a new episode: budget reports and migration guards start afresh.
        v.relocation_reported = False
        v.remediable = True
        if not e.should_run and v.state in (VmState.CRASHED, VmState.UNKNOWN) and v.alive is False:
            return self._set(v, VmState.STOPPED, "not expected to run here", v.now_ms)
        return []

    def _restart_result(self, v: _Vm, r: VmRestarted | VmRestartFailed) -> list[VmOutput]:
        attempt = v.pending_attempt
        v.pending_attempt = None
        if isinstance(r, VmRestartFailed):
            v.next_attempt_ms = r.now_ms + self.policy.restart_backoff_ms
            return []
        v.restarted_ms = r.now_ms
        v.alive = None
        v.heard_ms = r.now_ms
        what = f"attempt {attempt}" if attempt is not None else "outside the health policy"
        return self._set(v, VmState.STARTING, f"restarted in place ({what})", r.now_ms)

    def _set(self, v: _Vm, new: VmState, reason: str, now: int | None) -> list[VmOutput]:
        old = v.state
        v.reason = reason
        if new in (VmState.RUNNING, VmState.PAUSED, VmState.SHUTDOWN, VmState.MIGRATING,
                   VmState.PANICKED):
            # Seen alive: a later loss is a new episode.
            v.remediable = True
            if new is VmState.RUNNING:
                v.relocation_reported = False
        if new is old:
            return []
        v.state = new
        v.since_ms = now
        return [VmStateChanged(vm=v.name, old=old, new=new, reason=reason)]

    # ---- remediation ------------------------------------------------------------------

    def _remediate(self, v: _Vm, now: int | None) -> list[VmOutput]:
        if now is None or not v.should_run or v.pending_attempt is not None or v.relocation_reported:
            return []
        crashed = v.state is VmState.CRASHED and v.remediable and v.alive is False
        panicked = (v.state is VmState.PANICKED and self.policy.restart_on_panic
                    and v.alive is not False)
        if not (crashed or panicked) or now < v.next_attempt_ms:
            return []
        window = self.policy.window_ms
        v.restart_times_ms = [t for t in v.restart_times_ms if t > now - window]
        done = len(v.restart_times_ms)
        if done >= self.policy.max_restarts:
            v.relocation_reported = True
            return [ReportVmForRelocation(
                vm=v.name, reason=f"{v.state}: {v.reason}; {done} restart(s) in the last "
                                  f"{window / 1000:g} s, the limit is {self.policy.max_restarts}")]
        v.restart_times_ms.append(now)
        v.pending_attempt = done + 1
        return [RestartVmInPlace(vm=v.name, attempt=done + 1, reason=f"{v.state}: {v.reason}",
                                 kill_existing=panicked)]

    def _view(self, v: _Vm) -> VmHealthView:
        recent = v.restart_times_ms
        if v.now_ms is not None:
            recent = [t for t in recent if t > v.now_ms - self.policy.window_ms]
        return VmHealthView(vm=v.name, state=v.state, reason=v.reason, since_ms=v.since_ms,
                            should_run=v.should_run, last_heard_ms=v.last_reply_ms,
                            restarts_in_window=len(recent),
                            restart_pending=v.pending_attempt is not None,
                            relocation_reported=v.relocation_reported)
