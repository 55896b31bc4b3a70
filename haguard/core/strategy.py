"""Convergence strategy for one live migration: samples in, escalation steps out.

The migration engine feeds a `MigrationSample` (built from `query-migrate`) every
poll; `ConvergenceStrategy.observe` returns the actions to take now.  Escalation
follows a ladder fixed by the policy, each rung taken only after the current one
has had its chance (a number of passes without enough progress):

    raise downtime-limit (30 ms, then oVirt's 100 -> 500 ms schedule)
    turn on auto-converge throttling (policy `never`, when allowed)
    switch to postcopy (policy `auto`), or start it after the first pass (`always`)
    abort at the completion deadline (seconds per GiB, as KubeVirt does)

Once postcopy has started the strategy never aborts: losing either side would
lose the guest.  A postcopy that stops moving bytes is paused, and a paused one
is recovered on a retry schedule, with an alert, until the policy's bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from haguard.core.alerts import RaiseAlert

PostcopyMode = Literal["never", "auto", "always"]

GIB = 1024**3
PRECOPY_STATES = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-recover", "postcopy-recover-setup"})
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, kw_only=True)
class ConvergencePolicy:
    postcopy: PostcopyMode = "auto"
    max_bandwidth_bps: int = 0  # 0: as fast as the link allows
    # Start low (a fast link converges there, with a pause a guest barely notices), then
    # oVirt's 100 -> 500 ms schedule.
    downtime_steps_ms: tuple[int, ...] = (30, 50, 100, 150, 200, 300, 400, 500)
    # Passes in a row without enough progress before the next rung of the ladder.
    stall_passes: int = 1
    auto_converge: bool = True
    # Downtime rungs tried before throttling (never) or postcopy (auto).
    downtime_rungs_before_throttle: int = 2
    completion_timeout_ms_per_gib: int = 150_000
    min_completion_timeout_ms: int = 10_000
    completion_timeout_ms: int | None = None  # overrides the per-GiB figure
    progress_timeout_ms: int = 150_000
    postcopy_stall_timeout_ms: int = 5_000
    postcopy_recovery_retry_ms: int = 2_000
    postcopy_recovery_timeout_ms: int = 600_000

    def __post_init__(self) -> None:
        if not self.downtime_steps_ms or any(d <= 0 for d in self.downtime_steps_ms):
            raise ValueError("downtime_steps_ms needs at least one positive step")
        if list(self.downtime_steps_ms) != sorted(self.downtime_steps_ms):
            raise ValueError("downtime_steps_ms must grow")

    @property
    def initial_downtime_ms(self) -> int:
        return self.downtime_steps_ms[0]

    def completion_deadline_ms(self, ram_bytes: int) -> int:
        if self.completion_timeout_ms is not None:
            return self.completion_timeout_ms
        per_ram = self.completion_timeout_ms_per_gib * ram_bytes // GIB
        return max(self.min_completion_timeout_ms, per_ram)


@dataclass(frozen=True, kw_only=True)
class MigrationSample:
    now_ms: int
    status: str
    passes: int = 0              # dirty-sync-count: 1 during the first full pass
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_rate_bps: int = 0      # bytes dirtied per second (dirty-pages-rate x page size)
    throughput_bps: int = 0      # bytes per second actually sent (mbps)
    expected_downtime_ms: int | None = None


# ---- actions -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SetDowntimeLimit:
    downtime_ms: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class StartThrottling:
    reason: str


@dataclass(frozen=True, kw_only=True)
class StartPostcopy:
    reason: str


@dataclass(frozen=True, kw_only=True)
class Abort:
    reason: str


@dataclass(frozen=True, kw_only=True)
class PausePostcopy:
    reason: str


@dataclass(frozen=True, kw_only=True)
class RecoverPostcopy:
    attempt: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class GiveUpRecovery:
    reason: str


Action = (SetDowntimeLimit | StartThrottling | StartPostcopy | Abort | PausePostcopy
          | RecoverPostcopy | RaiseAlert | GiveUpRecovery)


class Phase(Enum):
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    POSTCOPY_PAUSED = "postcopy-paused"
    FINISHED = "finished"


@dataclass(frozen=True)
class Step:
    """One escalation or recovery step, kept for the migration's result."""

    at_ms: int
    action: Action


