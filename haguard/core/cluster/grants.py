"""Grants and local obedience: what this host may start, stop, kill or move, and when.

A VM is started only when the committed state names this host its owner, this host
follows a live coordinator of its highest term that committed that state in its own
term, that coordinator has confirmed an ack sent since (re)joining (acks.py), no change
to that VM is proposed, and this host holds quorum (so its watchdog is being petted) and
is not fenced.  A local VM without a grant is reported, never stopped on this host's own
initiative; copies go only when the committed state says so (a kill order, a move
finished, desired stopped) or an incoming move is no longer wanted.
"""

from __future__ import annotations

from collections.abc import Callable

from haguard.core.cluster.state import ClusterState
from haguard.core.cluster.types import (
    INCOMING_UNWANTED,
    MOVED_AWAY,
    KillVm,
    MigrateVm,
    MigrationReport,
    QemuState,
    StartVm,
    StopVm,
)

VmCommand = StartVm | StopVm | KillVm | MigrateVm
COMMAND_EXPIRY_MS = 30_000          # a command without result by then is forgotten (lost result)
INMIGRATE_GRACE_MS = 1_000          # an incoming QEMU may show up before its record reaches us


class LocalVms:
    """The QEMUs on this host, the commands under way for them, and what failed here."""

    def __init__(self, me: str, max_restarts: int) -> None:
        self.me = me
        self.max_restarts = max_restarts
        self.vms: dict[str, QemuState] = {}
        self.seen_ms: dict[str, int] = {}                       # vm -> when its QEMU appeared here
        self.commands: dict[str, tuple[int, VmCommand]] = {}    # id -> (issued at, command)
        self.restarts: dict[str, int] = {}
        self.failed: set[str] = set()                           # gave up restarting them here
        self.reports: dict[str, MigrationReport] = {}           # moves ended, until the record goes

    # ---- facts ------------------------------------------------------------------------------

    def observe(self, vms: dict[str, QemuState], crashed: frozenset[str], now: int) -> None:
        for vm in vms:
            self.seen_ms.setdefault(vm, now)
        for vm in set(self.seen_ms) - set(vms):
            del self.seen_ms[vm]
        self.vms = vms
        for vm in crashed:
            self.restarts[vm] = self.restarts.get(vm, 0) + 1
            if self.restarts[vm] > self.max_restarts:
                self.failed.add(vm)

    def finished(self, cid: str, ok: bool) -> bool:
        """A command's result; True when it ended a move (reported at the next heartbeat)."""
        entry = self.commands.pop(cid, None)
        if entry is None or not isinstance(entry[1], MigrateVm):
            return False
        cmd = entry[1]
        self.reports[cmd.vm] = MigrationReport(vm=cmd.vm, generation=cmd.generation, target=cmd.target,
                                               ok=ok)
        return True

    # ---- commands -----------------------------------------------------------------------------

    def issue(self, cmd: VmCommand, now: int) -> VmCommand:
        self.commands[cmd.id] = (now, cmd)
        return cmd

    def busy(self, vm: str) -> bool:
        return any(cmd.vm == vm for _at, cmd in self.commands.values())

    def expire(self, now: int) -> None:
        for cid, (at, _cmd) in list(self.commands.items()):
            if now - at > COMMAND_EXPIRY_MS:
                del self.commands[cid]

    def stop_all(self, term: int, reason: str, new_id: Callable[[], str], now: int) -> list[VmCommand]:
        """Every local VM not already being handled (isolation policy `shutdown`)."""
        return [self.issue(StopVm(id=new_id(), vm=vm, term=term, reason=reason), now)
                for vm in sorted(self.vms) if not self.busy(vm)]

    # ---- obeying the committed state ------------------------------------------------------------

    def forget_moved(self, state: ClusterState, owned: list[str]) -> None:
        """Reports of moves whose record is gone, and failures of VMs no longer ours."""
        for vm in sorted(self.reports):
            report, mig = self.reports[vm], state.migrations.get(vm)
            if mig is None or (mig.generation, mig.target) != (report.generation, report.target):
                del self.reports[vm]
        for vm in sorted((self.failed | set(self.restarts)) - set(owned)):
            self.failed.discard(vm)
            self.restarts.pop(vm, None)

    def copies(self, now: int, state: ClusterState, accepted: ClusterState, term: int, synced: bool,
               new_id: Callable[[], str]) -> list[VmCommand]:
        """What the committed state asks of the copies running here: kill, stop or move them."""
        out: list[VmCommand] = []
        for vm, qemu in sorted(self.vms.items()):
            if self.busy(vm):
                continue
            rec, mig = state.vms.get(vm), state.migrations.get(vm)
            owner = rec.owner if rec is not None else None
            if state.kills.get(vm) == self.me:
                out.append(KillVm(id=new_id(), vm=vm, term=term, reason="ordered: stray copy"))
            elif qemu == "inmigrate" and (mig is None or mig.target != self.me) \
                    and now - self.seen_ms.get(vm, now) >= INMIGRATE_GRACE_MS:
                out.append(KillVm(id=new_id(), vm=vm, term=term, reason=INCOMING_UNWANTED))
            elif qemu == "postmigrate" and owner != self.me:
                out.append(StopVm(id=new_id(), vm=vm, term=term, reason=MOVED_AWAY))
            elif qemu == "running" and owner == self.me and rec is not None and rec.desired == "stopped":
                out.append(StopVm(id=new_id(), vm=vm, term=term, reason="desired stopped"))
            elif qemu == "running" and mig is not None and mig.source == self.me and rec is not None \
                    and rec.generation == mig.generation and vm not in self.reports \
                    and synced and accepted.migrations.get(vm) == mig:
                out.append(MigrateVm(id=new_id(), vm=vm, target=mig.target, generation=mig.generation,
                                     term=term))
        return out

    def starts(self, state: ClusterState, accepted: ClusterState, owned: list[str], term: int,
               new_id: Callable[[], str]) -> list[VmCommand]:
        """The VMs granted to this host that do not run here yet (the caller checked it may start)."""
        out: list[VmCommand] = []
        for vm in owned:
            grant = state.vms[vm]
            if (grant.owner == self.me and grant.desired == "running"
                    and accepted.vms.get(vm) == grant      # no change to it under way
                    # A move in flight may have switched over already: the guest may run on the
                    # target while this host, rebooted since, no longer has a copy.
                    and vm not in state.migrations and vm not in accepted.migrations
                    and vm not in self.vms and vm not in self.failed and not self.busy(vm)):
                out.append(StartVm(id=new_id(), vm=vm, generation=grant.generation, term=term))
        return out
