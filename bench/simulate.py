"""Cluster simulator at volume and at scale.

  schedules   N random fault schedules (`haguard.sim.runner.run(seed)`, 4 hosts with fence
              devices, the simulator's defaults) on 2 worker processes: wall time, seeds per
              second, invariant violations (safety 1-4 and liveness 5), crashes, and the worst
              time-to-recovery seen (the simulator's convergence time after healing: from the
              instant faults stop until every VM runs exactly once); then more seeds on 10
              hosts with fanout 2, whose heartbeats reach the coordinator through relays
  gossip      a fault-free world of N hosts with 20 VMs each, started in steady state (every VM
              placed and running, as committed by an earlier coordinator): messages delivered
              per host per second once a coordinator committed in its term: the most loaded
              follower, aggregator and host, and the coordinator, next to the analytical rates
              of the layout (docs/cluster-design.md: a follower hears its ring neighbours and
              the coordinator's heartbeat, an aggregator also 4 digests, the coordinator its
              neighbours and the top digests)
  detection   in the same world (a fresh one for each crash below 100 hosts), hosts that own
              VMs lose power one after another, at different phases of the tick, heartbeat and
              ping periods, the same phases at every size; beyond a full mesh, hosts the
              coordinator hears only relayed: time until the coordinator's detector says
              `dead`, and until it orders the fence; the mean over the phases
  detector    one agent's failure detector: cost of a fed event (it judges the peers the event
              is about) and of a tick (every watched peer), and the events per second a
              follower and the coordinator get at N hosts
  signatures  the coordinator in steady state at 1,000 hosts (quick: 100), HMAC only and with
              host keys side by side: its core's CPU, messages and bytes received, plus each
              envelope's own check (measured per message) times the messages
  brokers     every broker gone for 120 s (quick: 30 s), and a 700 ms blip of every broker, at
              10, 30, 100 and 1,000 hosts (quick: 10 and 30), from a formed cluster with VMs on
              half of the hosts (bench/routine.py's scenarios): stop-petting decisions,
              watchdog resets, fences and VM restarts, without fence devices (every watchdog
              armed, the worst case) and with them
  planning    1,000 hosts x 20 VMs, one host failed: `plan_recovery` (placement of its 20 VMs
              on the 999 others) and the coordinator's whole `plan` call that releases and
              places them, from a synthetic committed state; p50 and max over several runs

Usage: .venv/bin/python bench/simulate.py [--quick] [--seeds N] [--sizes 3,30,100,1000]
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import base_parser, emit_result, log
from bench.routine import scenario as routine_scenario
from haguard.core import wire
from haguard.core.cluster import codec
from haguard.core.cluster.coordinator import Coordinator, HostView
from haguard.core.cluster.placement import HostCandidate, PlacementLimits, VmSpec
from haguard.core.cluster.recovery import plan_recovery
from haguard.core.cluster.relay import relay_layout, ring_neighbours
from haguard.core.cluster.state import ClusterState, HostRecord, VmRecord
from haguard.core.cluster.types import (
    CoreConfig,
    Heartbeat,
    HostSpec,
    MessageReceived,
    PersistedState,
    QemuState,
)
from haguard.core.detector import DetectorTiming, FailureDetector, PeerHeard, PeerState, PingObserved
from haguard.core.hostkeys import signer_of
from haguard.sim.faults import Schedule
from haguard.sim.runner import run
from haguard.sim.world import SimConfig, SimHost, World

TARGET_SCHEDULE_S = 600.0          # 10,000 schedules on 2 cores
TARGET_MSGS_PER_HOST_S = 50.0      # at 1,000 hosts
TARGET_PLAN_MS = 100.0             # one failed host's recovery at 1,000 hosts x 20 VMs
VMS_PER_HOST = 20
VM_MEMORY_MIB = 2048
HOST_MEMORY_MIB = 64 * 1024        # room for 32 such VMs: 20 placed plus a failed host's share
HOST_VCPUS = 64


# ---- schedules ----------------------------------------------------------------------------

RELAYED = SimConfig(hosts=10, gossip_fanout=2)     # ring neighbours + relay tiers, as at scale
_SIM: SimConfig | None = None                       # the workers' configuration (set before forking)


def _one_seed(seed: int) -> tuple[int, str | None, int | None, int | None, int, str]:
    result, _world = run(seed, sim=_SIM)
    message = result.message.splitlines()[0] if result.message else ""
    return seed, result.failure, result.invariant, result.converged_ms, result.events, message


def schedules(count: int, first_seed: int, workers: int, sim: SimConfig | None = None) -> dict[str, Any]:
    global _SIM
    _SIM = sim
    log(f"schedules: {count} seeds from {first_seed} on {workers} workers ({sim or 'defaults'})")
    failures: list[dict[str, Any]] = []
    converged: list[int] = []
    worst_seed, events = None, 0
    start = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        results = pool.imap_unordered(_one_seed, range(first_seed, first_seed + count), chunksize=20)
        for done, (seed, failure, invariant, conv, ev, message) in enumerate(results, 1):
            events += ev
            if failure is not None:
                failures.append({"seed": seed, "failure": failure, "invariant": invariant,
                                 "message": message[:300]})
            elif conv is not None:
                if not converged or conv > max(converged):
                    worst_seed = seed
                converged.append(conv)
            if done % max(1, count // 10) == 0:
                log(f"  {done}/{count} seeds, {time.monotonic() - start:.1f} s, {len(failures)} failed")
    took = time.monotonic() - start
    converged.sort()
    return {
        "seeds": count, "first_seed": first_seed, "workers": workers, "time_s": round(took, 2),
        "seeds_per_s": round(count / took, 1),
        "projected_10000_s": round(10_000 * took / count, 1),
        "violations": sum(f["failure"] in ("safety", "liveness") for f in failures),
        "safety_violations": sum(f["failure"] == "safety" for f in failures),
        "liveness_misses": sum(f["failure"] == "liveness" for f in failures),
        "crashes": sum(f["failure"] == "crash" for f in failures),
        "failures": failures[:20],
        "worst_recovery_ms": converged[-1] if converged else None,
        "worst_recovery_seed": worst_seed,
        "recovery_p50_ms": converged[len(converged) // 2] if converged else None,
        "recovery_p99_ms": (converged[min(len(converged) - 1, int(len(converged) * 0.99))]
                            if converged else None),
        "events": events,
    }


# ---- host keys: the coordinator's cost --------------------------------------------------

def _envelope_costs(body_bytes: int) -> dict[str, float]:
    """Microseconds to sign and to check one envelope of `body_bytes`, HMAC alone and with a
    host key (the transport's work per message, which the simulator does not do)."""
    key, own = b"k" * 32, Ed25519PrivateKey.generate()
    keys = {"h1": (own.public_key(),)}
    env = wire.Envelope(cluster="c1", host="h1", incarnation=1, seq=1, kind="cluster",
                        body={"msg": "x" * body_bytes})
    out: dict[str, float] = {}
    for name, signer, host_keys in (("hmac", None, None), ("host_key", signer_of(own), keys)):
        data = wire.encode(env, key, signer=signer)
        t0 = time.perf_counter()
        for _ in range(500):
            wire.encode(env, key, signer=signer)
        t1 = time.perf_counter()
        for _ in range(500):
            wire.decode(data, key, "c1", host_keys=host_keys)
        t2 = time.perf_counter()
        out[f"{name}_sign_us"] = round((t1 - t0) / 500 * 1e6, 1)
        out[f"{name}_check_us"] = round((t2 - t1) / 500 * 1e6, 1)
        out[f"{name}_bytes"] = len(data)
    return out


def _coordinator_cost(hosts: int, window_ms: int, keyed: bool) -> dict[str, Any]:
    world, coordinator, _ = _steady(hosts, VMS_PER_HOST, host_keys=keyed)
    assert coordinator is not None
    agent = world.hosts[coordinator].agent
    assert agent is not None
    spent = [0]
    received = [0, 0]

    def timed(fn: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            t0 = time.process_time_ns()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.process_time_ns() - t0
        return call
    agent.step = timed(agent.step)              # type: ignore[method-assign]
    agent.tick = timed(agent.tick)              # type: ignore[method-assign]
    feed = world._feed

    def counting(host: SimHost, event: Any) -> None:
        if host.name == coordinator and isinstance(event, MessageReceived):
            received[0] += 1
            received[1] += len(json.dumps(codec.to_data(event.message), separators=(",", ":")))
        feed(host, event)
    world._feed = counting                      # type: ignore[method-assign]
    t0 = world.now
    world.run(t0 + window_ms)
    seconds = (world.now - t0) / 1000
    return {"core_cpu_ms_per_s": round(spent[0] / 1e6 / seconds, 1),
            "messages_per_s": round(received[0] / seconds, 1),
            "body_kib_per_s": round(received[1] / 1024 / seconds, 1),
            "proofs_refused": agent.relay.proofs.refused}


def signature_cost(hosts: int, window_ms: int) -> dict[str, Any]:
    """The coordinator in steady state, HMAC only and with host keys, side by side: its core's
    CPU (heartbeats signed, relayed ones checked), the bytes it receives, and the envelopes'
    own cost per message received (measured here, times the messages)."""
    rows = {"hmac": _coordinator_cost(hosts, window_ms, False),
            "host_key": _coordinator_cost(hosts, window_ms, True)}
    body = int(rows["hmac"]["body_kib_per_s"] * 1024 / max(1, rows["hmac"]["messages_per_s"]))
    costs = _envelope_costs(min(body, 60_000))
    for name, row in rows.items():
        envelope_ms = row["messages_per_s"] * costs[f"{name}_check_us"] / 1000
        row["envelope_cpu_ms_per_s"] = round(envelope_ms, 1)
        row["total_cpu_pct_of_core"] = round((row["core_cpu_ms_per_s"] + envelope_ms) / 10, 1)
    ratio = rows["host_key"]["total_cpu_pct_of_core"] / max(0.1, rows["hmac"]["total_cpu_pct_of_core"])
    return {"hosts": hosts, **rows, "envelope": costs, "cpu_ratio": round(ratio, 2)}


# ---- gossip and detection at N hosts ----------------------------------------------------

class CountingWorld(World):
    """The simulator's world, counting the messages each host's agent is handed.

    The invariant checker is switched off: it scans every host's VMs after every event
    (O(hosts x VMs) per event), which dominates at tens of hosts and is not what is measured
    here; the schedules part runs with it.
    """

    def __init__(self, *args: Any, placed: ClusterState | None = None, **kwargs: Any) -> None:
        self.received: dict[str, int] = {}
        self.dead_seen: dict[str, int] = {}        # victim -> when the coordinator's detector said dead
        self.victims: set[str] = set()
        self.placed = placed
        super().__init__(*args, **kwargs)
        self.checker.after_step = lambda now: None      # type: ignore[method-assign]

    def _boot_agent(self, host: SimHost) -> None:
        # A cluster in steady state: every VM placed and running (placing 20,000 VMs from scratch
        # is not what is measured), the placement saved as committed by an earlier coordinator.
        if self.placed is not None and (host.disk is None or host.disk.committed is None):
            host.disk = PersistedState(accepted=self.placed, committed=self.placed)
            host.vms = {vm: "running" for vm in self.placed.owned_by(host.name)}
        super()._boot_agent(host)

    def _feed(self, host: SimHost, event: Any) -> None:
        if isinstance(event, MessageReceived) and host.agent is not None:
            self.received[host.name] = self.received.get(host.name, 0) + 1
        super()._feed(host, event)

    def _on_tick(self, payload: None) -> None:
        super()._on_tick(payload)
        for coordinator in self.coordinators():
            agent = self.hosts[coordinator].agent
            assert agent is not None
            for victim in self.victims - set(self.dead_seen):
                if agent.detector.state(victim) is PeerState.DEAD:
                    self.dead_seen[victim] = self.now


def _sim_config(hosts: int, vms_per_host: int, host_keys: bool = False) -> SimConfig:
    vms = tuple(VmSpec(name=f"vm{i}", memory_mib=VM_MEMORY_MIB, vcpus=1, priority=i % 3)
                for i in range(1, hosts * vms_per_host + 1))
    return SimConfig(hosts=hosts, vms=vms, host_memory_mib=HOST_MEMORY_MIB, host_vcpus=HOST_VCPUS,
                     liveness_bound_ms=10**9, decode_messages=False, host_keys=host_keys)


def _placed(sim: SimConfig, vms_per_host: int) -> ClusterState:
    names = [f"h{i}" for i in range(1, sim.hosts + 1)]
    owners = {vm.name: names[i // vms_per_host] for i, vm in enumerate(sim.vms)}
    return ClusterState(term=0, version=1, vms={vm: VmRecord(owner=h) for vm, h in owners.items()},
                        hosts={h: HostRecord() for h in names})


def _steady(hosts: int, vms_per_host: int,
            host_keys: bool = False) -> tuple[CountingWorld, str | None, int | None]:
    """A world warmed up until a coordinator committed a state in which every VM has an owner."""
    sim = _sim_config(hosts, vms_per_host, host_keys)
    world = CountingWorld(0, Schedule(faults=(), heal_ms=10**9), sim, placed=_placed(sim, vms_per_host))
    t, settled_ms = 0, None
    while t < 20_000:
        t += 500
        world.run(t)
        coords = world.coordinators()
        if coords:
            agent = world.hosts[next(iter(coords))].agent
            assert agent is not None
            if all(r.owner is not None for r in agent.committed.vms.values()):
                settled_ms = t
                break
    world.run(t + 1000)                                          # VMs started, acks flowing
    return world, next(iter(world.coordinators()), None), settled_ms


def _crash(world: CountingWorld, victim: str, at_ms: int) -> tuple[int | None, int | None]:
    """Power `victim` off at `at_ms`: when the coordinator's detector says dead, when it orders the fence."""
    world.run(at_ms)
    world.victims.add(victim)
    world._power_off(world.hosts[victim], "crash")
    fence = None
    while fence is None and world.now < at_ms + 3000:
        world.run(world.now + world.sim.timing.tick_ms)
        fence = next((at for at, _by, h in world.fences if h == victim and at >= at_ms), None)
    dead = world.dead_seen.get(victim)
    return (dead - at_ms if dead is not None else None), (fence - at_ms if fence is not None else None)


def gossip_at(hosts: int, vms_per_host: int, window_ms: int, phases: int) -> dict[str, Any]:
    wall0 = time.monotonic()
    world, coordinator, settled_ms = _steady(hosts, vms_per_host)
    before = dict(world.received)
    t0 = world.now
    world.run(t0 + window_ms)
    seconds = (world.now - t0) / 1000
    rates = {h: (world.received.get(h, 0) - before.get(h, 0)) / seconds for h in world.hosts}
    agent = world.hosts[coordinator].agent if coordinator is not None else None
    layout = agent.layout if agent is not None else None
    aggregators = {h for t in layout.tiers[1:] for h in t} if layout is not None else set()
    followers = [r for h, r in rates.items() if h != coordinator and h not in aggregators]
    beat_hz = 1000 / world.sim.timing.heartbeat_ms
    # The layout (relay.py): a follower hears its ring neighbours and the coordinator's heartbeat;
    # an aggregator also the digests of up to relay_fanin hosts; the coordinator its neighbours and
    # the top digests (in a full mesh: every follower).  No proposal or ack in steady state.
    names = sorted(world.hosts)
    ring = len(ring_neighbours(names, names[0], world.sim.gossip_fanout))
    fanin = CoreConfig.relay_fanin
    analytic_follower = beat_hz * min(hosts - 1, ring + 1)
    analytic_aggregator = beat_hz * (ring + 1 + fanin) if aggregators else None
    top = len(layout.tiers[-1]) if layout is not None and layout.enabled else 0
    analytic_coordinator = beat_hz * (ring + top) if top else beat_hz * (hosts - 1)
    # Detection: followers that own VMs lose power, one per phase of the heartbeat interval, each
    # the coordinator does not hear directly where it relays (a host it hears only in digests).
    # Crash instants at the same phases of the ticks, heartbeats and pings (all started at 0) in
    # every run: 600 ms is a multiple of each period.  A large cluster loses them one after
    # another; a small one gets a fresh world for each (it would lose its quorum).
    cycle = 600
    step = cycle // max(1, phases)

    def instant(now: int, k: int) -> int:
        return (now // cycle + 2) * cycle + k * step

    def victims_of(w: CountingWorld, coord: str | None, count: int) -> list[str]:
        order = sorted(w.hosts)
        if coord is None:
            return []
        near = ring_neighbours(order, coord, w.sim.gossip_fanout) | {coord}
        if len(near) == len(order):                             # a full mesh: any follower
            return [h for h in reversed(order) if h != coord][:count]
        spread = [order[(order.index(coord) + (k + 1) * len(order) // (count + 1)) % len(order)]
                  for k in range(count)]
        return [h for h in dict.fromkeys(spread) if h not in near]

    detect, fence = [], []
    reuse = victims_of(world, coordinator, phases) if hosts >= 100 else []
    for k in range(phases):
        if len(reuse) == phases:
            d, f = _crash(world, reuse[k], instant(world.now, k))
        else:
            fresh, fresh_coordinator, _ = _steady(hosts, vms_per_host)
            victim = victims_of(fresh, fresh_coordinator, 1)[0]
            d, f = _crash(fresh, victim, instant(fresh.now, k))
        if d is not None:
            detect.append(d)
        if f is not None:
            fence.append(f)
    wall = time.monotonic() - wall0
    return {
        "hosts": hosts, "vms": hosts * vms_per_host, "settled_ms": settled_ms, "window_ms": window_ms,
        "relayed": bool(layout is not None and layout.enabled),
        "relay_tiers": [len(t) for t in layout.tiers] if layout is not None else [],
        "follower_mean": round(statistics.fmean(followers), 1) if followers else None,
        "follower_max": round(max(followers), 1) if followers else None,
        "aggregator_max": round(max(rates[h] for h in aggregators), 1) if aggregators else None,
        "coordinator": round(rates[coordinator], 1) if coordinator else None,
        "max_any_host": round(max(rates.values()), 1),
        "analytic_follower": round(analytic_follower, 1),
        "analytic_aggregator": round(analytic_aggregator, 1) if analytic_aggregator else None,
        "analytic_coordinator": round(analytic_coordinator, 1),
        "detect_dead_ms": detect, "fence_ordered_ms": fence,
        "detect_mean_ms": round(statistics.fmean(detect)) if detect else None,
        "fence_mean_ms": round(statistics.fmean(fence)) if fence else None,
        "oversize": len(world.oversize),
        "largest_bytes": dict(sorted(world.largest.items())),
        "wall_s": round(wall, 1),
    }


# ---- the detector's cost per event at N peers -------------------------------------------

def detector_cost(hosts: int, events: int, fanout: int = 4) -> dict[str, Any]:
    """The coordinator's detector watches every host; a follower's only its neighbours and the
    coordinator.  A fed event judges the peers it is about; a tick (every 100 ms) judges all.
    Beyond a full mesh the coordinator takes each host's heartbeat from each of its reporters
    (relay.py): about 2.5 entries per host per heartbeat interval."""
    names = [f"h{i}" for i in range(1, hosts + 1)]
    det = FailureDetector(names[0], names, DetectorTiming(), 0)
    for h in names[1:]:
        det.step(PeerHeard(host=h, incarnation=1, now_ms=1, hears=frozenset(names[:3])))
    t0 = time.perf_counter()
    for i in range(events):
        host = names[1 + i % (hosts - 1)]
        if i % 2:
            det.step(PingObserved(host=host, ok=True, now_ms=2 + i // hosts, rtt_ms=1.0))
        else:
            det.step(PeerHeard(host=host, incarnation=1, now_ms=2 + i // hosts, hears=frozenset(names[:3])))
    per_event_us = (time.perf_counter() - t0) / events * 1e6
    t0 = time.perf_counter()
    ticks = 20
    for i in range(ticks):
        det.tick(2 + events // hosts + i)
    per_tick_us = (time.perf_counter() - t0) / ticks * 1e6
    watched = min(hosts - 1, fanout + 1)
    # Heartbeats every 200 ms, pings every 300 ms, from and to the watched hosts; ticks 10 a second.
    follower_per_s = 5.0 * watched + watched / 0.3
    layout = relay_layout(names, fanout, CoreConfig.relay_fanin)
    if layout.enabled:      # one relayed entry per reporter per host it reports; its neighbours direct
        reporters = sum(any(r.tier == 1 for r in roles) for roles in layout.roles.values())
        coordinator_per_s = 5.0 * (reporters * (fanout + 1) + fanout) + (hosts - 1) / 0.3
    else:
        coordinator_per_s = 5.0 * (hosts - 1) + (hosts - 1) / 0.3
    cpu_pct = (per_event_us * coordinator_per_s + per_tick_us * 10) / 1e4
    return {"hosts": hosts, "per_event_us": round(per_event_us, 1),
            "per_tick_us_all_watched": round(per_tick_us), "follower_events_per_s": round(follower_per_s),
            "coordinator_events_per_s": round(coordinator_per_s),
            "coordinator_cpu_pct_of_core": round(cpu_pct, 1)}


# ---- planning at 1,000 hosts ---------------------------------------------------------------

def _planning_world(hosts: int) -> tuple[CoreConfig, ClusterState, dict[str, HostView], str, list[str]]:
    names = [f"h{i}" for i in range(1, hosts + 1)]
    host_specs = {n: HostSpec(name=n, memory_mib=HOST_MEMORY_MIB, vcpus=HOST_VCPUS) for n in names}
    vm_specs: dict[str, VmSpec] = {}
    owners: dict[str, str] = {}
    for i, host in enumerate(names):
        for j in range(VMS_PER_HOST):
            vm = f"vm{i * VMS_PER_HOST + j + 1}"
            vm_specs[vm] = VmSpec(name=vm, memory_mib=VM_MEMORY_MIB, vcpus=1, priority=j % 3)
            owners[vm] = host
    config = CoreConfig(me=names[0], hosts=host_specs, vms=vm_specs)
    # Each host's watchdog confirmed 10 s: a deadline is a fence for it (core/cluster/recovery.py).
    state = ClusterState(term=1, version=5, vms={vm: VmRecord(owner=h) for vm, h in owners.items()},
                         hosts={h: HostRecord(watchdog_ms=10_000) for h in names})
    failed = names[-1]
    by_host: dict[str, dict[str, QemuState]] = {}      # each host's beat reports its own VMs
    for vm, host in owners.items():
        by_host.setdefault(host, {})[vm] = "running"
    views: dict[str, HostView] = {}
    for host in names:
        if host == failed:
            views[host] = HostView(name=host, alive=False, dead=True, beat=None)
            continue
        beat = Heartbeat(sender=host, incarnation=1, term=1, hears=frozenset(), reaches=frozenset(),
                         accepted=state.key, quorate=True, vms=by_host.get(host, {}))
        views[host] = HostView(name=host, alive=True, dead=False, beat=beat)
    return config, state, views, failed, sorted(vm for vm, h in owners.items() if h == failed)


def planning(hosts: int, runs: int) -> dict[str, Any]:
    log(f"planning: {hosts} hosts x {VMS_PER_HOST} VMs, one failed, {runs} runs")
    config, state, views, failed, lost = _planning_world(hosts)
    limits = PlacementLimits()
    candidates = []
    for name, spec in sorted(config.hosts.items()):
        cand = HostCandidate(name=name, alive=name != failed, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                             used_memory_mib=VMS_PER_HOST * VM_MEMORY_MIB, used_vcpus=VMS_PER_HOST)
        candidates.append(cand)
    recover_ms: list[float] = []
    placed = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        placements = plan_recovery(config.vms, lost, candidates, limits)
        recover_ms.append((time.perf_counter() - t0) * 1000)
        placed = sum(p.host is not None for p in placements)
    plan_ms: list[float] = []
    plan_cpu_ms: list[float] = []       # CPU time: the machine is shared, wall time is noisy
    released = 0
    for _ in range(max(3, runs // 3)):
        coord = Coordinator(config, 1, iter(f"id{i}" for i in range(10**6)).__next__)
        coord.fencing.declare(failed, device=False, now_ms=0)      # declared dead earlier
        t0, c0 = time.perf_counter(), time.process_time()
        new, _out = coord.plan(state, views, 60_000)               # watchdog deadline passed
        plan_ms.append((time.perf_counter() - t0) * 1000)
        plan_cpu_ms.append((time.process_time() - c0) * 1000)
        assert new is not None
        released = sum(new.vms[vm].owner not in (None, failed) for vm in lost)
    return {
        "hosts": hosts, "vms": hosts * VMS_PER_HOST, "lost_vms": len(lost),
        "plan_recovery_p50_ms": round(statistics.median(recover_ms), 2),
        "plan_recovery_max_ms": round(max(recover_ms), 2), "plan_recovery_placed": placed,
        "coordinator_plan_p50_ms": round(statistics.median(plan_ms), 1),
        "coordinator_plan_max_ms": round(max(plan_ms), 1), "coordinator_plan_placed": released,
        "coordinator_plan_cpu_p50_ms": round(statistics.median(plan_cpu_ms), 1),
        "coordinator_plan_cpu_max_ms": round(max(plan_cpu_ms), 1),
        "runs": runs, "coordinator_runs": len(plan_ms),
    }


# ---- broker outages and blips at N hosts --------------------------------------------------

def broker_faults(sizes: list[int], outage_ms: int) -> list[dict[str, Any]]:
    """bench/routine.py's blip and outage scenarios at each size: what they cost the hosts."""
    rows = []
    for n in sizes:
        for kind in ("blip", "outage", "outage+dev"):
            t0 = time.monotonic()
            row = routine_scenario(kind, n, outage_ms)
            row["outage_ms"] = 700 if kind == "blip" else outage_ms
            row["wall_s"] = round(time.monotonic() - t0, 1)
            log(f"brokers: {kind} at {n} hosts: {row}")
            rows.append(row)
    return rows


# ---- main -------------------------------------------------------------------------------

def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, help="random schedules (default 10,000; quick 300)")
    ap.add_argument("--relayed-seeds", type=int,
                    help=f"random schedules on {RELAYED.hosts} hosts that relay (default 2,000; quick 60)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--sizes", help="host counts for the gossip run (default 3,10,30,100,1000; "
                                    "quick 3,30,1000)")
    ap.add_argument("--window-ms", type=int, default=1000, help="steady-state window (simulated time)")
    ap.add_argument("--skip-schedules", action="store_true", help="experiments only")
    ap.add_argument("--broker-sizes", help="host counts for the broker outages (default 10,30,100,1000; "
                                           "quick 10,30)")
    args = ap.parse_args()
    seeds = args.seeds or (300 if args.quick else 10_000)
    relayed_seeds = args.relayed_seeds or (60 if args.quick else 2_000)
    sizes = [int(s) for s in (args.sizes or ("3,30,1000" if args.quick else "3,10,30,100,1000")).split(",")]
    phases = 2 if args.quick else 10      # quick: 1,000 simulated hosts cost ~10 s a simulated second

    plan = planning(1000, 10 if args.quick else 30)
    signatures = signature_cost(100 if args.quick else 1000, args.window_ms)
    log(f"signatures: {signatures}")
    detector = [detector_cost(n, 3000) for n in (3, 30, 100, 1000)]
    scale = []
    for n in sizes:
        log(f"gossip: {n} hosts x {VMS_PER_HOST} VMs")
        scale.append(gossip_at(n, VMS_PER_HOST, args.window_ms, phases))
        log(f"  {scale[-1]}")
    broker_sizes = args.broker_sizes or ("10,30" if args.quick else "10,30,100,1000")
    brokers = broker_faults([int(n) for n in broker_sizes.split(",")], 30_000 if args.quick else 120_000)
    sched = schedules(seeds, args.first_seed, 2) if not args.skip_schedules else {}
    relayed = (schedules(relayed_seeds, args.first_seed, 2, RELAYED)
               if not args.skip_schedules else {})

    at_1000 = next((s for s in scale if s["hosts"] == 1000), None)
    rate_1000 = at_1000["max_any_host"] if at_1000 else None
    coordinator_1000 = at_1000["coordinator"] if at_1000 else None
    base = next((s for s in scale if s["hosts"] == 3), None)
    largest = max(scale, key=lambda s: s["hosts"]) if scale else None
    detect_not_slower = (base is not None and largest is not None and largest["hosts"] > 3
                         and largest["detect_mean_ms"] is not None and base["detect_mean_ms"] is not None
                         and largest["detect_mean_ms"] <= base["detect_mean_ms"]
                         and largest["fence_mean_ms"] is not None and base["fence_mean_ms"] is not None
                         and largest["fence_mean_ms"] <= base["fence_mean_ms"])
    clean = all(r and r["violations"] == 0 and r["crashes"] == 0 for r in (sched, relayed))
    targets: dict[str, bool | None] = {
        "schedules_time": bool(sched) and sched["projected_10000_s"] <= TARGET_SCHEDULE_S,
        "schedules_zero_violations": bool(sched) and clean,
        "messages_per_host_at_1000": rate_1000 is not None and rate_1000 <= TARGET_MSGS_PER_HOST_S,
        # None: not measured at 1,000 hosts (only up to `detection_largest_hosts`).
        "detection_not_slower_at_1000": (detect_not_slower if at_1000 else None),
        "plan_one_host_at_1000": plan["coordinator_plan_cpu_max_ms"] <= TARGET_PLAN_MS,
        "host_keys_cpu_within_2x": signatures["cpu_ratio"] <= 2.0,
        "host_keys_coordinator_under_25pct": signatures["host_key"]["total_cpu_pct_of_core"] <= 25.0,
        "broker_faults_reset_nobody": all(r["stops"] == r["resets"] == r["fences"] == r["restarts"] == 0
                                          for r in brokers),
    }

    titles = (f"Random schedules ({SimConfig.hosts} hosts, full mesh, fence devices, 2 workers)",
              f"Random schedules ({RELAYED.hosts} hosts, fanout {RELAYED.gossip_fanout}: relayed, 2 workers)")
    for title, run_ in zip(titles, (sched, relayed), strict=True):
        if not run_:
            continue
        print(f"\n{title}")
        print(f"  {run_['seeds']} seeds in {run_['time_s']} s ({run_['seeds_per_s']} seeds/s; "
              f"10,000 projected {run_['projected_10000_s']} s); violations {run_['violations']} "
              f"(safety {run_['safety_violations']}, liveness {run_['liveness_misses']}), "
              f"crashes {run_['crashes']}")
        print(f"  time to recovery after healing: p50 {run_['recovery_p50_ms']} ms, p99 "
              f"{run_['recovery_p99_ms']} ms, worst {run_['worst_recovery_ms']} ms "
              f"(seed {run_['worst_recovery_seed']})")
    print("\nSteady state, messages received per host per second (simulated; analytic in brackets)")
    print(f"  {'hosts':>6} {'tiers':>20} {'follower':>14} {'aggregator':>14} {'coordinator':>14} {'max':>6}")
    for s in scale:
        agg = (f"{s['aggregator_max']} ({s['analytic_aggregator']})"
               if s["aggregator_max"] is not None else "-")
        follower = f"{s['follower_max']} ({s['analytic_follower']})"
        coord = f"{s['coordinator']} ({s['analytic_coordinator']})"
        print(f"  {s['hosts']:>6} {s['relay_tiers'] or '-'!s:>20} {follower:>14} {agg:>14} {coord:>14} "
              f"{s['max_any_host']:>6}")
    print("\nDetection of a powered-off host by the coordinator, and its fence order (ms after the crash; "
          "crashes at different phases of the heartbeat interval)")
    for s in scale:
        print(f"  {s['hosts']:>6} hosts: dead {s['detect_dead_ms']} (mean {s['detect_mean_ms']}), "
              f"fence {s['fence_ordered_ms']} (mean {s['fence_mean_ms']}); wall {s['wall_s']} s")
    print(f"  at 1,000 hosts: at most {rate_1000} messages per host per second (coordinator "
          f"{coordinator_1000}); target <= {TARGET_MSGS_PER_HOST_S}")
    print(f"  detection and fencing no slower than at 3 hosts up to {largest['hosts'] if largest else None} "
          f"hosts: {'yes' if detect_not_slower else 'no'}")
    print("\nFailure detector: cost per event fed (judges the peers it is about), per tick (judges every "
          "watched peer); events/s of a follower and of the coordinator (which watches everyone)")
    for d in detector:
        print(f"  {d['hosts']:>5} hosts: {d['per_event_us']:>5} us/event, "
              f"{d['per_tick_us_all_watched']:>6} us/tick of all; follower {d['follower_events_per_s']:>3} "
              f"events/s; coordinator {d['coordinator_events_per_s']:>5} events/s = "
              f"{d['coordinator_cpu_pct_of_core']}% of a core")
    print(f"\nPlanning at {plan['hosts']} hosts x {VMS_PER_HOST} VMs, one host failed "
          f"({plan['lost_vms']} VMs)")
    print(f"  plan_recovery: p50 {plan['plan_recovery_p50_ms']} ms, max {plan['plan_recovery_max_ms']} ms")
    print(f"  Coordinator.plan (release + place): CPU p50 {plan['coordinator_plan_cpu_p50_ms']} ms, "
          f"max {plan['coordinator_plan_cpu_max_ms']} ms (target <= {TARGET_PLAN_MS} ms); wall p50 "
          f"{plan['coordinator_plan_p50_ms']} ms, max {plan['coordinator_plan_max_ms']} ms (shared machine)")
    print(f"\nHost keys at {signatures['hosts']} hosts, the coordinator in steady state (side by side)")
    for name in ("hmac", "host_key"):
        r = signatures[name]
        print(f"  {name:>8}: core {r['core_cpu_ms_per_s']} ms/s + envelopes "
              f"{r['envelope_cpu_ms_per_s']} ms/s = {r['total_cpu_pct_of_core']}% of a core; "
              f"{r['messages_per_s']} messages/s, {r['body_kib_per_s']} KiB/s of bodies")
    e = signatures["envelope"]
    print(f"  per envelope: HMAC sign {e['hmac_sign_us']} us, check {e['hmac_check_us']} us "
          f"({e['hmac_bytes']} B); host key sign {e['host_key_sign_us']} us, check "
          f"{e['host_key_check_us']} us ({e['host_key_bytes']} B); CPU ratio {signatures['cpu_ratio']}")
    print("\nEvery broker gone (blip: 700 ms), VMs on half of the hosts; the hosts' stop-petting "
          "decisions, watchdog resets, fences and VM restarts (+dev: every host has a fence device)")
    print(f"  {'scenario':<12}{'hosts':>6}{'gone_ms':>9}{'stops':>7}{'resets':>8}{'fences':>8}"
          f"{'restarts':>10}{'lost_ms':>9}{'wall_s':>8}")
    for r in brokers:
        print(f"  {r['scenario']:<12}{r['hosts']:>6}{r['outage_ms']:>9}{r['stops']:>7}{r['resets']:>8}"
              f"{r['fences']:>8}{r['restarts']:>10}{r['lost_ms']:>9}{r['wall_s']:>8}")
    verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}
    print("\nTargets: " + ", ".join(f"{k} {verdict[v]}" for k, v in targets.items()))
    emit_result({"quick": args.quick, "schedules": sched, "schedules_relayed": relayed, "gossip": scale,
                 "messages_per_host_s_at_1000": rate_1000,
                 "coordinator_messages_s_at_1000": coordinator_1000,
                 "detection_largest_hosts": largest["hosts"] if largest else None,
                 "detection_not_slower_up_to_largest": detect_not_slower,
                 "detector_cost": detector, "planning": plan, "signatures": signatures,
                 "broker_faults": brokers, "targets": targets})
    return 0 if all(v is True for v in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
