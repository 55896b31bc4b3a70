"""Cluster-wide maintenance (`haguard maintenance on|off`, core/cluster/paused.py) in the
simulator: while it is on nothing is started, stopped, moved or fenced and every armed
watchdog is petted, so a switch reboot resets nobody; ending it never makes a VM run twice."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from haguard.sim.faults import Fault, Schedule, random_schedule
from haguard.sim.runner import run
from haguard.sim.world import SimConfig, World
from tests.test_sim import _half_full, faults, owners, settle

PAUSED_BY_MS = 9000


def _paused(world: World) -> bool:
    return all(h.agent is not None and h.agent.committed.cluster.paused for h in world.hosts.values())


def _switch_reboot(maintenance: bool) -> tuple[World, dict[str, str]]:
    """7 hosts without fence devices (every watchdog armed); every host's links down 30 s."""
    sim = _half_full(7, devices=False)
    hosts = [f"h{i}" for i in range(1, 8)]
    cut = [f"10000:isolate:{h}" for h in hosts] + [f"40000:rejoin:{h}" for h in hosts]
    world = World(3, Schedule(faults=faults(*cut), heal_ms=40000), sim)
    world.run(6900)
    assert world.checker.all_running()
    if maintenance:
        world.admin("maintenance-on", "*")
    world.run(PAUSED_BY_MS)
    assert _paused(world) == maintenance
    running = owners(world)
    world.run(60000)
    return world, running


@pytest.mark.timeout(60)
def test_maintenance_keeps_every_watchdog_petted_through_a_switch_reboot() -> None:
    world, running = _switch_reboot(maintenance=True)
    assert not world.stopped_petting and not world.power_offs and not world.fences
    assert not [s for s in world.starts if s[0] > PAUSED_BY_MS] and owners(world) == running
    assert [a for _at, _h, a in world.alerts if a.kind == "maintenance" and not a.resolved]
    # An operator's fence meanwhile is refused, and not taken once maintenance is off.
    world.admin("fence", "h7")
    world.run(61000)
    assert [a for _at, _h, a in world.alerts if a.kind == "fence-refused" and "maintenance" in a.reason]
    # Maintenance off: the cluster recovers a lost host again (by its watchdog deadline).
    world.admin("maintenance-off", "*")
    world.run(63000)
    assert not world.fences
    assert not any(h.agent is not None and h.agent.committed.cluster.paused for h in world.hosts.values())
    victim = next(h for h, host in world.hosts.items() if host.vms)
    lost = {vm for vm, q in world.hosts[victim].vms.items() if q == "running"}
    world.inject("crash", victim)
    settle(world, 63000 + 40000)
    assert {vm for at, h, vm in world.starts if at > 63000 and h != victim} >= lost


@pytest.mark.timeout(60)
def test_without_maintenance_the_same_switch_reboot_resets_every_host_with_vms() -> None:
    # The harm the test above prevents: without fence devices the watchdog is the fence.
    world, _running = _switch_reboot(maintenance=False)
    with_vms = {h for t, h, _vm in world.starts if t <= 10000}
    assert with_vms and {h for _at, h, why in world.power_offs if why == "watchdog"} >= with_vms


@pytest.mark.timeout(60)
def test_a_host_cut_off_while_maintenance_ends_is_never_recovered_by_its_watchdog_deadline() -> None:
    # The host still holds the paused state, so it pets on: its VMs must stay where they are
    # (no fence device: they are down elsewhere until it is heard again), never run twice.
    sim = _half_full(5, devices=False)
    world = World(4, Schedule(faults=(), heal_ms=10**9), sim)
    world.run(6900)
    # Not the coordinator, nor h1 (the operator's requests go to the first agent that runs).
    victim = next(h for h, host in sorted(world.hosts.items())
                  if host.vms and h != "h1" and h not in world.coordinators())
    kept = {vm for vm, q in world.hosts[victim].vms.items() if q == "running"}
    world.admin("maintenance-on", "*")
    world.run(PAUSED_BY_MS)
    assert _paused(world)
    world.inject("isolate", victim)
    world.run(10000)
    world.admin("maintenance-off", "*")
    world.run(60000)            # far past the grace, the watchdog's timeout and the margin
    assert world.hosts[victim].agent is not None and world.hosts[victim].agent.committed.cluster.paused
    assert not world.power_offs and not world.stopped_petting
    assert {vm for vm, q in world.hosts[victim].vms.items() if q == "running"} == kept
    assert not [s for s in world.starts if s[0] > 10000 and s[2] in kept]
    world.inject("rejoin", victim)
    settle(world, 60000 + 20000)
    assert {vm for vm, q in world.hosts[victim].vms.items() if q == "running"} == kept


@pytest.mark.timeout(120)
@pytest.mark.parametrize("devices", [True, False], ids=["fence-devices", "watchdog-only"])
def test_random_schedules_with_maintenance_keep_the_invariants(devices: bool) -> None:
    # Random faults plus maintenance turned on and off at random instants (healing ends it).
    sim = replace(SimConfig(), fence_devices=devices)
    hosts = [f"h{i}" for i in range(1, sim.hosts + 1)]
    failures, paused_runs = [], 0
    for seed in range(1, 21):
        base = random_schedule(seed, hosts, [v.name for v in sim.vms], max_faults=6)
        rng = random.Random(f"maintenance/{seed}")
        extra = [Fault(at_ms=rng.randrange(1000, base.heal_ms), kind=k, args=())
                 for k in ("pause", "pause", "resume")]
        schedule = replace(base, faults=tuple(sorted((*base.faults, *extra), key=lambda f: f.at_ms)))
        result, world = run(seed, schedule=schedule, sim=sim)
        if result.failure:
            failures.append((seed, result.failure, result.message[:200], result.command()))
        paused_runs += bool(world and any("maintenance" in a for a in result.alerts))
    assert not failures, failures
    assert paused_runs >= 15, paused_runs
