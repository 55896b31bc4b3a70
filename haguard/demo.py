"""`haguard demo`: live migration, then a 3-host cluster, shown step by step.

Act 1 (`--migration` alone): a VM with a memory-dirtying guest moved live between two
local QEMUs: a move that converges in pre-copy, then one that cannot (bandwidth capped far
below the guest's dirty rate) and so escalates to postcopy; a summary table.

Act 2 (`--cluster` alone, haguard/lab/tour.py): three hosts (network namespaces when root,
else loopback), a private mosquitto, six tiny VMs; the live cluster, a host drained with
progress bars, another powered off and fenced, its VMs recovered elsewhere.

Every step is checked (a guest kept its state; no VM ever ran twice; ...); the exit code is
0 only if all of them held.  Everything it starts lives in temporary directories (and, for
the cluster, namespaces) and is removed at the end, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from haguard.adapters.qmp import Qmp
from haguard.core.strategy import ConvergencePolicy
from haguard.errors import HaguardError
from haguard.guest.build import XP_COMMAND, GuestStatus, build_guest, parse_status
from haguard.lab.tour import ClusterTour
from haguard.migration.managed import migrate_vm
from haguard.migration.options import MigrationOptions
from haguard.migration.result import MigrationResult
from haguard.migration.uri import MigrationUri
from haguard.ui.progress import MigrationDisplay, result_table
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition

DIRTY_RATE_MIB_S = 200
CAPPED_BANDWIDTH_MIB_S = 24


class Checks:
    """Every step's verdict, printed as it comes and kept for the summary."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.results: list[tuple[str, bool, str]] = []

    def __call__(self, what: str, ok: bool, detail: str = "") -> bool:
        self.results.append((what, ok, detail))
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        self.console.print(f"  {mark} {what}" + (f" [dim]({detail})[/]" if detail else ""))
        return ok

    @property
    def all_held(self) -> bool:
        return bool(self.results) and all(ok for _, ok, _ in self.results)


