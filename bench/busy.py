"""Busy hosts (`bench/detection.py --busy`): heartbeat timing while guests spin every core.

Five real agents in namespaces at the shipped timing, no fence devices (every watchdog
armed, softdog stand-ins), and 3 spinning vCPUs per core (guests that rewrite 4 MiB as
fast as they can).  The agents run once at the normal policy (`scheduling.realtime_priority:
0`) and once at the default real-time priority, one after the other in the same run.  Every
cluster heartbeat is stamped at the broker (tests/helpers/beats.py): the gap between two
heartbeats of one host is what its peers wait.  Also counted: suspicions (`peer-state`
suspect, unreachable or dead), watchdog stop-petting decisions and resets.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import log
from tests.helpers.beats import BeatWatch, percentile
from tests.helpers.cluster import HUB_ADDR
from tests.helpers.ha import WatchdogHardware, ha_cluster, wait_placed
from tests.helpers.vms import guest_vm

HOSTS = tuple(f"h{i}" for i in range(1, 6))
INTERVAL_MS = 300                    # the shipped heartbeat interval
TARGET_P99_MS = 600                  # two intervals: far from the 900 ms suspicion


def _spinning() -> tuple:  # type: ignore[type-arg]
    return tuple(guest_vm(f"vm{i + 1}", memory_mib=64, mib=4, rate=-1)
                 for i in range(3 * (os.cpu_count() or 2)))


def busy_run(seconds: float, priority: int) -> dict[str, Any]:
    vms = _spinning()
    extra = f"scheduling:\n  realtime_priority: {priority}\n"
    with WatchdogHardware(HOSTS) as hw, \
            ha_cluster(vms, fence=False, hosts=HOSTS, shipped_timing=True, ha=hw.ha(10), extra=extra) as c:
        hw.attach(c)
        wait_placed(c, [v.name for v in vms], timeout_s=120)
        time.sleep(5)
        seen = {h: len(c.events(h, "peer-state")) for h in HOSTS}
        stops = {h: len(c.events(h, "watchdog-stop-petting")) for h in HOSTS}
        load = os.getloadavg()[0]
        with BeatWatch(c.hub, HUB_ADDR, 1883, f"haguard/{c.cluster}/#") as beats:
            time.sleep(seconds)
            gaps = beats.gaps_ms()
        load = max(load, os.getloadavg()[0])
        suspicions = sum(1 for h in HOSTS for e in c.events(h, "peer-state")[seen[h]:]
                         if e.get("new") in ("suspect", "unreachable", "dead"))
        stopped = sum(len(c.events(h, "watchdog-stop-petting")) - stops[h] for h in HOSTS)
        return {"priority": priority, "seconds": seconds, "heartbeats": len(gaps) + len(HOSTS),
                "gap_p50_ms": round(percentile(gaps, 50)), "gap_p99_ms": round(percentile(gaps, 99)),
                "gap_max_ms": round(max(gaps)), "jitter_p99_ms": round(percentile(gaps, 99) - INTERVAL_MS),
                "suspicions": suspicions, "stopped_petting": stopped, "resets": len(hw.reset_at),
                "load1": round(load, 1), "spinning_vcpus": len(vms)}


def busy_phase(seconds: float) -> dict[str, Any]:
    runs = []
    for priority in (0, 10):
        log(f"busy: {len(HOSTS)} agents, priority {priority or 'normal'}, {seconds:.0f} s")
        runs.append(busy_run(seconds, priority))
        log(f"  {runs[-1]}")
    normal, realtime = runs
    return {"busy_normal": normal, "busy_realtime": realtime,
            "busy_targets": {"no_suspicion_or_reset": (realtime["suspicions"] == realtime["stopped_petting"]
                                                       == realtime["resets"] == 0),
                             "gap_p99": realtime["gap_p99_ms"] <= TARGET_P99_MS}}


def print_busy(f: dict[str, Any]) -> None:
    print(f"\nBusy hosts: {len(HOSTS)} agents, {f['busy_realtime']['spinning_vcpus']} spinning vCPUs on "
          f"{os.cpu_count()} cores, shipped timing (heartbeat {INTERVAL_MS} ms), gaps at the broker")
    print(f"  {'scheduling':<22}{'seconds':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'jitter p99':>11}"
          f"{'suspicions':>11}{'stops':>6}{'resets':>7}{'load':>6}")
    for name, r in (("normal (priority 0)", f["busy_normal"]), ("SCHED_RR 10 (default)", f["busy_realtime"])):
        print(f"  {name:<22}{r['seconds']:>8.0f}{r['gap_p50_ms']:>8}{r['gap_p99_ms']:>8}{r['gap_max_ms']:>8}"
              f"{r['jitter_p99_ms']:>11}{r['suspicions']:>11}{r['stopped_petting']:>6}{r['resets']:>7}"
              f"{r['load1']:>6}")
    print(f"  targets: {f['busy_targets']}")
