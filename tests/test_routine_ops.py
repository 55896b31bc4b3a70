"""Routine operations never reset a host: real agents in namespaces at the shipped timing,
real QEMU guests, a real mosquitto, softdog stand-ins for the watchdogs (a device not petted
for its timeout kills its host's QEMUs and agent, as a reset does).  Every host's QEMUs are
sampled throughout; a VM seen on two hosts at once fails the test.

- a rolling restart of every agent (what a package upgrade does), coordinator first, then the
  new coordinator again (coordinator last), then the coordinator's agent killed, then a
  switch reboot in cluster maintenance (`haguard maintenance on`), on 12 hosts without fence
  devices (every watchdog armed: the worst case);
- a switch reboot: every link of a 7-host cluster with fence devices down for 120 s;
- busy hosts: guests spinning 3 vCPUs per core under 5 agents (HAGUARD_SOAK_S, default 30 s;
  `bench/detection.py --busy` runs the 10-minute soak and reports the heartbeat jitter).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.helpers.beats import BeatWatch, percentile
from tests.helpers.cluster import HUB_ADDR
from tests.helpers.ha import (
    TwiceWatch,
    WatchdogHardware,
    all_qemu_pids,
    coordinator_of,
    ha_cluster,
    ha_vms,
    no_harm,
    rejoined,
    running_on,
    stop_agent,
    wait_placed,
)
from tests.helpers.vms import guest_vm

pytestmark = pytest.mark.slow

WATCHDOG_S = 10                     # the shipped default


def _hosts(n: int) -> tuple[str, ...]:
    return tuple(f"h{i}" for i in range(1, n + 1))


@pytest.mark.timeout(900)
def test_a_rolling_restart_and_a_switch_reboot_in_maintenance_reset_nothing() -> None:
    hosts = _hosts(12)
    vms = ha_vms(6)                     # on half of the hosts
    with WatchdogHardware(hosts) as hw, \
            ha_cluster(vms, fence=False, hosts=hosts, shipped_timing=True, ha=hw.ha(WATCHDOG_S)) as c, \
            TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        hw.attach(c)
        wait_placed(c, [v.name for v in vms], timeout_s=120)
        c.wait_for("every agent following with its watchdog petted",
                   lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        before = all_qemu_pids(c)
        assert len(before) == len(vms)
        steps: list[tuple[float, str]] = []
        # One round, coordinator first; then the coordinator that took over (restarted
        # already, as a follower) again, last: both orders in 13 restarts.
        first = coordinator_of(c)
        for host in [first, *(h for h in hosts if h != first), None]:
            host = host or coordinator_of(c)
            steps.append((time.time(), f"stop {host}"))
            assert stop_agent(c, host) == 0, c.log_tail()
            c.start_agent(host)
            c.wait_for(f"{host} back", lambda h=host: rejoined(c, h, armed=True), 60)
        ended = [e for h in hosts for e in c.events(h, "handover-ended") if e.get("successor")]
        assert len(ended) >= 2, ended
        # A coordinator that dies (kill -9) costs the followers nothing either.  systemd starts
        # it again after RestartSec (2 s); waiting for the election first, as this test once
        # did, could leave its armed watchdog unpetted past its timeout: a reset of the test's
        # making, not the agent's.
        c.wait_for("every agent following one coordinator", lambda: len(
            {c.cluster_view(h).get("coordinator") for h in c.procs} - {None}) == 1, 30)
        coordinator = coordinator_of(c)
        term = c.cluster_view(coordinator).get("term") or 0
        steps.append((time.time(), f"kill -9 {coordinator} (coordinator)"))
        c.kill9(coordinator)
        time.sleep(2)
        c.start_agent(coordinator)
        c.wait_for(f"{coordinator} back", lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        assert (c.cluster_view(coordinator).get("term") or 0) > term, "a new coordinator was elected"
        no_harm(c, hw, before, steps=steps)
        assert sorted(running_on(c)) == sorted(v.name for v in vms)

        # Cluster maintenance, then every link down for longer than the self-fence grace plus
        # the watchdog's timeout (what a switch upgrade does): without maintenance every host
        # with VMs is reset (test_sim_maintenance.py shows it); with it, nobody.
        done = c.haguard("h2", "maintenance", "on", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["maintenance"] is True, done
        c.wait_for("every host holds the paused state",
                   lambda: all(c.cluster_view(h).get("maintenance") for h in hosts), 30)
        for h in hosts:
            c.cut(h)
        # Past the self-fence grace (4.3 s): without maintenance each host with VMs would stop
        # petting here (no_harm looks for that) and reset 10 s later.
        time.sleep(10)
        for h in hosts:
            c.mend(h)
        c.wait_for("the cluster formed again", lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        no_harm(c, hw, before, quorum_kept=False)
        done = c.haguard("h3", "maintenance", "off")
        assert done.returncode == 0, done
        c.wait_for("maintenance off everywhere, no host marked paused", lambda: not any(
            c.cluster_view(h).get("maintenance") or any(
                r.get("paused") for r in (c.cluster_view(h).get("hosts") or {}).values())
            for h in hosts), 30)
        assert sorted(running_on(c)) == sorted(v.name for v in vms)
        watch.check()


@pytest.mark.timeout(600)
def test_a_switch_reboot_resets_no_host_that_has_a_fence_device() -> None:
    hosts = _hosts(7)
    vms = ha_vms(4)
    with WatchdogHardware(hosts) as hw, \
            ha_cluster(vms, hosts=hosts, shipped_timing=True, ha=hw.ha(WATCHDOG_S)) as c, \
            TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        hw.attach(c)
        wait_placed(c, [v.name for v in vms], timeout_s=120)
        c.wait_for("a coordinator", lambda: all(rejoined(c, h, armed=False) for h in hosts), 60)
        before = all_qemu_pids(c)
        for h in hosts:                 # every link down at once: no broker, no peer
            c.cut(h)
        time.sleep(120)
        for h in hosts:
            c.mend(h)
        c.wait_for("the cluster formed again", lambda: all(rejoined(c, h, armed=False) for h in hosts), 60)
        time.sleep(10)                  # long enough for any fence or recovery to start
        no_harm(c, hw, before, quorum_kept=False)      # quorum-lost is the truth here
        assert not [e for h in hosts for e in hw.farm.events(h, "open")], "a watchdog was armed"
        watch.check()


def _spinning(n: int) -> tuple:  # type: ignore[type-arg]
    """Guests whose one vCPU never idles (they rewrite 4 MiB as fast as they can)."""
    return tuple(guest_vm(f"vm{i + 1}", memory_mib=64, mib=4, rate=-1) for i in range(n))


@pytest.mark.timeout(1200)
def test_busy_hosts_keep_quorum_and_their_timing() -> None:
    # 2 cores, 6 spinning vCPUs (3 per core), 5 agents at the shipped timing, every watchdog
    # armed (no fence devices): no suspicion, no quorum loss, no reset.
    soak_s = float(os.environ.get("HAGUARD_SOAK_S", "30"))
    hosts = _hosts(5)
    vms = _spinning(3 * (os.cpu_count() or 2))
    with WatchdogHardware(hosts) as hw, \
            ha_cluster(vms, fence=False, hosts=hosts, shipped_timing=True, ha=hw.ha(WATCHDOG_S)) as c, \
            TwiceWatch([c.run_dir(h) for h in c.hosts]) as watch:
        hw.attach(c)
        wait_placed(c, [v.name for v in vms], timeout_s=120)
        c.wait_for("every agent following", lambda: all(rejoined(c, h, armed=True) for h in hosts), 60)
        before = all_qemu_pids(c)
        seen = {h: len(c.events(h, "peer-state")) for h in hosts}
        with BeatWatch(c.hub, HUB_ADDR, 1883, f"haguard/{c.cluster}/#") as beats:
            time.sleep(soak_s)
            gaps = beats.gaps_ms()
        suspicions = [e for h in hosts for e in c.events(h, "peer-state")[seen[h]:]
                      if e.get("new") in ("suspect", "dead", "unreachable")]
        assert not suspicions, suspicions
        no_harm(c, hw, before)
        p99 = percentile(gaps, 99)
        print(f"heartbeat gaps over {soak_s:.0f} s: {len(gaps)}, p50 {percentile(gaps, 50):.0f} ms, "
              f"p99 {p99:.0f} ms, max {max(gaps):.0f} ms")
        assert len(gaps) > soak_s * len(hosts), "every host's heartbeats were seen"
        assert p99 < 900, "a peer would suspect it (suspect_timeout_ms 900)"
        watch.check()
