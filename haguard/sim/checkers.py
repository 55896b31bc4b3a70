"""The invariants of docs/cluster-design.md, checked by the world after every step.

The checker sees the world's truth (which QEMUs run where, which hosts are off and
why, every message published) and the agents' public views; it never steers them.

1 no VM runs on two hosts at once
2 no VM of a host is started elsewhere before that host is fenced (fence device
  off, or its watchdog deadline passed) or the copy there is confirmed gone
3 no decision without quorum: every committed state was accepted by a majority;
  at most one coordinator per term, each elected by a majority
4 no command of an older term obeyed: a start names the owner and generation of the
  newest committed state; a move is in it; a fence comes from the newest term that
  elected a coordinator; an agent's commands never go back in term
5 liveness: once faults stop, every VM runs exactly once within a bound

What the checker reads of the world is spelled out below (`WorldView` and the views it
holds), so the checker depends on that and not on world.py: the world imports the
checker, never the other way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.state import ClusterState, StateKey
from haguard.core.cluster.types import (
    Ack,
    FenceHost,
    Message,
    MigrateVm,
    Proposal,
    StartVm,
    StatePart,
    VoteGranted,
)
from haguard.errors import HaguardError

# ---- what the checker reads of the world (read-only, so the world's own types fit) ----------


class AgentView(Protocol):
    """A host's cluster core, as the checker sees it."""

    @property
    def committed(self) -> ClusterState: ...


class HostView(Protocol):
    """A simulated host: the truth of its QEMUs and of its power."""

    @property
    def vms(self) -> Mapping[str, str]: ...              # VM -> its QEMU's state ("running", ...)

    @property
    def agent(self) -> AgentView | None: ...             # None while the host is off

    @property
    def last_pet_ms(self) -> int: ...                    # its last watchdog pet

    @property
    def watchdog_ms(self) -> int: ...                    # its device's real timeout

    @property
    def fenced_ms(self) -> int: ...                      # last time a fence device turned it off


class TimingView(Protocol):
    @property
    def watchdog_timeout_ms(self) -> int: ...


class WorldView(Protocol):
    @property
    def hosts(self) -> Mapping[str, HostView]: ...

    @property
    def timing(self) -> TimingView: ...

    @property
    def vm_names(self) -> Sequence[str]: ...

# Ways a VM's copy ends that make starting it elsewhere safe by themselves.
SAFE_ENDS = frozenset({"stopped", "killed", "qemu-crash", "hang-killed", "fenced", "watchdog", "migrated"})


class Violation(HaguardError):
    def __init__(self, invariant: int, message: str, now_ms: int) -> None:
        super().__init__(f"invariant {invariant} at {now_ms} ms: {message}")
        self.invariant = invariant
        self.now_ms = now_ms


@dataclass
class LastRun:
    host: str
    ended: str | None = None          # None while running
    ended_ms: int = 0
    last_pet_ms: int = 0              # the host's last watchdog pet when the copy ended


