"""A fingerprint of the simulator's behaviour: run it in two trees to show a change of shape
changed no decision.

Runs seeded random schedules (`haguard.sim.runner.run`) in three configurations (4 hosts
with fence devices, 4 without, 10 hosts relayed) and hashes, per run, the outcome, the
convergence time, every alert, fence, VM start and finished move, and the number of
simulated events.  Two trees whose digests are equal took the same decisions at the same
simulated instants in every run.  Prints a table per configuration, then one JSON line.

Usage: .venv/bin/python bench/sim_digest.py [--quick] [--seeds N]
       (in another tree: cd OTHER && /path/to/.venv/bin/python bench/sim_digest.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from haguard.sim.runner import run
from haguard.sim.world import SimConfig

CONFIGS = {"4 hosts, fence devices": SimConfig(),
           "4 hosts, watchdogs only": replace(SimConfig(), fence_devices=False),
           "10 hosts, relayed": replace(SimConfig(), hosts=10, gossip_fanout=2)}


def digest(name: str, sim: SimConfig, seeds: int) -> dict[str, object]:
    h = hashlib.sha256()
    failures = events = 0
    started = time.monotonic()
    for seed in range(seeds):
        result, world = run(seed, sim=sim)
        failures += result.failure is not None
        events += result.events
        record = (seed, result.failure, result.converged_ms, result.alerts, result.fences, result.events,
                  tuple(world.starts) if world else (), tuple(world.migrations_done) if world else ())
        h.update(repr(record).encode())
    return {"config": name, "seeds": seeds, "failures": failures, "events": events,
            "digest": h.hexdigest()[:16], "wall_s": round(time.monotonic() - started, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 seeds per configuration (default 30)")
    ap.add_argument("--seeds", type=int)
    args = ap.parse_args()
    seeds = args.seeds or (10 if args.quick else 30)
    rows = [digest(name, sim, seeds if "10 hosts" not in name else max(1, seeds // 3))
            for name, sim in CONFIGS.items()]
    print(f"{'configuration':<26} {'seeds':>5} {'failures':>8} {'events':>9}  digest            wall s")
    for r in rows:
        print(f"{r['config']:<26} {r['seeds']:>5} {r['failures']:>8} {r['events']:>9}  {r['digest']}"
              f"  {r['wall_s']}")
    total = hashlib.sha256("".join(str(r["digest"]) for r in rows).encode()).hexdigest()[:16]
    print(json.dumps({"benchmark": "sim_digest", "quick": args.quick, "digest": total, "configs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
