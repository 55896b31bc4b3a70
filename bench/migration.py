"""Live migration: the classic script approach against `haguard migrate`, side by side.

Two scenarios, each move to a freshly started destination QEMU on this host, over TCP
on loopback (see bench/README.md for every definition):

  idle   an idle 1 GiB VM (its memory untouched since boot)
  dirty  the dirtying test guest rewriting a 2.5 GiB region at 100 MiB/s

  classic      a script speaking QMP: `migrate-incoming`, `migrate` with QEMU's defaults,
               `query-migrate` every 0.5 s until completed, `migrate_cancel` after 60 s
  haguard      the migration engine with its defaults (postcopy auto)
  haguard-tls  the same over TLS (tls-creds-x509, both ends verifying the other; a lab CA
               made with openssl as docs/migration.md shows): its cost beside plain TCP

Usage: .venv/bin/python bench/migration.py [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from bench.common import base_parser, emit_result, log, median, run_async, scratch_dir
from haguard.adapters.qmp import Qmp
from haguard.core.strategy import ConvergencePolicy
from haguard.errors import HaguardError
from haguard.guest.build import XP_COMMAND, GuestStatus, build_guest, parse_status
from haguard.migration import tls
from haguard.migration.engine import run_migration
from haguard.migration.managed import free_tcp_port
from haguard.migration.options import MigrationOptions
from haguard.migration.result import Progress
from haguard.migration.uri import MigrationUri
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition
from tests.helpers.tlscerts import host_credentials, make_ca

MIB = 1 << 20
# Moves start while the writer is this close to the top of its region (align_to_sweep).
# By our reading of QEMU 7.2 (clear-bitmap-shift 18) pages are re-protected for dirty
# logging 1 GiB at a time as the scan reaches them; a writer less than about 200 MiB
# ahead, at 100 against 128 MiB/s, is overtaken before it reaches the next GiB.
ALIGN_MIB = 160
CLASSIC_POLL_S = 0.5
CLASSIC_LIMIT_S = 60.0
TARGET_IDLE_DOWNTIME_MS = 300
TARGET_DIRTY_DOWNTIME_MS = 50
TARGET_DIRTY_FACTOR, TARGET_DIRTY_SLACK_MS = 1.5, 2000
APPROACHES = ("classic", "haguard", "haguard-tls")


@dataclass(frozen=True)
class Scenario:
    name: str
    memory_mib: int
    region_mib: int
    rate_mib_s: int

    @property
    def dirtying(self) -> bool:
        return self.rate_mib_s > 0


IDLE = Scenario("idle", memory_mib=1024, region_mib=16, rate_mib_s=0)
# At QEMU 7.2's default 128 MiB/s cap, pre-copy gains only 28 MiB/s on a 100 MiB/s
# dirtier: about region/28 s to converge, so 2560 MiB needs about 90 s, 1.5x the limit.
DIRTY = Scenario("dirty", memory_mib=2816, region_mib=2560, rate_mib_s=100)
# --quick: 1536 MiB, about 53 s against a 30 s limit, because the guest must write its
# whole region once (13 s per GiB of first touch here, plus region/rate) before a move.
DIRTY_QUICK = Scenario("dirty", memory_mib=1792, region_mib=1536, rate_mib_s=100)


@dataclass
class Run:
    scenario: str
    approach: str
    rep: int
    completed: bool = False
    total_time_ms: int | None = None     # see README: what each approach's clock covers
    call_ms: int | None = None           # the whole call, connects and clean-up included
    downtime_ms: float | None = None     # destination RESUME minus source STOP (event times)
    qemu_downtime_ms: int | None = None  # QEMU's own `downtime` (query-migrate, read by the bench)
    reported_downtime_ms: int | None = None  # haguard: its MigrationResult.downtime_ms
    transferred_bytes: int = 0
    postcopy: bool = False
    passes: int = 0
    guest_ok: bool | None = None         # the guest kept counting, with no corrupted page
    guest_rate_mib_s: float | None = None  # what the guest really wrote during the move
    remaining_bytes: int | None = None   # classic: what was left to send when it gave up
    pass1_bps: float | None = None       # throughput of the first full pass
    preflight_ms: int | None = None      # haguard: from its start to its first sample after `migrate`
    downtime_limit_ms: int | None = None  # haguard: the downtime-limit in force at the end
    lower_bound_ms: float | None = None  # dirty, haguard: region / this move's first-pass rate
    time_limit_ms: float | None = None   # dirty, haguard: 1.5 x lower bound + 2 s
    error: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


# ---- VMs ---------------------------------------------------------------------------

def guest_vm(sc: Scenario, name: str) -> VmDefinition:
    return VmDefinition(name=name, memory_mib=sc.memory_mib, machine="pc-i440fx-7.2",
                        firmware="qboot", kernel=build_guest(),
                        append=f"mib={sc.region_mib} rate={sc.rate_mib_s}")


class Watch:
    """One session on an instance's watch monitor (the one migrations never use):
    the guest's status block, the STOP/RESUME events with QEMU's own timestamps, and
    QEMU's own `downtime` once a move completes."""

    def __init__(self, paths: InstancePaths) -> None:
        self.qmp = Qmp(paths.watch, timeout_s=10, name="bench-watch")
        self._ctx: contextlib.AbstractContextManager[Any] | None = None
        self._listener: Any = None

    async def __aenter__(self) -> Watch:
        await self.qmp.connect()
        self._ctx = self.qmp.listener(["STOP", "RESUME"])
        self._listener = self._ctx.__enter__()
        # Subscribed separately so that waiting for `completed` consumes nothing times() reads.
        self._mig_ctx = self.qmp.listener(["MIGRATION"])
        self._mig = self._mig_ctx.__enter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ctx is not None:
            self._mig_ctx.__exit__(None, None, None)
            self._ctx.__exit__(None, None, None)
        await self.qmp.close()

    async def status(self) -> GuestStatus:
        out = await self.qmp.cmd("human-monitor-command", {"command-line": XP_COMMAND})
        return parse_status(out)

    async def qemu_downtime_at_completion(self) -> int | None:
        """QEMU's own `downtime` for the move, asked as soon as the source announces
        `completed` (needs the `events` capability, which haguard sets): the engine quits
        the source a few round trips later, so it is None if the quit wins the race.

        QEMU 7.2 reports `completed` before it computes `downtime` and `total-time`
        (both 0 until then), so ask again until `total-time` is set."""
        while True:
            ev: Any = await self._mig.get()
            if ev.get("data", {}).get("status") == "completed":
                break
        with contextlib.suppress(HaguardError, TimeoutError):
            return await final_downtime(self.qmp)
        return None

    def times(self, name: str) -> list[float]:
        return [ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
                for ev in self._listener.history if ev["event"] == name]


