"""Terms, votes and the coordinator lease (Raft's election rule, with leader stickiness).

Each agent grants at most one vote per term; the vote is persisted before the grant
is sent (the agent emits `PersistState` ahead of the `Send`).  A voter that still
follows a live coordinator refuses to vote, so a host that merely lost sight of the
coordinator cannot depose it; unless the candidate says that coordinator handed over to it
(Raft's leadership transfer: a clean stop).
"""

from __future__ import annotations

from enum import StrEnum

from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.state import StateKey


class Role(StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    COORDINATOR = "coordinator"


class Election:
    def __init__(self, me: str, quorum: Quorum, lease_ms: int, *, term: int = 0,
                 voted_for: str | None = None) -> None:
        self.me = me
        self.quorum = quorum
        self.lease_ms = lease_ms
        self.term = term
        self.voted_for = voted_for
        self.role = Role.FOLLOWER
        self.coordinator: str | None = None      # followed in `term`
        self.lease_until_ms = -1
        self.following_since_ms = -1             # start of the current unbroken lease
        self.grants: set[str] = set()
        self.started_ms = -1                     # when this agent last stood

    def observe_term(self, term: int) -> bool:
        """A higher term seen anywhere: follow nobody until its coordinator speaks."""
        if term <= self.term:
            return False
        self.term, self.voted_for = term, None
        self.role, self.coordinator, self.lease_until_ms = Role.FOLLOWER, None, -1
        self.grants = set()
        return True

    def lease_valid(self, now_ms: int) -> bool:
        return self.coordinator is not None and now_ms <= self.lease_until_ms

    def following(self, now_ms: int) -> str | None:
        """The coordinator of the current term while its lease holds (possibly this agent)."""
        if self.role is Role.COORDINATOR:
            return self.me
        return self.coordinator if self.lease_valid(now_ms) else None

    def should_grant(self, candidate: str, term: int, candidate_key: StateKey, my_key: StateKey,
                     candidate_alive: bool, now_ms: int, *, handover: bool = False) -> tuple[bool, str]:
        if term < self.term:
            return False, f"term {term} is older than {self.term}"
        if term == self.term and self.voted_for not in (None, candidate):
            return False, f"already voted for {self.voted_for} in term {term}"
        # A handover (the coordinator named the candidate) needs no lapsed lease: stickiness
        # only keeps a host that lost sight of a live coordinator from deposing it.
        if self.role is Role.COORDINATOR or (self.lease_valid(now_ms) and self.coordinator != candidate
                                             and not handover):
            return False, f"still following {self.following(now_ms)}"
        if not candidate_alive:
            return False, "candidate not alive here"
        if candidate_key < my_key:
            return False, f"candidate state {candidate_key} older than {my_key}"
        return True, "granted"

    def grant(self, candidate: str, term: int) -> None:
        self.observe_term(term)
        self.voted_for = candidate

    def stand(self, now_ms: int) -> int:
        """Become candidate for the next term, voting for itself."""
        self.observe_term(self.term + 1)
        self.voted_for, self.role = self.me, Role.CANDIDATE
        self.grants, self.started_ms = {self.me}, now_ms
        return self.term

    def granted(self, voter: str, term: int) -> bool:
        """Count a grant; True when it made this agent coordinator."""
        if self.role is not Role.CANDIDATE or term != self.term:
            return False
        self.grants.add(voter)
        if self.quorum.reached(self.grants):
            self.role, self.coordinator = Role.COORDINATOR, self.me
            return True
        return False

    def follow(self, coordinator: str, term: int, now_ms: int) -> None:
        self.observe_term(term)
        if term == self.term and self.role is not Role.COORDINATOR:
            if not self.lease_valid(now_ms) or self.coordinator != coordinator:
                self.following_since_ms = now_ms
            self.role, self.coordinator = Role.FOLLOWER, coordinator
            self.lease_until_ms = now_ms + self.lease_ms

    def step_down(self) -> None:
        self.role, self.coordinator, self.lease_until_ms = Role.FOLLOWER, None, -1
