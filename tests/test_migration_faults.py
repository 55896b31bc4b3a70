"""Network faults during a migration between two namespace hosts.

The source QEMU runs in host A, the destination in host B; haguard runs in host A
as the agent would.  Faults are applied to the veth link between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from haguard.adapters.qmp import Qmp
from haguard.migration import tls
from tests.helpers.netns import HostPair, host_pair
from tests.helpers.tlscerts import host_credentials, make_ca
from tests.helpers.vms import VmLab, guest_status, guest_vm, run_state, wait_guest_ready

PORT = 4444


async def _status(path) -> str:  # type: ignore[no-untyped-def]
    async with Qmp.session(path, timeout_s=5) as qmp:
        return str((await qmp.cmd("query-migrate")).get("status", "none"))


async def _wait_status(path, wanted: set[str], timeout_s: float) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        st = await _status(path)
        if st in wanted:
            return st
        assert time.monotonic() < deadline, f"migration status stayed {st!r}, wanted {wanted}"
        await asyncio.sleep(0.1)


def _start(lab: VmLab, pair: HostPair, name: str, *extra: str, rate: int = 100,  # type: ignore[no-untyped-def]
           mib: int = 64):
    vm = guest_vm(name, memory_mib=128, mib=mib, rate=rate)
    src = lab.start(vm, netns=pair.a)
    dst = lab.start(vm, incoming=True, netns=pair.b)
    return src, dst, _migrate(lab, pair, src, dst, *extra)


def _migrate(lab: VmLab, pair: HostPair, src, dst, *extra: str):  # type: ignore[no-untyped-def]
    return lab.haguard_bg("migrate", "--source-qmp", str(src.paths.qmp), "--dest-qmp",
                          str(dst.paths.qmp), "--uri", f"tcp:{pair.addr_b}:{PORT}", "--json", *extra,
                          netns=pair.a)


def _finish(proc) -> dict:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no result; stderr: {err}"
    return json.loads(lines[-1])


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    with host_pair("f") as p:
        yield p


@pytest.mark.timeout(120)
async def test_link_cut_during_precopy_keeps_source_running(lab: VmLab, pair: HostPair) -> None:
    src, _dst, proc = _start(lab, pair, "cut1", "--max-bandwidth", "5", "--postcopy", "never",
                            "--progress-timeout", "4")
    await wait_guest_ready(src.paths)
    try:
        await _wait_status(src.paths.ops, {"active"}, 20)
        await asyncio.sleep(1)
        pair.cut()
        res = _finish(proc)
    finally:
        pair.restore()
    assert res["status"] == "aborted" and "no bytes moved" in res["error"], res
    assert proc.returncode == 1
    assert await run_state(src.paths) == "running"
    st = await guest_status(src.paths)
    assert st.errors == 0
    assert set(lab.live_qemus()) == {src.paths.dir.name}, "the destination must be gone"


@contextlib.asynccontextmanager
async def _run_state_events(src, dst):  # type: ignore[no-untyped-def]
    """STOP/RESUME events of both QEMUs, on their watch monitors (migrations never use them)."""
    async with Qmp.session(src.paths.watch) as s, Qmp.session(dst.paths.watch) as d:
        with s.listener(["STOP"]) as stops, d.listener(["RESUME"]) as resumes:
            yield stops, resumes


def _pause_ms(stops, resumes) -> float:  # type: ignore[no-untyped-def]
    def ts(ev) -> float:  # type: ignore[no-untyped-def]
        return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
    assert resumes.history and stops.history, "no STOP/RESUME seen"
    resumed = ts(resumes.history[0])
    return (resumed - max(ts(e) for e in stops.history if ts(e) <= resumed)) * 1000


# Each recovery listens on a port that no listener of the move has used: the
# destination keeps its first listener open and takes any connection to it as the
# recovery stream, and QEMU 7.2 crashed when such a stream failed (docs/migration.md).
async def _postcopy_fault(lab: VmLab, pair: HostPair, name: str, fault: str, rate: int,
                          bandwidth: str = "8", mib: int = 64, *extra: str):  # type: ignore[no-untyped-def]
    vm = guest_vm(name, memory_mib=128, mib=mib, rate=rate)
    src = lab.start(vm, netns=pair.a)
    dst = lab.start(vm, incoming=True, netns=pair.b)
    async with _run_state_events(src, dst) as (stops, resumes):
        proc = _migrate(lab, pair, src, dst, "--max-bandwidth", bandwidth, "--postcopy", "always",
                        "--postcopy-stall", "2", *extra)
        before = await wait_guest_ready(src.paths)
        try:
            await _wait_status(src.paths.ops, {"postcopy-active"}, 60)
            await asyncio.sleep(0.5)
            pair.abort() if fault == "abort" else pair.cut()
            # Both ends pause (QEMU notices an aborted connection; haguard pauses a stalled
            # one).  The monitors are left alone meanwhile, as an operator's would be.
            await asyncio.sleep(7)
        finally:
            pair.restore()
        res = _finish(proc)
        res["measured_pause_ms"] = _pause_ms(stops, resumes) if res["status"] == "completed" else None
    assert any(s["action"] == "RaiseAlert" and s["kind"] == "migration-postcopy-paused"
               for s in res["steps"]), res["steps"]
    return res, src, dst, before


async def _assert_recovered(lab: VmLab, res: dict, src, dst, before) -> None:  # type: ignore[no-untyped-def]
    assert res["status"] == "completed", res
    assert res["postcopy"] is True and res["postcopy_recoveries"] >= 1
    # Exactly once, on the destination, with the guest's memory intact and its clock going on.
    assert set(lab.live_qemus()) == {dst.paths.dir.name}
    assert await run_state(dst.paths) == "running"
    after = await guest_status(dst.paths)
    assert after.errors == 0 and after.ms > before.ms
    # The downtime reported is the guest's real pause (source STOP to destination RESUME),
    # not QEMU's figure, which stops counting before the destination has the device state.
    assert abs(res["downtime_ms"] - res["measured_pause_ms"]) <= 1, res


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_postcopy_connection_aborted_then_restored_recovers(lab: VmLab, pair: HostPair,
                                                                 tmp_path: Path) -> None:
    # The dirtying guest at full speed: many page faults in flight when the stream breaks.  Over
    # TLS: postcopy and its recovery run on the authenticated channel (both ends verify).
    creds = _credentials(tmp_path, pair)
    res, src, dst, before = await _postcopy_fault(lab, pair, "pcab1", "abort", 100, "8", 64,
                                                  "--tls-dir", str(creds))
    await _assert_recovered(lab, res, src, dst, before)
    async with Qmp.session(dst.paths.qmp) as qmp:
        assert await tls.in_use(qmp), "the destination took the move over TLS"


def _credentials(tmp_path: Path, pair: HostPair) -> Path:
    """One directory for both ends: its certificate names the destination's address."""
    return host_credentials(tmp_path, "b", pair.addr_b, make_ca(tmp_path / "ca"))