async def wait_ready(paths: InstancePaths, sc: Scenario) -> GuestStatus:
    """Up, and (dirtying guest) its whole region written once, so all of it is non-zero.

    Generous: on a loaded host the first touch of fresh memory alone takes minutes."""
    deadline = time.monotonic() + 60 + 3 * sc.region_mib / max(sc.rate_mib_s, 1)
    while True:
        with contextlib.suppress(HaguardError):
            async with Watch(paths) as w:
                st = await w.status()
            if st.alive and st.ms > 50 and (not sc.dirtying or st.passes >= 1):
                return st
        if time.monotonic() > deadline:
            raise HaguardError(f"guest in {paths.dir} did not get ready")
        await asyncio.sleep(0.5)


async def align_to_sweep(w: Watch, sc: Scenario) -> None:
    """Return while the guest is in the first ALIGN_MIB of a sweep of its region.

    Where the guest writes when `migrate` starts decides how much of its writing the
    first pass absorbs (a page rewritten before the scan reaches it is sent once):
    from random points the default-capped pre-copy converged in 40 to 103 s.  Starting
    every move near the top of a sweep gives each the same race, the one the textbook
    model (region / (bandwidth - dirty rate)) describes: the scan runs ahead of the writer.
    """
    if not sc.dirtying:
        return
    pages = sc.region_mib * 256
    deadline = time.monotonic() + 2 * sc.region_mib / sc.rate_mib_s + 10
    while time.monotonic() < deadline:
        at_mib = ((await w.status()).pages % pages) / 256
        if at_mib < ALIGN_MIB:
            return
        to_wrap_s = (sc.region_mib - at_mib) / sc.rate_mib_s
        await asyncio.sleep(max(0.05, min(to_wrap_s - 0.2, 5.0)))
    raise HaguardError("the dirtying guest does not keep its rate: the host is overloaded")


