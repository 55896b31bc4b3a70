"""The versioned cluster state and its commitment by acks.

Only the coordinator writes it.  A state is identified by its key `(term, version)`:
the term of the coordinator that wrote it, then its version (versions only grow).
Comparing keys is Raft's log comparison: a voter grants only to a candidate whose
key is at least its own, so a new coordinator always holds every committed state.
A state is committed once hosts holding a majority of the weight have accepted it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from haguard.core.cluster.quorum import Quorum

StateKey = tuple[int, int]          # (term, version)
Desired = Literal["running", "stopped"]


@dataclass(frozen=True, kw_only=True)
class VmRecord:
    owner: str | None               # None: not placed (no host had room)
    generation: int = 0
    desired: Desired = "running"


@dataclass(frozen=True, kw_only=True)
class HostRecord:
    maintenance: bool = False
    fenced: bool = False            # powered off or reset; must rejoin without VMs
    # The watchdog timeout the host's device confirmed (WDIOC_SETTIMEOUT, read back), in ms;
    # 0: none confirmed, so a deadline is no fence for it.  Never lowered while it holds VMs.
    watchdog_ms: int = 0
    # It may still hold a state of the cluster in maintenance, and so pet its watchdog whatever
    # its quorum: its deadline is no fence (paused.py).  Cleared once it reports a later state.
    paused: bool = False


@dataclass(frozen=True, kw_only=True)
class ClusterRecord:
    """Cluster-wide settings the operators change at run time."""

    paused: bool = False            # `haguard maintenance on`: nothing started, stopped, moved or fenced
    resumed_at: tuple[int, int] = (0, 0)    # the key of the state that last turned maintenance off


@dataclass(frozen=True, kw_only=True)
class MigrationRecord:
    source: str
    target: str
    generation: int                 # the generation being moved


@dataclass(frozen=True, kw_only=True)
class ClusterState:
    term: int = 0
    version: int = 0
    vms: Mapping[str, VmRecord] = field(default_factory=dict)
    hosts: Mapping[str, HostRecord] = field(default_factory=dict)
    migrations: Mapping[str, MigrationRecord] = field(default_factory=dict)
    kills: Mapping[str, str] = field(default_factory=dict)   # vm -> host whose stray copy must go
    cluster: ClusterRecord = ClusterRecord()

    @cached_property
    def key(self) -> StateKey:          # read on every step: computed once (not a field)
        return (self.term, self.version)

    def host(self, name: str) -> HostRecord:
        return self.hosts.get(name, HostRecord())

    def owned_by(self, host: str) -> list[str]:
        return sorted(vm for vm, rec in self.vms.items() if rec.owner == host)


def initial_state(vms: list[str], hosts: list[str]) -> ClusterState:
    unplaced, host = VmRecord(owner=None), HostRecord()        # frozen: shared
    return ClusterState(vms=dict.fromkeys(vms, unplaced), hosts=dict.fromkeys(hosts, host))


class Proposer:
    """The coordinator's side: one proposal in flight at a time, committed by acks."""

    def __init__(self, quorum: Quorum, me: str, committed: ClusterState, proposal: ClusterState) -> None:
        self.quorum = quorum
        self.me = me
        self.committed = committed
        self.proposal = proposal
        self.acks: set[str] = {me}
        self._maybe_commit()

    @property
    def in_flight(self) -> bool:
        return self.proposal.key != self.committed.key

    def propose(self, state: ClusterState) -> None:
        if self.in_flight:
            raise ValueError("a proposal is already in flight")
        if state.key <= self.committed.key:
            raise ValueError("a proposal must have a newer key than the committed state")
        self.proposal, self.acks = state, {self.me}
        self._maybe_commit()

    def ack(self, host: str, key: StateKey) -> bool:
        """Record an ack; True when it committed the proposal."""
        if key != self.proposal.key or not self.in_flight:
            return False
        self.acks.add(host)
        return self._maybe_commit()

    def _maybe_commit(self) -> bool:
        if self.in_flight and self.quorum.reached(self.acks):
            self.committed = self.proposal
            return True
        return False