class Checker:
    def __init__(self, world: WorldView, quorum: Quorum) -> None:
        self.world = world
        self.quorum = quorum
        self.acks: dict[StateKey, set[str]] = {}
        self.grants: dict[int, set[str]] = {}
        self.coordinators: dict[int, str] = {}
        self.checked: set[StateKey] = {(0, 0)}
        self.newest = ClusterState()
        self.last_run: dict[str, LastRun] = {}
        self.last_term: dict[str, int] = {}        # host -> highest term in its commands
        self._observed: dict[str, ClusterState] = {}

    # ---- bookkeeping from the world -------------------------------------------------

    def published(self, msg: Message, now: int) -> None:
        match msg:
            case Ack(sender=sender, accepted=key):
                self.acks.setdefault(key, set()).add(sender)
            case VoteGranted(sender=sender, term=term, to=candidate):
                self.grants.setdefault(term, {candidate}).add(sender)
            case Proposal(sender=sender, term=term, state=ClusterState(key=key)) | StatePart(
                    sender=sender, term=term, key=key):
                self.acks.setdefault(key, set()).add(sender)
                first = self.coordinators.setdefault(term, sender)
                if first != sender:
                    raise Violation(3, f"two coordinators in term {term}: {first} and {sender}", now)
                if not self.quorum.reached(self.grants.get(term, {sender})):
                    raise Violation(3, f"{sender} coordinates term {term} with grants of "
                                       f"{sorted(self.grants.get(term, {sender}))} only", now)
            case _:
                pass

    def vm_started(self, vm: str, host: str) -> None:
        self.last_run[vm] = LastRun(host=host)

    def vm_ended(self, vm: str, host: str, how: str, now: int) -> None:
        run = self.last_run.get(vm)
        if run is not None and run.host == host and run.ended is None:
            run.ended, run.ended_ms = how, now
            run.last_pet_ms = self.world.hosts[host].last_pet_ms

    # ---- commands -------------------------------------------------------------------

    def command(self, host: str, cmd: StartVm | MigrateVm, agent_term: int, now: int) -> None:
        if cmd.term < self.last_term.get(host, 0):
            raise Violation(4, f"{host} issued {cmd} after a command of term {self.last_term[host]}", now)
        self.last_term[host] = cmd.term
        if cmd.term > agent_term:
            raise Violation(4, f"{host} issued {cmd} beyond its term {agent_term}", now)
        rec = self.newest.vms.get(cmd.vm)
        match cmd:
            case StartVm():
                if rec is None or (rec.owner, rec.generation) != (host, cmd.generation):
                    raise Violation(4, f"{host} starts {cmd.vm} generation {cmd.generation}, but the newest "
                                       f"committed state {self.newest.key} says {rec}", now)
                self._fenced_first(cmd.vm, host, now)
            case MigrateVm():
                mig = self.newest.migrations.get(cmd.vm)
                if mig is None or (mig.source, mig.target, mig.generation) != (host, cmd.target,
                                                                              cmd.generation):
                    raise Violation(4, f"{host} moves {cmd.vm} to {cmd.target}, but the newest committed "
                                       f"state {self.newest.key} has {mig}", now)

    def fence(self, host: str, cmd: FenceHost, is_coordinator: bool, quorate: bool, now: int) -> None:
        """A fence is a decision: by a coordinator holding quorum, of the newest term elected."""
        if not (is_coordinator and quorate):
            raise Violation(3, f"{host} fences {cmd.host} without coordinating with quorum", now)
        newest_term = max(self.coordinators, default=0)
        if cmd.term < newest_term:
            raise Violation(4, f"{host} fences {cmd.host} in term {cmd.term}; term {newest_term} has "
                               f"coordinator {self.coordinators[newest_term]}", now)

    def _fenced_first(self, vm: str, host: str, now: int) -> None:
        run = self.last_run.get(vm)
        if run is None or run.host == host:
            return
        if run.ended is None:
            raise Violation(1, f"{vm} started on {host} while running on {run.host}", now)
        if run.ended in SAFE_ENDS:
            return
        old = self.world.hosts[run.host]
        deadline = run.last_pet_ms + old.watchdog_ms
        if old.fenced_ms >= run.ended_ms or now >= deadline:
            return
        raise Violation(2, f"{vm} started on {host} after its copy on {run.host} ended by {run.ended} at "
                           f"{run.ended_ms} ms; {run.host} not fenced and its watchdog deadline is "
                           f"{deadline} ms", now)

    # ---- after every step -----------------------------------------------------------

    def after_step(self, now: int) -> None:
        where: dict[str, str] = {}
        for name, host in self.world.hosts.items():
            for vm, qemu in host.vms.items():
                if qemu != "running":
                    continue
                if vm in where:
                    raise Violation(1, f"{vm} runs on {where[vm]} and {name}", now)
                where[vm] = name
            if host.agent is not None and self._observed.get(name) is not host.agent.committed:
                self.observe(name, host.agent.committed, now)

    def observe(self, host: str, committed: ClusterState, now: int) -> None:
        if self._observed.get(host) is committed:
            return                                  # checked already (after every event: cheap)
        self._observed[host] = committed
        if committed.key not in self.checked:
            backers = self.acks.get(committed.key, set())
            if not self.quorum.reached(backers):
                raise Violation(3, f"{host} holds committed state {committed.key} accepted only by "
                                   f"{sorted(backers)}", now)
            self.checked.add(committed.key)
        if committed.key > self.newest.key:
            self.newest = committed

    def all_running(self) -> bool:
        """Liveness: every VM runs on exactly one host."""
        count: dict[str, int] = {}
        for host in self.world.hosts.values():
            for vm, qemu in host.vms.items():
                if qemu == "running":
                    count[vm] = count.get(vm, 0) + 1
        return all(count.get(vm) == 1 for vm in self.world.vm_names)
