"""One host's cluster core: detector, election, replicated state and the agent's own rules.

`step(input)` takes one fact and answers what it calls for at once (a vote, an ack);
`tick(now_ms)` does the periodic work (election, coordinating, heartbeats, watchdog,
obeying the committed state).  Both return outputs in the order they must be
executed (etcd raft's Ready): a `PersistState` always comes first in its batch and
must be on stable storage before any `Send` after it.  The agent's rules:

- gossip layout (bounded): a follower sends its heartbeat to its ring neighbours
  (`gossip_fanout`), one `Send` each, and pings them and the coordinator it follows; in a
  full mesh (at most fanout + 1 hosts) it also sends its heartbeat to the coordinator,
  in a larger cluster its heartbeat reaches the coordinator relayed in digests (relay.py:
  bounded fan-in everywhere, at most `lag_ms` late).  The coordinator broadcasts its
  heartbeat (lease renewal, membership summary: whom it does not hear, the acks it
  confirms) and pings everyone.
  A proposal is broadcast when made and while in flight; a host whose heartbeat shows
  it behind gets it alone.  Acks go out when a proposal arrives and, after (re)joining,
  until one is confirmed.  A cluster of at most fanout + 1 hosts is a full mesh.
- quorum: a peer counts while this agent hears it and the peer's heartbeat says it
  hears this agent (mutual, through the broker), or while it answers ping; a follower
  also holds quorum while it is mutual with a coordinator of its term whose heartbeat
  says the coordinator holds quorum.  Decisions need the broker kind (votes and acks
  travel through it).
- grants: a VM is started only when the committed state names this host its owner,
  this agent follows a live coordinator of its highest term that committed that
  state in its own term, that coordinator has confirmed an ack this agent sent since
  it (re)joined (a read index: nothing decided while we were cut off is missing),
  no change to that VM is proposed, and this agent holds quorum (so its
  watchdog is being petted) and is not fenced.  A local VM without a grant is
  reported, never stopped on this agent's own initiative.
- watchdog: petted while this agent holds quorum, or while nothing runs here.
- isolation (no broker and no peer): keep, shut the VMs down, or stop petting at once.
"""

from __future__ import annotations

from dataclasses import fields, replace

from haguard.core.cluster.coordinator import Coordinator, HostView
from haguard.core.cluster.election import Election, Role
from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.relay import RelayLayout, relay_layout, reported_by, ring_neighbours
from haguard.core.cluster.state import ClusterState, Proposer, StateKey, initial_state
from haguard.core.cluster.types import (
    INCOMING_UNWANTED,
    MOVED_AWAY,
    Ack,
    AdminRequested,
    ClusterInput,
    ClusterOutput,
    CommandResult,
    CoreConfig,
    Digest,
    Heartbeat,
    KillVm,
    LocalHealthObserved,
    LocalVmsObserved,
    Message,
    MessageReceived,
    MigrateVm,
    MigrationReport,
    PersistedState,
    PersistState,
    PetWatchdog,
    Proposal,
    QemuState,
    RaiseAlert,
    RelayEntry,
    Send,
    StartVm,
    StopPettingWatchdog,
    StopVm,
    VoteGranted,
    VoteRequest,
)
from haguard.core.detector import (
    BrokerStatus,
    DetectorOutput,
    FailureDetector,
    GossipHeard,
    IsolationChanged,
    PeerState,
    PingObserved,
    RelayedHeard,
)

VmCommand = StartVm | StopVm | KillVm | MigrateVm
COMMAND_EXPIRY_MS = 30_000          # a command without result by then is forgotten (lost result)
INMIGRATE_GRACE_MS = 1_000          # an incoming QEMU may show up before its record reaches us
MOVE_REQUEST_MS = 60_000            # an operator's move request not taken by then is dropped
RELAY_REFRESH_MS = 5_000            # a relayed heartbeat's content is sent again at least this often
NO_KEY: StateKey = (-1, -1)
HEARTBEAT_FIELDS = tuple(f.name for f in fields(Heartbeat) if f.name != "to")


__all__ = ["ClusterAgent", "heard_by", "ring_neighbours"]


def _news_of(beat: Heartbeat) -> tuple[object, ...]:
    """What in a host's heartbeat the coordinator must learn at once (its VMs and moves, its
    requests); the rest (keys, terms) reaches it in acks or the next digests, and changes on
    every host at every commit: at once, that would be a burst of news from every reporter."""
    return (beat.incarnation, beat.vms, beat.failed_vms, beat.migrations, beat.requests, beat.moves,
            beat.degraded)


def heard_by(beat: Heartbeat, host: str) -> bool:
    """Whether the heartbeat's sender says it hears `host`."""
    if host in beat.hears:
        return True
    return beat.unheard is not None and host != beat.sender and host not in beat.unheard


