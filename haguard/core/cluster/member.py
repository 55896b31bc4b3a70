"""One host's cluster membership: it wires the rooms below and keeps their order.

    election.py  terms and votes           campaign.py  standing and granting votes
    state.py     the replicated state      follower.py  leases, proposals, acks sent
    quorum.py    weighted majorities       acks.py      the read index
    quorate.py   whom this host counts     grants.py    what this host may start, stop, kill
    relay.py     relay tiers and hops      duty.py      the coordinator's duty for a term
    coordinator.py, recovery.py, placement.py           what the coordinator decides

`step(input)` takes one fact and answers what it calls for at once (a vote, an ack);
`tick(now_ms)` does the periodic work (election, coordinating, heartbeats, watchdog,
obeying the committed state).  Both return outputs in the order they must be executed
(etcd raft's Ready): a `PersistState` always comes first in its batch and must be on
stable storage before any `Send` after it.  The rules kept here:

- heartbeats (bounded): a follower sends its heartbeat to its ring neighbours
  (`gossip_fanout`), one `Send` each; in a full mesh (at most fanout + 1 hosts) also to
  the coordinator, in a larger cluster it reaches the coordinator relayed (relay.py).
  The coordinator broadcasts its heartbeat: its lease renewal and membership summary
  (whom it does not hear, the acks it confirms).  This host watches (hears, pings,
  judges) its neighbours and the coordinator; everyone while coordinating.
- watchdog (selffence.py): armed where it is the host's fence; petted while this host
  holds quorum, lost it less than a grace ago, or runs nothing.  A host
  without a fence device starts VMs only while its device confirms the configured
  timeout (`WatchdogConfirmed`); the confirmed value travels in its heartbeat.
- isolation (no broker and no peer): keep, shut the VMs down, or stop petting at once.

Size: about 550 lines because the order of a tick (retrack, stand, coordinate, beat,
relay, watchdog, obey) and of a message's handling lives here in one place; each step is
a call into its room, and splitting the ordering itself would scatter it.
"""

from __future__ import annotations

from dataclasses import fields, replace

from haguard.core.alerts import RaiseAlert
from haguard.core.cluster import paused
from haguard.core.cluster.acks import NO_KEY
from haguard.core.cluster.campaign import Campaign
from haguard.core.cluster.coordinator import Coordinator
from haguard.core.cluster.definition import DefinitionCheck
from haguard.core.cluster.duty import Duty
from haguard.core.cluster.election import Election, Role
from haguard.core.cluster.follower import Follower
from haguard.core.cluster.grants import LocalVms
from haguard.core.cluster.lostvotes import LostVotes
from haguard.core.cluster.parts import split_entries
from haguard.core.cluster.proof import ProofCheck, signed
from haguard.core.cluster.quorate import QuorumViews, heard_by
from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.relay import RelayHops, RelayLayout, relay_layout, ring_neighbours
from haguard.core.cluster.selffence import SelfFence
from haguard.core.cluster.state import ClusterState, Proposer, initial_state
from haguard.core.cluster.types import (
    Ack,
    AdminRequested,
    ClusterInput,
    ClusterOutput,
    CommandFinished,
    CoreConfig,
    Digest,
    Handover,
    Heartbeat,
    LocalHealthObserved,
    LocalVmsObserved,
    Message,
    MessageReceived,
    PersistedState,
    PersistState,
    PetWatchdog,
    Proposal,
    RelayEntry,
    Send,
    StatePart,
    StopPettingWatchdog,
    StopRequested,
    VoteGranted,
    VoteRequest,
    WatchdogConfirmed,
)
from haguard.core.detector import (
    BrokerConnectionChanged,
    DetectorOutput,
    FailureDetector,
    IsolationChanged,
    PeerHeard,
    PeerHeardRelayed,
    PingObserved,
)
from haguard.core.hostkeys import HostKeys, Signer

MOVE_REQUEST_MS = 60_000            # an operator's move request not taken by then is dropped
CONFIRM_OFF_MS = 30_000             # an operator's confirm-off or fence not taken by then is dropped
HEARTBEAT_FIELDS = tuple(f.name for f in fields(Heartbeat) if f.name != "to")

__all__ = ["ClusterMember", "heard_by", "ring_neighbours"]


