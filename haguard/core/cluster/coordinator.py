"""What the coordinator decides from the committed state and the hosts' reports.

`Coordinator.plan` returns the next state to propose (or None when nothing changes)
and the fence commands and alerts to emit.  Order within one plan, each step seeing
the ones before: admin requests; fenced hosts that rejoined; finished kills and
migrations (and moves whose destination was fenced after the switchover); dead
hosts (fence first, then their VMs are released); VMs that failed on their host;
stray copies; placement of VMs without an owner; drain moves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from haguard.core.cluster.placement import HostCandidate, Placement, VmSpec, place
from haguard.core.cluster.recovery import Fencing, by_priority, plan_recovery
from haguard.core.cluster.state import ClusterState, HostRecord, MigrationRecord, VmRecord
from haguard.core.cluster.types import CoreConfig, FenceHost, Heartbeat, PlacementDecided, RaiseAlert

PlanOutput = FenceHost | RaiseAlert | PlacementDecided
FAILED_TARGET_MS = 60_000           # a host a VM failed on is avoided this long


@dataclass(frozen=True, kw_only=True)
class HostView:
    name: str
    alive: bool                  # heard lately (always true for the coordinator itself)
    dead: bool                   # declared dead: by this detector and a quorum of reports
    beat: Heartbeat | None       # its latest fresh report


class Coordinator:
    def __init__(self, config: CoreConfig, term: int, new_id: Callable[[], str]) -> None:
        t = config.timing
        self.config = config
        self.term = term
        self.new_id = new_id
        self.fencing = Fencing(watchdog_wait_ms=t.watchdog_timeout_ms + t.watchdog_margin_ms,
                               fence_timeout_ms=t.fence_timeout_ms, backoff_ms=t.fence_backoff_ms,
                               host_timeouts_ms={h: s.fence_timeout_ms for h, s in config.hosts.items()
                                                 if s.fence_timeout_ms is not None})
        # vm -> host a move to it or a run on it failed -> when; avoided for FAILED_TARGET_MS.
        self.failed_targets: dict[str, dict[str, int]] = {}
        self._refused: set[tuple[str, str, int]] = set()  # (vm, target, generation) moves said no to
        self._since: dict[tuple[str, str], int] = {}      # (vm, condition) -> held since

    def _held(self, key: tuple[str, str], now_ms: int, wait_ms: int, held: set[tuple[str, str]]) -> bool:
        """True once the condition `key` has held in every plan for longer than `wait_ms`."""
        held.add(key)
        return now_ms - self._since.setdefault(key, now_ms) > wait_ms

    def fenced(self, host: str, now_ms: int) -> bool:
        """True once `host` is confirmed off; only then may its VMs run elsewhere."""
        return self.fencing.confirmed(host, now_ms)

    def plan(self, state: ClusterState, views: Mapping[str, HostView],
             now_ms: int) -> tuple[ClusterState | None, list[PlanOutput]]:
        out: list[PlanOutput] = []
        vms = dict(state.vms)
        hosts = {h: state.host(h) for h in self.config.hosts}
        migrations = dict(state.migrations)
        kills = dict(state.kills)
        beats = {h: v.beat for h, v in views.items() if v.alive and v.beat is not None}

        for reporter in beats.values():                               # admin requests
            for action, host in sorted(reporter.requests):
                if host in hosts:
                    hosts[host] = replace(hosts[host], maintenance=action == "drain")

        for host, host_rec in hosts.items():                          # fenced hosts back, empty
            host_beat = beats.get(host)
            if host_rec.fenced and host_beat is not None and not host_beat.vms:
                hosts[host] = replace(host_rec, fenced=False)
                self.fencing.forget(host)

        for vm, host in list(kills.items()):                          # strays gone
            killer = beats.get(host)
            if (killer is not None and vm not in killer.vms) or hosts[host].fenced:
                del kills[vm]

        wait = self.config.timing.quorum_timeout_ms + self.config.timing.heartbeat_ms
        held: set[tuple[str, str]] = set()
        for vm, mig in list(migrations.items()):                      # moves finished
            rec = vms[vm]
            report = next((r for r in beats[mig.source].migrations
                           if r.vm == vm and r.generation == mig.generation and r.target == mig.target),
                          None) if mig.source in beats else None
            target_beat, source_beat = beats.get(mig.target), beats.get(mig.source)
            switched = (target_beat is not None and target_beat.vms.get(vm) == "running"
                        and source_beat is not None and source_beat.vms.get(vm) == "postmigrate")
            if rec.owner != mig.source or rec.generation != mig.generation:
                del migrations[vm]
            elif switched or (report is not None and report.ok):   # the report may be lost
                vms[vm] = replace(rec, owner=mig.target, generation=rec.generation + 1)
                del migrations[vm]
            elif report is not None:
                self.failed_targets.setdefault(vm, {})[mig.target] = now_ms
                del migrations[vm]
            elif source_beat is not None and vm not in source_beat.vms and target_beat is not None:
                # The source lost its copy (rebooted, QEMU died) with the result unreported: a target
                # that runs the guest has it.  Otherwise the move is over and the source restarts it,
                # once the target has had time to report a switchover that raced the source's report.
                if target_beat.vms.get(vm) == "running":
                    vms[vm] = replace(rec, owner=mig.target, generation=rec.generation + 1)
                    del migrations[vm]
                elif self._held((vm, "source lost"), now_ms, wait, held):
                    del migrations[vm]
            elif (source_beat is not None and source_beat.vms.get(vm) == "postmigrate"
                  and target_beat is not None and vm not in target_beat.vms
                  and self._held((vm, "target lost"), now_ms, 2 * wait, held)):
                # Switched over (the guest left the source), result unreported, and the target no
                # longer has it (its QEMU died since): nobody runs the guest; place it anew.  Waited
                # for, so that the target's reports are from after the switchover.
                vms[vm] = replace(rec, owner=None, generation=rec.generation + 1)
                del migrations[vm]
        self._since = {k: at for k, at in self._since.items() if k in held}

        for host, paused in sorted(beats.items()):                    # moved to a host now fenced
            for vm in sorted(v for v, qemu in paused.vms.items() if qemu == "postmigrate"):
                # The guest left this host; without a move in flight its destination was fenced.
                if vm in vms and vms[vm].owner == host and vm not in migrations:
                    vms[vm] = replace(vms[vm], owner=None, generation=vms[vm].generation + 1)

        for host, view in sorted(views.items()):                      # dead hosts: fence first
            if host == self.config.me or hosts[host].fenced:
                continue
            if not view.dead:
                self.fencing.cancel(host)
                continue
            if not state.owned_by(host) and not any(m.target == host for m in migrations.values()):
                continue                                              # nothing of it to move
            spec = self.config.hosts[host]
            self.fencing.declare(host, device=spec.fence_device, now_ms=now_ms)
            if self.fenced(host, now_ms):
                hosts[host] = replace(hosts[host], fenced=True)
                self._release(host, vms, migrations, kills, beats)
        commands, alerts = self.fencing.poll(now_ms, self.new_id)
        out += [FenceHost(id=c.id, host=c.host, term=self.term) for c in commands]
        out += [RaiseAlert(id=self.new_id(), kind="fence-failed", reason=a.reason, host=a.host)
                for a in alerts]

        for host, failing in sorted(beats.items()):                   # VM-level failures
            for vm in sorted(failing.failed_vms):
                failed = vms.get(vm)
                if (failed is not None and failed.owner == host and vm not in failing.vms
                        and vm not in migrations):
                    self.failed_targets.setdefault(vm, {})[host] = now_ms
                    vms[vm] = replace(failed, owner=None, generation=failed.generation + 1)

        # Running copies not on their owner (one pass over the reports, not over every VM).
        unexpected: list[tuple[str, str]] = []
        for host, beat in beats.items():
            for vm, qemu in beat.vms.items():
                if qemu == "running":
                    owned = vms.get(vm)
                    if owned is None or owned.owner != host:
                        unexpected.append((vm, host))
        for vm, host in sorted(unexpected):                           # stray copies
            moving = migrations.get(vm)
            incoming = moving is not None and moving.target == host
            if not incoming and vm not in kills:
                kills[vm] = host

        running_unowned = {vm for vm, _host in unexpected}            # placement
        unplaced = [vm for vm, rec in vms.items()
                    if rec.owner is None and rec.desired == "running" and vm not in running_unowned]
        candidates = self._candidates(vms, hosts, migrations, views)
        excluded = {vm: self._failed(vm, now_ms) for vm in unplaced}
        for placement in plan_recovery(self.config.vms, unplaced, candidates, self.config.limits, excluded):
            if placement.host is not None:
                vms[placement.vm] = replace(vms[placement.vm], owner=placement.host)
                out.append(self._decided(placement, "place"))
            elif (no_room := (placement.vm, "", vms[placement.vm].generation)) not in self._refused:
                self._refused.add(no_room)          # said once, not at every plan
                out.append(self._decided(placement, "place"))

        self._drain(vms, hosts, migrations, views, beats, out, now_ms)
        self._moves(vms, hosts, migrations, views, beats, out)

        new = ClusterState(term=self.term, version=state.version + 1, vms=vms, hosts=hosts,
                           migrations=migrations, kills=kills)
        same = (new.vms == state.vms and dict(new.hosts) == {h: state.host(h) for h in hosts}
                and new.migrations == state.migrations and new.kills == state.kills)
        return (None if same and state.term == self.term else new), out

    def _release(self, host: str, vms: dict[str, VmRecord], migrations: dict[str, MigrationRecord],
                 kills: dict[str, str], beats: Mapping[str, Heartbeat]) -> None:
        """`host` is fenced: its VMs are free; a move whose target already runs the VM completes."""
        involved = {vm for vm, mig in migrations.items() if host in (mig.source, mig.target)}
        for vm, rec in [(vm, rec) for vm, rec in vms.items() if rec.owner == host or vm in involved]:
            mig = migrations.get(vm)
            if mig is not None and host in (mig.source, mig.target):
                del migrations[vm]
                target_beat = beats.get(mig.target)
                if (mig.source == host and target_beat is not None
                        and target_beat.vms.get(vm) == "running"):
                    vms[vm] = replace(rec, owner=mig.target, generation=rec.generation + 1)
                    continue
            if rec.owner == host:
                vms[vm] = replace(rec, owner=None, generation=rec.generation + 1)
        for vm, on in list(kills.items()):
            if on == host:
                del kills[vm]

    def _candidates(self, vms: Mapping[str, VmRecord], hosts: Mapping[str, HostRecord],
                    migrations: Mapping[str, MigrationRecord],
                    views: Mapping[str, HostView]) -> list[HostCandidate]:
        # One pass over the VMs, not one per host: at 1,000 hosts x 20 VMs that is 20,000 steps
        # instead of 20 million (measured by bench/simulate.py: 13 s per plan before).
        memory: dict[str, int] = {}                  # host -> what the VMs it runs or receives use
        vcpus: dict[str, int] = {}
        groups: dict[str, tuple[set[str], set[str]]] = {}   # host -> (affinity, anti-affinity) groups
        incoming: dict[str, int] = {}
        specs = self.config.vms

        held = [(rec.owner, specs[vm]) for vm, rec in vms.items() if rec.owner is not None]
        held += [(mig.target, specs[vm]) for vm, mig in migrations.items()
                 if vm in vms and mig.target != vms[vm].owner]
        for host, vm_spec in held:                   # the hot loop at 20,000 VMs: kept flat
            memory[host] = memory.get(host, 0) + vm_spec.memory_mib
            vcpus[host] = vcpus.get(host, 0) + vm_spec.vcpus
            if vm_spec.affinity or vm_spec.anti_affinity:
                aff, anti = groups.setdefault(host, (set(), set()))
                if vm_spec.affinity:
                    aff.add(vm_spec.affinity)
                if vm_spec.anti_affinity:
                    anti.add(vm_spec.anti_affinity)
        for mig in migrations.values():
            incoming[mig.target] = incoming.get(mig.target, 0) + 1
        out = []
        empty: tuple[set[str], set[str]] = (set(), set())
        for name, spec in sorted(self.config.hosts.items()):
            view = views.get(name)
            aff, anti = groups.get(name, empty)
            out.append(HostCandidate(
                name=name, alive=view is not None and view.alive and not spec.witness,
                degraded=view is not None and view.beat is not None and view.beat.degraded,
                memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                maintenance=hosts[name].maintenance, fenced=hosts[name].fenced,
                groups=spec.groups, group_priority=spec.group_priority,
                migrations_in_flight=incoming.get(name, 0),
                used_memory_mib=memory.get(name, 0), used_vcpus=vcpus.get(name, 0),
                affinity_groups=frozenset(aff), anti_affinity_groups=frozenset(anti)))
        return out

    def _decided(self, placement: Placement, kind: Literal["place", "drain", "move"]) -> PlacementDecided:
        return PlacementDecided(id=self.new_id(), vm=placement.vm, host=placement.host, kind=kind,
                                reasons=placement.explain())

    def _moves(self, vms: dict[str, VmRecord], hosts: Mapping[str, HostRecord],
               migrations: dict[str, MigrationRecord], views: Mapping[str, HostView],
               beats: Mapping[str, Heartbeat], out: list[PlanOutput]) -> None:
        """Operators' move requests (`haguard migrate VM --to HOST`), if the target may take it."""
        asked = sorted({move for beat in beats.values() for move in beat.moves})
        for vm, target in asked:
            rec = vms.get(vm)
            if rec is None or rec.owner in (None, target) or vm in migrations or target not in hosts:
                continue
            source = beats.get(rec.owner)
            if source is None or source.vms.get(vm) != "running":
                continue
            candidates = [c for c in self._candidates(vms, hosts, migrations, views) if c.name == target]
            placement = place(self.config.vms[vm], candidates, self.config.limits, migration=True,
                              cluster_migrations=len(migrations))
            key = (vm, target, rec.generation)
            if placement.host is not None:
                migrations[vm] = MigrationRecord(source=rec.owner, target=target, generation=rec.generation)
                out.append(self._decided(placement, "move"))
            elif key not in self._refused:          # said once, not at every plan
                self._refused.add(key)
                out.append(self._decided(placement, "move"))

    def _failed(self, vm: str, now_ms: int) -> frozenset[str]:
        """Hosts a move or run of `vm` failed on lately: avoided while others will do."""
        failed = self.failed_targets.get(vm, {})
        return frozenset(h for h, at in failed.items() if now_ms - at < FAILED_TARGET_MS)

    def _drain(self, vms: dict[str, VmRecord], hosts: Mapping[str, HostRecord],
               migrations: dict[str, MigrationRecord], views: Mapping[str, HostView],
               beats: Mapping[str, Heartbeat], out: list[PlanOutput], now_ms: int) -> None:
        """Plan live moves off hosts in maintenance or degraded, highest priority first, within
        the limits."""
        for host, host_rec in sorted(hosts.items()):
            beat = beats.get(host)
            if not (host_rec.maintenance or (beat is not None and beat.degraded)) or beat is None:
                continue
            movable = [vm for vm in sorted(vms) if vms[vm].owner == host and vm not in migrations
                       and beat.vms.get(vm) == "running"]
            for vm in by_priority(self.config.vms, movable):
                outgoing = sum(m.source == host for m in migrations.values())
                if outgoing >= self.config.limits.max_migrations_per_host:
                    break
                spec: VmSpec = self.config.vms[vm]
                skip = self._failed(vm, now_ms)
                candidates = [c for c in self._candidates(vms, hosts, migrations, views)
                              if c.name not in skip]
                placement = place(spec, candidates, self.config.limits, migration=True,
                                  cluster_migrations=len(migrations))
                if placement.host is None and skip:
                    # No other target will do: try the failed ones again (the failure may have been
                    # the source's, a QEMU that hung, say).
                    self.failed_targets.pop(vm, None)
                    continue
                if placement.host is not None:
                    migrations[vm] = MigrationRecord(source=host, target=placement.host,
                                                     generation=vms[vm].generation)
                    out.append(self._decided(placement, "drain"))
