"""Who tells the coordinator about whom: ring neighbours and the relay tiers.

A host hears its ring neighbours (the hosts sorted by name form a ring; fanout/2 on
either side).  A cluster of at most fanout + 1 hosts is a full mesh and every follower
also sends its heartbeat to the coordinator.  A larger cluster relays instead, so that
nobody, the coordinator included, receives more than a bounded number of messages:

- tier 1, the reporters: the hosts at even ring positions (and the last one when that
  makes their number even).  A reporter already hears its neighbours, so it reports them
  and itself at no extra message received; every host has two reporters at least (an
  odd position both of its adjacent even ones).
- two halves: the reporters alternate between them, so a host's two reporters go up
  disjoint paths.  Each half has its own aggregators: no host holds two slots, and none
  is a reporter of the other half, so one host lost leaves every other host a path.
- tiers 2.., the aggregators: each takes the digests of at most `fanin` hosts of the
  tier below (slot `i` sends to slot `i mod n` of the next tier) and sends one digest up;
  the last tier, one aggregator per half, sends to the coordinator.

At 1,000 hosts with fanin 4: 500 reporters, then 126, 32, 8 and 2 aggregators.  An
aggregator receives its 4 neighbours, the coordinator and 4 digests per heartbeat; the
coordinator its neighbours and 2 digests.  The price is delay: each tier holds what it
heard for up to a heartbeat interval, which `lag_ms` bounds (member.py shows where it
enters the windows; docs/cluster-design.md, Relays, why the margins still hold).

`RelayHops` is one host's side of it: what it reports and forwards up, what it took from
below, and which heartbeat contents each hop already has (compact entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from haguard.core.cluster.proof import ProofCheck
from haguard.core.cluster.types import Heartbeat, RelayEntry

RELAY_REFRESH_MS = 5_000            # a relayed heartbeat's content is sent again at least this often
Heard = tuple[int, Heartbeat]       # (received at, heartbeat)


def ring_neighbours(hosts: list[str], me: str, fanout: int) -> frozenset[str]:
    """`me`'s neighbours on the ring of sorted host names: fanout/2 (rounded up) each side."""
    ring = sorted(hosts)
    if len(ring) - 1 <= fanout or me not in ring:
        return frozenset(h for h in ring if h != me)
    return _around(ring, ring.index(me), fanout)


def _around(ring: list[str] | tuple[str, ...], i: int, fanout: int) -> frozenset[str]:
    half = (fanout + 1) // 2
    return frozenset(ring[(i + d) % len(ring)] for d in range(-half, half + 1) if d != 0)


@dataclass(frozen=True)
class Role:
    """One upward duty of a host: what it sends and to whom (None: the coordinator)."""

    tier: int                   # 1: reports its ring neighbourhood; 2..: forwards digests
    parent: str | None


