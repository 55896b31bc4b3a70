"""The convergence strategy, stepped directly with synthetic samples."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core.strategy import (
    Abort,
    ConvergencePolicy,
    ConvergenceStrategy,
    GiveUpRecovery,
    MigrationSample,
    PausePostcopy,
    RaiseAlert,
    RecoverPostcopy,
    SetDowntimeLimit,
    StartPostcopy,
    StartThrottling,
    build_ladder,
)

MIB = 2**20
GIB = 2**30


OVIRT_STEPS = (100, 150, 200, 300, 400, 500)


def strat(**kw: object) -> ConvergenceStrategy:
    kw.setdefault("downtime_steps_ms", OVIRT_STEPS)
    return ConvergenceStrategy(ConvergencePolicy(**kw), ram_bytes=GIB, started_ms=0)  # type: ignore[arg-type]


def sample(now_ms: int, passes: int, remaining_mib: int, *, status: str = "active",
           dirty_mib: int = 50, bw_mib: int = 100, sent_mib: int | None = None) -> MigrationSample:
    return MigrationSample(now_ms=now_ms, status=status, passes=passes,
                           transferred_bytes=(sent_mib if sent_mib is not None else now_ms) * MIB,
                           remaining_bytes=remaining_mib * MIB, total_bytes=GIB,
                           dirty_rate_bps=dirty_mib * MIB, throughput_bps=bw_mib * MIB,
                           expected_downtime_ms=remaining_mib * 1000 // bw_mib)


def test_ladders_follow_policy() -> None:
    assert ConvergencePolicy().downtime_steps_ms[:2] == (30, 50)
    never = build_ladder(ConvergencePolicy(postcopy="never", downtime_steps_ms=OVIRT_STEPS))
    assert [type(r).__name__ for r in never] == ["_Downtime", "_Downtime", "_Throttle", "_Downtime",
                                                 "_Downtime", "_Downtime"]
    auto = build_ladder(ConvergencePolicy(postcopy="auto", downtime_steps_ms=OVIRT_STEPS))
    assert [type(r).__name__ for r in auto] == ["_Downtime", "_Downtime", "_Postcopy"]
    assert build_ladder(ConvergencePolicy(postcopy="never", auto_converge=False,
                                          downtime_steps_ms=OVIRT_STEPS))[2].ms == 300  # type: ignore[union-attr]


def test_converging_migration_takes_no_step() -> None:
    s = strat(postcopy="auto")
    out = []
    for i, rem in enumerate([900, 400, 150, 60, 20], start=1):
        out += s.observe(sample(i * 1000, i, rem, dirty_mib=20))
    assert out == []


def test_stalled_precopy_raises_downtime_then_throttles_then_aborts_at_deadline() -> None:
    s = strat(postcopy="never", completion_timeout_ms=20_000)
    actions = []
    for i in range(1, 12):
        actions += s.observe(sample(i * 1500, i, 100, dirty_mib=90, bw_mib=100))
    kinds = [type(a) for a in actions]
    assert kinds[:3] == [SetDowntimeLimit, SetDowntimeLimit, StartThrottling]
    assert [a.downtime_ms for a in actions if isinstance(a, SetDowntimeLimit)] == [150, 200, 300, 400, 500]
    assert StartPostcopy not in kinds
    final = s.observe(sample(20_000, 12, 100, dirty_mib=90))
    assert len(final) == 1 and isinstance(final[0], Abort) and "deadline" in final[0].reason


def test_auto_goes_postcopy_when_dirtying_faster_than_the_link() -> None:
    s = strat(postcopy="auto")
    assert s.observe(sample(1000, 1, 900, dirty_mib=200)) == []
    out = s.observe(sample(2000, 2, 800, dirty_mib=200, bw_mib=100))
    assert len(out) == 1 and isinstance(out[0], StartPostcopy)
    # Asked once; no second request while QEMU switches over.
    assert s.observe(sample(2100, 3, 800, dirty_mib=200)) == []


def test_hopeless_downtime_raises_are_skipped() -> None:
    # 500 MiB left at 100 MiB/s is 5 s of pause: no downtime limit of the policy helps.
    s = strat(postcopy="auto")
    s.observe(sample(1000, 1, 500, dirty_mib=90))
    out = s.observe(sample(2000, 2, 500, dirty_mib=90))
    assert len(out) == 1 and isinstance(out[0], StartPostcopy)


def test_always_starts_postcopy_after_first_pass() -> None:
    s = strat(postcopy="always")
    assert s.observe(sample(500, 1, 900, dirty_mib=1)) == []
    out = s.observe(sample(1500, 2, 100, dirty_mib=1))
    assert len(out) == 1 and isinstance(out[0], StartPostcopy)


def test_postcopy_stall_pauses_and_recovery_is_retried_then_given_up() -> None:
    s = strat(postcopy="always", postcopy_stall_timeout_ms=2000, postcopy_recovery_retry_ms=1000,
              postcopy_recovery_timeout_ms=5000)
    s.observe(sample(100, 1, 900))
    s.observe(sample(200, 2, 500))
    assert s.observe(sample(300, 2, 500, status="postcopy-active", sent_mib=10)) == []
    # No byte moves for 2 s: pause.
    out = s.observe(sample(2400, 2, 500, status="postcopy-active", sent_mib=10))
    assert len(out) == 1 and isinstance(out[0], PausePostcopy)
    out = s.observe(sample(2500, 2, 500, status="postcopy-paused", sent_mib=10))
    assert [type(a) for a in out] == [RaiseAlert, RecoverPostcopy]
    assert s.observe(sample(3000, 2, 500, status="postcopy-paused", sent_mib=10)) == []
    out = s.observe(sample(3600, 2, 500, status="postcopy-paused", sent_mib=10))
    assert [type(a) for a in out] == [RecoverPostcopy] and out[0].attempt == 2  # type: ignore[union-attr]
    out = s.observe(sample(7600, 2, 500, status="postcopy-paused", sent_mib=10))
    assert [type(a) for a in out] == [GiveUpRecovery]
    assert s.observe(sample(9000, 2, 500, status="postcopy-paused", sent_mib=10)) == []


STATUSES = ["setup", "active", "active", "active", "postcopy-active", "postcopy-paused",
            "postcopy-recover", "pre-switchover", "device"]


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(["never", "auto", "always"]),
       steps=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 1), st.integers(0, 2000),
                                st.sampled_from(STATUSES), st.integers(0, 400), st.integers(1, 400)),
                      max_size=60))
def test_safety_properties_hold_for_any_sample_sequence(policy, steps) -> None:  # type: ignore[no-untyped-def]
    s = strat(postcopy=policy, completion_timeout_ms=30_000)
    now = passes = sent = 0
    postcopy_seen = False
    actions = []
    for dt, dpass, rem, status, dirty, bw in steps:
        now, passes, sent = now + dt, passes + dpass, sent + rem // 7
        if status.startswith("postcopy"):
            if policy == "never":
                continue  # QEMU never enters postcopy unless asked
            postcopy_seen = True
        elif postcopy_seen:
            continue  # QEMU never returns to pre-copy after postcopy started
        out = s.observe(sample(now, passes, rem, status=status, dirty_mib=dirty, bw_mib=bw,
                               sent_mib=sent))
        for a in out:
            actions.append(a)
            if postcopy_seen:
                assert not isinstance(a, Abort), "never abort once postcopy started"
            if isinstance(a, SetDowntimeLimit):
                assert a.downtime_ms <= s.policy.downtime_steps_ms[-1]
    starts = [a for a in actions if isinstance(a, StartPostcopy)]
    assert len(starts) <= 1
    if policy == "never":
        assert not starts
    assert sum(isinstance(a, Abort) for a in actions) <= 1 or not postcopy_seen