# Rungs of the escalation ladder.
@dataclass(frozen=True)
class _Downtime:
    ms: int


@dataclass(frozen=True)
class _Throttle:
    pass


@dataclass(frozen=True)
class _Postcopy:
    pass


_Rung = _Downtime | _Throttle | _Postcopy


def build_ladder(policy: ConvergencePolicy) -> tuple[_Rung, ...]:
    raises = [_Downtime(ms) for ms in policy.downtime_steps_ms[1:]]
    k = policy.downtime_rungs_before_throttle
    if policy.postcopy == "never":
        rungs: list[_Rung] = list(raises[:k])
        if policy.auto_converge:
            rungs.append(_Throttle())
        rungs += raises[k:]
        return tuple(rungs)
    # With postcopy available, a short downtime escalation then postcopy (oVirt's
    # "post-copy" policy): throttling would only slow the guest down.
    return (*raises[:k], _Postcopy())


@dataclass
class ConvergenceStrategy:
    policy: ConvergencePolicy
    ram_bytes: int
    started_ms: int
    phase: Phase = Phase.PRECOPY
    downtime_ms: int = 0
    throttling: bool = False
    steps: list[Step] = field(default_factory=list)
    _ladder: tuple[_Rung, ...] = ()
    _rung: int = 0
    _stalls: int = 0
    _last_pass: int = 0
    _remaining_at_pass: int | None = None
    _last_transferred: int = 0
    _last_progress_ms: int = 0
    _paused_since_ms: int | None = None
    _next_recovery_ms: int = 0
    _recovery_attempts: int = 0
    _gave_up: bool = False
    _postcopy_requested: bool = False

    def __post_init__(self) -> None:
        self._ladder = build_ladder(self.policy)
        self.downtime_ms = self.policy.initial_downtime_ms
        self._last_progress_ms = self.started_ms

    @property
    def deadline_ms(self) -> int:
        return self.started_ms + self.policy.completion_deadline_ms(self.ram_bytes)

    @property
    def postcopy_started(self) -> bool:
        return self.phase in (Phase.POSTCOPY, Phase.POSTCOPY_PAUSED)

    def observe(self, s: MigrationSample) -> list[Action]:
        actions = self._decide(s)
        for a in actions:
            self.steps.append(Step(s.now_ms, a))
        return actions

    # ---- decisions ----------------------------------------------------------------

    def _decide(self, s: MigrationSample) -> list[Action]:
        if s.status in FINAL_STATES:
            self.phase = Phase.FINISHED
            return []
        if s.transferred_bytes > self._last_transferred:
            self._last_transferred = s.transferred_bytes
            self._last_progress_ms = s.now_ms
        if s.status == "postcopy-paused":
            return self._paused(s)
        if s.status in POSTCOPY_STATES:
            return self._postcopy(s)
        if s.status in PRECOPY_STATES and self.phase is Phase.PRECOPY:
            return self._precopy(s)
        return []

    def _precopy(self, s: MigrationSample) -> list[Action]:
        if self._postcopy_requested:
            return []  # waiting for QEMU to switch over
        postcopy_ok = self.policy.postcopy != "never"
        if s.now_ms >= self.deadline_ms:
            if postcopy_ok:
                return [self._start_postcopy("completion deadline reached")]
            return [Abort(reason=f"did not converge within the completion deadline "
                                 f"({(s.now_ms - self.started_ms) / 1000:.0f} s)")]
        if s.now_ms - self._last_progress_ms >= self.policy.progress_timeout_ms:
            return [Abort(reason=f"no bytes moved for {self.policy.progress_timeout_ms / 1000:g} s")]
        if s.passes <= self._last_pass:
            return []
        # A pass just ended: judge the one before it.
        new_pass, self._last_pass = s.passes, s.passes
        prev_remaining, self._remaining_at_pass = self._remaining_at_pass, s.remaining_bytes
        if new_pass < 2:
            return []  # still in the first full pass: nothing to compare yet
        if self.policy.postcopy == "always":
            return [self._start_postcopy("policy postcopy: always, first pass done")]
        bw, dirty = s.throughput_bps, s.dirty_rate_bps
        if self.policy.postcopy == "auto" and bw > 0 and dirty >= bw:
            return [self._start_postcopy(
                f"dirty rate {_mib(dirty)} MiB/s is not below bandwidth {_mib(bw)} MiB/s")]
        shrinking = prev_remaining is not None and s.remaining_bytes < 0.9 * prev_remaining
        fits = (s.expected_downtime_ms is not None and s.expected_downtime_ms <= self.downtime_ms)
        if shrinking or fits:
            self._stalls = 0
            return []
        self._stalls += 1
        if self._stalls < self.policy.stall_passes:
            return []
        self._stalls = 0
        return self._escalate(s)

    def _escalate(self, s: MigrationSample) -> list[Action]:
        # A larger downtime limit only helps if what is left could be sent within the
        # largest one the policy allows: when it could not, skip to the next kind of step.
        bw = s.throughput_bps
        hopeless = bw > 0 and s.remaining_bytes * 1000 // bw > 2 * self.policy.downtime_steps_ms[-1]
        while (hopeless and self._rung < len(self._ladder)
               and isinstance(self._ladder[self._rung], _Downtime)
               and any(not isinstance(r, _Downtime) for r in self._ladder[self._rung:])):
            self._rung += 1
        if self._rung >= len(self._ladder):
            return []  # nothing left but the deadline
        rung = self._ladder[self._rung]
        self._rung += 1
        why = (f"pass {s.passes}: {_mib(s.remaining_bytes)} MiB left, dirtying "
               f"{_mib(s.dirty_rate_bps)} MiB/s against {_mib(s.throughput_bps)} MiB/s")
        if isinstance(rung, _Downtime):
            self.downtime_ms = rung.ms
            return [SetDowntimeLimit(downtime_ms=rung.ms, reason=why)]
        if isinstance(rung, _Throttle):
            self.throttling = True
            return [StartThrottling(reason=why)]
        return [self._start_postcopy(why)]

    def _start_postcopy(self, reason: str) -> StartPostcopy:
        self._postcopy_requested = True
        return StartPostcopy(reason=reason)

    def _postcopy(self, s: MigrationSample) -> list[Action]:
        if self.phase is Phase.POSTCOPY_PAUSED:
            self._last_progress_ms = s.now_ms  # the recovered stream gets a fresh stall timer
        self.phase = Phase.POSTCOPY
        self._paused_since_ms = None
        if s.status != "postcopy-active":
            return []
        stalled_ms = s.now_ms - self._last_progress_ms
        if stalled_ms >= self.policy.postcopy_stall_timeout_ms:
            self._last_progress_ms = s.now_ms  # one pause request per stall period
            return [PausePostcopy(reason=f"postcopy moved no bytes for {stalled_ms / 1000:.1f} s")]
        return []

    def _paused(self, s: MigrationSample) -> list[Action]:
        actions: list[Action] = []
        if self._paused_since_ms is None:
            self.phase = Phase.POSTCOPY_PAUSED
            self._paused_since_ms = s.now_ms
            self._next_recovery_ms = s.now_ms
            actions.append(RaiseAlert(kind="migration-postcopy-paused",
                                      reason="postcopy paused: the VM is frozen until the "
                                             "migration path returns"))
        if self._gave_up:
            return actions
        waited = s.now_ms - self._paused_since_ms
        if waited >= self.policy.postcopy_recovery_timeout_ms:
            self._gave_up = True
            actions.append(GiveUpRecovery(
                reason=f"postcopy not recovered within {waited / 1000:.0f} s; both QEMUs are kept "
                       "paused so that no memory is lost"))
            return actions
        if s.now_ms >= self._next_recovery_ms:
            self._recovery_attempts += 1
            self._next_recovery_ms = s.now_ms + self.policy.postcopy_recovery_retry_ms
            actions.append(RecoverPostcopy(attempt=self._recovery_attempts,
                                           reason=f"paused for {waited / 1000:.1f} s"))
        return actions


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"