async def final_downtime(qmp: Qmp) -> int | None:
    """QEMU's `downtime` of a completed move, once QEMU has computed it: 7.2 reports
    `completed` before it sets `downtime` and `total-time` (both 0 until then)."""
    async with asyncio.timeout(2):
        while not (info := await qmp.cmd("query-migrate")).get("total-time"):
            await asyncio.sleep(0.001)
    figure = info.get("downtime")
    return None if figure is None else int(figure)


def downtime_between(src: Watch, dst: Watch) -> float | None:
    resumed = dst.times("RESUME")
    stopped = [t for t in src.times("STOP") if resumed and t <= resumed[0]]
    if not resumed or not stopped:
        return None
    return round((resumed[0] - stopped[-1]) * 1000, 1)


async def check_guest(w: Watch, before: GuestStatus, run: Run) -> None:
    st = await w.status()
    run.guest_ok = st.alive and st.errors == 0 and st.ms > before.ms and st.pages >= before.pages
    if st.ms > before.ms:
        run.guest_rate_mib_s = round((st.pages - before.pages) / 256 / ((st.ms - before.ms) / 1000), 1)


# ---- the two approaches ------------------------------------------------------------

async def classic_move(base: Path, vm: VmDefinition, sc: Scenario, run: Run,
                       limit_s: float) -> None:
    """What an operator's script does: QEMU's defaults, poll every 0.5 s, give up at the limit."""
    src = launcher.current_paths(vm.name, base)
    dst = launcher.start(vm, base, incoming=True)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    t_call = time.monotonic()
    try:
        async with Watch(src) as wsrc, Watch(dst.paths) as wdst, \
                Qmp.session(dst.paths.qmp, timeout_s=10) as d, \
                Qmp.session(src.qmp, timeout_s=10) as s:
            before = await wsrc.status()
            p = await s.cmd("query-migrate-parameters")
            run.params = {k: p[k] for k in ("max-bandwidth", "downtime-limit")}
            await d.cmd("migrate-incoming", {"uri": uri})
            await align_to_sweep(wsrc, sc)
            t0 = time.monotonic()
            await s.cmd("migrate", {"uri": uri})
            info: dict[str, Any] = {}
            last_ram: dict[str, Any] = {}
            while True:
                await asyncio.sleep(CLASSIC_POLL_S)
                info = await s.cmd("query-migrate")
                last_ram = info.get("ram") or last_ram
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 >= limit_s:
                    await s.cmd("migrate_cancel")
                    async with asyncio.timeout(20):
                        while (info := await s.cmd("query-migrate")).get("status") not in (
                                "cancelled", "failed", "completed"):
                            await asyncio.sleep(0.1)
                    break
            run.total_time_ms = round((time.monotonic() - t0) * 1000)
            run.completed = info.get("status") == "completed"
            run.transferred_bytes = int(last_ram.get("transferred", 0))
            run.passes = int(last_ram.get("dirty-sync-count", 0))
            run.remaining_bytes = int(last_ram.get("remaining", 0))
            if run.completed:
                run.qemu_downtime_ms = await final_downtime(s)
                await asyncio.sleep(0.1)  # the destination's RESUME follows `completed`
                run.downtime_ms = downtime_between(wsrc, wdst)
                await check_guest(wdst, before, run)
            else:
                run.error = f"{info.get('status')} after {run.total_time_ms / 1000:.1f} s"
                await check_guest(wsrc, before, run)  # still running at the source
        run.call_ms = round((time.monotonic() - t_call) * 1000)
    finally:
        if run.completed:
            launcher.promote(vm.name, base, dst.paths)
            await launcher.stop(src)
        else:
            await launcher.stop(dst.paths)


def pass1_throughput(samples: list[Progress]) -> float | None:
    """Bytes per second between the first and the last sample of the first full pass."""
    first = [p for p in samples if p.status == "active" and p.passes == 1]
    if len(first) < 2 or first[-1].elapsed_ms <= first[0].elapsed_ms:
        return None
    return ((first[-1].transferred_bytes - first[0].transferred_bytes) * 1000
            / (first[-1].elapsed_ms - first[0].elapsed_ms))