class ClusterMember:
    coordinator_class: type[Coordinator] = Coordinator

    def __init__(self, config: CoreConfig, *, incarnation: int, now_ms: int,
                 persisted: PersistedState | None = None) -> None:
        self.config = config
        self.me = config.me
        self.incarnation = incarnation
        saved = persisted or PersistedState()
        self.quorum = Quorum({h: s.weight for h, s in config.hosts.items()})
        self.hosts = sorted(config.hosts)
        self.neighbours = ring_neighbours(self.hosts, self.me, config.gossip_fanout)
        self.layout: RelayLayout = relay_layout(self.hosts, config.gossip_fanout, config.relay_fanin)
        self.lag_ms = self.layout.lag_ms(config.timing.heartbeat_ms)
        proofs = ProofCheck(config.host_keys, required=config.require_host_keys)
        self.relay = RelayHops(self.layout, self.me, self.neighbours, config.gossip_fanout,
                               config.detector.suspect_timeout_ms, proofs)
        # Watched (heard, pinged, judged): the neighbours and the coordinator; everyone when coordinating.
        self.detector = FailureDetector(self.me, sorted(self.neighbours | {self.me}), config.detector, now_ms)
        self.election = Election(self.me, self.quorum, config.timing.lease_ms, term=saved.term,
                                 voted_for=saved.voted_for)
        self.definition = DefinitionCheck(config)
        self.lost_votes = LostVotes(lost=persisted is None, now_ms=now_ms,
                                    window_ms=config.timing.lease_ms + 2 * config.timing.election_timeout_ms)
        self.committed: ClusterState = saved.committed or initial_state(sorted(config.vms), self.hosts)
        self.accepted: ClusterState = saved.accepted or self.committed
        self.duty: Duty | None = None                           # while coordinating
        self.beats: dict[str, tuple[int, Heartbeat]] = {}       # peer -> (received at, heartbeat)
        self.relayed: set[str] = set()                          # peers whose latest beat was relayed
        self.views = QuorumViews(self)
        self.local = LocalVms(self.me, config.timing.max_local_restarts)
        self.follower = Follower(self)
        self.campaign = Campaign(self)
        self.requests: set[tuple[str, str]] = set()
        # (confirm-off | fence, host) -> when an operator asked: asked for CONFIRM_OFF_MS, each
        # command its own request (a confirm-off is never kept for a later failure of the host).
        self.fencing_asked: dict[tuple[str, str], int] = {}
        self.moves: dict[tuple[str, str], int] = {}             # (vm, target) -> asked at
        self.degraded = False
        self.self_fence = SelfFence(config)
        self.petting = False                                    # the armed device is petted
        self.watchdog_ms = 0                                    # what this host's device confirmed
        self.self_fenced = False
        self.now_ms = now_ms
        self._next_id = 0
        self._beat_seq = 0
        self._last_beat_ms = -10**9
        self.granted_at: dict[str, int] = {}                    # our voters: host -> when it granted
        self._owned_cache: tuple[tuple[int, int], list[str]] = (NO_KEY, [])
        self.steps = 0                                          # facts taken: keys the quorum caches
        self._persisted = self._durable()

    # ---- feeding --------------------------------------------------------------------

    def rekey(self, signer: Signer | None, host_keys: HostKeys) -> None:
        """Host keys reloaded (a rotation, core/hostkeys.py): this host signs its heartbeats with
        `signer`, relayed heartbeats are checked against `host_keys`.  Keys are outside the
        cluster definition's fingerprint, so nothing else changes."""
        self.config = replace(self.config, signer=signer, host_keys=host_keys)
        self.relay.proofs.keys = host_keys

    def step(self, event: ClusterInput) -> list[ClusterOutput]:
        out: list[ClusterOutput] = []
        self.now_ms = max(self.now_ms, event.now_ms)
        self.steps += 1
        self._abstain()
        match event:
            case MessageReceived(message=message):
                out += self._receive(message)
            case LocalVmsObserved(vms=vms, crashed=crashed):
                self.local.observe(dict(vms), crashed, self.now_ms)
            case CommandFinished():
                out += self._finished(event)
            case AdminRequested(action="migrate", host=host, vm=vm):
                if host in self.config.hosts and vm in self.config.vms:
                    self.moves[(vm, host)] = self.now_ms
                    self._last_beat_ms = -10**9     # to the coordinator at the next tick
            case AdminRequested(action="confirm-off" | "fence", host=host):
                if host in self.config.hosts and not (event.action == "confirm-off" and host == self.me):
                    self.fencing_asked[(event.action, host)] = self.now_ms
                    self._last_beat_ms = -10**9
            case AdminRequested(action=action, host=host):
                cluster_wide = host == paused.CLUSTER and action in (paused.ON, paused.OFF)
                if host in self.config.hosts or cluster_wide:
                    # The newest request about a host (or the cluster) replaces an opposite one.
                    self.requests = {(a, h) for a, h in self.requests if h != host} | {(action, host)}
                    self._last_beat_ms = -10**9
            case WatchdogConfirmed(timeout_ms=timeout_ms):
                if timeout_ms != self.watchdog_ms:
                    self.watchdog_ms = timeout_ms
                    self._last_beat_ms = -10**9     # the coordinator learns it at the next tick
            case LocalHealthObserved(degraded=degraded):
                if degraded != self.degraded:
                    self.degraded = degraded
                    self._last_beat_ms = -10**9
            case PingObserved() | BrokerConnectionChanged():
                if isinstance(event, PingObserved):
                    self.views.observe(event)
                out += self._detected(self.detector.step(event))
            case StopRequested():
                out += self.campaign.hand_over(self.now_ms)
        # Periodic work (coordinating, heartbeats, obeying the committed state) waits for tick().
        return self._ready(out)

    def tick(self, now_ms: int) -> list[ClusterOutput]:
        self.now_ms = max(self.now_ms, now_ms)
        self._abstain()
        out = self._detected(self.detector.tick(self.now_ms))
        return self._ready(out + self._advance(self.now_ms))

    def _ready(self, out: list[ClusterOutput]) -> list[ClusterOutput]:
        durable = self._durable()
        if durable != self._persisted:
            self._persisted = durable
            out.insert(0, PersistState(id=self.new_id(), term=self.election.term,
                                       voted_for=self.election.voted_for,
                                       accepted=self.accepted, committed=self.committed))
        return out

    def _abstain(self) -> None:
        if self.lost_votes.abstaining():
            self.lost_votes.update(self.now_ms, self.election, [h for h in self.hosts if h != self.me],
                                   self.beats)

    def _durable(self) -> tuple[object, ...]:
        return (self.election.term, self.election.voted_for, self.accepted.key, self.committed.key)

    def new_id(self) -> str:
        self._next_id += 1
        return f"{self.me}/{self.incarnation}/{self._next_id}"

    def send(self, message: Message) -> Send:
        return Send(id=self.new_id(), message=message)

    # ---- messages -------------------------------------------------------------------

    def _receive(self, message: Message) -> list[ClusterOutput]:
        if message.sender == self.me or message.sender not in self.config.hosts:
            return []
        match message:
            case Heartbeat():
                return self._heartbeat_received(message)
            case VoteRequest():
                return self.campaign.vote_requested(message)
            case VoteGranted():
                if message.to == self.me and message.term == self.election.term:
                    self.granted_at[message.sender] = self.now_ms
                if message.to == self.me and self.election.granted(message.sender, message.term):
                    return self._became_coordinator()
                return []
            case Proposal():
                return self.follower.proposal(message)
            case StatePart():
                return self.follower.state_part(message)
            case Digest():
                return self._digest(message) if message.to == self.me else []
            case Handover():
                return self.campaign.handed_over(message)
            case Ack():
                return self._ack_received(message)
        return []

    def _heartbeat_received(self, message: Heartbeat) -> list[ClusterOutput]:
        now = self.now_ms
        previous = self.beats.get(message.sender)
        if previous is not None and previous[1].incarnation > message.incarnation:
            return []                       # an older life of that agent
        self.beats[message.sender] = (now, message)
        self.relayed.discard(message.sender)
        self.relay.heard(message, previous[1] if previous is not None else None)
        self._observe_term(message.term)
        out: list[ClusterOutput] = []
        self.definition.heard(message.sender, message.definition)
        mismatch = self.definition.alert(self.new_id())
        if mismatch is not None:
            out.append(mismatch)
        if message.coordinator:
            out += self.follower.coordinator_beat(message)
        hears = message.hears
        if message.unheard is not None:     # a coordinator's summary: what of it we watch
            hears = hears | {p for p in self.detector.peers if heard_by(message, p)}
        return out + self._detected(self.detector.step(PeerHeard(
            host=message.sender, incarnation=message.incarnation, now_ms=now,
            hears=hears, reaches=message.reaches, seq=message.seq or None)))

    def _ack_received(self, message: Ack) -> list[ClusterOutput]:
        if message.to != self.me or self.duty is None or message.term != self.election.term:
            return []
        self.duty.acked(message)
        # An ack is proof of life too: a host it comes from is not declared dead.
        return self._detected(self.detector.step(PeerHeard(
            host=message.sender, incarnation=message.incarnation, now_ms=self.now_ms)))

    def _observe_term(self, term: int) -> None:
        if term > self.election.term:
            self.drop_coordination()
            self.election.observe_term(term)

    def take_committed(self, state: ClusterState) -> None:
        if state.key > self.committed.key:
            self.committed = state
        if self.committed.key > self.accepted.key:
            self.accepted = self.committed

    def _became_coordinator(self) -> list[ClusterOutput]:
        self.duty = Duty(self, self.coordinator_class)
        self._last_beat_ms = -10**9             # announce at once
        self.retrack()
        return []

    def drop_coordination(self) -> None:
        if self.election.role is Role.COORDINATOR:
            self.election.step_down()
        self.duty = None

    @property
    def proposer(self) -> Proposer | None:
        return self.duty.proposer if self.duty is not None else None

    @property
    def coordinator(self) -> Coordinator | None:
        return self.duty.coordinator if self.duty is not None else None

    # ---- local facts ----------------------------------------------------------------

    def _finished(self, r: CommandFinished) -> list[ClusterOutput]:
        if self.coordinator is not None and r.id not in self.local.commands:
            alert = self.coordinator.fencing.result(r.id, r.ok, r.reason, r.now_ms)
            if alert is not None:
                return [RaiseAlert(id=self.new_id(), kind="fence-failed", reason=alert.reason,
                                   host=alert.host)]
            return []
        if self.local.finished(r.id, r.ok):
            self._last_beat_ms = -10**9             # report the move's end at the next tick
        return []

    def _detected(self, events: list[DetectorOutput]) -> list[ClusterOutput]:
        """The detector's news passed on (logs, metrics), and the isolation policy applied."""
        out: list[ClusterOutput] = list(events)
        for event in events:
            if isinstance(event, IsolationChanged) and event.isolated:
                out.append(RaiseAlert(id=self.new_id(), kind="isolated",
                                      reason=f"{event.reason}; policy {self.config.isolation}"))
                if self.config.isolation == "shutdown" and not self.committed.cluster.paused:
                    out += self.local.stop_all(self.election.term, "isolated", self.new_id, self.now_ms)
                elif self.config.isolation == "self-fence":
                    self.self_fenced = True
            elif isinstance(event, IsolationChanged):
                self.self_fenced = False
        return out

    # ---- quorum (quorate.py) ----------------------------------------------------------

    def mutual_peers(self, now_ms: int) -> set[str]:
        return self.views.mutual_peers(now_ms)

    def broker_quorate(self, now_ms: int) -> bool:
        return self.views.broker_quorate(now_ms)

    def connected_quorate(self, now_ms: int) -> bool:
        return self.views.connected_quorate(now_ms)

    def ping_targets(self) -> frozenset[str]:
        """The hosts this agent wants pinged: its neighbours and coordinator; everyone when coordinating."""
        return self.detector.peers

    def beat_targets(self) -> frozenset[str]:
        return self.views.beat_targets()

    def window(self, peer: str) -> int:
        """How long a peer's latest heartbeat counts: relayed ones may be `lag_ms` late."""
        t = self.config.timing.quorum_timeout_ms
        return t + self.lag_ms if peer in self.relayed else t

    def retrack(self) -> None:
        if self.election.role is Role.COORDINATOR:
            wanted = set(self.hosts)
        else:
            wanted = set(self.neighbours) | {self.me}
            followed = self.election.following(self.now_ms)
            if followed is not None:
                wanted.add(followed)
        if wanted - {self.me} != self.detector.peers:
            self.detector.reconfigure(sorted(wanted), self.config.detector, self.now_ms)

    # ---- the periodic part ----------------------------------------------------------

    def _advance(self, now: int) -> list[ClusterOutput]:
        out: list[ClusterOutput] = []
        self.retrack()
        self.campaign.forget_old(now)
        if self.election.role is Role.COORDINATOR and not self.broker_quorate(now):
            self.drop_coordination()               # step down at once; our lease lapses by itself
            self.retrack()
        standing = self.views.standing_quorate(now)
        out += self.campaign.maybe_stand(now, standing)
        if self.duty is not None:
            out += self.duty.run(now)
        if now - self._last_beat_ms >= self.config.timing.heartbeat_ms:
            self._last_beat_ms = now
            out += self._send_heartbeats(now, standing)
            out += self._send_digests(now)
        if self.election.role is not Role.COORDINATOR and self.relay.has_news(now, self.beats):
            to = self.election.following(now)
            entries = self.relay.news(now, self.beats, to)
            if entries is not None and to is not None:
                out += self._digests_to(entries, to)
        out += self._watchdog(now)
        out += self._local_actions(now)
        return out

    def _digests_to(self, entries: tuple[RelayEntry, ...], to: str) -> list[ClusterOutput]:
        """As many digests as the wire's limit needs (parts.py)."""
        return [self.send(Digest(sender=self.me, term=self.election.term, entries=chunk, to=to, part=i))
                for i, chunk in enumerate(split_entries(entries))]

    def _send_digests(self, now: int) -> list[ClusterOutput]:
        if self.election.role is Role.COORDINATOR:
            return []
        keep = self.lag_ms + self.config.detector.dead_timeout_ms
        return [d for to, entries in self.relay.digests(now, self.beats, self.election.following(now), keep)
                for d in self._digests_to(entries, to)]

    def _watchdog(self, now: int) -> list[ClusterOutput]:
        """Pet an armed device unless quorum has been lost for longer than a blip (selffence.py)."""
        self.self_fence.observe(now, self.connected_quorate(now))
        pet = self.self_fence.pet(now, has_vms=bool(self.local.vms), self_fenced=self.self_fenced,
                                  paused=self.committed.cluster.paused)
        was, self.petting = self.petting, pet
        if pet:
            return [PetWatchdog(id=self.new_id())]
        if was:
            why = ("self-fencing: isolated" if self.self_fenced else
                   f"lost quorum {self.self_fence.lost_for(now)} ms ago with VMs running here")
            return [StopPettingWatchdog(id=self.new_id(), reason=why)]
        return []

    # ---- heartbeats -----------------------------------------------------------------

    def _send_heartbeats(self, now: int, standing: bool) -> list[ClusterOutput]:
        if self.election.role is Role.COORDINATOR:
            beat = self.heartbeat(now, self.broker_quorate(now))
            if self.duty is not None:
                self.duty.acks.confirmed()
            return [self.send(beat)]                                   # to everyone
        beat = self.heartbeat(now, standing)
        self.relay.sent_own(now, beat)
        to = set(self.neighbours)
        followed = self.election.following(now)
        if followed is not None and not self.layout.enabled:
            to.add(followed)                    # else it gets it relayed (or as a ring neighbour)
        kwargs = {f: getattr(beat, f) for f in HEARTBEAT_FIELDS}       # cheaper than replace()
        return [self.send(Heartbeat(**kwargs, to=host)) for host in sorted(to)]

    def heartbeat(self, now: int, quorate: bool) -> Heartbeat:
        committed = self.committed
        pending = {(a, h) for a, h in self.requests
                   if (committed.cluster.paused != (a == paused.ON) if h == paused.CLUSTER
                       else committed.host(h).maintenance != (a == "drain"))}
        self.requests = pending
        self.fencing_asked = {(a, h): at for (a, h), at in self.fencing_asked.items()
                              if now - at <= CONFIRM_OFF_MS and not self.committed.host(h).fenced}
        pending = pending | {(f"{a}:{at}", h) for (a, h), at in self.fencing_asked.items()}
        self.moves = {(vm, target): at for (vm, target), at in self.moves.items()
                      if now - at <= MOVE_REQUEST_MS and self.committed.vms.get(vm) is not None
                      and self.committed.vms[vm].owner != target}
        hears = self.detector.hears(now)
        reaches = self.detector.reaches(now) | self.views.direct_reaches(now)
        coordinating = self.election.role is Role.COORDINATOR
        unheard = None
        if coordinating:                        # a summary instead of a list of every host
            mutual = self.mutual_peers(now)
            unheard = frozenset(h for h in self.hosts if h != self.me and h not in mutual)
            hears, reaches = hears & self.neighbours, reaches & self.neighbours
        self._beat_seq += 1
        local = self.local
        return signed(Heartbeat(sender=self.me, incarnation=self.incarnation, term=self.election.term,
                         hears=hears, reaches=reaches,
                         accepted=self.accepted.key, quorate=quorate, vms=dict(local.vms),
                         failed_vms=frozenset(local.failed),
                         migrations=tuple(sorted(local.reports.values(), key=lambda r: r.vm)),
                         requests=frozenset(pending), committed=self.committed.key,
                         moves=frozenset(self.moves), degraded=self.degraded,
                         coordinator=coordinating, unheard=unheard,
                         confirmed=dict(self.duty.acks.new) if self.duty is not None else {},
                         watchdog_ms=self.watchdog_ms, definition=self.definition.mine,
                         seq=self._beat_seq), self.config.signer)

    # ---- obeying the committed state (grants.py) -------------------------------------

    def _owned(self, state: ClusterState) -> list[str]:
        """The VMs `state` gives this host, sorted; computed once per state (20,000 VMs at scale)."""
        if self._owned_cache[0] != state.key:
            self._owned_cache = (state.key, state.owned_by(self.me))
        return self._owned_cache[1]

    def _local_actions(self, now: int) -> list[ClusterOutput]:
        self.local.expire(now)
        state, term = self.committed, self.election.term
        # Orders only from a live coordinator of our term, and only once it has committed a state in
        # its own term: that state holds every decision committed before (a new coordinator's first
        # proposal is built on what it accepted), an older committed snapshot may not.
        if self.election.following(now) is None or state.term != self.election.term or state.cluster.paused:
            return []                   # in maintenance (paused.py): nothing started, stopped or moved
        mine = self._owned(state)
        self.local.forget_moved(state, mine)
        synced = self.follower.synced()
        out = self.local.copies(now, state, self.accepted, term, synced, self.new_id)
        may_start = (not self.self_fenced and self.connected_quorate(now) and not state.host(self.me).fenced
                     and synced and self.fenceable())
        if may_start:
            out += self.local.starts(state, self.accepted, mine, term, self.new_id)
        return [self.local.issue(cmd, now) for cmd in out]

    def fenceable(self) -> bool:
        """Others can fence this host: by its device, or by a watchdog that confirmed the
        configured timeout (a longer one would outlast the coordinator's wait)."""
        own = self.config.hosts[self.me]
        return own.fence_device or self.watchdog_ms == self.config.timing.watchdog_timeout_ms

    # ---- relays (a cluster larger than a full mesh, relay.py) ------------------------

    def _digest(self, d: Digest) -> list[ClusterOutput]:
        now = self.now_ms
        sent = now - self.config.timing.relay_transit_ms    # the digest's age counts from then
        entries = self.relay.take(d.sender, d.entries, sent, d.part,
                                  coordinating=self.election.role is Role.COORDINATOR)
        out: list[ClusterOutput] = []
        if self.election.role is Role.COORDINATOR:
            for entry in entries:
                out += self._relayed_beat(entry, sent, now)
        return out

    def _relayed_beat(self, entry: RelayEntry, sent: int, now: int) -> list[ClusterOutput]:
        """The coordinator takes a relayed heartbeat like a direct one, dated when it was heard
        (`sent`: when the digest left its last hop)."""
        beat, host = entry.beat, entry.host
        if beat is None or host == self.me or host not in self.config.hosts or beat.coordinator:
            return []
        built = sent - entry.relay_age_ms
        heard = built - entry.heard_age_ms
        previous = self.beats.get(host)
        if previous is not None and previous[1].incarnation > beat.incarnation:
            return []
        if previous is None or heard > previous[0] or beat.incarnation > previous[1].incarnation:
            self.beats[host] = (heard, beat)
            self.relayed.add(host)
            self._observe_term(beat.term)
        return self._detected(self.detector.step(PeerHeardRelayed(
            host=host, reporter=entry.reporter, incarnation=beat.incarnation, heard_ms=heard,
            built_ms=built, lag_ms=self.lag_ms, now_ms=now, hears=beat.hears, reaches=beat.reaches,
            seq=entry.seq or None)))

    # ---- views ----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.election.role

    @property
    def term(self) -> int:
        return self.election.term

    def fence_commands(self) -> list[str]:
        return self.coordinator.fencing.pending() if self.coordinator is not None else []
