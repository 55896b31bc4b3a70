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
heard for up to a heartbeat interval, which `lag_ms` bounds (agent.py shows where it
enters the windows; docs/cluster-design.md, Relays, why the margins still hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