class Demo:
    def __init__(self, console: Console, root: Path, check: Checks) -> None:
        self.console = console
        self.root = root
        self.run_dir = root / "run"
        self.check = check
        self.moves: list[tuple[str, MigrationResult]] = []

    async def guest(self, vm: VmDefinition) -> GuestStatus:
        paths = launcher.current_paths(vm.name, self.run_dir)
        async with Qmp.session(paths.ops, timeout_s=5) as qmp:
            return parse_status(await qmp.cmd("human-monitor-command", {"command-line": XP_COMMAND}))

    async def wait_booted(self, vm: VmDefinition) -> GuestStatus:
        for _ in range(200):
            with contextlib.suppress(HaguardError):
                st = await self.guest(vm)
                if st.alive and st.ms > 100:
                    return st
            await asyncio.sleep(0.05)
        raise HaguardError("the demo guest did not boot")

    def live_instances(self) -> int:
        count = 0
        for d in self.run_dir.iterdir():
            if d.is_dir() and not d.is_symlink() and launcher.read_pid(InstancePaths(d)):
                count += 1
        return count

    async def move(self, vm: VmDefinition, label: str, policy: ConvergencePolicy,
                   expect_postcopy: bool) -> bool:
        self.console.rule(f"[bold]{label}")
        before = await self.guest(vm)
        opts = MigrationOptions(uri=MigrationUri("unix", path="/unused"), policy=policy)
        with MigrationDisplay(vm.name, console=self.console) as display:
            res = await migrate_vm(vm, self.run_dir, opts, transport="unix",
                                   on_progress=display.update, on_alert=display.alert)
        self.moves.append((label, res))
        ok = self.check("migration completed", res.ok, res.error or f"{res.total_time_ms} ms, "
                        f"downtime {res.downtime_ms} ms")
        steps = "; ".join(f"{s['action']}: {s.get('reason', '')}" for s in res.steps)
        if expect_postcopy or not res.postcopy:
            ok &= self.check("postcopy " + ("used" if expect_postcopy else "not needed"),
                             res.postcopy == expect_postcopy, steps)
        else:
            # Unthrottled, pre-copy converges on an idle machine; on a busy one the link can
            # fall below the dirty rate, and escalating then is the policy doing its job.
            self.console.print(f"  [yellow]![/] postcopy was needed after all: the machine is busy "
                               f"[dim]({steps})[/]")
        after = await self.guest(vm)
        ok &= self.check("guest kept its state and kept running",
                         after.errors == 0 and after.ms > before.ms and after.pages > before.pages,
                         f"guest clock {before.ms} → {after.ms} ms, page check errors {after.errors}")
        state = await launcher.query_status(launcher.current_paths(vm.name, self.run_dir))
        ok &= self.check("VM runs exactly once", state == "running" and self.live_instances() == 1,
                         f"{self.live_instances()} QEMU, state {state}")
        return ok

    async def run(self) -> bool:
        c = self.console
        c.rule("[bold]haguard demo: live migration between two QEMUs")
        kernel = build_guest(self.root / "guest")
        vm = VmDefinition(name="demo-vm", memory_mib=256, machine="pc-i440fx-7.2", firmware="qboot",
                          kernel=kernel, append=f"mib=96 rate={DIRTY_RATE_MIB_S}")
        c.print(f"Starting [bold]{vm.name}[/]: 256 MiB, a guest rewriting 96 MiB at "
                f"{DIRTY_RATE_MIB_S} MiB/s (checking every page it rewrites)")
        launcher.start(vm, self.run_dir)
        st = await self.wait_booted(vm)
        pid = launcher.read_pid(launcher.current_paths(vm.name, self.run_dir))
        self.check("VM booted", st.alive, f"pid {pid}")
        ok = await self.move(vm, "1: unthrottled, converges",
                             ConvergencePolicy(postcopy="auto"), expect_postcopy=False)
        ok &= await self.move(
            vm, f"2: {CAPPED_BANDWIDTH_MIB_S} MiB/s cap → postcopy",
            ConvergencePolicy(postcopy="auto", max_bandwidth_bps=CAPPED_BANDWIDTH_MIB_S << 20),
            expect_postcopy=True)
        c.print(result_table(self.moves, title="Summary"))
        return ok

    async def cleanup(self) -> None:
        if self.run_dir.exists():
            for d in self.run_dir.iterdir():
                if d.is_dir() and not d.is_symlink():
                    await launcher.stop(InstancePaths(d))


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: the demo cleans up and stops.  Not an error (no HaguardError): the
    signal handler raises it anywhere, and `except HaguardError` around the tour must not
    swallow it, as `except Exception` must not (a BaseException, like KeyboardInterrupt)."""


async def _migration(console: Console, check: Checks) -> bool:
    root = Path(tempfile.mkdtemp(prefix="haguard-demo-"))
    demo = Demo(console, root, check)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await demo.run()
    except asyncio.CancelledError:
        raise Interrupted from None
    except HaguardError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return False
    finally:
        with contextlib.suppress(BaseException):
            await asyncio.shield(demo.cleanup())
        shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


def _cluster(console: Console, check: Checks, loopback: bool) -> bool:
    root = Path(tempfile.mkdtemp(prefix="hgdemo-"))   # short: unix socket paths have 108 bytes
    tour = ClusterTour(console, root, check, namespaces=False if loopback else None)
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return tour.run()
    except HaguardError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return False
    finally:
        # Cleaning up must finish: a second Ctrl-C would leave namespaces and QEMUs behind.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        try:
            tour.close()
            shutil.rmtree(root, ignore_errors=True)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def run_demo(*, keep_going: bool = False, migration: bool = True, cluster: bool = True,
             loopback: bool = False) -> int:
    """Both acts by default; `keep_going` runs the cluster act even after a failed first act;
    `loopback` puts the cluster on loopback addresses even as root."""
    # Without a terminal (a log, CI) rich would wrap at 80 columns: give the tables room.
    console = Console() if sys.stdout.isatty() else Console(width=110)
    check = Checks(console)
    start = time.monotonic()
    ok = True
    try:
        if migration:
            ok = asyncio.run(_migration(console, check))
        if cluster and (ok or keep_going):
            ok &= _cluster(console, check, loopback)
    except (Interrupted, KeyboardInterrupt):
        console.print("[yellow]interrupted: everything the demo started is gone[/]")
        return 130
    failed = [(what, detail) for what, held, detail in check.results if not held]
    if failed:
        table = Table(title="Steps that did not hold", title_justify="left")
        table.add_column("step")
        table.add_column("detail")
        for what, detail in failed:
            table.add_row(what, detail)
        console.print(table)
    ok = ok and check.all_held
    console.print(f"{len(check.results) - len(failed)}/{len(check.results)} checks held in "
                  f"{time.monotonic() - start:.0f} s")
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
    return 0 if ok else 1
