"""Routine operations and infrastructure faults in the simulator: what they cost the hosts.

Each scenario starts from a formed cluster (VMs on half of the hosts, the simulator's
timing: heartbeat 200 ms, lease 1.5 s, self-fence grace 4.3 s, watchdog 2 s) and reports,
for the hosts other than the one the operation is about:

  stops      watchdog stop-petting decisions       resets   watchdog resets
  fences     fence commands                        restarts VMs started again (not the victim's)
  lost_ms    the longest a host lacked connected quorum (below the grace: no event)
  lead_ms    from the operation until another host coordinates

Scenarios (no fence devices: every watchdog is armed, the worst case; `+dev`: every host
has a fence device, so none is armed):
  stop       the coordinator's agent stops cleanly (disarms, hands over) and starts again
  kill       the coordinator's agent is killed (kill -9) and starts again
  power      the coordinator loses power (its own VMs are recovered: not counted)
  blip       the broker is gone for 700 ms
  outage     the broker is gone for 120 s (+dev, and without devices)
  switch     every link down for 120 s (+dev)

Usage: .venv/bin/python bench/routine.py [--quick] [--sizes 12,30,100]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import base_parser, emit_result, log
from haguard.core.cluster.placement import VmSpec
from haguard.sim.faults import Fault, Schedule
from haguard.sim.world import SimConfig, World

OUTAGE_MS = 120_000
SCENARIOS = ("stop", "kill", "power", "blip", "outage+dev", "outage", "switch+dev")


class Watched(World):
    """Records the longest connected-quorum loss of every host after `since`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.since = 10**12
        self.lost_ms: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _on_tick(self, payload: None) -> None:
        super()._on_tick(payload)
        if self.now < self.since:
            return
        for name, host in self.hosts.items():
            if host.agent is not None:
                lost = host.agent.self_fence.lost_for(self.now)
                self.lost_ms[name] = max(self.lost_ms.get(name, 0), lost)


def _sim(hosts: int, devices: bool) -> SimConfig:
    vms = tuple(VmSpec(name=f"vm{i}", memory_mib=1024, vcpus=1) for i in range(1, hosts // 2 + 1))
    return SimConfig(hosts=hosts, vms=vms, fence_devices=devices, liveness_bound_ms=60_000)


def _faults(kind: str, victim: str, hosts: list[str], at: int,
            outage_ms: int = OUTAGE_MS) -> tuple[list[Fault], int]:
    """The scenario's faults and how long to watch after them."""
    match kind:
        case "stop" | "kill" | "power":
            name = {"stop": "agent-stop", "kill": "agent-restart", "power": "crash"}[kind]
            return [Fault(at_ms=at, kind=name, args=(victim,))], 20_000
        case "blip":
            return [Fault(at_ms=at, kind="broker-down"), Fault(at_ms=at + 700, kind="broker-up")], 15_000
        case "outage" | "outage+dev":
            return [Fault(at_ms=at, kind="broker-down"),
                    Fault(at_ms=at + outage_ms, kind="broker-up")], outage_ms + 20_000
        case _:
            down = [Fault(at_ms=at, kind="isolate", args=(h,)) for h in hosts]
            up = [Fault(at_ms=at + outage_ms, kind="rejoin", args=(h,)) for h in hosts]
            return down + up, outage_ms + 20_000


def scenario(kind: str, hosts: int, outage_ms: int = OUTAGE_MS) -> dict[str, Any]:
    sim = _sim(hosts, devices=kind.endswith("+dev"))
    world = Watched(1, Schedule(faults=(), heal_ms=10**12), sim)
    world.run(8000 if hosts <= 30 else 12_000)
    (coordinator,) = world.coordinators()
    at = world.now
    faults, watch_ms = _faults(kind, coordinator, sorted(world.hosts), at, outage_ms)
    for f in faults:
        world._at(f.at_ms, "fault", f)
    world.since = at
    starts_before = len(world.starts)
    victim = coordinator if kind in ("stop", "kill", "power") else None
    lead_ms = None
    t = at
    while t < at + watch_ms:
        t += 50
        world.run(t)
        if lead_ms is None and set(world.coordinators()) - {coordinator} and victim is not None:
            lead_ms = t - at
    lost = {h: ms for h, ms in world.lost_ms.items() if h != victim}
    theirs = _owned(world, victim)
    restarts = [s for s in world.starts[starts_before:] if s[1] != victim and s[2] not in theirs]
    return {"scenario": kind, "hosts": hosts,
            "stops": len([s for s in world.stopped_petting if s[1] != victim]),
            "resets": len([p for p in world.power_offs if p[2] == "watchdog" and p[1] != victim]),
            "fences": len([f for f in world.fences if f[2] != victim]),
            "restarts": len(restarts), "lost_ms": max(lost.values(), default=0), "lead_ms": lead_ms}


def _owned(world: World, victim: str | None) -> set[str]:
    """The VMs the victim ran when it failed (their recovery is expected)."""
    if victim is None:
        return set()
    return {vm for _at, h, vm in world.starts if h == victim}


def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="host counts (default 12,30,100; quick 12,30)")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("12,30" if args.quick else "12,30,100")).split(",")]
    rows = []
    started = time.monotonic()
    for n in sizes:
        for kind in SCENARIOS:
            t0 = time.monotonic()
            rows.append(scenario(kind, n))
            log(f"{kind} at {n} hosts: {rows[-1]} ({time.monotonic() - t0:.1f} s)")
    print(f"\n{'scenario':<12}{'hosts':>6}{'stops':>7}{'resets':>8}{'fences':>8}{'restarts':>10}"
          f"{'lost_ms':>9}{'lead_ms':>9}")
    for r in rows:
        print(f"{r['scenario']:<12}{r['hosts']:>6}{r['stops']:>7}{r['resets']:>8}{r['fences']:>8}"
              f"{r['restarts']:>10}{r['lost_ms']:>9}{r['lead_ms'] or '-'!s:>9}")
    harmless = [r for r in rows if r["scenario"] != "outage"]
    targets = {"routine_ops_reset_nobody": all(r["stops"] == r["resets"] == r["fences"] == r["restarts"] == 0
                                               for r in harmless)}
    print(f"\ntargets: {targets}  ({time.monotonic() - started:.0f} s)")
    emit_result({"benchmark": "routine", "sizes": sizes, "rows": rows, "targets": targets,
                 "outage_without_devices_resets": {r["hosts"]: r["resets"] for r in rows
                                                   if r["scenario"] == "outage"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
