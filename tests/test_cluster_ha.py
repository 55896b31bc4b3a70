"""The cluster acting: real agents in 3 namespaces with `ha.enabled`, real QEMU guests,
a real mosquitto and a fence stand-in.  Every test samples every host's QEMUs throughout
and fails on any instant at which a VM runs on two hosts."""

from __future__ import annotations

import pytest

from tests.helpers.ha import TwiceWatch, fence_calls, ha_cluster, ha_vms, now, running_on, wait_placed


@pytest.mark.timeout(180)
def test_drain_moves_every_vm_live_respecting_anti_affinity() -> None:
    vms = ha_vms(4, anti_affinity=None)
    with ha_cluster(vms) as c, TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        wait_placed(c, [v.name for v in vms], timeout_s=60)
        where = running_on(c)
        victim = max(c.hosts, key=lambda h: sum(h in hs for hs in where.values()))
        moved = sorted(vm for vm, hs in where.items() if victim in hs)
        assert moved, where
        print("draining", victim, moved, where)
        out = c.haguard(victim, "drain", victim, timeout_s=150)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_placed(c, [v.name for v in vms], timeout_s=30, avoid=(victim,))
        for vm in moved:
            assert c.events(victim, "migration-end"), c.log_tail()
            ends = [e for e in c.events(victim, "migration-end") if e.get("vm") == vm]
            assert ends and ends[-1]["status"] == "completed", ends
        assert not fence_calls(c), "a drain never fences"
        watch.check()
        print("after", running_on(c), "samples", watch.monitor.samples, out.stdout)
        start = now()
        out = c.haguard(victim, "undrain", victim, timeout_s=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert now() - start < 30


def _owned_by(c, host: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(vm for vm, hs in running_on(c).items() if host in hs)


@pytest.mark.timeout(150)
def test_hard_host_failure_is_fenced_then_recovered_elsewhere() -> None:
    vms = ha_vms(4)
    with ha_cluster(vms) as c, TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        wait_placed(c, [v.name for v in vms], timeout_s=60)
        coordinator = c.cluster_view("h1").get("coordinator")
        victim = next(h for h in ("h3", "h2", "h1") if h != coordinator and _owned_by(c, h))
        lost = _owned_by(c, victim)
        cut_at = now()
        c.cut(victim)                  # a power-off: no link, its QEMUs gone
        c.kill_vms(victim)
        wait_placed(c, [v.name for v in vms], timeout_s=30, avoid=(victim,))
        took = now() - cut_at
        print(f"recovered {lost} from {victim} in {took:.2f} s")
        assert took < 10, took
        calls = fence_calls(c)
        assert any(f" off {victim} 0" in line for line in calls), calls
        fenced_at = min(float(line.split()[0]) for line in calls if f" off {victim} 0" in line)
        starts = [e for h in c.hosts if h != victim for e in c.events(h, "vm-start") if e.get("vm") in lost]
        assert starts, c.log_tail()
        watch.check()
        assert fenced_at > 0
