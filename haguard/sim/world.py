"""The simulated world: N agent cores on a virtual clock, a broker, hosts, QEMUs, fences.

Everything random comes from one seeded `random.Random`; events run in (time,
sequence) order, so a seed replays exactly.  The world stands in for the agent
runtime: it feeds the cores the same inputs and executes the same outputs (persist
before sending, fence devices, watchdogs, QEMUs, migrations).  Faults live here,
never in the cores.

The bus behaves like an MQTT broker with QoS 1: per-message delay, loss and
duplication, delivery in order per publisher and subscriber (so reordering only
across publishers), nothing delivered while the broker or a host's link to it is
down.  Links between hosts can be cut one way; a cut loses both the gossip and the
pings from that side.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from haguard.core import wire
from haguard.core.alerts import RaiseAlert
from haguard.core.cluster import codec
from haguard.core.cluster.member import ClusterMember
from haguard.core.cluster.placement import VmSpec
from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.selffence import DISARM_WAIT_MS
from haguard.core.cluster.types import (
    AdminRequested,
    ClusterOutput,
    ClusterTiming,
    CommandFinished,
    CoreConfig,
    FenceHost,
    HostSpec,
    IsolationPolicy,
    KillVm,
    LocalVmsObserved,
    Message,
    MessageReceived,
    MigrateVm,
    PersistedState,
    PersistState,
    PetWatchdog,
    QemuState,
    Send,
    StartVm,
    StopPettingWatchdog,
    StopRequested,
    StopVm,
    WatchdogArm,
    WatchdogConfirmed,
)
from haguard.core.detector import BrokerConnectionChanged, DetectorTiming, PingObserved
from haguard.core.hostkeys import signer_of
from haguard.sim.checkers import Checker, Violation
from haguard.sim.faults import Fault, Schedule

AgentFactory = Callable[..., ClusterMember]


# An envelope's bytes around its body, at their largest: 63-character cluster and host
# names, 19-digit numbers, a host key's signature (core/wire.py).
ENVELOPE_BYTES = len(wire.encode(wire.Envelope(cluster="c" * 63, host="h" * 63, incarnation=2**63 - 1,
                                               seq=2**63 - 1, kind="direct", sent_ms=2**63 - 1,
                                               body={"msg": {}}), b"k" * 32,
                                 signer=lambda _: "A" * 86 + "==")) - len('{}')

@dataclass(frozen=True, kw_only=True)
class SimConfig:
    hosts: int = 4
    witness: bool = False              # one more host that only votes
    fence_devices: bool = True
    isolation: IsolationPolicy = "keep"
    watchdog_arm: WatchdogArm = "auto"
    vms: tuple[VmSpec, ...] = tuple(
        VmSpec(name=f"vm{i}", memory_mib=2048, vcpus=2, priority=i % 3,
               anti_affinity="web" if i <= 2 else None) for i in range(1, 7))
    host_memory_mib: int = 8192
    host_vcpus: int = 8
    # relay_transit_ms: the bus's mean delay (delay_ms below), as an operator would set it.
    timing: ClusterTiming = field(default_factory=lambda: ClusterTiming(relay_transit_ms=20))
    detector: DetectorTiming = field(default_factory=lambda: DetectorTiming(
        suspect_timeout_ms=600, dead_timeout_ms=1200, isolation_timeout_ms=1000, min_failed_pings=3))
    ping_interval_ms: int = 300
    delay_ms: tuple[int, int] = (1, 40)
    # Every message is encoded with the real codec and measured against the wire's limit; it
    # is also decoded back unless this is off (benchmarks at 1,000 hosts: decoding gives
    # back an equal message, tested elsewhere, at twice the cost).
    decode_messages: bool = True
    boot_ms: int = 1500
    agent_restart_ms: int = 400
    fence_ms: int = 300
    migration_ms: tuple[int, int] = (300, 1500)
    stall_ms: int = 5000
    # A QEMU whose monitor stopped answering: the agent's VM watcher kills it after this long
    # (then it counts as crashed); a stop meanwhile ends in SIGKILL after the guest's grace, a
    # move fails at the migration core's first unanswered command.
    hang_detect_ms: int = 2000
    hang_stop_ms: int = 1000
    hang_migrate_ms: int = 1500
    liveness_bound_ms: int = 25_000
    host_specs: tuple[HostSpec, ...] = ()   # replaces the generated hosts when given
    # host -> its watchdog device's real timeout, when it is not the configured one (a device
    # that ignores or clamps WDIOC_SETTIMEOUT); 0: the device cannot be opened.
    watchdog_devices: Mapping[str, int] = field(default_factory=dict)
    gossip_fanout: int = CoreConfig.gossip_fanout   # below hosts - 1: partial views (a large cluster)
    direct_mesh: int = CoreConfig.direct_mesh       # signed beats to every host up to this size
    # Every host signs its heartbeats with its own Ed25519 key, and relayed ones are checked
    # (core/cluster/proof.py); the keys come from the seed.
    host_keys: bool = False


@dataclass
class SimHost:
    name: str
    spec: HostSpec
    powered: bool = True
    agent: ClusterMember | None = None
    incarnation: int = 0
    disk: PersistedState | None = None      # state_dir: nothing before the first write, as on a new host
    vms: dict[str, QemuState] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)
    hung: set[str] = field(default_factory=set)     # QEMUs whose monitor does not answer
    watchdog_armed: bool = False
    watchdog_ms: int = 0              # the device's real timeout (0: no working device)
    watchdog_told: int = -1           # the agent incarnation told what the device confirmed
    last_pet_ms: int = 0
    fenced_ms: int = -1               # last time a fence device turned it off
    fence_mode: str = "ok"
    broker_link: bool = True


class World:
    def __init__(self, seed: int, schedule: Schedule, sim: SimConfig | None = None,
                 agent_class: AgentFactory = ClusterMember) -> None:
        self.sim = sim or SimConfig()
        self.rng = random.Random(f"world/{seed}")
        self.schedule = schedule
        self.agent_class = agent_class
        self.timing = self.sim.timing
        names = [f"h{i}" for i in range(1, self.sim.hosts + 1)]
        specs = {n: HostSpec(name=n, memory_mib=self.sim.host_memory_mib, vcpus=self.sim.host_vcpus,
                             fence_device=self.sim.fence_devices) for n in names}
        if self.sim.host_specs:
            specs = {s.name: s for s in self.sim.host_specs}
        if self.sim.witness:
            specs["w"] = HostSpec(name="w", witness=True)
        self.specs = specs
        self.keys = {n: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{seed}/{n}".encode()).digest())
                     for n in specs} if self.sim.host_keys else {}
        self.public_keys: dict[str, tuple[Ed25519PublicKey, ...]] = {
            n: (k.public_key(),) for n, k in self.keys.items()}
        self.vm_specs = {v.name: v for v in self.sim.vms}
        self.vm_names = sorted(self.vm_specs)
        self.hosts = {n: SimHost(name=n, spec=s, watchdog_ms=self.sim.watchdog_devices.get(
            n, self.timing.watchdog_timeout_ms)) for n, s in specs.items()}
        self.checker = Checker(self, Quorum({h: s.weight for h, s in specs.items()}))
        self.now = 0
        self._queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.broker_up = True
        self.cuts: set[tuple[str, str]] = set()
        self.loss_pct = 0
        self.dup_pct = 0
        self.migration_mode = "ok"
        self._fifo: dict[tuple[str, str], int] = {}
        self.alerts: list[tuple[int, str, RaiseAlert]] = []
        self.oversize: list[tuple[int, str, str]] = []         # (at, host, message type) not sent
        self.largest: dict[str, int] = {}                      # message type -> most bytes on the wire
        self.fences: list[tuple[int, str, str]] = []           # (at, by, host)
        self.starts: list[tuple[int, str, str]] = []           # (at, host, vm)
        self.migrations_done: list[tuple[int, str, str, str]] = []
        self.power_offs: list[tuple[int, str, str]] = []       # (at, host, why)
        self.stopped_petting: list[tuple[int, str, str]] = []  # (at, host, why)
        self.healed = False
        self.stopping: dict[str, tuple[int, bool | None]] = {}  # host -> (since, disarm: None yet)
        self.converged_ms: int | None = None
        self.events = 0
        for host in self.hosts.values():
            self._boot_agent(host)
        for f in schedule.faults:
            self._at(f.at_ms, "fault", f)
        self._at(schedule.heal_ms, "heal", None)
        self._at(0, "tick", None)
        self._at(0, "ping", None)

    # ---- the event loop -------------------------------------------------------------

    def _at(self, at_ms: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at_ms, self._seq, kind, payload))

    def run(self, until_ms: int) -> None:
        """Run until `until_ms`, or until the VMs converged after healing; raises `Violation`."""
        while self._queue and self._queue[0][0] <= until_ms:
            at, _seq, kind, payload = heapq.heappop(self._queue)
            self.now = at
            self.events += 1
            getattr(self, f"_on_{kind}")(payload)
            self.checker.after_step(self.now)
            if self.healed and self.converged_ms is None and kind == "tick" and self.checker.all_running():
                self.converged_ms = self.now - self.schedule.heal_ms
                return

    def _on_tick(self, _: None) -> None:
        for name in sorted(self.stopping):
            self._advance_stop(self.hosts[name])
        for host in self.hosts.values():
            starved = self.now - host.last_pet_ms > host.watchdog_ms
            if host.powered and host.watchdog_armed and starved:
                self._power_off(host, "watchdog")
                self._at(self.now + self.sim.boot_ms, "boot", host.name)
        for host in self.hosts.values():
            if host.agent is not None:
                self._execute(host, host.agent.tick(self.now))
        self._at(self.now + self.timing.tick_ms, "tick", None)

    def _on_ping(self, _: None) -> None:
        for src in self.hosts.values():
            if src.agent is None:
                continue
            pinged, beaten = src.agent.ping_targets(), src.agent.beat_targets()
            for name in sorted(pinged | beaten):                # the peers its core asks for
                dst = self.hosts[name]
                ok = dst.powered and not {(src.name, dst.name), (dst.name, src.name)} & self.cuts
                if name in pinged:
                    self._feed(src, PingObserved(host=dst.name, ok=ok, now_ms=self.now,
                                                 rtt_ms=1.0 if ok else None))
                # The signed beat (adapters/directbeat.py): the peer's agent runs, sends to this
                # host (it beats it too) and says it hears it.  An echo reply needs no agent.
                if src.agent is None:
                    break
                if name in beaten:
                    beat = ok and dst.agent is not None and src.name in dst.agent.beat_targets()
                    self._feed(src, PingObserved(host=dst.name, ok=beat, now_ms=self.now, signed=True))
                if src.agent is None:
                    break
        self._at(self.now + self.sim.ping_interval_ms, "ping", None)

    def _feed(self, host: SimHost, event: Any) -> None:
        if host.agent is not None:
            self._execute(host, host.agent.step(event))

    # ---- the bus --------------------------------------------------------------------

    def _connected(self, host: SimHost) -> bool:
        return self.broker_up and host.broker_link and host.powered

    def _on_the_wire(self, src: SimHost, msg: Message) -> Message | None:
        """`msg` as a peer gets it: through the real codec both ways (executor.py, core/host.py),
        and None when its envelope would be over the wire's size limit (the transport drops it
        and counts it).  The envelope's own bytes are taken at their largest, not signed and
        parsed for every message: that would make the simulator five times slower."""
        data = codec.to_data(msg)
        size = len(json.dumps(data, sort_keys=True, separators=(",", ":"))) + ENVELOPE_BYTES
        kind = type(msg).__name__
        self.largest[kind] = max(size, self.largest.get(kind, 0))
        if size > wire.MAX_MESSAGE_BYTES:
            self.oversize.append((self.now, src.name, type(msg).__name__))
            return None
        return codec.from_data(data) if self.sim.decode_messages else msg

    def _publish(self, src: SimHost, msg: Message) -> None:
        sent = self._on_the_wire(src, msg)
        if sent is None:
            return
        msg = sent
        self.checker.published(msg, self.now)
        if not self._connected(src):
            return
        if msg.to is None:
            targets = list(self.hosts.values())
        else:
            targets = [self.hosts[msg.to]] if msg.to in self.hosts else []
        for dst in targets:
            if dst is src or (src.name, dst.name) in self.cuts:
                continue
            if self.loss_pct and self.rng.randrange(100) < self.loss_pct:
                continue
            copies = 2 if self.dup_pct and self.rng.randrange(100) < self.dup_pct else 1
            for _ in range(copies):
                at = max(self.now + self.rng.randint(*self.sim.delay_ms),
                         self._fifo.get((src.name, dst.name), 0))
                self._fifo[(src.name, dst.name)] = at
                self._at(at, "deliver", (dst.name, dst.incarnation, msg))

    def _on_deliver(self, payload: tuple[str, int, Message]) -> None:
        name, incarnation, msg = payload
        dst = self.hosts[name]
        if dst.incarnation == incarnation and self._connected(dst):
            self._feed(dst, MessageReceived(message=msg, now_ms=self.now))

    def _broker_changed(self) -> None:
        for host in self.hosts.values():
            self._feed(host, BrokerConnectionChanged(connected=self._connected(host), now_ms=self.now))

    # ---- outputs --------------------------------------------------------------------

    def _execute(self, host: SimHost, outputs: list[ClusterOutput]) -> None:
        agent = host.agent
        for out in outputs:
            if agent is None or host.agent is not agent:
                return                                  # the agent died mid-batch
            match out:
                case PersistState():
                    host.disk = PersistedState(term=out.term, voted_for=out.voted_for,
                                               accepted=out.accepted, committed=out.committed)
                case Send(message=msg):
                    self._publish(host, msg)
                case PetWatchdog():
                    # As the runtime does: the device is opened (armed) and set at the first pet of
                    # an agent's life, which then learns the timeout the device confirmed.
                    if host.watchdog_told != host.incarnation:
                        host.watchdog_told = host.incarnation
                        self._at(self.now, "watchdog_confirmed", (host.name, host.incarnation))
                    if host.watchdog_ms:
                        host.watchdog_armed, host.last_pet_ms = True, self.now
                case StopPettingWatchdog():
                    self.stopped_petting.append((self.now, host.name, out.reason))
                case RaiseAlert():
                    self.alerts.append((self.now, host.name, out))
                case StartVm():
                    self.checker.observe(host.name, agent.committed, self.now)
                    self.checker.command(host.name, out, agent.term, self.now)
                    ok = out.vm not in host.vms
                    if ok:
                        host.vms[out.vm] = "running"
                        self.checker.vm_started(out.vm, host.name)
                        self.starts.append((self.now, host.name, out.vm))
                    self._result(host, out.id, ok, 20)
                case StopVm() if out.vm in host.hung:
                    self._at(self.now + self.sim.hang_stop_ms, "hung_stop",
                             (host.name, host.incarnation, out.vm, out.id))
                case StopVm() | KillVm():
                    if out.vm in host.vms:
                        self._end_vm(host, out.vm, "stopped" if isinstance(out, StopVm) else "killed")
                    self._result(host, out.id, True, 20)
                case MigrateVm():
                    self.checker.observe(host.name, agent.committed, self.now)
                    self.checker.command(host.name, out, agent.term, self.now)
                    if out.vm in host.hung:
                        self._result(host, out.id, False, self.sim.hang_migrate_ms, "monitor not answering")
                    else:
                        self._start_migration(host, out)
                case FenceHost():
                    self.checker.fence(host.name, out, agent.role == "coordinator",
                                       agent.broker_quorate(self.now), self.now)
                    self.fences.append((self.now, host.name, out.host))
                    mode = self.hosts[out.host].fence_mode
                    if mode != "hang":
                        self._at(self.now + self.sim.fence_ms, "fence_done", (host.name, host.incarnation,
                                                                              out, mode == "ok"))

    def _result(self, host: SimHost, cid: str, ok: bool, after_ms: int, reason: str = "") -> None:
        self._at(self.now + after_ms, "result", (host.name, host.incarnation, cid, ok, reason))

    def _on_result(self, payload: tuple[str, int, str, bool, str]) -> None:
        name, incarnation, cid, ok, reason = payload
        host = self.hosts[name]
        if host.incarnation == incarnation:
            self._observe_vms(host)
            self._feed(host, CommandFinished(id=cid, ok=ok, reason=reason, now_ms=self.now))

    def _observe_vms(self, host: SimHost) -> None:
        crashed, host.crashed = frozenset(host.crashed), set()
        self._feed(host, LocalVmsObserved(vms=dict(host.vms), crashed=crashed, now_ms=self.now))

    def _end_vm(self, host: SimHost, vm: str, how: str) -> None:
        host.hung.discard(vm)
        if host.vms.pop(vm, None) is not None:
            self.checker.vm_ended(vm, host.name, how, self.now)

    def _on_fence_done(self, payload: tuple[str, int, FenceHost, bool]) -> None:
        by, incarnation, cmd, ok = payload
        target = self.hosts[cmd.host]
        if ok:
            target.fenced_ms = self.now
            if target.powered:
                self._power_off(target, "fenced")
                if self.healed:             # once faults stop, the operator powers it on again
                    self._at(self.now + self.sim.boot_ms, "boot", target.name)
        by_host = self.hosts[by]
        if by_host.incarnation == incarnation:
            self._feed(by_host, CommandFinished(id=cmd.id, ok=ok, now_ms=self.now,
                                              reason="" if ok else "fence device error"))

    def _on_hang_detected(self, payload: tuple[str, str]) -> None:
        """The agent's VM watcher gives up on a hung monitor: SIGKILL, reported as a crash (an
        agent restarting meanwhile watches it afresh once it runs)."""
        name, vm = payload
        host = self.hosts[name]
        if vm not in host.hung:
            return
        if host.agent is None:
            self._at(self.now + self.sim.hang_detect_ms, "hang_detected", payload)
            return
        self._end_vm(host, vm, "hang-killed")
        host.crashed.add(vm)
        self._observe_vms(host)

    def _on_hung_stop(self, payload: tuple[str, int, str, str]) -> None:
        """A stop of a hung QEMU: no answer to the power-off, SIGKILL after the grace."""
        name, incarnation, vm, cid = payload
        host = self.hosts[name]
        if host.incarnation == incarnation:
            if vm in host.vms:
                self._end_vm(host, vm, "killed")
            self._result(host, cid, True, 0)

    # ---- migrations -----------------------------------------------------------------

    def _start_migration(self, src: SimHost, cmd: MigrateVm) -> None:
        dst = self.hosts[cmd.target]
        if not dst.powered or src.vms.get(cmd.vm) != "running" or cmd.vm in dst.vms:
            self._result(src, cmd.id, False, 20, "destination not ready")
            return
        dst.vms[cmd.vm] = "inmigrate"
        self._observe_vms(dst)
        mode = self.migration_mode
        took = self.sim.stall_ms if mode == "stall" else self.rng.randint(*self.sim.migration_ms)
        self._at(self.now + took, "migration_done", (src.name, src.incarnation, dst.name, cmd, mode == "ok"))

    def _on_migration_done(self, payload: tuple[str, int, str, MigrateVm, bool]) -> None:
        src_name, incarnation, dst_name, cmd, ok = payload
        src, dst = self.hosts[src_name], self.hosts[dst_name]
        ok = (ok and src.vms.get(cmd.vm) == "running" and dst.vms.get(cmd.vm) == "inmigrate"
              and cmd.vm not in src.hung)
        if ok:
            src.vms[cmd.vm], dst.vms[cmd.vm] = "postmigrate", "running"
            self.checker.vm_ended(cmd.vm, src.name, "migrated", self.now)
            self.checker.vm_started(cmd.vm, dst.name)
            self.migrations_done.append((self.now, src.name, dst.name, cmd.vm))
        elif dst.vms.get(cmd.vm) == "inmigrate" and src.vms.get(cmd.vm) in ("running", None):
            del dst.vms[cmd.vm]                 # a failed incoming QEMU exits
        self._observe_vms(dst)
        if src.incarnation == incarnation:
            self._result(src, cmd.id, ok, 0, "" if ok else "migration failed")

    # ---- hosts ----------------------------------------------------------------------

    def _config(self, name: str) -> CoreConfig:
        return CoreConfig(me=name, hosts=self.specs, vms=self.vm_specs, timing=self.timing,
                          detector=self.sim.detector, isolation=self.sim.isolation,
                          watchdog_arm=self.sim.watchdog_arm,
                          gossip_fanout=self.sim.gossip_fanout, direct_mesh=self.sim.direct_mesh,
                          signer=signer_of(self.keys[name]) if name in self.keys else None,
                          host_keys=self.public_keys)

    def _on_watchdog_confirmed(self, payload: tuple[str, int]) -> None:
        name, incarnation = payload
        host = self.hosts[name]
        if host.incarnation == incarnation:
            self._feed(host, WatchdogConfirmed(timeout_ms=host.watchdog_ms, now_ms=self.now))

    def reload_keys(self, accepted: Mapping[str, tuple[Ed25519PublicKey, ...]],
                    own: Mapping[str, Ed25519PrivateKey], on: Collection[str] | None = None) -> None:
        """A reload of the key settings on every running agent, or only those `on` (one step of
        a rotation, as agent/reload.py applies it): they accept `accepted`, and hosts in `own`
        sign with their new key from now on.  The others keep what they had."""
        self.keys.update(own)
        if on is None:
            self.public_keys = dict(accepted)
        for host in self.hosts.values():
            if host.agent is not None and (on is None or host.name in on):
                host.agent.rekey(signer_of(self.keys[host.name]) if host.name in self.keys else None,
                                 dict(accepted))

    def _boot_agent(self, host: SimHost) -> None:
        host.incarnation += 1
        host.agent = self.agent_class(self._config(host.name), incarnation=host.incarnation, now_ms=self.now,
                                      persisted=host.disk)
        self._feed(host, BrokerConnectionChanged(connected=self._connected(host), now_ms=self.now))
        self._observe_vms(host)

    def _power_off(self, host: SimHost, how: str) -> None:
        self.power_offs.append((self.now, host.name, how))
        for vm in list(host.vms):
            self._end_vm(host, vm, how)
        host.powered, host.agent, host.watchdog_armed = False, None, False
        host.incarnation += 1                   # nothing addressed to the old life arrives

    def _on_boot(self, name: str) -> None:
        host = self.hosts[name]
        if not host.powered:
            host.powered = True
            self._boot_agent(host)

    def _on_agent_boot(self, name: str) -> None:
        host = self.hosts[name]
        if host.powered and host.agent is None:
            self._boot_agent(host)

    # ---- faults ---------------------------------------------------------------------

    def _on_fault(self, f: Fault) -> None:
        a = self.hosts.get(f.args[0]) if f.args else None
        match f.kind:
            case "cut" | "cut2" | "heal":
                x, y = f.args
                pairs = {(x, y)} if f.kind == "cut" else {(x, y), (y, x)}
                self.cuts = self.cuts - pairs if f.kind == "heal" else self.cuts | pairs
            case "isolate" | "rejoin":
                assert a is not None
                pairs = {p for o in self.hosts if o != a.name for p in ((a.name, o), (o, a.name))}
                self.cuts = self.cuts | pairs if f.kind == "isolate" else self.cuts - pairs
                a.broker_link = f.kind == "rejoin"
                self._broker_changed()
            case "broker-down" | "broker-up":
                self.broker_up = f.kind == "broker-up"
                self._broker_changed()
            case "crash":
                assert a is not None
                if a.powered:
                    self._power_off(a, "crash")
            case "boot":
                self._on_boot(f.args[0])
            case "agent-stop":
                if a is not None and a.agent is not None and a.name not in self.stopping:
                    self._stop_cleanly(a)
            case "agent-restart" | "state-lost":
                if a is not None and a.agent is not None:
                    a.agent = None
                    if f.kind == "state-lost":
                        a.disk = None
                    a.incarnation += 1
                    self._at(self.now + self.sim.agent_restart_ms, "agent_boot", a.name)
            case "fence":
                assert a is not None
                a.fence_mode = f.args[1]
            case "qemu-crash":
                for host in self.hosts.values():
                    if host.vms.get(f.args[0]) == "running":
                        self._end_vm(host, f.args[0], "qemu-crash")
                        host.crashed.add(f.args[0])
                        self._observe_vms(host)
            case "qemu-hang":
                for host in self.hosts.values():
                    if host.vms.get(f.args[0]) == "running" and f.args[0] not in host.hung:
                        host.hung.add(f.args[0])
                        self._at(self.now + self.sim.hang_detect_ms, "hang_detected", (host.name, f.args[0]))
            case "migrations":
                self.migration_mode = f.args[0]
            case "loss":
                self.loss_pct = int(f.args[0])
            case "dup":
                self.dup_pct = int(f.args[0])
            case "drain" | "undrain":
                action: Literal["drain", "undrain"] = "drain" if f.kind == "drain" else "undrain"
                self.admin(action, f.args[0])
            case "pause" | "resume":
                self.admin("maintenance-on" if f.kind == "pause" else "maintenance-off", "*")
            case "confirm-off":
                assert a is not None
                if not a.powered:               # the operator looked: a running host is not off
                    self.admin("confirm-off", a.name)

    def _stop_cleanly(self, host: SimHost) -> None:
        """As the runtime stops: the cluster learns the watchdog is no fence, then the magic
        close (or, without an answer in time and with VMs, it stays armed); a coordinator
        hands over; the agent exits and is started again."""
        self.stopping[host.name] = (self.now, None)
        if host.watchdog_armed:
            self._feed(host, WatchdogConfirmed(timeout_ms=0, now_ms=self.now))

    def _advance_stop(self, host: SimHost) -> None:
        since, disarm = self.stopping[host.name]
        agent = host.agent
        if agent is None:
            del self.stopping[host.name]
        elif disarm is None:
            known = agent.committed.host(host.name).watchdog_ms == 0
            if not host.watchdog_armed or known or self.now - since >= DISARM_WAIT_MS:
                self.stopping[host.name] = (self.now, not host.watchdog_armed or known or not agent.local.vms)
                self._feed(host, StopRequested(now_ms=self.now))
        elif agent.campaign.handover_done(self.now):
            del self.stopping[host.name]
            host.agent = None
            host.incarnation += 1
            host.watchdog_armed = host.watchdog_armed and not disarm
            self._at(self.now + self.sim.agent_restart_ms, "agent_boot", host.name)

    def inject(self, kind: str, *args: str) -> None:
        """A fault now, outside the schedule (a test's step by step scenario)."""
        self._on_fault(Fault(at_ms=self.now, kind=kind, args=args))

    def admin(self, action: Literal["drain", "undrain", "confirm-off", "fence", "maintenance-on",
                                    "maintenance-off"], host: str) -> None:
        """An operator's request, given to the first agent that runs."""
        for h in self.hosts.values():
            if h.agent is not None:
                self._feed(h, AdminRequested(action=action, host=host, now_ms=self.now))
                return

    def _on_heal(self, _: None) -> None:
        self.healed = True
        if any(f.kind == "pause" for f in self.schedule.faults):
            self.admin("maintenance-off", "*")     # the operators' work is done too
        self.cuts.clear()
        self.broker_up, self.loss_pct, self.dup_pct, self.migration_mode = True, 0, 0, "ok"
        for host in self.hosts.values():
            host.fence_mode, host.broker_link = "ok", True
            if not host.powered:
                self._at(self.now + self.sim.boot_ms, "boot", host.name)
        self._broker_changed()

    # ---- results --------------------------------------------------------------------

    def coordinators(self) -> dict[str, int]:
        return {h.name: h.agent.term for h in self.hosts.values()
                if h.agent is not None and h.agent.role == "coordinator"}


__all__ = ["SimConfig", "SimHost", "Violation", "World"]
