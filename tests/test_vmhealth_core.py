"""The VM health state machine: scenario tables and property tests (pure, no QEMU)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core.vmhealth import (
    ReportVmForRelocation,
    RestartVmInPlace,
    VmEventSeen,
    VmExpected,
    VmForgotten,
    VmHealth,
    VmHealthPolicy,
    VmInput,
    VmOutput,
    VmProcessGone,
    VmRestarted,
    VmRestartFailed,
    VmState,
    VmStateChanged,
    VmStatusReplied,
    VmStatusTimedOut,
)

VM = "web1"


def parse(line: str) -> VmInput | int:
    """One scenario step: `AT_MS VERB [ARG]`, e.g. `100 reply running`, `5000 tick` (-> an int)."""
    at, verb, *rest = line.split()
    now, arg = int(at), (rest[0] if rest else "")
    facts: dict[str, VmInput] = {
        "reply": VmStatusReplied(vm=VM, now_ms=now, status=arg),
        "timeout": VmStatusTimedOut(vm=VM, now_ms=now),
        "event": VmEventSeen(vm=VM, now_ms=now, event=arg),
        "gone": VmProcessGone(vm=VM, now_ms=now),
        "restarted": VmRestarted(vm=VM, now_ms=now),
        "restart-failed": VmRestartFailed(vm=VM, now_ms=now, reason="boom"),
        "own": VmExpected(vm=VM, should_run=True),
        "disown": VmExpected(vm=VM, should_run=False),
    }
    return now if verb == "tick" else facts[verb]


def show(o: VmOutput) -> str:
    match o:
        case RestartVmInPlace():
            return f"restart#{o.attempt}{'+kill' if o.kill_existing else ''}"
        case ReportVmForRelocation():
            return "relocate"
        case VmStateChanged():
            return f"{o.old}->{o.new}"
    raise AssertionError(o)


def run(script: str, policy: VmHealthPolicy | None = None) -> tuple[VmHealth, list[str]]:
    core = VmHealth(policy or VmHealthPolicy(max_restarts=3, window_ms=60_000, hung_timeout_ms=3_000))
    out: list[str] = []
    for line in script.strip().splitlines():
        arg = parse(line.strip())
        outs = core.tick(arg) if isinstance(arg, int) else core.step(arg)
        out += [show(o) for o in outs]
    return core, out


SCENARIOS = [
    ("running", "0 own\n0 reply running", "running",
     ["unknown->running"]),
    ("owned crash restarts", "0 own\n0 reply running\n500 gone", "crashed",
     ["unknown->running", "running->crashed", "restart#1"]),
    ("not owned crash is stopped", "0 reply running\n500 gone", "stopped",
     ["unknown->running", "running->stopped"]),
    ("never seen alive is not a crash", "0 own\n0 gone\n9000 tick", "stopped",
     ["unknown->stopped"]),
    ("hung after silence, never restarted",
     "0 own\n0 reply running\n1000 timeout\n2000 timeout\n3000 timeout\n60000 tick", "hung",
     ["unknown->running", "running->hung"]),
    ("hung by tick alone", "0 own\n0 reply running\n2999 tick\n3000 tick", "hung",
     ["unknown->running", "running->hung"]),
    ("hung at connect: first fact is a timeout", "0 own\n0 timeout\n1500 timeout\n3000 timeout", "hung",
     ["unknown->hung"]),
    ("hung recovers", "0 own\n0 reply running\n3000 tick\n3500 reply running", "running",
     ["unknown->running", "running->hung", "hung->running"]),
    ("hung then gone is a crash", "0 own\n0 reply running\n3000 tick\n4000 gone", "crashed",
     ["unknown->running", "running->hung", "hung->crashed", "restart#1"]),
    ("stop and cont", "0 own\n0 reply running\n10 event STOP\n20 reply paused\n30 event RESUME", "running",
     ["unknown->running", "running->paused", "paused->running"]),
    ("paused is never restarted", "0 own\n0 reply paused\n60000 tick\n60001 reply paused", "paused",
     ["unknown->paused", "paused->hung", "hung->paused"]),
    ("STOP after a panic keeps it panicked",
     "0 reply running\n10 event GUEST_PANICKED\n11 event STOP\n20 reply guest-panicked", "panicked",
     ["unknown->running", "running->panicked"]),
    ("panic restarts with kill when owned", "0 own\n0 reply running\n10 event GUEST_PANICKED", "panicked",
     ["unknown->running", "running->panicked", "restart#1+kill"]),
    ("clean shutdown then exit is not a crash",
     "0 own\n0 reply running\n10 event SHUTDOWN\n20 gone\n9000 tick", "shutdown",
     ["unknown->running", "running->shutdown"]),
    ("crash during a migration is not remediated",
     "0 own\n0 reply running\n10 reply postmigrate\n20 gone\n9000 tick", "crashed",
     ["unknown->running", "running->migrating", "migrating->crashed"]),
    ("unknown run state counts as paused", "0 own\n0 reply frobnicated", "paused",
     ["unknown->paused"]),
    ("one restart in flight", "0 own\n0 reply running\n10 gone\n20 gone\n5000 tick\n6000 gone", "crashed",
     ["unknown->running", "running->crashed", "restart#1"]),
    ("restart then boot", "0 own\n0 reply running\n10 gone\n300 restarted\n400 reply running", "running",
     ["unknown->running", "running->crashed", "restart#1", "crashed->starting", "starting->running"]),
    ("a gone seen before the restart is stale",
     "0 own\n0 reply running\n10 gone\n300 restarted\n250 gone\n400 reply running", "running",
     ["unknown->running", "running->crashed", "restart#1", "crashed->starting", "starting->running"]),
    ("failed restart retried after backoff",
     "0 own\n0 reply running\n10 gone\n100 restart-failed\n600 tick\n1100 tick", "crashed",
     ["unknown->running", "running->crashed", "restart#1", "restart#2"]),
    ("new QEMU never answers: hung, not restarted",
     "0 own\n0 reply running\n10 gone\n300 restarted\n3299 tick\n3300 tick", "hung",
     ["unknown->running", "running->crashed", "restart#1", "crashed->starting", "starting->hung"]),
    ("disowned crash is stopped", "0 own\n0 reply running\n10 disown\n20 gone", "stopped",
     ["unknown->running", "running->stopped"]),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("script", "final", "expected"), [s[1:] for s in SCENARIOS],
                         ids=[s[0] for s in SCENARIOS])
def test_scenarios(script: str, final: str, expected: list[str]) -> None:
    core, out = run(script)
    assert out == expected
    assert core.state(VM) == VmState(final)


@pytest.mark.timeout(10)
def test_restart_budget_then_one_relocation_report() -> None:
    cycle = "{t} gone\n{t1} restarted\n{t2} reply running\n"
    script = "0 own\n0 reply running\n" + "".join(
        cycle.format(t=t, t1=t + 100, t2=t + 200) for t in (1000, 2000, 3000))
    script += "4000 gone\n4100 tick\n9000 tick\n"
    core, out = run(script, VmHealthPolicy(max_restarts=3, window_ms=60_000))
    assert [o for o in out if o.startswith("restart")] == ["restart#1", "restart#2", "restart#3"]
    assert out.count("relocate") == 1
    assert out[-1] == "relocate"
    view = core.snapshot()[VM]
    assert view.relocation_reported and view.restarts_in_window == 3 and view.state is VmState.CRASHED


@pytest.mark.timeout(10)
def test_window_slides() -> None:
    policy = VmHealthPolicy(max_restarts=1, window_ms=10_000)
    first = "0 own\n0 reply running\n1000 gone\n1100 restarted\n1200 reply running\n"
    # The restart at 1000 counts in (now - 10000, now]: until 10999 included.
    _, out = run(first + "10999 gone", policy)
    assert out[-1] == "relocate"
    _, out = run(first + "11000 gone", policy)
    assert out[-1] == "restart#1"


@pytest.mark.timeout(10)
def test_zero_restarts_reports_at_once_and_no_panic_restart_by_policy() -> None:
    _, out = run("0 own\n0 reply running\n10 gone", VmHealthPolicy(max_restarts=0))
    assert out == ["unknown->running", "running->crashed", "relocate"]
    _, out = run("0 own\n0 reply running\n10 event GUEST_PANICKED",
                 VmHealthPolicy(restart_on_panic=False))
    assert out == ["unknown->running", "running->panicked"]


@pytest.mark.timeout(10)
def test_vms_are_independent_and_forgettable() -> None:
    core = VmHealth(VmHealthPolicy(hung_timeout_ms=1000))
    core.step(VmExpected(vm="a", should_run=True))
    core.step(VmStatusReplied(vm="a", now_ms=0, status="running"))
    core.step(VmStatusReplied(vm="b", now_ms=0, status="running"))
    out = core.step(VmProcessGone(vm="b", now_ms=10))
    assert not any(isinstance(o, RestartVmInPlace) for o in out)  # b is not owned
    assert {k: v.state for k, v in core.snapshot().items()} == {"a": VmState.RUNNING, "b": VmState.STOPPED}
    core.step(VmForgotten(vm="b"))
    assert list(core.snapshot()) == ["a"]
    with pytest.raises(ValueError):
        VmHealthPolicy(max_restarts=-1)


# ---- properties ------------------------------------------------------------------------

STATUSES = ["running", "paused", "inmigrate", "postmigrate", "shutdown", "guest-panicked",
            "internal-error", "io-error", "prelaunch"]
EVENTS = ["SHUTDOWN", "STOP", "RESUME", "GUEST_PANICKED", "RESET"]
PANIC_INPUTS = {"GUEST_PANICKED", "guest-panicked", "internal-error"}

# Weighted towards the paths that matter: crashes, restarts finishing, VMs coming back.
OPS = ([("reply", s) for s in STATUSES] + [("reply", "running")] * 6 + [("event", e) for e in EVENTS]
       + [("timeout", "")] * 3 + [("gone", "")] * 8 + [("tick", "")] * 4
       + [("finish", "ok")] * 5 + [("finish", "failed")] * 2 + [("own", "yes"), ("own", "no")])
op = st.sampled_from(OPS)
steps = st.lists(st.tuples(st.integers(0, 4_000), op), min_size=10, max_size=80)
policies = st.builds(VmHealthPolicy, max_restarts=st.integers(0, 4), window_ms=st.integers(1_000, 30_000),
                     hung_timeout_ms=st.integers(100, 5_000), restart_on_panic=st.booleans(),
                     restart_backoff_ms=st.integers(0, 3_000))


@dataclass
class Checker:
    policy: VmHealthPolicy
    restarts_ms: list[int]
    pending: bool = False
    crash_seen: bool = False       # a gone or a panic since the last successful restart
    reports_in_episode: int = 0

    def check(self, core: VmHealth, now: int, fed: VmInput | None, outs: list[VmOutput]) -> None:
        state = core.state(VM)
        for o in outs:
            if isinstance(o, RestartVmInPlace):
                assert not self.pending, "a second restart while one is in flight"
                assert self.crash_seen, "a restart without a crash or panic"
                panic_ok = state is VmState.PANICKED and self.policy.restart_on_panic
                assert state is VmState.CRASHED or panic_ok
                assert not isinstance(fed, VmStatusTimedOut), "a restart on a silent (hung) VM"
                view = core.snapshot()[VM]
                assert view.should_run
                self.pending = True
                self.restarts_ms.append(now)
            elif isinstance(o, ReportVmForRelocation):
                self.reports_in_episode += 1
                assert self.reports_in_episode == 1, "relocation reported twice in one episode"
        # Never more than max_restarts in any window of window_ms.
        for t in self.restarts_ms:
            inside = [u for u in self.restarts_ms if t <= u < t + self.policy.window_ms]
            assert len(inside) <= self.policy.max_restarts


@settings(max_examples=300, deadline=None)
@given(policy=policies, script=steps)
@pytest.mark.timeout(60)
def test_properties(policy: VmHealthPolicy, script: list[tuple[int, tuple[str, str]]]) -> None:
    core = VmHealth(policy)
    chk = Checker(policy, [])
    now = 0
    script = [(0, ("own", "yes")), (0, ("reply", "running")), *script]
    for dt, (verb, arg) in script:
        now += dt
        fed: VmInput | None = None
        match verb:
            case "reply":
                fed = VmStatusReplied(vm=VM, now_ms=now, status=arg)
            case "event":
                fed = VmEventSeen(vm=VM, now_ms=now, event=arg)
            case "timeout":
                fed = VmStatusTimedOut(vm=VM, now_ms=now)
            case "gone":
                fed = VmProcessGone(vm=VM, now_ms=now)
            case "own":
                fed = VmExpected(vm=VM, should_run=arg == "yes")
            case "finish":
                if not chk.pending:
                    continue  # the executor answers only restarts it was given
                chk.pending = False
                fed = VmRestarted(vm=VM, now_ms=now) if arg == "ok" else VmRestartFailed(
                    vm=VM, now_ms=now, reason="x")
        if isinstance(fed, VmProcessGone) or (verb in ("reply", "event") and arg in PANIC_INPUTS):
            chk.crash_seen = True
        if isinstance(fed, VmRestarted):
            chk.crash_seen = False
        if (verb == "reply" and arg == "running") or (verb == "event" and arg == "RESUME") or verb == "own":
            chk.reports_in_episode = 0
        outs = core.tick(now) if fed is None else core.step(fed)
        chk.check(core, now, fed, outs)


@settings(max_examples=200, deadline=None)
@given(hung_ms=st.integers(100, 5_000), gaps=st.lists(st.integers(1, 2_000), min_size=1, max_size=40))
@pytest.mark.timeout(60)
def test_silence_means_hung_never_restart(hung_ms: int, gaps: list[int]) -> None:
    core = VmHealth(VmHealthPolicy(hung_timeout_ms=hung_ms, max_restarts=5))
    core.step(VmExpected(vm=VM, should_run=True))
    core.step(VmStatusReplied(vm=VM, now_ms=0, status="running"))
    now = 0
    for gap in gaps:
        now += gap
        outs = core.step(VmStatusTimedOut(vm=VM, now_ms=now)) + core.tick(now)
        assert not any(isinstance(o, RestartVmInPlace | ReportVmForRelocation) for o in outs)
        expected = VmState.HUNG if now >= hung_ms else VmState.RUNNING
        assert core.state(VM) is expected
