"""Host probes: real commands and files through the adapter, and the aggregation core."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haguard.adapters.hostprobe import HostProber, run_probe
from haguard.config.cluster import HostProbe
from haguard.core.probes import (
    HostHealthChanged,
    HostProbes,
    HostStatus,
    ProbeFailed,
    ProbeInput,
    ProbePassed,
    ProbePolicy,
    ProbeTimedOut,
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hg-probe-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dead(pid: int) -> bool:
    """Gone or a zombie (an orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def cmd(*argv: str, timeout_s: float = 5.0) -> HostProbe:
    return HostProbe(name="cmd", command=argv, timeout_s=timeout_s)


@pytest.mark.timeout(10)
async def test_command_exit_codes() -> None:
    ok = await run_probe(cmd("true"))
    assert isinstance(ok, ProbePassed) and ok.probe == "cmd"
    bad = await run_probe(cmd("sh", "-c", "echo checking; echo 'disk /srv full' >&2; exit 3"))
    assert isinstance(bad, ProbeFailed)
    assert bad.reason == "exit 3: disk /srv full"
    missing = await run_probe(cmd("/nonexistent/probe"))
    assert isinstance(missing, ProbeFailed)
    assert missing.reason == "cannot run /nonexistent/probe: No such file or directory"


@pytest.mark.timeout(10)
async def test_command_past_its_timeout_is_killed_with_its_children(tmp: Path) -> None:
    pids = tmp / "pids"
    t0 = time.monotonic()
    res = await run_probe(cmd("sh", "-c", f"sleep 30 & echo $$ $! > {pids}; wait", timeout_s=0.5))
    took = time.monotonic() - t0
    assert isinstance(res, ProbeTimedOut) and res.timeout_ms == 500
    assert 0.5 <= took < 2.0
    shell, child = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 2
    while not (dead(shell) and dead(child)):
        assert time.monotonic() < deadline, "the probe's process group survived"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(10)
async def test_file_probes(tmp: Path) -> None:
    f = tmp / "value"

    def probe(path: Path) -> HostProbe:
        return HostProbe(name="load", file=path, max_value=4.0)

    f.write_text("0.52 0.58 0.59 1/189 12345\n")  # /proc/loadavg's shape
    under = await run_probe(probe(f))
    assert isinstance(under, ProbePassed) and under.detail == "0.52"
    f.write_text("4\n")
    assert isinstance(await run_probe(probe(f)), ProbePassed)  # at the limit is fine
    f.write_text("7.5\n")
    over = await run_probe(probe(f))
    assert isinstance(over, ProbeFailed) and over.reason == f"{f}: 7.5 is above the limit 4"
    f.write_text("lots\n")
    garbage = await run_probe(probe(f))
    assert isinstance(garbage, ProbeFailed) and "does not start with a number ('lots')" in garbage.reason
    missing = await run_probe(probe(tmp / "absent"))
    assert isinstance(missing, ProbeFailed)
    assert missing.reason == f"cannot read {tmp / 'absent'}: No such file or directory"
    real = await run_probe(HostProbe(name="load", file=Path("/proc/loadavg"), max_value=10_000))
    assert isinstance(real, ProbePassed)


@pytest.mark.timeout(15)
async def test_prober_runs_on_intervals_and_degrades_the_host(tmp: Path) -> None:
    f = tmp / "temp"
    f.write_text("95\n")
    probes = [HostProbe(name="temp", file=f, max_value=80, interval_s=0.1),
              HostProbe(name="alive", command=("true",), interval_s=0.1)]
    core = HostProbes(ProbePolicy(fail_after=2, pass_after=2))
    results: list[ProbeInput] = []
    changes: list[HostHealthChanged] = []

    def on_result(r: ProbeInput) -> None:
        results.append(r)
        changes.extend(core.step(r))

    task = asyncio.create_task(HostProber(probes, on_result).run())
    try:
        await asyncio.sleep(0.45)
        assert sum(r.probe == "temp" for r in results) >= 3
        assert sum(r.probe == "alive" for r in results) >= 3
        health = core.health()
        assert health.status is HostStatus.DEGRADED
        assert [(p.name, p.reason) for p in health.failing] == [("temp", f"{f}: 95 is above the limit 80")]
        f.write_text("40\n")
        deadline = time.monotonic() + 2
        while not core.health().healthy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [c.new.status for c in changes] == [HostStatus.DEGRADED, HostStatus.HEALTHY]
    with pytest.raises(ValueError):
        HostProber(probes + probes, on_result)


# ---- the aggregation core ---------------------------------------------------------------

def feed(core: HostProbes, seq: str, probe: str = "p") -> list[HostStatus]:
    """`+` pass, `-` fail, `t` timeout; the host status after each result."""
    out = []
    for i, c in enumerate(seq):
        r: ProbeInput = {"+": ProbePassed(probe=probe, now_ms=i),
                         "-": ProbeFailed(probe=probe, now_ms=i, reason=f"bad {i}"),
                         "t": ProbeTimedOut(probe=probe, now_ms=i, timeout_ms=500)}[c]
        core.step(r)
        out.append(core.health().status)
    return out


H, D = HostStatus.HEALTHY, HostStatus.DEGRADED


@pytest.mark.timeout(5)
@pytest.mark.parametrize(("fail_after", "pass_after", "seq", "expected"), [
    (2, 2, "-+-+-+", [H, H, H, H, H, H]),          # flapping never degrades
    (2, 2, "--", [H, D]),
    (2, 2, "-t", [H, D]),                           # a timeout is a failure
    (2, 2, "--+-+", [H, D, D, D, D]),               # clearing needs passes in a row
    (2, 2, "--++", [H, D, D, H]),
    (1, 1, "-+-", [D, H, D]),
    (3, 1, "--+---", [H, H, H, H, H, D]),
])
def test_flapping_protection(fail_after: int, pass_after: int, seq: str, expected: list[HostStatus]) -> None:
    assert feed(HostProbes(ProbePolicy(fail_after=fail_after, pass_after=pass_after)), seq) == expected


@pytest.mark.timeout(5)
def test_degraded_names_every_failing_probe_with_its_reason() -> None:
    core = HostProbes()
    feed(core, "--", probe="disk")
    changes = core.step(ProbeTimedOut(probe="nfs", now_ms=10, timeout_ms=5000))
    assert changes == []  # one timeout is not enough
    changes = core.step(ProbeTimedOut(probe="nfs", now_ms=20, timeout_ms=5000))
    assert len(changes) == 1 and changes[0].old.status is D
    health = core.health()
    assert [(p.name, p.reason, p.since_ms) for p in health.failing] == [
        ("disk", "bad 1", 0), ("nfs", "timed out after 5 s", 10)]
    assert health.summary() == "degraded: disk: bad 1; nfs: timed out after 5 s"
    assert core.step(ProbeFailed(probe="disk", now_ms=30, reason="worse")) == []  # same set: no news
    assert core.forget("disk")[0].new.failing[0].name == "nfs"
    with pytest.raises(ValueError):
        ProbePolicy(fail_after=0)
