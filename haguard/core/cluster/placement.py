"""Placement: choose a host for a VM, with the reason for every host.

Pure.  A host is eligible when it is alive, not fenced, not in maintenance, not
degraded, in one of the VM's allowed groups, holds no VM of the VM's anti-affinity
group, has room (memory and vCPUs after the overcommit ratios) and, for a live
migration, is under the per-host and per-cluster migration limits.  Among the
eligible: highest group priority, then a host already holding the VM's affinity
group, then the most free memory after placing; ties by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    name: str
    memory_mib: int
    vcpus: int
    priority: int = 0                          # recovered and moved first when higher
    affinity: str | None = None                # prefer hosts holding this group
    anti_affinity: str | None = None           # never two of this group on one host
    allowed_groups: frozenset[str] = frozenset()   # empty: any host


@dataclass(frozen=True, kw_only=True)
class HostCandidate:
    name: str
    alive: bool
    memory_mib: int
    fenceable: bool = True          # a fence device, or a watchdog that confirmed the configured timeout
    vcpus: int
    used_memory_mib: int = 0
    used_vcpus: int = 0
    maintenance: bool = False
    degraded: bool = False
    fenced: bool = False
    groups: frozenset[str] = frozenset()
    group_priority: int = 0
    affinity_groups: frozenset[str] = frozenset()       # groups of the VMs it holds
    anti_affinity_groups: frozenset[str] = frozenset()
    migrations_in_flight: int = 0


@dataclass(frozen=True, kw_only=True)
class PlacementLimits:
    memory_overcommit: float = 1.0
    vcpu_overcommit: float = 4.0
    max_migrations_per_host: int = 1
    max_migrations_cluster: int = 2


@dataclass(frozen=True, kw_only=True)
class Placement:
    vm: str
    host: str | None
    reasons: dict[str, str]                    # host -> why chosen or not

    def explain(self) -> str:
        return "; ".join(f"{h}: {r}" for h, r in sorted(self.reasons.items()))


def refusal(vm: VmSpec, host: HostCandidate, limits: PlacementLimits, *, migration: bool,
            cluster_migrations: int = 0) -> str | None:
    """Why `host` cannot take `vm`, or None when it can."""
    if not host.alive:
        return "not alive"
    if host.fenced:
        return "fenced, not rejoined"
    if not host.fenceable:
        return "no fence device and no watchdog confirming the configured timeout"
    if host.maintenance:
        return "in maintenance"
    if host.degraded:
        return "degraded"
    if vm.allowed_groups and not vm.allowed_groups & host.groups:
        return f"not in allowed groups {', '.join(sorted(vm.allowed_groups))}"
    if vm.anti_affinity is not None and vm.anti_affinity in host.anti_affinity_groups:
        return f"anti-affinity: a VM of group {vm.anti_affinity} is already there"
    free_memory = int(host.memory_mib * limits.memory_overcommit) - host.used_memory_mib
    if vm.memory_mib > free_memory:
        return f"memory: needs {vm.memory_mib} MiB, {free_memory} MiB free"
    free_vcpus = int(host.vcpus * limits.vcpu_overcommit) - host.used_vcpus
    if vm.vcpus > free_vcpus:
        return f"vcpus: needs {vm.vcpus}, {free_vcpus} free"
    if migration and host.migrations_in_flight >= limits.max_migrations_per_host:
        return f"migration limit: {host.migrations_in_flight} in flight to this host"
    if migration and cluster_migrations >= limits.max_migrations_cluster:
        return f"cluster migration limit: {cluster_migrations} in flight"
    return None


def rank(vm: VmSpec, host: HostCandidate, limits: PlacementLimits) -> tuple[int, int, int]:
    """Higher is better."""
    free_after = int(host.memory_mib * limits.memory_overcommit) - host.used_memory_mib - vm.memory_mib
    near = int(vm.affinity is not None and vm.affinity in host.affinity_groups)
    return (host.group_priority, near, free_after)


def place(vm: VmSpec, hosts: Iterable[HostCandidate], limits: PlacementLimits, *,
          migration: bool = False, cluster_migrations: int = 0) -> Placement:
    reasons: dict[str, str] = {}
    eligible: list[HostCandidate] = []
    for host in hosts:
        why = refusal(vm, host, limits, migration=migration, cluster_migrations=cluster_migrations)
        if why is None:
            eligible.append(host)
        else:
            reasons[host.name] = why
    # Sorting by name first, then a stable sort by rank, breaks ties by name.
    ranks = {id(h): rank(vm, h, limits) for h in eligible}        # once per host: 1,000s of hosts
    eligible.sort(key=lambda h: h.name)
    eligible.sort(key=lambda h: ranks[id(h)], reverse=True)
    for i, host in enumerate(eligible):
        prio, near, free = ranks[id(host)]
        detail = f"group priority {prio}, affinity {'yes' if near else 'no'}, {free} MiB free after"
        reasons[host.name] = ("chosen: " if i == 0 else "eligible, ranked lower: ") + detail
    return Placement(vm=vm.name, host=eligible[0].name if eligible else None, reasons=reasons)


def choose(vm: VmSpec, hosts: Iterable[HostCandidate], limits: PlacementLimits, *,
           migration: bool = False, cluster_migrations: int = 0) -> HostCandidate | None:
    """`place`'s choice without the reasons: one pass, no sorting (a recovery at 1,000 hosts)."""
    best: HostCandidate | None = None
    best_rank: tuple[int, int, int] = (0, 0, 0)
    for host in hosts:
        if refusal(vm, host, limits, migration=migration, cluster_migrations=cluster_migrations) is not None:
            continue
        r = rank(vm, host, limits)
        if best is None or r > best_rank or (r == best_rank and host.name < best.name):
            best, best_rank = host, r
    return best
