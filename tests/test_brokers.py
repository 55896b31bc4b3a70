"""No single broker: a 12-host cluster of real agents with two mosquittos, each running on a
hypervisor (not bridged, both used at once), at the shipped timing, real QEMU guests, softdog
stand-ins armed on every host (`arm: always`: the strictest case) and every host's QEMUs
sampled throughout (a VM seen on two hosts at once fails the test).

- every broker stopped for 120 s, then started: no host stops petting, no fence, no VM
  restarted, moved or stopped (the hosts show a majority by their direct beats); then a
  700 ms blip of both: the same;
- one broker killed: nothing but the `broker-down` alert;
- the hypervisor running the other broker powered off: it is fenced and its VMs recovered,
  the cluster working on the remaining broker.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers.cluster import Cluster
from tests.helpers.ha import (
    TwiceWatch,
    WatchdogHardware,
    all_qemu_pids,
    fence_calls,
    ha_cluster,
    ha_vms,
    no_harm,
    rejoined,
    running_on,
    wait_placed,
)

pytestmark = pytest.mark.slow

WATCHDOG_S = 10                     # the shipped default
ALERT_AFTER_S = 3                   # alerts.broker_unreachable_after_s


def _links_up(c: Cluster, host: str) -> dict[str, bool]:
    status = c.status(host) or {}
    return dict(status.get("brokers") or {})


def _alerts(c: Cluster, kind: str) -> list[dict[str, object]]:
    return [e for h in c.hosts for e in c.events(h, "alert") if e.get("alert") == kind]


@pytest.mark.timeout(900)
def test_two_brokers_on_hypervisors_a_broker_outage_and_a_powered_off_broker_host() -> None:
    hosts = tuple(f"h{i}" for i in range(1, 13))
    vms = ha_vms(12)
    with WatchdogHardware(hosts) as hw, \
            ha_cluster(vms, hosts=hosts, shipped_timing=True, brokers_on=("h1", "h2"),
                       ha=f"  watchdog: {{device: '{hw.farm.mountpoint}/{{host}}', timeout_s: {WATCHDOG_S}, "
                          "arm: always}\n",
                       extra=f"alerts:\n  broker_unreachable_after_s: {ALERT_AFTER_S}\n") as c, \
            TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        hw.attach(c)
        names = [v.name for v in vms]
        wait_placed(c, names, timeout_s=120)
        c.wait_for("every agent following with its watchdog petted",
                   lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        before = all_qemu_pids(c)
        assert len(before) == len(vms)

        # Every broker gone for 120 s: decisions wait, nobody is reset.
        for broker in c.brokers.values():
            broker.kill()
        time.sleep(120)
        for broker in c.brokers.values():
            broker.start()
        c.wait_for("the cluster formed again", lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        no_harm(c, hw, before)

        # A 700 ms blip of both.
        for broker in c.brokers.values():
            broker.kill()
        time.sleep(0.7)
        for broker in c.brokers.values():
            broker.start()
        time.sleep(15)
        no_harm(c, hw, before)

        # One broker killed: only the alert.
        owners = running_on(c)
        victim = next(h for h in ("h2", "h1") if any(h in where for where in owners.values()))
        other = "h1" if victim == "h2" else "h2"
        c.brokers[other].kill()
        c.wait_for("broker-down raised", lambda: _alerts(c, "broker-down"), 3 * ALERT_AFTER_S + 10)
        time.sleep(5)
        no_harm(c, hw, before)
        assert all(rejoined(c, h, armed=True) for h in hosts)
        c.brokers[other].start()
        c.wait_for("every link up again", lambda: all(
            all(_links_up(c, h).values()) and len(_links_up(c, h)) == 2 for h in hosts), 30)

        # The hypervisor running the other broker loses power: fenced, its VMs recovered,
        # decided and committed through the remaining broker.
        lost = sorted(vm for vm, where in owners.items() if victim in where)
        assert lost
        cut_at = time.monotonic()
        c.cut(victim)
        c.brokers[victim].kill()
        c.kill_vms(victim)
        c.kill9(victim)
        wait_placed(c, names, timeout_s=60, avoid=(victim,))
        took = time.monotonic() - cut_at
        print(f"12 hosts, two brokers: recovered {lost} from {victim} (running a broker) in {took:.2f} s")
        calls = fence_calls(c)
        assert any(f" off {victim} 0" in line for line in calls), calls
        assert took < 20, took
        assert not hw.reset_at, hw.reset_at
        watch.check()
