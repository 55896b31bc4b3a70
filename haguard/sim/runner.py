"""Run one seed: a safety phase under faults, then a liveness phase after healing.

`run(seed)` builds the schedule from the seed (or takes one), runs the world and
returns a `RunResult`; `shrink` removes faults one at a time while the run still
fails the same way.  `python -m haguard.sim --seed N` replays a seed exactly.
Exit codes: 0 passed, 1 safety invariant broken, 2 liveness bound missed, 3 crash.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass, field

from haguard.core.cluster.member import ClusterMember
from haguard.sim.checkers import Violation
from haguard.sim.faults import Schedule, random_schedule
from haguard.sim.world import AgentFactory, SimConfig, World

EXIT = {None: 0, "safety": 1, "liveness": 2, "crash": 3}


@dataclass(frozen=True, kw_only=True)
class RunResult:
    seed: int
    schedule: Schedule
    failure: str | None = None          # safety | liveness | crash
    message: str = ""
    converged_ms: int | None = None     # after healing
    invariant: int | None = None
    alerts: tuple[str, ...] = ()
    fences: tuple[tuple[int, str, str], ...] = ()
    events: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def command(self, shrunk: Schedule | None = None, flags: str = "") -> str:
        cmd = f"python -m haguard.sim --seed {self.seed}{flags}"
        if shrunk is not None:
            cmd += f" --schedule '{shrunk.encode()}'"
        return cmd


def run(seed: int, *, schedule: Schedule | None = None, sim: SimConfig | None = None,
        agent_class: AgentFactory = ClusterMember) -> tuple[RunResult, World | None]:
    sim = sim or SimConfig()
    if schedule is None:
        hosts = [f"h{i}" for i in range(1, sim.hosts + 1)]
        schedule = random_schedule(seed, hosts, [v.name for v in sim.vms])
    world: World | None = None
    failure, message, invariant = None, "", None
    try:
        world = World(seed, schedule, sim, agent_class)
        world.run(schedule.heal_ms + sim.liveness_bound_ms)
        if world.converged_ms is None:
            failure = "liveness"
            message = f"VMs not all running once within {sim.liveness_bound_ms} ms after healing"
    except Violation as v:
        failure, message, invariant = "safety", str(v), v.invariant
    except Exception:                                        # a crash of a core or the world
        failure, message = "crash", traceback.format_exc()
    result = RunResult(
        seed=seed, schedule=schedule, failure=failure, message=message, invariant=invariant,
        converged_ms=world.converged_ms if world else None,
        alerts=tuple(f"{at} {h} {a.kind}: {a.reason}" for at, h, a in world.alerts) if world else (),
        fences=tuple(world.fences) if world else (), events=world.events if world else 0)
    return result, world


def shrink(result: RunResult, *, sim: SimConfig | None = None, agent_class: AgentFactory = ClusterMember,
           max_runs: int = 200) -> Schedule:
    """A shorter schedule that fails the same way (greedy: drop one fault at a time)."""
    schedule, runs = result.schedule, 0
    progress = True
    while progress and runs < max_runs:
        progress = False
        for i in range(len(schedule.faults)):
            candidate = schedule.without(i)
            runs += 1
            again, _ = run(result.seed, schedule=candidate, sim=sim, agent_class=agent_class)
            if again.failure == result.failure and again.invariant == result.invariant:
                schedule, progress = candidate, True
                break
    return schedule


def main(argv: list[str] | None = None, agent_class: AgentFactory = ClusterMember) -> int:
    parser = argparse.ArgumentParser(prog="python -m haguard.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed on")
    parser.add_argument("--schedule", help="a fault schedule as printed by a failing run")
    parser.add_argument("--hosts", type=int, default=SimConfig.hosts)
    parser.add_argument("--witness", action="store_true", help="add a host that only votes")
    parser.add_argument("--no-fence-devices", action="store_true", help="recover by watchdog deadline")
    parser.add_argument("--isolation", choices=["keep", "shutdown", "self-fence"], default="keep")
    parser.add_argument("--fanout", type=int, default=SimConfig.gossip_fanout,
                        help="ring neighbours per host (below hosts - 1: partial views)")
    parser.add_argument("--no-shrink", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    schedule = Schedule.decode(args.schedule) if args.schedule else None
    sim = SimConfig(hosts=args.hosts, witness=args.witness, fence_devices=not args.no_fence_devices,
                    isolation=args.isolation, gossip_fanout=args.fanout)
    flags = "".join([f" --hosts {args.hosts}" if args.hosts != SimConfig.hosts else "",
                     " --witness" if args.witness else "",
                     " --no-fence-devices" if args.no_fence_devices else "",
                     f" --isolation {args.isolation}" if args.isolation != "keep" else "",
                     f" --fanout {args.fanout}" if args.fanout != SimConfig.gossip_fanout else ""])
    worst, code = 0, 0
    for seed in range(args.seed, args.seed + args.seeds):
        result, _world = run(seed, schedule=schedule, sim=sim, agent_class=agent_class)
        if result.ok:
            worst = max(worst, result.converged_ms or 0)
            if args.verbose or args.seeds == 1:
                print(f"seed {seed}: ok, {len(result.schedule.faults)} faults, converged "
                      f"{result.converged_ms} ms after healing, {result.events} events")
            continue
        print(f"seed {seed}: {result.failure}: {result.message}")
        print(f"schedule: {result.schedule.encode()}")
        print(f"reproduce: {result.command(schedule, flags)}")
        if not args.no_shrink:
            shrunk = shrink(result, sim=sim, agent_class=agent_class)
            print(f"shrunk to {len(shrunk.faults)} faults: {result.command(shrunk, flags)}")
        code = max(code, EXIT[result.failure])
    if args.seeds > 1:
        print(f"{args.seeds} seeds, worst convergence {worst} ms after healing")
    return code


if __name__ == "__main__":
    sys.exit(main())