@dataclass(frozen=True)
class RelayLayout:
    hosts: tuple[str, ...]
    tiers: tuple[tuple[str, ...], ...] = ()
    roles: dict[str, tuple[Role, ...]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    def roles_of(self, host: str) -> tuple[Role, ...]:
        return self.roles.get(host, ())

    def lag_ms(self, heartbeat_ms: int) -> int:
        """How late relayed news may be: a heartbeat interval per tier, one for the heartbeat
        itself and one for a lost digest.  0 without relays."""
        return (len(self.tiers) + 2) * heartbeat_ms if self.tiers else 0


def relay_layout(hosts: list[str], fanout: int, fanin: int) -> RelayLayout:
    ring = tuple(sorted(hosts))
    if len(ring) - 1 <= fanout:
        return RelayLayout(hosts=ring)
    if fanin < 2:
        raise ValueError("relay_fanin must be at least 2")
    reporters = list(ring[0::2])
    if len(ring) % 2 == 0 and len(reporters) % 2:
        reporters.append(ring[-1])          # an even cycle of reporters: alternate halves all round
    # Two halves, alternate reporters, disjoint aggregators: a host's reporters are adjacent, so
    # it goes up both halves, and no single aggregator lost cuts it off.
    halves = [_tiers(reporters[k::2], ring, fanin, 1, k) for k in (0, 1)]
    used: set[str] = set()
    depth = max(len(h) for h in halves)
    tiers: list[list[str]] = [[] for _ in range(depth)]
    roles: dict[str, list[Role]] = {}
    position = {h: i for i, h in enumerate(ring)}
    for k, half in enumerate(halves):
        # Aggregators: distinct hosts across both halves, and none a reporter of the other half
        # (else a host whose reporters are on both sides could lose both paths with it).
        barred = used | set(halves[1 - k][0])
        for t, tier in enumerate(half):
            if t:
                for i, host in enumerate(tier):
                    pos = position[host]
                    while ring[pos % len(ring)] in barred:
                        pos += 1
                    tier[i] = ring[pos % len(ring)]
                    used.add(tier[i])
                    barred.add(tier[i])
        for t, tier in enumerate(half):
            above = half[t + 1] if t + 1 < len(half) else None
            for i, host in enumerate(tier):
                parent = above[i % len(above)] if above is not None else None
                roles.setdefault(host, []).append(Role(tier=t + 1, parent=parent))
            tiers[t] += tier
    return RelayLayout(hosts=ring, tiers=tuple(tuple(t) for t in tiers),
                       roles={h: tuple(r) for h, r in roles.items()})


def _tiers(reporters: list[str], ring: tuple[str, ...], fanin: int, top: int,
           offset: int) -> list[list[str]]:
    """One half: its reporters, then aggregator tiers until at most `top` slots remain (placed
    spread around the ring; made distinct by the caller)."""
    tiers = [list(reporters)]
    while len(tiers[-1]) > top:
        slots = math.ceil(len(tiers[-1]) / fanin)
        tiers.append([ring[((2 * i + offset) * len(ring)) // (2 * slots) + len(tiers) % len(ring)]
                      for i in range(slots)])
    return tiers


def reported_by(layout: RelayLayout, fanout: int) -> dict[str, frozenset[str]]:
    """host -> the reporters that may relay its heartbeat (itself and neighbours at tier 1)."""
    out: dict[str, set[str]] = {h: set() for h in layout.hosts}
    for i, reporter in enumerate(layout.hosts):
        if any(r.tier == 1 for r in layout.roles_of(reporter)):
            for host in _around(layout.hosts, i, fanout) | {reporter}:
                out[host].add(reporter)
    return {h: frozenset(r) for h, r in out.items()}


def news_of(beat: Heartbeat) -> tuple[object, ...]:
    """What in a host's heartbeat the coordinator must learn at once (its VMs and moves, its
    requests); the rest (keys, terms) reaches it in acks or the next digests, and changes on
    every host at every commit: at once, that would be a burst of news from every reporter."""
    return (beat.incarnation, beat.vms, beat.failed_vms, beat.migrations, beat.requests, beat.moves,
            beat.degraded)


class RelayHops:
    """One host's relay duties and hop state (a cluster larger than a full mesh).

    Up: as a reporter, its own heartbeat and its neighbours' latest; as an aggregator, the
    digests its children sent.  A heartbeat travels whole on a hop only when its content
    changed there or every RELAY_REFRESH_MS; otherwise its number and the number of its
    content's first heartbeat (`since`), which the receiver resolves from what it holds.
    """

    def __init__(self, layout: RelayLayout, me: str, neighbours: frozenset[str], fanout: int,
                 suspect_timeout_ms: int, proofs: ProofCheck | None = None) -> None:
        self.layout = layout
        self.me = me
        self.neighbours = neighbours
        self.suspect_timeout_ms = suspect_timeout_ms
        self.proofs = proofs if proofs is not None else ProofCheck({})   # relayed heartbeats' signatures
        self.refused_digests = 0                    # from a sender the layout does not send here
        self.roles = layout.roles_of(me)
        self.reporter = any(r.tier == 1 for r in self.roles)
        # A reporter whose own aggregator slot takes its reports (they go up in that digest).
        self._self_fed = any(r.tier == 1 and r.parent == me for r in self.roles)
        self._reported_by = reported_by(layout, fanout) if layout.enabled else {}
        self._children = frozenset(h for h, roles in layout.roles.items()
                                   for r in roles if r.parent == me and h != me)
        # Who may send a digest to the coordinator: the top aggregators, and any reporter (news).
        self._to_coordinator = frozenset(h for h, roles in layout.roles.items()
                                         for r in roles if r.parent is None or r.tier == 1)
        # Digests taken, per sender: (when it was sent, by our clock: see relay_transit_ms; entries).
        # (sender, part) -> (received at, entries): a large digest comes in several parts.
        self._digests: dict[tuple[str, int], tuple[int, tuple[RelayEntry, ...]]] = {}
        self._silent_sent: frozenset[str] = frozenset()     # neighbours last reported silent
        self._urgent = False                                # news for the coordinator, not yet sent
        self._own_beat: Heard | None = None
        # The first heartbeat number of each content, per host heard (tier 1) ...
        self._since: dict[str, int] = {}
        # ... what content each hop received per (host, reporter), and sent per parent.
        self._contents: dict[tuple[str, str], Heard] = {}
        self._sent: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}   # to -> key -> (since, at)

    # ---- tier 1: what this reporter hears ------------------------------------------------

    def heard(self, beat: Heartbeat, previous: Heartbeat | None) -> None:
        """A neighbour's direct heartbeat: a new content starts its `since`; news goes up at once."""
        if not self.reporter or beat.sender not in self.neighbours or beat.coordinator:
            return
        if previous is None or previous != beat or beat.sender not in self._since:
            self._since[beat.sender] = beat.seq
        if previous is None or news_of(previous) != news_of(beat):
            self._urgent = True

    def sent_own(self, now: int, beat: Heartbeat) -> None:
        if self._own_beat is None or self._own_beat[1] != beat:
            self._since[self.me] = beat.seq
        self._own_beat = (now, beat)

    def reports(self, now: int, beats: Mapping[str, Heard]) -> list[RelayEntry]:
        """Tier 1: this host's own heartbeat and its neighbours' latest, with their ages."""
        if not self.reporter:
            return []
        heard = [self._own_beat] if self._own_beat is not None else []
        heard += [got for host in sorted(self.neighbours) if (got := beats.get(host)) is not None
                  and not got[1].coordinator]
        return [RelayEntry(host=beat.sender, reporter=self.me, incarnation=beat.incarnation,
                           seq=beat.seq, since=self._since.get(beat.sender, beat.seq),
                           heard_age_ms=now - at, relay_age_ms=0, beat=beat)
                for at, beat in heard]

    def _silent(self, now: int, beats: Mapping[str, Heard]) -> frozenset[str]:
        t = self.suspect_timeout_ms
        return frozenset(h for h in self.neighbours if h in beats and now - beats[h][0] > t)

    def has_news(self, now: int, beats: Mapping[str, Heard]) -> bool:
        """A neighbour's heartbeat changed, or a neighbour went silent or spoke again."""
        return self.reporter and (self._urgent or self._silent(now, beats) != self._silent_sent)

    def news(self, now: int, beats: Mapping[str, Heard], to: str | None) -> tuple[RelayEntry, ...] | None:
        """A reporter's news goes straight to the coordinator, not a tier per interval: a failure
        is rare, the coordinator's intake in steady state stays bounded, and the news is as late
        as a heartbeat of a small cluster.  None: nobody to send it to."""
        self._urgent, self._silent_sent = False, self._silent(now, beats)
        if to is None or to == self.me:
            return None
        return self._compact(self.reports(now, beats), to, now)

    # ---- up the tiers -----------------------------------------------------------------------

    def digests(self, now: int, beats: Mapping[str, Heard], following: str | None,
                keep_ms: int) -> list[tuple[str, tuple[RelayEntry, ...]]]:
        """A digest per upward role: (to, entries), to the parent or the coordinator followed."""
        if not self.layout.enabled:
            return []
        self._digests = {h: d for h, d in self._digests.items() if now - d[0] <= keep_ms}
        reports = self.reports(now, beats)
        targets = {r.parent if r.parent is not None else following for r in self.roles}
        self._sent = {to: sent for to, sent in self._sent.items() if to in targets}
        out = []
        for role in self.roles:
            if role.tier == 1:
                if role.parent == self.me:
                    continue                    # taken up by this host's own aggregator role
                entries = reports
            else:
                entries = [replace(e, relay_age_ms=e.relay_age_ms + now - at)
                           for (sender, _part), (at, got) in sorted(self._digests.items())
                           if sender in self._children for e in got]
                if self._self_fed:
                    entries += reports
            to = role.parent if role.parent is not None else following
            if to is not None and to != self.me and entries:
                out.append((to, self._compact(entries, to, now)))
        return out

    def take(self, sender: str, entries: tuple[RelayEntry, ...], sent: int,
             part: int = 0, *, coordinating: bool = False) -> tuple[RelayEntry, ...]:
        """A digest received (`sent`: when it left its last hop): its entries with their
        heartbeats, only those of a reporter's own neighbourhood as the layout has it, and
        only from a sender the layout sends here (a child; for the coordinator, a top
        aggregator or a reporter's news)."""
        if not self.layout.enabled:
            return ()
        if sender not in self._children and not (coordinating and sender in self._to_coordinator):
            self.refused_digests += 1
            return ()
        full = tuple(whole for e in entries
                     if e.reporter in self._reported_by.get(e.host, ())
                     and e.heard_age_ms >= 0 and e.relay_age_ms >= 0
                     and (whole := self._expand(e)) is not None)
        self._digests[(sender, part)] = (sent, full)
        return full

    def _expand(self, e: RelayEntry) -> RelayEntry | None:
        """The entry with its heartbeat: the one it carries, or the one received before with the
        same content (None: not received, or another content; it comes again within the refresh)."""
        key = (e.host, e.reporter)
        if e.beat is not None:
            beat = e.beat
            if beat.sender != e.host or beat.incarnation != e.incarnation or not self.proofs.trusted(beat):
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