@pytest.mark.timeout(120)
async def test_multifd_over_tls_moves_a_vm_between_hosts_on_verified_channels(
        lab: VmLab, pair: HostPair, tmp_path: Path) -> None:
    creds = _credentials(tmp_path, pair)
    vm = guest_vm("mtls1", memory_mib=128, mib=32, rate=20)
    src = lab.start(vm, netns=pair.a)
    dst = lab.start(vm, incoming=True, netns=pair.b)
    before = await wait_guest_ready(src.paths)
    res = _finish(_migrate(lab, pair, src, dst, "--postcopy", "never", "--multifd", "on",
                           "--multifd-channels", "3", "--tls-dir", str(creds)))
    assert res["status"] == "completed", res
    async with Qmp.session(dst.paths.qmp) as qmp:
        params = await qmp.cmd("query-migrate-parameters")
        caps = {c["capability"]: c["state"] for c in await qmp.cmd("query-migrate-capabilities")}
    assert params["tls-creds"] == tls.OBJECT_ID and params["multifd-channels"] == 3, params
    assert caps["multifd"] is True
    assert set(lab.live_qemus()) == {dst.paths.dir.name}
    after = await guest_status(dst.paths)
    assert after.errors == 0 and after.ms > before.ms
    # A certificate that does not name the destination: refused, the source still runs.
    vm2 = guest_vm("mtls2", memory_mib=128, mib=32, rate=20)
    other = lab.start(vm2, netns=pair.a)
    dst2 = lab.start(vm2, incoming=True, netns=pair.b)
    await wait_guest_ready(other.paths)
    bad = _finish(_migrate(lab, pair, other, dst2, "--postcopy", "never", "--tls-dir", str(creds),
                           "--tls-hostname", "not-the-destination"))
    assert bad["status"] != "completed", bad
    assert await run_state(other.paths) == "running"


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_postcopy_link_stalled_then_restored_recovers(lab: VmLab, pair: HostPair) -> None:
    res, src, dst, before = await _postcopy_fault(lab, pair, "pcst1", "stall", rate=20)
    await _assert_recovered(lab, res, src, dst, before)
    assert any(s["action"] == "PausePostcopy" for s in res["steps"])