class ClusterAgent:
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
        # Digests taken, per sender: (when it was sent, by our clock: see relay_transit_ms; entries).
        self._digests: dict[str, tuple[int, tuple[RelayEntry, ...]]] = {}
        self._silent_sent: frozenset[str] = frozenset()         # tier 1: neighbours last reported silent
        self._urgent = False                                    # news for the coordinator, not yet sent
        self._beat_seq = 0
        self._own_beat: tuple[int, Heartbeat] | None = None
        self._relayed: set[str] = set()                         # peers whose latest beat was relayed
        # Compact relays: the first heartbeat number of each content, per host heard (tier 1) ...
        self._since: dict[str, int] = {}
        # ... what content each hop received per (host, reporter), and sent per parent.
        self._contents: dict[tuple[str, str], tuple[int, Heartbeat]] = {}
        self._sent: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}   # to -> key -> (since, at)
        self._roles = self.layout.roles_of(self.me)
        self._reporter = any(r.tier == 1 for r in self._roles)
        # A reporter whose own aggregator slot takes its reports (they go up in that digest).
        self._self_fed = any(r.tier == 1 and r.parent == self.me for r in self._roles)
        self._reported_by = reported_by(self.layout, config.gossip_fanout) if self.layout.enabled else {}
        self._children = frozenset(h for h, roles in self.layout.roles.items()
                                   for r in roles if r.parent == self.me and h != self.me)
        self._local_quorum = Quorum({h: config.hosts[h].weight for h in self.neighbours | {self.me}})
        # Watched (heard, pinged, judged): the neighbours and the coordinator; everyone when coordinating.
        self.detector = FailureDetector(self.me, sorted(self.neighbours | {self.me}), config.detector, now_ms)
        self.election = Election(self.me, self.quorum, config.timing.lease_ms, term=saved.term,
                                 voted_for=saved.voted_for)
        self.committed: ClusterState = saved.committed or initial_state(sorted(config.vms), self.hosts)
        self.accepted: ClusterState = saved.accepted or self.committed
        self.proposer: Proposer | None = None
        self.coordinator: Coordinator | None = None
        self.beats: dict[str, tuple[int, Heartbeat]] = {}       # peer -> (received at, heartbeat)
        self.local_vms: dict[str, QemuState] = {}
        self.local_seen_ms: dict[str, int] = {}                 # vm -> when its QEMU appeared here
        self.commands: dict[str, tuple[int, VmCommand]] = {}    # id -> (issued at, command)
        self.restarts: dict[str, int] = {}
        self.failed_vms: set[str] = set()
        self.migration_reports: dict[str, MigrationReport] = {}
        self.requests: set[tuple[str, str]] = set()
        self.moves: dict[tuple[str, str], int] = {}             # (vm, target) -> asked at
        self.degraded = False
        self.petting = False
        self.self_fenced = False
        self.now_ms = now_ms
        self._next_id = 0
        self._last_beat_ms = -10**9
        self._last_proposal_ms = -10**9
        self._ack_seq = 0
        self._sync_seq: int | None = None                       # first ack since (re)joining
        self._confirmed: tuple[int, int] = (-1, -1)             # what the coordinator has of ours
        self._acks_seen: dict[str, tuple[int, int]] = {}        # coordinator: host -> newest ack
        self._acks_new: dict[str, tuple[int, int]] = {}         # ... received since our last heartbeat
        # What the confirming coordinator held when it confirmed our ack: (accepted, committed) keys.
        self._confirm_need: tuple[StateKey, StateKey] = (NO_KEY, NO_KEY)
        self._last_ack_ms = -10**9
        self._candidates: dict[str, tuple[int, StateKey]] = {}  # vote requests seen: host -> (at, key)
        self._granted_at: dict[str, int] = {}                   # our voters: host -> when it granted
        self._caught_up: dict[str, int] = {}                    # coordinator: host -> proposal sent at
        self._changed_ms = -10**9                               # coordinator: last proposal or commit
        self._coordinating_since = -10**9
        self._owned_cache: tuple[StateKey, list[str]] = (NO_KEY, [])
        self._steps = 0                                         # facts taken: keys the caches below
        self._cache_key: tuple[object, ...] = ()
        self._cache: dict[str, object] = {}
        self._persisted = self._durable()

    # ---- feeding --------------------------------------------------------------------

    def step(self, event: ClusterInput) -> list[ClusterOutput]:
        out: list[ClusterOutput] = []
        self.now_ms = max(self.now_ms, event.now_ms)
        self._steps += 1
        match event:
            case MessageReceived(message=message):
                out += self._receive(message)
            case LocalVmsObserved(vms=vms, crashed=crashed):
                self._observe_vms(dict(vms), crashed)
            case CommandResult():
                out += self._result(event)
            case AdminRequested(action="migrate", host=host, vm=vm):
                if host in self.config.hosts and vm in self.config.vms:
                    self.moves[(vm, host)] = self.now_ms
                    self._last_beat_ms = -10**9     # to the coordinator at the next tick
            case AdminRequested(action=action, host=host):
                if host in self.config.hosts:
                    self.requests.add((action, host))
                    self._last_beat_ms = -10**9
            case LocalHealthObserved(degraded=degraded):
                if degraded != self.degraded:
                    self.degraded = degraded
                    self._last_beat_ms = -10**9
            case PingObserved() | BrokerStatus():
                out += self._detected(self.detector.step(event))
        # Periodic work (coordinating, heartbeats, obeying the committed state) waits for tick().
        return self._ready(out)

    def tick(self, now_ms: int) -> list[ClusterOutput]:
        self.now_ms = max(self.now_ms, now_ms)
        out = self._detected(self.detector.tick(self.now_ms))
        return self._ready(out + self._advance(self.now_ms))

    def _ready(self, out: list[ClusterOutput]) -> list[ClusterOutput]:
        durable = self._durable()
        if durable != self._persisted:
            self._persisted = durable
            out.insert(0, PersistState(id=self._id(), term=self.election.term,
                                       voted_for=self.election.voted_for,
                                       accepted=self.accepted, committed=self.committed))
        return out

    def _durable(self) -> tuple[object, ...]:
        return (self.election.term, self.election.voted_for, self.accepted.key, self.committed.key)

    def _id(self) -> str:
        self._next_id += 1
        return f"{self.me}/{self.incarnation}/{self._next_id}"

    def _send(self, message: Message) -> Send:
        return Send(id=self._id(), message=message)

    # ---- messages -------------------------------------------------------------------

    def _receive(self, message: Message) -> list[ClusterOutput]:
        now = self.now_ms
        if message.sender == self.me or message.sender not in self.config.hosts:
            return []
        match message:
            case Heartbeat():
                previous = self.beats.get(message.sender)
                if previous is not None and previous[1].incarnation > message.incarnation:
                    return []                       # an older life of that agent
                self.beats[message.sender] = (now, message)
                self._relayed.discard(message.sender)
                if self._reporter and message.sender in self.neighbours and not message.coordinator:
                    if previous is None or previous[1] != message or message.sender not in self._since:
                        self._since[message.sender] = message.seq
                    if previous is None or _news_of(previous[1]) != _news_of(message):
                        self._urgent = True         # a reporter sends its news up at once
                self._observe_term(message.term)
                out: list[ClusterOutput] = []
                if message.coordinator:
                    out += self._follow_beat(message)
                hears = message.hears
                if message.unheard is not None:     # a coordinator's summary: what of it we watch
                    hears = hears | {p for p in self.detector.peers if heard_by(message, p)}
                return out + self._detected(self.detector.step(GossipHeard(
                    host=message.sender, incarnation=message.incarnation, now_ms=now,
                    hears=hears, reaches=message.reaches, seq=message.seq or None)))
            case VoteRequest():
                self._candidates[message.sender] = (now, message.accepted)
                # A candidate this agent does not watch: its request is the news that it lives.
                alive = (self.detector.state(message.sender) is PeerState.ALIVE
                         or not self.detector.watches(message.sender))
                ok, _why = self.election.should_grant(message.sender, message.term, message.accepted,
                                                      self.accepted.key, alive, now)
                if not ok:
                    return []
                self._drop_coordination()
                self.election.grant(message.sender, message.term)
                return [self._send(VoteGranted(sender=self.me, term=message.term, to=message.sender))]
            case VoteGranted():
                if message.to == self.me and message.term == self.election.term:
                    self._granted_at[message.sender] = now
                if message.to == self.me and self.election.granted(message.sender, message.term):
                    return self._became_coordinator()
                return []
            case Proposal():
                return self._proposal(message)
            case Digest():
                return self._digest(message) if message.to == self.me else []
            case Ack():
                if (message.to == self.me and self.proposer is not None
                        and message.term == self.election.term):
                    if self.proposer.ack(message.sender, message.accepted):
                        self._last_proposal_ms = -10**9     # tell everyone the commit at the next tick
                    self._committed(self.proposer.committed)
                    seen = (message.incarnation, message.seq)
                    self._acks_seen[message.sender] = max(seen, self._acks_seen.get(message.sender, seen))
                    self._acks_new[message.sender] = self._acks_seen[message.sender]
                    # An ack is proof of life too: a host it comes from is not declared dead.
                    return self._detected(self.detector.step(GossipHeard(
                        host=message.sender, incarnation=message.incarnation, now_ms=now)))
                return []
        return []

    def _observe_term(self, term: int) -> None:
        if term > self.election.term:
            self._drop_coordination()
            self.election.observe_term(term)

    def _follow(self, coordinator: str, term: int) -> bool:
        """Renew the lease of `coordinator`; False when it is not the one to follow."""
        if term < self.election.term:
            return False                            # an older term's coordinator: refused
        if term > self.election.term:
            self._drop_coordination()
        self.election.follow(coordinator, term, self.now_ms)
        if self.election.coordinator != coordinator or self.election.role is Role.COORDINATOR:
            return False
        if self.election.following_since_ms == self.now_ms:
            self._sync_seq = None                   # (re)joined: wait for a fresh ack to be confirmed
            self._retrack()
        return True

    def _confirm(self, seen: tuple[int, int] | None, accepted: StateKey, committed: StateKey) -> None:
        if seen is not None and seen > self._confirmed:
            self._confirmed, self._confirm_need = seen, (accepted, committed)

    def _proposal(self, p: Proposal) -> list[ClusterOutput]:
        if not self._follow(p.sender, p.term):
            return []
        self._confirm(p.confirmed.get(self.me), p.state.key, p.committed.key)
        self._committed(p.committed)
        if p.state.key > self.accepted.key:
            self.accepted = p.state
        if self.accepted.key != p.state.key:
            return []
        return [self._ack(p.sender, p.term)]

    def _follow_beat(self, beat: Heartbeat) -> list[ClusterOutput]:
        """A coordinator's heartbeat: its lease, its confirmations, its committed key."""
        if not self._follow(beat.sender, beat.term):
            return []
        self._confirm(beat.confirmed.get(self.me), beat.accepted, beat.committed)
        if beat.committed == self.accepted.key:
            self._committed(self.accepted)          # the state we accepted is committed now
        waiting = self._sync_seq is None or self._confirmed < (self.incarnation, self._sync_seq)
        if waiting and self.now_ms - self._last_ack_ms >= self.config.timing.heartbeat_ms:
            return [self._ack(beat.sender, beat.term)]   # (re)joined: ask for a confirmation
        return []

    def _ack(self, coordinator: str, term: int) -> Send:
        self._ack_seq += 1
        self._last_ack_ms = self.now_ms
        if self._sync_seq is None:
            self._sync_seq = self._ack_seq
        return self._send(Ack(sender=self.me, term=term, accepted=self.accepted.key, to=coordinator,
                              incarnation=self.incarnation, seq=self._ack_seq))

    def _committed(self, state: ClusterState) -> None:
        if state.key > self.committed.key:
            self.committed = state
        if self.committed.key > self.accepted.key:
            self.accepted = self.committed

    def _became_coordinator(self) -> list[ClusterOutput]:
        term = self.election.term
        # Raft's rule: re-propose what this agent accepted, in its own term, to commit it.
        proposal = replace(self.accepted, term=term, version=self.accepted.version + 1)
        self.proposer = Proposer(self.quorum, self.me, self.committed, proposal)
        self.accepted = proposal
        self.coordinator = self.coordinator_class(self.config, term, self._id)
        self._acks_seen, self._acks_new, self._caught_up = {}, {}, {}
        self._last_proposal_ms = self._last_beat_ms = -10**9   # announce at once
        self._coordinating_since = self.now_ms
        self._retrack()
        return []

    def _drop_coordination(self) -> None:
        if self.election.role is Role.COORDINATOR:
            self.election.step_down()
        self.proposer, self.coordinator = None, None

    # ---- local facts ----------------------------------------------------------------

    def _observe_vms(self, vms: dict[str, QemuState], crashed: frozenset[str]) -> None:
        for vm in vms:
            self.local_seen_ms.setdefault(vm, self.now_ms)
        for vm in set(self.local_seen_ms) - set(vms):
            del self.local_seen_ms[vm]
        self.local_vms = vms
        for vm in crashed:
            self.restarts[vm] = self.restarts.get(vm, 0) + 1
            if self.restarts[vm] > self.config.timing.max_local_restarts:
                self.failed_vms.add(vm)

    def _result(self, r: CommandResult) -> list[ClusterOutput]:
        if self.coordinator is not None and r.id not in self.commands:
            alert = self.coordinator.fencing.result(r.id, r.ok, r.reason, r.now_ms)
            if alert is not None:
                return [RaiseAlert(id=self._id(), kind="fence-failed", reason=alert.reason, host=alert.host)]
            return []
        entry = self.commands.pop(r.id, None)
        if entry is not None and isinstance(entry[1], MigrateVm):
            cmd = entry[1]
            self.migration_reports[cmd.vm] = MigrationReport(vm=cmd.vm, generation=cmd.generation,
                                                             target=cmd.target, ok=r.ok)
            self._last_beat_ms = -10**9             # report the move's end at the next tick
        return []

    def _detected(self, events: list[DetectorOutput]) -> list[ClusterOutput]:
        out: list[ClusterOutput] = []
        for event in events:
            if isinstance(event, IsolationChanged) and event.isolated:
                out.append(RaiseAlert(id=self._id(), kind="isolated",
                                      reason=f"{event.reason}; policy {self.config.isolation}"))
                if self.config.isolation == "shutdown":
                    out += [self._vm_command(StopVm(id=self._id(), vm=vm, term=self.election.term,
                                                    reason="isolated"))
                            for vm in sorted(self.local_vms) if not self._busy(vm)]
                elif self.config.isolation == "self-fence":
                    self.self_fenced = True
            elif isinstance(event, IsolationChanged):
                self.self_fenced = False
        return out

    # ---- quorum ---------------------------------------------------------------------

    def mutual_peers(self, now_ms: int) -> set[str]:
        """Peers heard through the broker that report hearing this agent, lately; and voters
        that have just granted this agent their vote (they are not sending to it yet)."""
        cached = self._cached("mutual", now_ms)
        if isinstance(cached, frozenset):
            return set(cached)
        heard = self.detector.hears(now_ms)
        mutual = {p for p in heard if p in self.beats and now_ms - self.beats[p][0] <= self._window(p)
                  and heard_by(self.beats[p][1], self.me)}
        if self.election.role is Role.COORDINATOR:
            # Voters' heartbeats reach a new coordinator once they follow it (relayed: later).
            window = self.config.timing.quorum_timeout_ms + self.lag_ms
            mutual |= {p for p, at in self._granted_at.items() if now_ms - at <= window}
        self._cache["mutual"] = frozenset(mutual)
        return mutual

    def _cached(self, name: str, now_ms: int) -> object | None:
        """A quorum view computed since the last fact at this instant (asked several times a tick)."""
        e = self.election
        key = (now_ms, self._steps, e.role, e.term, e.coordinator, e.lease_until_ms)
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
        return self._cache.get(name)

    def _lease_quorate(self, mutual: set[str]) -> bool:
        """Mutual with the coordinator we follow, whose latest heartbeat says it holds quorum."""
        c = self.election.following(self.now_ms)
        if c is None or c == self.me or c not in mutual:
            return False
        beat = self.beats[c][1]
        return beat.coordinator and beat.quorate and beat.term == self.election.term

    def broker_quorate(self, now_ms: int) -> bool:
        cached = self._cached("broker", now_ms)
        if cached is None:
            mutual = self.mutual_peers(now_ms)
            cached = self._cache["broker"] = (self.quorum.reached(mutual | {self.me})
                                              or self._lease_quorate(mutual))
        return bool(cached)

    def connected_quorate(self, now_ms: int) -> bool:
        if self.broker_quorate(now_ms):
            return True
        cached = self._cached("connected", now_ms)
        if cached is None:
            cached = self._cache["connected"] = self.quorum.reached(
                self.mutual_peers(now_ms) | self.detector.reaches(now_ms) | {self.me})
        return bool(cached)

    def _standing_quorate(self, now_ms: int) -> bool:
        """May stand for election: quorate, or (a large cluster, where nobody hears a majority
        before a coordinator exists) mutual with a majority of its own neighbourhood."""
        if self.broker_quorate(now_ms):
            return True
        return (self.detector.broker_connected
                and self._local_quorum.reached(self.mutual_peers(now_ms) | {self.me}))

    def ping_targets(self) -> frozenset[str]:
        """The hosts this agent wants pinged: its neighbours and coordinator; everyone when coordinating."""
        return self.detector.peers

    def _retrack(self) -> None:
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
        self._retrack()
        for host, (at, _key) in list(self._candidates.items()):
            if now - at > 2 * self.config.timing.election_timeout_ms:
                del self._candidates[host]
        if self.election.role is Role.COORDINATOR and not self.broker_quorate(now):
            self._drop_coordination()               # step down at once; our lease lapses by itself
            self._retrack()
        standing = self._standing_quorate(now)
        out += self._maybe_stand(now, standing)
        if self.proposer is not None and self.coordinator is not None:
            out += self._coordinate(now)
        if now - self._last_beat_ms >= self.config.timing.heartbeat_ms:
            self._last_beat_ms = now
            out += self._send_heartbeats(now, standing)
            out += self._send_digests(now)
        if self._relay_news(now):
            out += self._send_news(now)
        out += self._watchdog(now)
        out += self._local_actions(now)
        return out

    def _send_heartbeats(self, now: int, standing: bool) -> list[ClusterOutput]:
        if self.election.role is Role.COORDINATOR:
            beat = self._heartbeat(now, self.broker_quorate(now))
            self._acks_new = {}
            return [self._send(beat)]                                   # to everyone
        beat = self._heartbeat(now, standing)
        if self._own_beat is None or self._own_beat[1] != beat:
            self._since[self.me] = beat.seq
        self._own_beat = (now, beat)
        to = set(self.neighbours)
        followed = self.election.following(now)
        if followed is not None and not self.layout.enabled:
            to.add(followed)                    # else it gets it relayed (or as a ring neighbour)
        kwargs = {f: getattr(beat, f) for f in HEARTBEAT_FIELDS}       # cheaper than replace()
        return [self._send(Heartbeat(**kwargs, to=host)) for host in sorted(to)]

    def _heartbeat(self, now: int, quorate: bool) -> Heartbeat:
        pending = {(a, h) for a, h in self.requests
                   if self.committed.host(h).maintenance != (a == "drain")}
        self.requests = pending
        self.moves = {(vm, target): at for (vm, target), at in self.moves.items()
                      if now - at <= MOVE_REQUEST_MS and self.committed.vms.get(vm) is not None
                      and self.committed.vms[vm].owner != target}
        hears, reaches = self.detector.hears(now), self.detector.reaches(now)
        coordinating = self.election.role is Role.COORDINATOR
        unheard = None
        if coordinating:                        # a summary instead of a list of every host
            mutual = self.mutual_peers(now)
            unheard = frozenset(h for h in self.hosts if h != self.me and h not in mutual)
            hears, reaches = hears & self.neighbours, reaches & self.neighbours
        return Heartbeat(sender=self.me, incarnation=self.incarnation, term=self.election.term,
                         hears=hears, reaches=reaches,
                         accepted=self.accepted.key, quorate=quorate, vms=dict(self.local_vms),
                         failed_vms=frozenset(self.failed_vms),
                         migrations=tuple(sorted(self.migration_reports.values(), key=lambda r: r.vm)),
                         requests=frozenset(pending), committed=self.committed.key,
                         moves=frozenset(self.moves), degraded=self.degraded,
                         coordinator=coordinating, unheard=unheard,
                         confirmed=dict(self._acks_new) if coordinating else {}, seq=self._next_beat())

    # ---- relays (a cluster larger than a full mesh, relay.py) ------------------------

    def _window(self, peer: str) -> int:
        """How long a peer's latest heartbeat counts: relayed ones may be `lag_ms` late."""
        t = self.config.timing.quorum_timeout_ms
        return t + self.lag_ms if peer in self._relayed else t

    def _digest(self, d: Digest) -> list[ClusterOutput]:
        now = self.now_ms
        if not self.layout.enabled:
            return []
        # Only a reporter's own neighbourhood, as the layout has it: nothing misrouted is relayed.
        entries = tuple(full for e in d.entries
                        if e.reporter in self._reported_by.get(e.host, ())
                        and e.heard_age_ms >= 0 and e.relay_age_ms >= 0
                        and (full := self._expand(e)) is not None)
        sent = now - self.config.timing.relay_transit_ms    # the digest's age counts from then
        self._digests[d.sender] = (sent, entries)
        if self.election.role is Role.COORDINATOR:
            out: list[ClusterOutput] = []
            for entry in entries:
                out += self._relayed_beat(entry, sent, now)
            return out
        return []

    def _expand(self, e: RelayEntry) -> RelayEntry | None:
        """The entry with its heartbeat: the one it carries, or the one received before with the
        same content (None: not received, or another content; it comes again within the refresh)."""
        key = (e.host, e.reporter)
        if e.beat is not None:
            if e.beat.sender != e.host or e.beat.incarnation != e.incarnation:
                return None
            self._contents[key] = (e.since, e.beat)
            return e
        known = self._contents.get(key)
        if known is None or known[0] != e.since or known[1].incarnation != e.incarnation:
            return None
        return replace(e, beat=known[1])

    def _compact(self, entries: list[RelayEntry], to: str, now: int) -> tuple[RelayEntry, ...]:
        """The entries for `to`: a heartbeat whose content `to` already has goes without it."""
        sent = self._sent.setdefault(to, {})
        out = []
        for e in entries:
            key = (e.host, e.reporter)
            before = sent.get(key)
            if before is not None and before[0] == e.since and now - before[1] < RELAY_REFRESH_MS:
                out.append(replace(e, beat=None))
            else:
                sent[key] = (e.since, now)
                out.append(e)
        return tuple(out)

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
            self._relayed.add(host)
            self._observe_term(beat.term)
        return self._detected(self.detector.step(RelayedHeard(
            host=host, reporter=entry.reporter, incarnation=beat.incarnation, heard_ms=heard,
            built_ms=built, lag_ms=self.lag_ms, now_ms=now, hears=beat.hears, reaches=beat.reaches,
            seq=entry.seq or None)))

    def _reports(self, now: int) -> list[RelayEntry]:
        """Tier 1: this host's own heartbeat and its neighbours' latest, with their ages."""
        if not self._reporter:
            return []
        out = []
        heard = [self._own_beat] if self._own_beat is not None else []
        heard += [got for host in sorted(self.neighbours) if (got := self.beats.get(host)) is not None
                  and not got[1].coordinator]
        for at, beat in heard:
            out.append(RelayEntry(host=beat.sender, reporter=self.me, incarnation=beat.incarnation,
                                  seq=beat.seq, since=self._since.get(beat.sender, beat.seq),
                                  heard_age_ms=now - at, relay_age_ms=0, beat=beat))
        return out

    def _silent_neighbours(self, now: int) -> frozenset[str]:
        t = self.config.detector.suspect_timeout_ms
        return frozenset(h for h in self.neighbours if h in self.beats and now - self.beats[h][0] > t)

    def _relay_news(self, now: int) -> bool:
        """Tier 1: a neighbour's heartbeat changed, or a neighbour went silent or spoke again."""
        if not self._reporter or self.election.role is Role.COORDINATOR:
            return False
        return self._urgent or self._silent_neighbours(now) != self._silent_sent

    def _send_news(self, now: int) -> list[ClusterOutput]:
        """A reporter's news (a neighbour gone silent or back, a heartbeat changed) goes straight
        to the coordinator, not a tier per interval: a failure is rare, the coordinator's intake in
        steady state stays bounded, and the news is as late as a heartbeat of a small cluster."""
        self._urgent, self._silent_sent = False, self._silent_neighbours(now)
        to = self.election.following(now)
        if to is None or to == self.me:
            return []
        return [self._send(Digest(sender=self.me, term=self.election.term,
                                  entries=self._compact(self._reports(now), to, now), to=to))]

    def _send_digests(self, now: int) -> list[ClusterOutput]:
        """A digest per upward role: to the parent, or the coordinator this agent follows."""
        if not self.layout.enabled or self.election.role is Role.COORDINATOR:
            return []
        keep = self.lag_ms + self.config.detector.dead_timeout_ms
        self._digests = {h: d for h, d in self._digests.items() if now - d[0] <= keep}
        reports = self._reports(now)
        targets = {r.parent if r.parent is not None else self.election.following(now) for r in self._roles}
        self._sent = {to: sent for to, sent in self._sent.items() if to in targets}
        out: list[ClusterOutput] = []
        for role in self._roles:
            if role.tier == 1:
                if role.parent == self.me:
                    continue                    # taken up by this host's own aggregator role
                entries = reports
            else:
                entries = [replace(e, relay_age_ms=e.relay_age_ms + now - at)
                           for sender, (at, got) in sorted(self._digests.items())
                           if sender in self._children for e in got]
                if self._self_fed:
                    entries += reports
            to = role.parent if role.parent is not None else self.election.following(now)
            if to is not None and to != self.me and entries:
                out.append(self._send(Digest(sender=self.me, term=self.election.term,
                                             entries=self._compact(entries, to, now), to=to)))
        return out

    def _next_beat(self) -> int:
        self._beat_seq += 1
        return self._beat_seq

    def _maybe_stand(self, now: int, quorate: bool) -> list[ClusterOutput]:
        e = self.election
        if e.role is Role.COORDINATOR or e.lease_valid(now) or not quorate:
            return []
        if e.role is Role.CANDIDATE and now - e.started_ms < self.config.timing.election_timeout_ms:
            return []
        if e.started_ms >= 0 and now - e.started_ms < self.config.timing.election_timeout_ms:
            return []
        if self._preferred_candidate(now) != self.me:
            e.role = Role.FOLLOWER
            return []
        term = e.stand(now)
        return [self._send(VoteRequest(sender=self.me, term=term, accepted=self.accepted.key))]

    def _preferred_candidate(self, now: int) -> str:
        """The alive, quorate host with the newest state, then highest priority, then first name."""
        keys = {self.me: self.accepted.key}
        for peer, (at, beat) in self.beats.items():
            if (beat.quorate and now - at <= self._window(peer)
                    and self.detector.state(peer) is PeerState.ALIVE):
                keys[peer] = beat.accepted
        for peer, (_at, key) in self._candidates.items():   # candidates seen lately (large clusters)
            if peer != self.me and key > keys.get(peer, NO_KEY):
                keys[peer] = key
        hosts = sorted(keys)
        hosts.sort(key=lambda h: (keys[h], self.config.hosts[h].priority), reverse=True)
        return hosts[0]

    def _coordinate(self, now: int) -> list[ClusterOutput]:
        assert self.proposer is not None and self.coordinator is not None
        out: list[ClusterOutput] = []
        committed_before = self.proposer.committed.key
        # Followers start reporting to a new coordinator once its first heartbeat reaches them: plan
        # only when it has had the time to hear them (else it would place every VM on its neighbours).
        settled = now - self._coordinating_since >= self.config.timing.quorum_timeout_ms + self.lag_ms
        if not self.proposer.in_flight and settled:
            state, planned = self.coordinator.plan(self.proposer.committed, self._views(now), now)
            out += planned
            if state is not None:
                self.proposer.propose(state)
                self.accepted = state
                self._committed(self.proposer.committed)
                self._last_proposal_ms = -10**9
        if self.proposer.committed.key != committed_before:
            self._changed_ms = now
        proposal, committed = self.proposer.proposal, self.proposer.committed
        # Broadcast while in flight (and once more when it was committed at once, alone).
        if (self.proposer.in_flight or self._last_proposal_ms == -10**9) \
                and now - self._last_proposal_ms >= self.config.timing.heartbeat_ms:
            self._last_proposal_ms = self._changed_ms = now
            out.append(self._send(Proposal(sender=self.me, term=self.election.term,
                                           state=proposal, committed=committed)))
        # A host whose heartbeat, sent well after the last change, shows it behind: the state to it alone.
        t = self.config.timing
        grace = 3 * t.heartbeat_ms
        for host, (at, beat) in self.beats.items():
            if (at > self._changed_ms + grace and now - at <= self._window(host)
                    and (beat.accepted < proposal.key or beat.committed < committed.key)
                    and now - self._caught_up.get(host, -10**9) >= grace):
                self._caught_up[host] = now
                seen = self._acks_seen.get(host)
                out.append(self._send(Proposal(sender=self.me, term=self.election.term, state=proposal,
                                               committed=committed, to=host,
                                               confirmed={host: seen} if seen is not None else {})))
        return out

    def _views(self, now: int) -> dict[str, HostView]:
        fresh = {p: b for p, (at, b) in self.beats.items()
                 if now - at <= self._window(p) and self.detector.state(p) is PeerState.ALIVE}
        own = self._heartbeat(now, True)
        views = {self.me: HostView(name=self.me, alive=True, dead=False, beat=own)}
        for host in self.config.hosts:
            if host == self.me:
                continue
            dead = False
            if self.detector.state(host) is PeerState.DEAD:
                # A quorum must agree: this agent and fresh reporters that neither hear nor reach it.
                agree = {self.me} | {p for p, b in fresh.items() if host not in b.hears | b.reaches}
                dead = self.quorum.reached(agree)
            views[host] = HostView(name=host, alive=host in fresh, dead=dead, beat=fresh.get(host))
        return views

    def _watchdog(self, now: int) -> list[ClusterOutput]:
        nothing_here = not self.local_vms
        pet = (self.connected_quorate(now) or nothing_here) and not self.self_fenced
        was, self.petting = self.petting, pet
        if pet:
            return [PetWatchdog(id=self._id())]
        if was:
            why = "self-fencing: isolated" if self.self_fenced else "lost quorum with VMs running here"
            return [StopPettingWatchdog(id=self._id(), reason=why)]
        return []

    # ---- obeying the committed state -------------------------------------------------

    def _synced(self) -> bool:
        """The coordinator has an ack we sent since (re)joining: its committed state is current."""
        if self.election.role is Role.COORDINATOR:
            return True
        accepted, committed = self._confirm_need
        return (self._sync_seq is not None and self._confirmed >= (self.incarnation, self._sync_seq)
                and self.accepted.key >= accepted and self.committed.key >= committed)

    def _busy(self, vm: str) -> bool:
        return any(cmd.vm == vm for _at, cmd in self.commands.values())

    def _owned(self, state: ClusterState) -> list[str]:
        """The VMs `state` gives this host, sorted; computed once per state (20,000 VMs at scale)."""
        if self._owned_cache[0] != state.key:
            self._owned_cache = (state.key, state.owned_by(self.me))
        return self._owned_cache[1]

    def _vm_command(self, cmd: VmCommand) -> VmCommand:
        self.commands[cmd.id] = (self.now_ms, cmd)
        return cmd

    def _local_actions(self, now: int) -> list[ClusterOutput]:
        for cid, (at, _cmd) in list(self.commands.items()):
            if now - at > COMMAND_EXPIRY_MS:
                del self.commands[cid]
        state, term = self.committed, self.election.term
        # Orders only from a live coordinator of our term, and only once it has committed a state in
        # its own term: that state holds every decision committed before (a new coordinator's first
        # proposal is built on what it accepted), an older committed snapshot may not.
        if self.election.following(now) is None or state.term != self.election.term:
            return []
        out: list[VmCommand] = []
        for vm in sorted(self.migration_reports):   # reported until the record is gone
            report, mig = self.migration_reports[vm], state.migrations.get(vm)
            if mig is None or (mig.generation, mig.target) != (report.generation, report.target):
                del self.migration_reports[vm]
        mine = self._owned(state)
        for vm in sorted((self.failed_vms | set(self.restarts)) - set(mine)):
            self.failed_vms.discard(vm)
            self.restarts.pop(vm, None)
        for vm, qemu in sorted(self.local_vms.items()):
            if self._busy(vm):
                continue
            rec, mig = state.vms.get(vm), state.migrations.get(vm)
            owner = rec.owner if rec is not None else None
            if state.kills.get(vm) == self.me:
                out.append(KillVm(id=self._id(), vm=vm, term=term, reason="ordered: stray copy"))
            elif qemu == "inmigrate" and (mig is None or mig.target != self.me) \
                    and now - self.local_seen_ms.get(vm, now) >= INMIGRATE_GRACE_MS:
                out.append(KillVm(id=self._id(), vm=vm, term=term, reason=INCOMING_UNWANTED))
            elif qemu == "postmigrate" and owner != self.me:
                out.append(StopVm(id=self._id(), vm=vm, term=term, reason=MOVED_AWAY))
            elif qemu == "running" and owner == self.me and rec is not None and rec.desired == "stopped":
                out.append(StopVm(id=self._id(), vm=vm, term=term, reason="desired stopped"))
            elif qemu == "running" and mig is not None and mig.source == self.me and rec is not None \
                    and rec.generation == mig.generation and vm not in self.migration_reports \
                    and self._synced() and self.accepted.migrations.get(vm) == mig:
                out.append(MigrateVm(id=self._id(), vm=vm, target=mig.target, generation=mig.generation,
                                     term=term))
        may_start = (self.petting and self.connected_quorate(now) and not state.host(self.me).fenced
                     and self._synced())
        for vm in mine if may_start else []:
            grant = state.vms[vm]
            if (grant.owner == self.me and grant.desired == "running"
                    and self.accepted.vms.get(vm) == grant      # no change to it under way
                    # A move in flight may have switched over already: the guest may run on the
                    # target while this host, rebooted since, no longer has a copy.
                    and vm not in state.migrations and vm not in self.accepted.migrations
                    and vm not in self.local_vms and vm not in self.failed_vms and not self._busy(vm)):
                out.append(StartVm(id=self._id(), vm=vm, generation=grant.generation, term=term))
        return [self._vm_command(cmd) for cmd in out]

    # ---- views ----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.election.role

    @property
    def term(self) -> int:
        return self.election.term

    def fence_commands(self) -> list[str]:
        return self.coordinator.fencing.pending() if self.coordinator is not None else []