async def haguard_move(base: Path, vm: VmDefinition, sc: Scenario, run: Run,
                       policy: ConvergencePolicy, multifd: str = "auto", tls_dir: Path | None = None) -> None:
    """The engine with its defaults, to a destination started as `haguard migrate` starts it
    (`tls_dir`: over TLS, the destination's side set as its agent sets it)."""
    src = launcher.current_paths(vm.name, base)
    dst = launcher.start(vm, base, incoming=True)
    opts = MigrationOptions(uri=MigrationUri("tcp", host="127.0.0.1", port=free_tcp_port()),
                            policy=policy, vm_name=vm.name, tls_dir=tls_dir, tls_hostname="127.0.0.1",
                            multifd=multifd)  # type: ignore[arg-type]  # argparse's choices
    if tls_dir is not None:
        async with Qmp.session(dst.paths.qmp) as q:
            await tls.enable(q, tls_dir, "server")
    samples: list[Progress] = []
    ok = False
    qemu_figure: asyncio.Task[int | None] | None = None
    try:
        async with Watch(src) as wsrc, Watch(dst.paths) as wdst:
            before = await wsrc.status()
            await align_to_sweep(wsrc, sc)
            qemu_figure = asyncio.create_task(wsrc.qemu_downtime_at_completion())
            t_call = time.monotonic()
            res = await run_migration(str(src.qmp), str(dst.paths.qmp), opts,
                                      on_progress=samples.append)
            run.call_ms = round((time.monotonic() - t_call) * 1000)
            ok = res.ok
            run.completed, run.error = res.ok, res.error
            run.total_time_ms = res.total_time_ms
            # After a postcopy the engine reports the guest's real pause (source STOP to
            # destination RESUME), otherwise QEMU's figure; the bench's own event-timed
            # pause (downtime_ms) stays the reference, QEMU's figure is read separately.
            run.reported_downtime_ms = res.downtime_ms
            if ok:
                with contextlib.suppress(TimeoutError):
                    run.qemu_downtime_ms = await asyncio.wait_for(qemu_figure, 2)
            run.transferred_bytes, run.passes = res.transferred_bytes, res.passes
            run.postcopy, run.steps = res.postcopy, res.steps
            run.pass1_bps = pass1_throughput(samples)
            run.preflight_ms = samples[0].elapsed_ms if samples else None
            run.downtime_limit_ms = samples[-1].downtime_limit_ms if samples else None
            if ok:
                await asyncio.sleep(0.1)
                run.downtime_ms = downtime_between(wsrc, wdst)
                await check_guest(wdst, before, run)
    finally:
        if qemu_figure is not None and not qemu_figure.done():
            qemu_figure.cancel()
        if ok:
            launcher.promote(vm.name, base, dst.paths)
            await launcher.stop(src)
        else:
            await launcher.stop(dst.paths)


# ---- the runs ----------------------------------------------------------------------

@dataclass
class Settings:
    idle_reps: int
    dirty_reps: int
    classic_limit_s: float
    policy: ConvergencePolicy
    scenarios: tuple[str, ...]
    dirty: Scenario = DIRTY
    approaches: tuple[str, ...] = APPROACHES
    multifd: str = "auto"
    tls_dir: Path | None = None


async def one_vm(base: Path, sc: Scenario, rep: int, approaches: list[str],
                 st: Settings) -> list[Run]:
    """Boot a fresh VM, run the approaches on it in order, stop it."""
    name = f"{sc.name}{rep}"
    vm = guest_vm(sc, name)
    launcher.start(vm, base)
    runs: list[Run] = []
    try:
        t = time.monotonic()
        await wait_ready(launcher.current_paths(name, base), sc)
        log(f"{sc.name} #{rep}: guest ready in {time.monotonic() - t:.1f} s")
        for approach in approaches:
            run = Run(sc.name, approach, rep)
            runs.append(run)
            log(f"{sc.name} #{rep}: {approach} ...")
            try:
                if approach == "classic":
                    await classic_move(base, vm, sc, run, st.classic_limit_s)
                else:
                    await haguard_move(base, vm, sc, run, st.policy, st.multifd,
                                       st.tls_dir if approach == "haguard-tls" else None)
            except (HaguardError, TimeoutError, OSError) as exc:
                run.error = run.error or f"{type(exc).__name__}: {exc}"
            reported = ("" if run.reported_downtime_ms is None
                        else f"haguard reports {run.reported_downtime_ms}, ")
            log(f"{sc.name} #{rep}: {approach}: completed={run.completed} "
                f"time={run.total_time_ms} ms downtime={run.downtime_ms} ms STOP->RESUME "
                f"({reported}QEMU's own {run.qemu_downtime_ms}, "
                f"limit {run.downtime_limit_ms or 'default'}) "
                f"{run.transferred_bytes / MIB:.0f} MiB "
                f"postcopy={run.postcopy} passes={run.passes} steps="
                f"{[s['action'] for s in run.steps]} {run.error or ''}")
    finally:
        await launcher.stop(launcher.current_paths(name, base))
    return runs


