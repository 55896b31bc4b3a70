"""One host's pure core: every decision this host takes, behind one `step`/`tick`.

`HostCore` owns the one failure detector, the local VMs' health (vmhealth.py), the
host's probes (probes.py), ping statistics, the peers' own reports (peers.py) and, in
cluster mode, the cluster membership (cluster/member.py: election, replicated state,
coordinator duty, grants).  The agent runtime feeds it past-tense facts, calls
`tick(now_ms)` every 100 ms and executes what comes out, in order; the simulator drives
the cluster membership the same way.  Rules that belong to the host as a whole:

- broker envelopes: a peer's report (`heartbeat`, `state`, `offline`) updates the
  status view; a cluster message is decoded here and taken only when its signer is its
  sender, it is addressed to this host or to all, and it came on the matching topic kind:
  anything else is `MessageRejected`, counted and never acted on.
- one detector: without a cluster, it watches every peer from their reports and pings; in
  cluster mode it is the membership's, fed by cluster messages, pings and signed direct
  beats; only the beats count towards quorum without the broker (detector.py, quorate.py).
- the local QEMUs as the cluster counts them: `inmigrate` and `postmigrate` (and
  `finish-migrate`) are copies that do not run the guest; any other state holds it
  (the safe side).  A QEMU gone while not being stopped or moved is a crash.  They are
  reported to the membership on change and at least every second.
- `quorum-lost` is raised while this host holds VMs without quorum for longer than the
  self-fence grace, resolved when it is back; a VM of a fenced host given a new owner by
  this coordinator is `recovery-done`.
- a clean stop disarms the watchdog only once the cluster knows (`WatchdogDisarming`): the
  host reports no confirmed watchdog, and once the committed state says so (a later
  coordinator will not count a deadline as its fence) `WatchdogDisarmAllowed` goes out
  (a host with a fence device too: with `arm: always` its deadline is a fence as well).
- a clean stop hands the coordinator's lease over (`StopRequested`, campaign.py) and says
  when the agent may disconnect (`HandoverEnded`).
- a stop-time drain (`ShutdownDrainRequested`) asks for this host's maintenance and ends
  when nothing is left here, when no coordinator has been followed for 30 s, or at its
  time limit (`ShutdownDrainEnded`); meanwhile `ShutdownDrainProgress` every 5 s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from haguard.core.alerts import RaiseAlert
from haguard.core.cluster import codec
from haguard.core.cluster.member import ClusterMember
from haguard.core.cluster.state import ClusterState
from haguard.core.cluster.status import membership_status
from haguard.core.cluster.types import (
    AdminRequested,
    CommandFinished,
    LocalHealthObserved,
    LocalVmsObserved,
    MessageReceived,
    PersistedState,
    QemuState,
    StopRequested,
    WatchdogConfirmed,
)
from haguard.core.detector import (
    BrokerConnectionChanged,
    FailureDetector,
    PeerHeard,
    PeerWentOffline,
    PingObserved,
)
from haguard.core.host_types import (
    EnvelopeReceived,
    HandoverEnded,
    HostConfig,
    HostInput,
    HostOutput,
    MessageRejected,
    QemuStateObserved,
    ShutdownDrainEnded,
    ShutdownDrainProgress,
    ShutdownDrainRequested,
    VmStopBegan,
    WatchdogDisarmAllowed,
    WatchdogDisarming,
)
from haguard.core.peers import PeerReports, capacity, report_body, status_view
from haguard.core.probes import (
    HostHealthChanged,
    HostProbes,
    PingStats,
    ProbeFailed,
    ProbeInput,
    ProbePassed,
    ProbeTimedOut,
)
from haguard.core.vmhealth import (
    VmEventSeen,
    VmHealth,
    VmInput,
    VmProcessGone,
    VmStatusReplied,
)

LOCAL_REPORT_MS = 1_000             # local QEMUs reported to the membership at least this often
DRAIN_LEADERLESS_MS = 30_000        # a stop-time drain without a coordinator this long gives up
DRAIN_PROGRESS_MS = 5_000
CLUSTER_KINDS = frozenset({"cluster", "direct"})
# QEMU run states -> what the cluster counts.  Anything but these holds the guest.
_QEMU_STATES: dict[str, QemuState] = {"inmigrate": "inmigrate", "postmigrate": "postmigrate",
                                      "finish-migrate": "postmigrate"}


def counted(status: str) -> QemuState:
    return _QEMU_STATES.get(status, "running")


@dataclass
class _Drain:
    started_ms: int
    timeout_ms: int
    leaderless_since_ms: int | None = None
    progress_ms: int = -10**9


class HostCore:
    def __init__(self, cfg: HostConfig, *, incarnation: int, now_ms: int,
                 persisted: PersistedState | None = None) -> None:
        self.cfg = cfg
        self.me = cfg.me
        self.member: ClusterMember | None = None
        if cfg.cluster is not None:
            self.member = ClusterMember(cfg.cluster, incarnation=incarnation, now_ms=now_ms,
                                        persisted=persisted)
            self.detector = self.member.detector
        else:
            self.detector = FailureDetector(cfg.me, list(cfg.peers), cfg.timing, now_ms)
        self.vms = VmHealth(cfg.vm_policy)
        self.probes = HostProbes(cfg.probe_policy)
        self.pings = PingStats()
        self.peers = PeerReports(cfg.me, cfg.peers)
        self.now_ms = self.started_ms = now_ms
        self.incarnation = incarnation
        self.qemu: dict[str, str] = {}              # vm -> QEMU run state (cluster mode)
        self.gone: set[str] = set()                 # QEMUs that went away since the last report
        self.stopping: set[str] = set()             # ... because the core stopped or moved them
        self._reported: tuple[dict[str, QemuState], frozenset[str]] | None = None
        self._reported_ms = -10**9
        self._quorum_lost = False
        self._last_committed = self.member.committed if self.member is not None else None
        self._drain: _Drain | None = None
        self._disarming = False
        self._handover_said = True                  # until a StopRequested
        self._next_id = 0

    # ---- feeding ----------------------------------------------------------------------------

    def step(self, event: HostInput) -> list[HostOutput]:
        now = getattr(event, "now_ms", None)
        if isinstance(now, int):
            self.now_ms = max(self.now_ms, now)
        match event:
            case EnvelopeReceived():
                return self._envelope(event)
            case BrokerConnectionChanged():
                return self._evidence(event)
            case PingObserved():
                if self.peers.known(event.host) and not event.signed:
                    self.pings.record(event)            # round trips, for the status view
                if self.member is None and not self.peers.known(event.host):
                    return []
                return self._evidence(event)
            case QemuStateObserved(vm=vm, status=status):
                self._observe_qemu(vm, status)
                return []
            case VmStopBegan(vm=vm):
                self.stopping.add(vm)
                return []
            case CommandFinished() | AdminRequested() | WatchdogConfirmed():
                return self._member(event)
            case StopRequested():
                if self.member is None:
                    return [HandoverEnded(successor=None)]
                self._handover_said = False
                return self._member(event)
            case WatchdogDisarming():
                self._disarming = True
                return self._member(WatchdogConfirmed(timeout_ms=0, now_ms=self.now_ms))
            case ShutdownDrainRequested():
                self._drain = _Drain(started_ms=self.now_ms, timeout_ms=event.timeout_ms)
                return self._member(AdminRequested(action="drain", host=self.me, now_ms=self.now_ms))
            case ProbePassed() | ProbeFailed() | ProbeTimedOut():
                return self._probed(event)
        return self._vm_fact(event)

    def tick(self, now_ms: int) -> list[HostOutput]:
        self.now_ms = max(self.now_ms, now_ms)
        out: list[HostOutput] = []
        if self.member is None:
            out += self.detector.tick(self.now_ms)
        out += self.vms.tick(self.now_ms)
        if self.member is not None:
            out += self._report_local(self.now_ms)
            out += self._member_tick(self.now_ms)
            out += self._watch_quorum(self.now_ms)
            out += self._drain_progress(self.now_ms)
            out += self._disarm_allowed()
            out += self._handover_ended(self.now_ms)
        return out

    def _id(self) -> str:
        self._next_id += 1
        return f"{self.me}/{self.incarnation}/host-{self._next_id}"

    def _member(self, event: Any) -> list[HostOutput]:
        if self.member is None:
            return []
        return self._after_member(list(self.member.step(event)))

    def _member_tick(self, now_ms: int) -> list[HostOutput]:
        assert self.member is not None
        return self._after_member(list(self.member.tick(now_ms)))

    def _after_member(self, out: list[HostOutput]) -> list[HostOutput]:
        assert self.member is not None
        committed = self.member.committed
        if committed is not self._last_committed:
            if self._last_committed is not None:
                out += self._recoveries(self._last_committed, committed)
            self._last_committed = committed
        return out

    # ---- what peers send ------------------------------------------------------------------

    def _envelope(self, e: EnvelopeReceived) -> list[HostOutput]:
        if e.kind in CLUSTER_KINDS:
            return self._cluster_message(e)
        if not self.peers.known(e.host):
            return []
        match e.kind:
            case "heartbeat":
                body = self.peers.heard(e.host, e.body, e.now_ms)
                if self.member is not None or body is None:
                    return []                   # cluster mode: liveness comes from cluster messages
                return list(self.detector.step(PeerHeard(
                    host=e.host, incarnation=e.incarnation, now_ms=e.now_ms,
                    hears=frozenset(body["hears"]), reaches=frozenset(body["reaches"]))))
            case "offline":
                if self.member is not None:
                    return []
                graceful = e.body.get("reason") == "stopped"
                return list(self.detector.step(PeerWentOffline(
                    host=e.host, incarnation=e.incarnation, now_ms=e.now_ms, graceful=graceful)))
            case "state":
                self.peers.stated(e.host, e.body)
        return []

    def _cluster_message(self, e: EnvelopeReceived) -> list[HostOutput]:
        if self.member is None:
            return []
        try:
            message = codec.from_data(e.body.get("msg"))
        except codec.CodecError as exc:
            return [MessageRejected(sender=e.host, kind=e.kind, reason=str(exc))]
        why = ""
        if message.sender != e.host:
            why = f"message of {message.sender!r} sent by {e.host!r}"
        elif message.to is not None and message.to != self.me:
            why = f"message for {message.to!r} delivered here"
        elif (e.kind == "direct") != (message.to is not None):
            why = "broadcast and direct messages mixed up"
        if why:
            return [MessageRejected(sender=e.host, kind=e.kind, reason=why)]
        return self._member(MessageReceived(message=message, now_ms=e.now_ms))

    def _evidence(self, event: BrokerConnectionChanged | PingObserved) -> list[HostOutput]:
        if self.member is not None:
            return self._member(event)
        return list(self.detector.step(event))

    # ---- local facts ------------------------------------------------------------------------

    def _probed(self, event: ProbeInput) -> list[HostOutput]:
        out: list[HostOutput] = list(self.probes.step(event))
        for change in list(out):
            if isinstance(change, HostHealthChanged):       # a degraded host is evacuated live
                out += self._member(LocalHealthObserved(degraded=not change.new.healthy,
                                                        now_ms=self.now_ms))
        return out

    def _vm_fact(self, event: VmInput) -> list[HostOutput]:
        out: list[HostOutput] = list(self.vms.step(event))
        if self.member is not None:
            if isinstance(event, VmStatusReplied):
                self._observe_qemu(event.vm, event.status)
            elif isinstance(event, VmProcessGone):
                self._observe_qemu(event.vm, None)
            elif isinstance(event, VmEventSeen) and event.event == "RESUME":
                # An incoming QEMU that took over resumes: do not wait for the next poll.
                self._observe_qemu(event.vm, "running")
        return out

    def _observe_qemu(self, vm: str, status: str | None) -> None:
        if status is None:
            if self.qemu.pop(vm, None) is not None and vm not in self.stopping:
                self.gone.add(vm)
            self.stopping.discard(vm)
        else:
            self.qemu[vm] = status

    def _report_local(self, now_ms: int) -> list[HostOutput]:
        local = {vm: counted(s) for vm, s in self.qemu.items()}
        crashed = frozenset(self.gone)
        due = now_ms - self._reported_ms >= LOCAL_REPORT_MS
        if (local, crashed) == self._reported and not crashed and not due:
            return []
        self._reported, self._reported_ms = (local, crashed), now_ms
        self.gone = set()
        return self._member(LocalVmsObserved(vms=local, now_ms=now_ms, crashed=crashed))

    # ---- the host's own rules -------------------------------------------------------------------

    def _watch_quorum(self, now_ms: int) -> list[HostOutput]:
        """quorum-lost while this host holds VMs and has lacked quorum for longer than a blip
        (the self-fence grace: a handover or a broker blip is no event); an armed watchdog
        stops being petted then.  Resolved when quorum is back."""
        assert self.member is not None
        fence = self.member.self_fence
        lost = bool(self.qemu) and fence.lost(now_ms)
        if lost == self._quorum_lost or now_ms - self.started_ms < self.cfg.timing.dead_timeout_ms:
            return []
        self._quorum_lost = lost
        petting = "; the watchdog is no longer petted" if lost and fence.armed else ""
        return [RaiseAlert(id=self._id(), kind="quorum-lost", host=self.me, resolved=not lost,
                           summary=f"{self.me} {'lost' if lost else 'regained'} quorum with VMs running",
                           reason="no decision is taken here; VMs keep running" + petting)]

    def _recoveries(self, before: ClusterState, after: ClusterState) -> list[HostOutput]:
        """On the coordinator: a VM of a fenced host that got a new owner (the recovery)."""
        if self.member is None or self.member.coordinator is None:
            return []
        out: list[HostOutput] = []
        for vm, rec in after.vms.items():
            old = before.vms.get(vm)
            if (old is not None and old.owner is not None and rec.owner not in (None, old.owner)
                    and after.host(old.owner).fenced and vm not in before.migrations):
                out.append(RaiseAlert(id=self._id(), kind="recovery-done", host=old.owner, vm=vm,
                                      summary=f"{vm} recovered from fenced {old.owner} on {rec.owner}",
                                      reason=f"generation {rec.generation}"))
        return out

    def _disarm_allowed(self) -> list[HostOutput]:
        member = self.member
        if not self._disarming or member is None:
            return []
        if member.committed.host(self.me).watchdog_ms == 0:
            self._disarming = False
            return [WatchdogDisarmAllowed()]
        return []

    def _handover_ended(self, now_ms: int) -> list[HostOutput]:
        member = self.member
        if member is None or self._handover_said or not member.campaign.handover_done(now_ms):
            return []
        self._handover_said = True
        following = member.election.following(now_ms)
        return [HandoverEnded(successor=following if following != self.me else None)]

    def _drain_progress(self, now_ms: int) -> list[HostOutput]:
        drain, member = self._drain, self.member
        if drain is None or member is None:
            return []
        left = tuple(self.owned_here())
        took = now_ms - drain.started_ms
        if member.election.following(now_ms) is None:
            drain.leaderless_since_ms = drain.leaderless_since_ms or now_ms
            if now_ms - drain.leaderless_since_ms >= DRAIN_LEADERLESS_MS:
                return self._drain_ended(False, "no coordinator", left, took)
        else:
            drain.leaderless_since_ms = None
        if not left:
            return self._drain_ended(True, "drained", left, took)
        if took >= drain.timeout_ms:
            return self._drain_ended(False, "timeout", left, took)
        if now_ms - drain.progress_ms >= DRAIN_PROGRESS_MS:
            drain.progress_ms = now_ms
            return [ShutdownDrainProgress(left=left)]
        return []

    def _drain_ended(self, drained: bool, reason: str, left: tuple[str, ...], took: int) -> list[HostOutput]:
        self._drain = None
        return [ShutdownDrainEnded(drained=drained, reason=reason, left=left, took_ms=took)]

    # ---- views --------------------------------------------------------------------------------

    def owned_here(self) -> list[str]:
        """VMs still on this host: committed to it, or a QEMU of them running here."""
        owned = set(self.member.committed.owned_by(self.me)) if self.member is not None else set()
        return sorted(owned | {vm for vm, st in self.qemu.items() if counted(st) == "running"})

    def targets(self) -> tuple[frozenset[str] | None, frozenset[str] | None]:
        """Whom to ping (the peers the membership watches) and to send signed beats; None: all."""
        m = self.member
        return (None, None) if m is None else (m.ping_targets(), m.beat_targets())

    def bounded(self) -> bool:
        """Beyond a full mesh: no node-level gossip to everyone (it grows with N squared)."""
        return self.member is not None and len(self.member.neighbours) < len(self.member.hosts) - 1

    def may_receive(self, vm: str, sender: str, generation: int) -> str | None:
        """Whether `sender` may move `vm` here now; None: yes, else why not."""
        if self.member is not None:
            move = (sender, self.me, generation)
            for state in (self.member.committed, self.member.accepted):
                if (m := state.migrations.get(vm)) is not None and (m.source, m.target, m.generation) == move:
                    return None
        return f"no move of {vm} from {sender} to {self.me} (generation {generation}) in the cluster state"

    def report(self, now_ms: int) -> dict[str, Any]:
        """The body of this host's own report (also the retained "state")."""
        snapshot = self.vms.snapshot()
        cap = capacity(self.cfg.memory_mib, self.cfg.vcpus, self.cfg.vm_sizes, snapshot)
        return report_body(self.probes, cap, snapshot, self.detector, now_ms)

    def status(self, now_ms: int, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything `haguard status` shows, as JSON data (`report`: this instant's own report
        when the caller has it already)."""
        mine = self.report(now_ms) if report is None else report
        data = status_view(self.me, mine, self.detector, self.peers, self.pings, now_ms)
        if self.member is not None:
            data["cluster"] = self.cluster_status(now_ms)
        return data

    def cluster_status(self, now_ms: int) -> dict[str, Any]:
        assert self.member is not None
        return membership_status(self.member, now_ms)

    def reconfigure(self, cfg: HostConfig, now_ms: int) -> None:
        """A reloaded configuration: peers, timing, policies, capacities and host keys; evidence
        is kept.  The cluster's other settings need a restart (the runtime says so)."""
        if cfg.me != self.cfg.me:
            raise ValueError("a host cannot change its name")
        if self.member is None:
            self.detector.reconfigure(list(cfg.peers), cfg.timing, now_ms)
        self.vms.policy = cfg.vm_policy
        self.probes.policy = cfg.probe_policy
        self.peers.reconfigure(cfg.peers, self.pings)
        if self.member is not None and cfg.cluster is not None:
            self.member.rekey(cfg.cluster.signer, cfg.cluster.host_keys)      # a key rotation
        self.cfg = cfg if self.member is None else replace(cfg, cluster=self.member.config)

    def peer_report(self, host: str) -> dict[str, Any] | None:
        return self.peers.heartbeat(host)

    def peer_state(self, host: str) -> dict[str, Any] | None:
        return self.peers.state(host)
