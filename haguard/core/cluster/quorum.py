"""Votes by weight: a strict majority of the total configured weight.

Never a majority of the hosts currently seen: the smaller side of a partition can
never decide, whatever it sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class Quorum:
    def __init__(self, weights: Mapping[str, int]) -> None:
        if any(w < 0 for w in weights.values()):
            raise ValueError("host weights must not be negative")
        self.weights = dict(weights)
        self.total = sum(self.weights.values())
        if self.total <= 0:
            raise ValueError("the cluster needs some voting weight")
        self._ones = frozenset(self.weights) if all(w == 1 for w in self.weights.values()) else None

    def weight(self, hosts: Iterable[str]) -> int:
        if self._ones is not None:              # every vote weighs 1 (the usual case): a count
            return len(self._ones.intersection(hosts))
        return sum(self.weights.get(h, 0) for h in set(hosts))

    def reached(self, hosts: Iterable[str]) -> bool:
        """True when `hosts` hold strictly more than half of all configured weight."""
        return 2 * self.weight(hosts) > self.total
