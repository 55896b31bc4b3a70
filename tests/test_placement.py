"""Placement: table tests, and a property test against a naive reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core.cluster.placement import HostCandidate, PlacementLimits, VmSpec, place
from haguard.core.cluster.recovery import plan_recovery

LIMITS = PlacementLimits()
VM = VmSpec(name="vm", memory_mib=2048, vcpus=2)


def host(name: str, **kw: object) -> HostCandidate:
    base: dict[str, object] = {"alive": True, "memory_mib": 8192, "vcpus": 8}
    base.update(kw)
    return HostCandidate(name=name, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("vm", "hosts", "chosen", "reason_of"), [
    (VM, [host("b"), host("a")], "a", {"b": "eligible, ranked lower"}),
    (VM, [host("a", used_memory_mib=7000), host("b")], "b", {"a": "memory: needs 2048 MiB, 1192 MiB free"}),
    (VM, [host("a", alive=False), host("b")], "b", {"a": "not alive"}),
    (VM, [host("a", maintenance=True), host("b", degraded=True)], None,
     {"a": "in maintenance", "b": "degraded"}),
    (VM, [host("a", fenced=True)], None, {"a": "fenced, not rejoined"}),
    (VM, [host("a", vcpus=1, used_vcpus=3)], None, {"a": "vcpus: needs 2, 1 free"}),
    (VmSpec(name="w", memory_mib=1, vcpus=1, anti_affinity="web"),
     [host("a", anti_affinity_groups=frozenset({"web"})), host("b", used_memory_mib=8000)], "b",
     {"a": "anti-affinity: a VM of group web is already there"}),
    (VmSpec(name="w", memory_mib=1, vcpus=1, affinity="db"),
     [host("a"), host("b", affinity_groups=frozenset({"db"}), used_memory_mib=4000)], "b",
     {"a": "eligible, ranked lower"}),
    (VmSpec(name="g", memory_mib=1, vcpus=1, allowed_groups=frozenset({"ssd"})),
     [host("a"), host("b", groups=frozenset({"ssd", "x"}))], "b", {"a": "not in allowed groups ssd"}),
    (VM, [host("a", used_memory_mib=4000, group_priority=1), host("b")], "a",
     {"b": "eligible, ranked lower"}),
])
def test_placement_table(vm: VmSpec, hosts: list[HostCandidate], chosen: str | None,
                         reason_of: dict[str, str]) -> None:
    p = place(vm, hosts, LIMITS)
    assert p.host == chosen
    assert set(p.reasons) == {h.name for h in hosts}, "every host gets a reason"
    if chosen is not None:
        assert p.reasons[chosen].startswith("chosen")
    for name, why in reason_of.items():
        assert p.reasons[name].startswith(why), p.explain()


def test_migration_limits() -> None:
    hosts = [host("a", migrations_in_flight=1), host("b")]
    assert place(VM, hosts, LIMITS, migration=True).host == "b"
    assert place(VM, hosts, LIMITS).host == "a", "restarts are not limited by migrations"
    p = place(VM, hosts, LIMITS, migration=True, cluster_migrations=2)
    assert p.host is None and p.reasons["b"] == "cluster migration limit: 2 in flight"


def test_overcommit_ratios() -> None:
    big = VmSpec(name="big", memory_mib=10_000, vcpus=40)
    assert place(big, [host("a")], LIMITS).host is None
    assert place(big, [host("a")], PlacementLimits(memory_overcommit=1.5, vcpu_overcommit=5)).host == "a"


def test_recovery_places_by_priority_and_sees_earlier_choices() -> None:
    vms = {"low": VmSpec(name="low", memory_mib=4096, vcpus=1, priority=0),
           "high": VmSpec(name="high", memory_mib=4096, vcpus=1, priority=9),
           "mid": VmSpec(name="mid", memory_mib=4096, vcpus=1, priority=5)}
    hosts = [host("a", memory_mib=8192), host("b", memory_mib=4096, used_memory_mib=0)]
    plan = plan_recovery(vms, ["low", "mid", "high"], hosts, LIMITS)
    assert [(p.vm, p.host) for p in plan] == [("high", "a"), ("mid", "a"), ("low", "b")]
    hosts = [host("a", memory_mib=4096)]
    plan = plan_recovery(vms, ["low", "high"], hosts, LIMITS)
    assert [(p.vm, p.host) for p in plan] == [("high", "a"), ("low", None)], "the lower priority waits"


# ---- property: against a naive reference ----------------------------------------------

def reference(vm: VmSpec, hosts: list[HostCandidate], limits: PlacementLimits, migration: bool,
              cluster: int) -> str | None:
    """The rules written out plainly: filter, then pick the best by an explicit loop."""
    ok = []
    for h in hosts:
        mem_free = int(h.memory_mib * limits.memory_overcommit) - h.used_memory_mib
        cpu_free = int(h.vcpus * limits.vcpu_overcommit) - h.used_vcpus
        if not h.alive or h.fenced or h.maintenance or h.degraded:
            continue
        if vm.allowed_groups and not (vm.allowed_groups & h.groups):
            continue
        if vm.anti_affinity and vm.anti_affinity in h.anti_affinity_groups:
            continue
        if vm.memory_mib > mem_free or vm.vcpus > cpu_free:
            continue
        if migration and (h.migrations_in_flight >= limits.max_migrations_per_host
                          or cluster >= limits.max_migrations_cluster):
            continue
        ok.append(h)
    best: HostCandidate | None = None
    for h in ok:
        if best is None:
            best = h
            continue
        def score(x: HostCandidate) -> tuple[int, int, int]:
            free = int(x.memory_mib * limits.memory_overcommit) - x.used_memory_mib - vm.memory_mib
            return (x.group_priority, int(vm.affinity is not None and vm.affinity in x.affinity_groups), free)
        if score(h) > score(best) or (score(h) == score(best) and h.name < best.name):
            best = h
    return best.name if best else None


groups = st.frozensets(st.sampled_from(["web", "db", "ssd"]), max_size=2)
hosts_st = st.lists(st.builds(
    HostCandidate, name=st.sampled_from("abcdefgh"), alive=st.booleans(),
    memory_mib=st.integers(0, 16384), vcpus=st.integers(0, 16), used_memory_mib=st.integers(0, 16384),
    used_vcpus=st.integers(0, 32), maintenance=st.booleans(), degraded=st.booleans(), fenced=st.booleans(),
    groups=groups, group_priority=st.integers(0, 2), affinity_groups=groups, anti_affinity_groups=groups,
    migrations_in_flight=st.integers(0, 2)), max_size=6, unique_by=lambda h: h.name)
vm_st = st.builds(VmSpec, name=st.just("vm"), memory_mib=st.integers(1, 8192), vcpus=st.integers(1, 8),
                  affinity=st.none() | st.sampled_from(["web", "db"]),
                  anti_affinity=st.none() | st.sampled_from(["web", "db"]), allowed_groups=groups)


@settings(max_examples=400, deadline=None)
@given(vm=vm_st, hosts=hosts_st, migration=st.booleans(), cluster=st.integers(0, 3),
       memory_overcommit=st.sampled_from([1.0, 1.5]))
def test_placement_matches_the_reference(vm: VmSpec, hosts: list[HostCandidate], migration: bool,
                                         cluster: int, memory_overcommit: float) -> None:
    limits = PlacementLimits(memory_overcommit=memory_overcommit)
    p = place(vm, hosts, limits, migration=migration, cluster_migrations=cluster)
    assert p.host == reference(vm, hosts, limits, migration, cluster)
    assert set(p.reasons) == {h.name for h in hosts}
    assert p == place(vm, list(reversed(hosts)), limits, migration=migration, cluster_migrations=cluster), \
        "the order of hosts does not matter"