async def run_all(base: Path, st: Settings) -> list[Run]:
    runs: list[Run] = []
    if "idle" in st.scenarios:
        for rep in range(st.idle_reps):
            # A fresh VM per move, the order rotating so drift favours none.
            order = [a for a in APPROACHES if a in st.approaches]
            order = order[rep % len(order):] + order[:rep % len(order)]
            for i, approach in enumerate(order):
                runs += await one_vm(base, IDLE, rep * len(APPROACHES) + i, [approach], st)
    if "dirty" in st.scenarios:
        for rep in range(st.dirty_reps):
            # One warmed-up guest for all: the classic script changes no setting, so the
            # VM it leaves behind (cancelled, on the source) is as haguard would find it;
            # the TLS move then takes the guest where the plain one left it, still dirtying.
            runs += await one_vm(base, st.dirty, rep, [a for a in APPROACHES if a in st.approaches], st)
    return runs


def raw_socket_bps(total: int = 512 * MIB, chunk: int = MIB) -> float:
    """A plain TCP copy over loopback, for context: the link without QEMU's page work."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got = 0

    def sink() -> None:
        nonlocal got
        conn, _ = srv.accept()
        buf = bytearray(chunk)
        with conn:
            while (n := conn.recv_into(buf)) > 0:
                got += n

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    data = os.urandom(chunk)
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.monotonic()
        for _ in range(total // chunk):
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        t.join(30)
        dt = time.monotonic() - t0
    srv.close()
    return got / dt


# ---- figures -----------------------------------------------------------------------

def summarize(runs: list[Run]) -> dict[str, Any]:
    done = [r for r in runs if r.completed]
    times = [r.total_time_ms for r in runs if r.total_time_ms is not None]
    downs = [r.downtime_ms for r in done if r.downtime_ms is not None]
    return {
        "runs": len(runs),
        "completed_runs": len(done),
        "completed": bool(runs) and len(done) == len(runs),
        "total_time_ms": median(times),
        "downtime_ms": median(downs),
        "downtime_max_ms": max(downs) if downs else None,
        # For reference only (README): QEMU's own figure, and what haguard's result says.
        "qemu_downtime_ms": median([r.qemu_downtime_ms for r in done
                                    if r.qemu_downtime_ms is not None]),
        "reported_downtime_ms": median([r.reported_downtime_ms for r in done
                                        if r.reported_downtime_ms is not None]),
        "transferred_bytes": median([r.transferred_bytes for r in runs]),
        "postcopy": any(r.postcopy for r in runs),
        "postcopy_runs": sum(r.postcopy for r in runs),
        "guest_ok": all(r.guest_ok for r in runs),
        "each": [asdict(r) for r in runs],
    }


def figures(runs: list[Run], st: Settings, raw_bps: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "migration", "transport": "tcp-loopback",
        "classic_poll_s": CLASSIC_POLL_S, "classic_limit_s": st.classic_limit_s,
        "haguard_policy": asdict(st.policy), "haguard_multifd": st.multifd,
        "classic_qemu_defaults": next((r.params for r in runs if r.params), {}),
    }
    # The link as a live move of this guest gets it: the unthrottled first pass (README).
    bw = median([r.pass1_bps for r in runs
                 if r.scenario == "dirty" and r.approach == "haguard" and r.pass1_bps])
    out["bandwidth_bps"] = bw
    out["raw_socket_bps"] = raw_bps
    for sc in (IDLE, st.dirty):
        if sc.name not in st.scenarios:
            continue
        mine = [r for r in runs if r.scenario == sc.name]
        if sc.dirtying:
            must_move = sc.region_mib * MIB  # every page of the region holds a non-zero word
        else:
            # Zero-page markers and a tiny kernel: all the stream carried.
            must_move = min((r.transferred_bytes for r in mine if r.completed), default=0)
        for r in mine:
            if sc.dirtying and r.approach == "haguard" and r.pass1_bps:
                # Each move against the bound from its own first pass: the machine's load
                # changes from one move to the next, a side-by-side ratio does not.
                r.lower_bound_ms = round(must_move / r.pass1_bps * 1000, 1)
                r.time_limit_ms = round(r.lower_bound_ms * TARGET_DIRTY_FACTOR
                                        + TARGET_DIRTY_SLACK_MS, 1)
        entry: dict[str, Any] = {
            "guest": {"memory_mib": sc.memory_mib, "region_mib": sc.region_mib,
                      "rate_mib_s": sc.rate_mib_s},
            "bytes_to_move": must_move,
            "lower_bound_ms": round(must_move / bw * 1000, 1) if bw else None,
            "classic": summarize([r for r in mine if r.approach == "classic"]),
            "haguard": summarize([r for r in mine if r.approach == "haguard"]),
            "haguard-tls": summarize([r for r in mine if r.approach == "haguard-tls"]),
        }
        plain, secure = entry["haguard"], entry["haguard-tls"]
        entry["tls_vs_plain"] = {k: (round(secure[k] / plain[k], 2) if secure[k] and plain[k] else None)
                                 for k in ("total_time_ms", "downtime_ms")}
        out[sc.name] = entry
    out["targets"] = targets(out)
    out["all_targets_met"] = all(t["ok"] for t in out["targets"].values())
    return out


def targets(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t: dict[str, dict[str, Any]] = {}
    if "idle" in f:
        c, h = f["idle"]["classic"], f["idle"]["haguard"]
        t["idle_time"] = {
            "ok": bool(h["completed"] and c["total_time_ms"] is not None
                       and h["total_time_ms"] <= c["total_time_ms"]),
            "haguard_ms": h["total_time_ms"], "classic_ms": c["total_time_ms"]}
        t["idle_downtime"] = {
            "ok": h["downtime_ms"] is not None and h["downtime_ms"] <= TARGET_IDLE_DOWNTIME_MS,
            "haguard_ms": h["downtime_ms"], "limit_ms": TARGET_IDLE_DOWNTIME_MS}
    if "dirty" in f:
        c, h = f["dirty"]["classic"], f["dirty"]["haguard"]
        t["dirty_classic_not_done"] = {
            "ok": c["runs"] > 0 and c["completed_runs"] == 0,
            "classic_completed_runs": c["completed_runs"], "limit_s": f["classic_limit_s"]}
        each = [r for r in h["each"] if r["time_limit_ms"] is not None]
        over = median([r["total_time_ms"] - r["time_limit_ms"] for r in each if r["completed"]])
        t["dirty_time"] = {
            "ok": bool(h["completed"] and over is not None and over <= 0),
            "haguard_ms": h["total_time_ms"],
            "lower_bound_ms": median([r["lower_bound_ms"] for r in each]),
            "limit_ms": median([r["time_limit_ms"] for r in each]),
            "over_limit_ms": over}
        t["dirty_downtime"] = {
            "ok": h["downtime_ms"] is not None and h["downtime_ms"] <= TARGET_DIRTY_DOWNTIME_MS,
            "haguard_ms": h["downtime_ms"], "limit_ms": TARGET_DIRTY_DOWNTIME_MS}
    return t


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def print_tables(f: dict[str, Any]) -> None:
    con = Console(width=120, highlight=False)
    tab = Table(title="Live migration: classic script vs haguard (medians)")
    for col in ("scenario", "approach", "completed", "total time", "downtime (max)",
                "transferred", "postcopy", "lower bound"):
        tab.add_column(col, justify="left" if col in ("scenario", "approach") else "right")
    for sc in ("idle", "dirty"):
        if sc not in f:
            continue
        for ap in APPROACHES:
            s = f[sc][ap]
            if not s["runs"]:
                continue
            tab.add_row(sc, ap, f"{s['completed_runs']}/{s['runs']}", _ms(s["total_time_ms"]),
                        f"{_ms(s['downtime_ms'])} ({_ms(s['downtime_max_ms'])})",
                        f"{(s['transferred_bytes'] or 0) / MIB:,.0f} MiB",
                        f"{s['postcopy_runs']}/{s['runs']}", _ms(f[sc]["lower_bound_ms"]))
    con.print(tab)
    bw, raw = f["bandwidth_bps"], f["raw_socket_bps"]
    con.print(f"bandwidth (unthrottled first pass, median): {bw / MIB:,.0f} MiB/s" if bw
              else "bandwidth: not measured", f"   raw TCP loopback copy: {raw / MIB:,.0f} MiB/s")
    con.print(f"classic script's QEMU parameters: {f['classic_qemu_defaults']}")
    for sc in ("idle", "dirty"):
        if sc in f:
            con.print(f"{sc}: TLS against plain (haguard-tls / haguard, medians): {f[sc]['tls_vs_plain']}")
    tt = Table(title="Targets")
    for col in ("target", "result", "figures"):
        tt.add_column(col)
    for name, t in f["targets"].items():
        figs = ", ".join(f"{k}={v:,.0f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in t.items() if k != "ok")
        tt.add_row(name, "[green]PASS[/]" if t["ok"] else "[red]FAIL[/]", figs)
    con.print(tt)


# ---- main --------------------------------------------------------------------------

def parse_args() -> tuple[Settings, bool]:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, help="repetitions of each scenario (default: idle 5, "
                    "dirty 3; --quick: 1 each)")
    ap.add_argument("--scenario", choices=["idle", "dirty", "both"], default="both")
    ap.add_argument("--classic-limit", type=float, metavar="S",
                    help="the classic script gives up after this long (default 60; --quick: 30)")
    ap.add_argument("--approach", choices=[*APPROACHES, "all"], default="all",
                    help="experiment: run only one approach")
    ap.add_argument("--downtime-steps", metavar="MS,MS,...",
                    help="experiment: haguard's downtime-limit ladder instead of its default")
    ap.add_argument("--multifd", choices=["auto", "on", "off"], default="auto",
                    help="experiment: haguard's multifd option instead of its default")
    ap.add_argument("--postcopy", choices=["never", "auto", "always"],
                    help="experiment: haguard's postcopy mode instead of its default")
    args = ap.parse_args()
    policy = ConvergencePolicy()
    if args.downtime_steps:
        policy = replace(policy, downtime_steps_ms=tuple(int(x) for x in args.downtime_steps.split(",")))
    if args.postcopy:
        policy = replace(policy, postcopy=args.postcopy)
    idle_reps, dirty_reps = (1, 1) if args.quick else (5, 3)
    if args.reps:
        idle_reps = dirty_reps = args.reps
    limit = args.classic_limit or (CLASSIC_LIMIT_S / 2 if args.quick else CLASSIC_LIMIT_S)
    return Settings(
        idle_reps, dirty_reps, limit, policy,
        scenarios=("idle", "dirty") if args.scenario == "both" else (args.scenario,),
        dirty=DIRTY_QUICK if args.quick else DIRTY,
        approaches=APPROACHES if args.approach == "all" else (args.approach,),
        multifd=args.multifd,
    ), args.quick


async def bench(root: Path, st: Settings, quick: bool) -> dict[str, Any]:
    build_guest()
    if "haguard-tls" in st.approaches:
        st.tls_dir = host_credentials(root / "tls", "bench", "127.0.0.1", make_ca(root / "tls" / "ca"))
    raw = await asyncio.to_thread(raw_socket_bps)
    log(f"raw TCP loopback copy: {raw / MIB:.0f} MiB/s")
    runs = await run_all(root / "run", st)
    f = figures(runs, st, raw)
    f["quick"] = quick
    return f


def main() -> int:
    st, quick = parse_args()
    os.environ["HAGUARD_NO_SCOPE"] = "1"  # the benchmark owns and kills its QEMUs
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    try:
        with scratch_dir("mig") as root:
            f = run_async(lambda: bench(root, st, quick))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every QEMU and temp dir removed", file=sys.stderr)
        return 130
    except HaguardError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        emit_result({"benchmark": "migration", "quick": quick, "error": str(exc),
                     "all_targets_met": False})
        return 1
    f["bench_seconds"] = round(time.monotonic() - t0, 1)
    print_tables(f)
    emit_result(f)
    return 0 if f["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
