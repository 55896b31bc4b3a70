"""The cluster core stepped directly: quorum, votes, commitment, the agent's rules, fencing."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

import haguard.core.cluster as cluster_pkg
from haguard.core.alerts import RaiseAlert
from haguard.core.cluster.coordinator import Coordinator, HostView
from haguard.core.cluster.election import Election, Role
from haguard.core.cluster.member import ClusterMember
from haguard.core.cluster.placement import VmSpec
from haguard.core.cluster.quorum import Quorum
from haguard.core.cluster.recovery import Fencing
from haguard.core.cluster.relay import RELAY_REFRESH_MS, relay_layout, ring_neighbours
from haguard.core.cluster.state import ClusterState, HostRecord, Proposer, VmRecord, initial_state
from haguard.core.cluster.types import (
    Ack,
    ClusterTiming,
    CommandFinished,
    CoreConfig,
    Digest,
    FenceHost,
    Heartbeat,
    HostSpec,
    KillVm,
    LocalVmsObserved,
    MessageReceived,
    PersistedState,
    PersistState,
    PetWatchdog,
    PlacementDecided,
    Proposal,
    RelayEntry,
    Send,
    StartVm,
    StopPettingWatchdog,
    StopVm,
    VoteGranted,
    VoteRequest,
    WatchdogConfirmed,
)
from haguard.core.detector import BrokerConnectionChanged

HOSTS = {n: HostSpec(name=n, memory_mib=8192, vcpus=8, fence_device=True) for n in ("h1", "h2", "h3")}
VMS = {"vm1": VmSpec(name="vm1", memory_mib=1024, vcpus=1)}


def config(me: str = "h1", **kw: object) -> CoreConfig:
    return CoreConfig(me=me, hosts=HOSTS, vms=VMS, **kw)  # type: ignore[arg-type]


WATCHDOG_MS = ClusterTiming().watchdog_timeout_ms     # the configured timeout


def beat(sender: str, *, hears: frozenset[str] = frozenset({"h1", "h2", "h3"}), term: int = 0,
         vms: dict[str, str] | None = None, accepted: tuple[int, int] = (0, 0),
         watchdog_ms: int = WATCHDOG_MS) -> Heartbeat:
    return Heartbeat(sender=sender, incarnation=1, term=term, hears=hears - {sender}, reaches=frozenset(),
                     accepted=accepted, quorate=True, vms=vms or {},  # type: ignore[arg-type]
                     watchdog_ms=watchdog_ms)


def hear_all(agent: ClusterMember, now: int, **kw: object) -> None:
    for peer in ("h1", "h2", "h3"):
        if peer != agent.me:
            agent.step(MessageReceived(message=beat(peer, **kw), now_ms=now))  # type: ignore[arg-type]


def connected(agent: ClusterMember, now: int = 0) -> None:
    agent.step(BrokerConnectionChanged(connected=True, now_ms=now))


# ---- purity ---------------------------------------------------------------------------

def test_the_core_imports_no_io_clock_or_global_randomness() -> None:
    forbidden = {"asyncio", "time", "random", "socket", "threading", "haguard.adapters", "haguard.agent",
                 "haguard.sim"}
    # The whole sans-IO core, not only the cluster package.
    for path in Path(cluster_pkg.__file__).parent.parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                bad = any(name == f or name.startswith(f + ".") for f in forbidden)
                assert not bad, f"{path.name}: {name}"


# ---- quorum, votes, commitment --------------------------------------------------------

def test_quorum_is_a_strict_majority_of_all_configured_weight() -> None:
    q = Quorum({"a": 1, "b": 1, "c": 1, "d": 1})
    assert not q.reached({"a", "b"}), "half is not a majority"
    assert q.reached({"a", "b", "c"})
    assert not q.reached({"a", "x", "y"}), "unknown hosts carry no weight"
    heavy = Quorum({"a": 3, "b": 1, "c": 1})
    assert heavy.reached({"a"}) and not heavy.reached({"b", "c"})
    witness = Quorum({"a": 1, "b": 1, "w": 1})
    assert witness.reached({"a", "w"})
    with pytest.raises(ValueError):
        Quorum({"a": 0})


def test_one_vote_per_term_for_a_candidate_at_least_as_new() -> None:
    e = Election("v", Quorum({"a": 1, "b": 1, "v": 1}), lease_ms=1000)
    assert e.should_grant("a", 1, (0, 0), (0, 0), True, 0)[0]
    e.grant("a", 1)
    assert e.should_grant("a", 1, (0, 0), (0, 0), True, 0)[0], "the same candidate may ask again"
    assert not e.should_grant("b", 1, (0, 0), (0, 0), True, 0)[0]
    assert not e.should_grant("b", 2, (1, 3), (2, 1), True, 0)[0], "older state"
    assert not e.should_grant("b", 2, (2, 1), (2, 1), False, 0)[0], "not alive here"
    e.follow("a", 2, now_ms=0)
    assert e.should_grant("b", 3, (2, 1), (2, 1), True, 500)[1].startswith("still following a")
    assert e.should_grant("b", 3, (2, 1), (2, 1), True, 1500)[0], "after the lease"


def test_a_proposal_commits_with_a_majority_of_acks_for_its_key() -> None:
    q = Quorum({"a": 1, "b": 1, "c": 1, "d": 1, "e": 1})
    start = ClusterState()
    p = Proposer(q, "a", start, ClusterState(term=1, version=1))
    assert p.in_flight
    assert not p.ack("b", (1, 2)), "an ack for another state"
    assert not p.ack("b", (1, 1))
    assert p.ack("c", (1, 1)) and p.committed.key == (1, 1)
    with pytest.raises(ValueError):
        p.propose(ClusterState(term=1, version=1))


# ---- the agent ------------------------------------------------------------------------

def test_a_host_that_lost_its_votes_never_votes_twice_in_a_term() -> None:
    # h3 grants h1 term 5, then its state_dir is lost and its agent starts again.  h2 never
    # heard of term 5 and asks for it: a grant would give h1 and h2 a majority each in term 5.
    window = ClusterTiming().lease_ms + 2 * ClusterTiming().election_timeout_ms
    before = ClusterMember(config("h3"), incarnation=1, now_ms=0, persisted=PersistedState(term=4))
    connected(before)
    hear_all(before, 100, term=4)
    out = before.step(MessageReceived(message=VoteRequest(sender="h1", term=5, accepted=(0, 0)), now_ms=200))
    assert [o.message for o in out if isinstance(o, Send)] == [VoteGranted(sender="h3", term=5, to="h1")]

    def asks(agent: ClusterMember, term: int, now: int) -> list[object]:
        ask = VoteRequest(sender="h2", term=term, accepted=(0, 0))
        out = agent.step(MessageReceived(message=ask, now_ms=now))
        return [o.message for o in out if isinstance(o, Send)]

    after = ClusterMember(config("h3"), incarnation=2, now_ms=1000, persisted=None)
    connected(after, 1000)
    after.step(MessageReceived(message=beat("h1", term=5), now_ms=1100))
    after.step(MessageReceived(message=beat("h2", term=4), now_ms=1100))
    assert asks(after, 5, 1200) == [], "abstains inside the window"
    standing = [o for o in after.tick(1300) if isinstance(o, Send) and isinstance(o.message, VoteRequest)]
    assert not standing, "and does not stand"
    assert asks(after, 5, 1000 + window + 100) == [], "term 5 was heard in the window: counted as voted"
    assert asks(after, 6, 1000 + window + 200) == [VoteGranted(sender="h3", term=6, to="h2")]
    # A new cluster (every host heard at term 0) is not held back.
    fresh = ClusterMember(config("h3"), incarnation=1, now_ms=0, persisted=None)
    connected(fresh)
    hear_all(fresh, 100)
    assert asks(fresh, 1, 150) == [VoteGranted(sender="h3", term=1, to="h2")]


def test_a_host_with_another_cluster_definition_gets_no_vote_and_is_named_in_an_alert() -> None:
    # h1's file gives it weight 2 (a rolling change half done): under h1's definition h1 and
    # one other make a majority, under h2's they do not.  Nobody may elect across the two.
    heavy = {**HOSTS, "h1": replace(HOSTS["h1"], weight=2)}
    h1 = ClusterMember(CoreConfig(me="h1", hosts=heavy, vms=VMS), incarnation=1, now_ms=0,
                       persisted=PersistedState())
    h2 = ClusterMember(config("h2"), incarnation=1, now_ms=0, persisted=PersistedState())
    connected(h1)
    connected(h2)
    assert h1.definition.mine != h2.definition.mine
    h1_beat = h1.heartbeat(100, True)
    out = h2.step(MessageReceived(message=h1_beat, now_ms=100))
    [alert] = [o for o in out if isinstance(o, RaiseAlert)]
    assert alert.kind == "config-mismatch" and not alert.resolved and "h1" in alert.reason
    h2.step(MessageReceived(message=beat("h3"), now_ms=150))
    ask = VoteRequest(sender="h1", term=1, accepted=(0, 0), definition=h1.definition.mine)
    assert not [o for o in h2.step(MessageReceived(message=ask, now_ms=200)) if isinstance(o, Send)]
    # The file fixed and the agent restarted: h1 agrees again, the alert resolves, votes flow.
    fixed = ClusterMember(config("h1"), incarnation=2, now_ms=300, persisted=PersistedState())
    out = h2.step(MessageReceived(message=fixed.heartbeat(300, True), now_ms=300))
    [alert] = [o for o in out if isinstance(o, RaiseAlert)]
    assert alert.kind == "config-mismatch" and alert.resolved
    ask = VoteRequest(sender="h1", term=1, accepted=(0, 0), definition=fixed.definition.mine)
    out = h2.step(MessageReceived(message=ask, now_ms=350))
    assert [o.message for o in out if isinstance(o, Send)] == [VoteGranted(sender="h2", term=1, to="h1")]


def test_a_vote_is_persisted_before_the_grant_is_sent() -> None:
    agent = ClusterMember(config("h2"), incarnation=1, now_ms=0)
    connected(agent)
    hear_all(agent, 100)
    out = agent.step(MessageReceived(message=VoteRequest(sender="h1", term=1, accepted=(0, 0)), now_ms=150))
    assert [type(o) for o in out] == [PersistState, Send]
    assert isinstance(out[0], PersistState) and (out[0].term, out[0].voted_for) == (1, "h1")
    assert isinstance(out[1], Send) and out[1].message == VoteGranted(sender="h2", term=1, to="h1")
    again = agent.step(MessageReceived(message=VoteRequest(sender="h3", term=1, accepted=(0, 0)), now_ms=160))
    assert again == [], "one vote per term"


def test_a_restarted_agent_keeps_its_vote() -> None:
    agent = ClusterMember(config("h2"), incarnation=2, now_ms=0,
                         persisted=PersistedState(term=4, voted_for="h1"))
    connected(agent)
    hear_all(agent, 100)
    assert agent.step(MessageReceived(message=VoteRequest(sender="h3", term=4, accepted=(9, 9)),
                                      now_ms=150)) == []


def _elect(agent: ClusterMember) -> int:
    """Drive `agent` (h1, preferred by name) to coordinator; returns the time reached."""
    connected(agent)
    now = 0
    for now in range(0, 3000, 100):
        hear_all(agent, now)
        for out in agent.tick(now):
            if isinstance(out, Send) and isinstance(out.message, VoteRequest):
                for voter in ("h2", "h3"):
                    agent.step(MessageReceived(message=VoteGranted(sender=voter, term=out.message.term,
                                                                   to="h1"), now_ms=now))
        if agent.role is Role.COORDINATOR:
            return now
    raise AssertionError("not elected")


def test_coordinator_places_vms_once_a_majority_acks() -> None:
    agent = ClusterMember(config("h1"), incarnation=1, now_ms=0)
    elected = _elect(agent)
    proposals, beats = [], []
    # It plans once its followers have had quorum_timeout_ms to start reporting to it.
    for now in range(elected + 100, elected + 1400, 100):
        hear_all(agent, now)
        for out in agent.tick(now):
            if isinstance(out, Send) and isinstance(out.message, Proposal):
                proposals.append(out.message)
                agent.step(MessageReceived(message=Ack(sender="h2", term=out.message.term,
                                                       accepted=out.message.state.key, to="h1"), now_ms=now))
            if isinstance(out, Send) and isinstance(out.message, Heartbeat):
                beats.append(out.message)
    assert proposals and proposals[-1].state.vms["vm1"].owner is not None
    assert agent.committed.vms["vm1"].owner is not None and agent.committed.term == agent.term
    # The proposal is broadcast while in flight; the commit is announced by the coordinator's
    # heartbeat (to everyone), which also renews its lease.
    assert beats[-1].coordinator and beats[-1].to is None and beats[-1].committed == agent.committed.key


def test_a_proposal_of_an_older_term_is_refused() -> None:
    agent = ClusterMember(config("h2"), incarnation=1, now_ms=0)
    connected(agent)
    hear_all(agent, 100, term=5)
    state = ClusterState(term=3, version=7, vms={"vm1": VmRecord(owner="h2")})
    out = agent.step(MessageReceived(message=Proposal(sender="h1", term=3, state=state, committed=state),
                                     now_ms=200))
    assert out == [] and agent.committed.key == (0, 0) and agent.term == 5


def _follower_with_grant(owner: str | None, until_ms: int = 1300, confirm: bool = True,
                         cfg: CoreConfig | None = None) -> ClusterMember:
    """h2 following h1 from 150 ms on, its committed state granting vm1 to `owner`."""
    agent = ClusterMember(cfg or config("h2"), incarnation=1, now_ms=0)
    connected(agent)
    state = ClusterState(term=1, version=2, vms={"vm1": VmRecord(owner=owner, generation=3)})
    for now in range(100, until_ms, 200):
        hear_all(agent, now)
        # From the second round on, the coordinator confirms it has h2's first ack (a read index).
        confirmed = {"h2": (1, 1)} if confirm and now > 100 else {}
        proposal = Proposal(sender="h1", term=1, state=state, committed=state, confirmed=confirmed)
        agent.step(MessageReceived(message=proposal, now_ms=now + 50))
    return agent


def test_a_granted_vm_is_started_with_its_generation_and_term() -> None:
    agent = _follower_with_grant("h2", confirm=False)
    assert not [o for o in agent.tick(1300) if isinstance(o, StartVm)], "no ack of ours confirmed yet"
    agent = _follower_with_grant("h2", cfg=ARMED)
    out = agent.tick(1300)
    pets = [o for o in out if isinstance(o, PetWatchdog)]
    starts = [o for o in out if isinstance(o, StartVm)]
    assert pets and out.index(pets[0]) < out.index(starts[0]), "the watchdog is petted before the start"
    assert [(s.vm, s.generation, s.term) for s in starts] == [("vm1", 3, 1)]
    assert not [o for o in agent.tick(1400) if isinstance(o, StartVm)], "not twice while it runs"


def test_a_grant_with_a_change_under_way_waits() -> None:
    agent = _follower_with_grant("h2")
    moved = ClusterState(term=1, version=3, vms={"vm1": VmRecord(owner="h3", generation=4)})
    agent.step(MessageReceived(message=Proposal(sender="h1", term=1, state=moved,
                                                committed=agent.committed), now_ms=1250))
    assert not [o for o in agent.tick(1300) if isinstance(o, StartVm)]


def test_nothing_is_started_without_a_live_coordinator() -> None:
    agent = _follower_with_grant("h2")
    hear_all(agent, 3000)
    assert not [o for o in agent.tick(3000) if isinstance(o, StartVm)], "the lease ran out"


def test_a_local_vm_without_grant_is_reported_not_stopped() -> None:
    agent = _follower_with_grant("h3")
    agent.step(LocalVmsObserved(vms={"vm1": "running"}, now_ms=1250))
    out = agent.tick(1300)
    assert not [o for o in out if isinstance(o, StopVm | KillVm | StartVm)]
    beats = [o.message for o in out if isinstance(o, Send) and isinstance(o.message, Heartbeat)]
    assert beats and beats[0].vms == {"vm1": "running"}


def test_a_kill_order_removes_a_stray_copy() -> None:
    agent = ClusterMember(config("h2"), incarnation=1, now_ms=0)
    connected(agent)
    hear_all(agent, 100)
    state = ClusterState(term=1, version=2, vms={"vm1": VmRecord(owner="h3", generation=4)},
                         kills={"vm1": "h2"})
    proposal = Proposal(sender="h1", term=1, state=state, committed=state)
    agent.step(MessageReceived(message=proposal, now_ms=200))
    agent.step(LocalVmsObserved(vms={"vm1": "running"}, now_ms=250))
    assert [o.vm for o in agent.tick(300) if isinstance(o, KillVm)] == ["vm1"]


ARMED = config("h2", watchdog_arm="always")       # these hosts have fence devices: armed on request


def test_losing_quorum_with_vms_running_stops_the_watchdog_after_the_grace() -> None:
    agent = _follower_with_grant("h2", cfg=ARMED)
    agent.step(LocalVmsObserved(vms={"vm1": "running"}, now_ms=1250))
    assert any(isinstance(o, PetWatchdog) for o in agent.tick(1300))
    grace = ARMED.timing.self_fence_grace_ms
    outputs = {t: agent.tick(t) for t in range(1400, 2400 + grace + 1000, 100)}
    stopped = [(t, o) for t, out in outputs.items() for o in out if isinstance(o, StopPettingWatchdog)]
    assert len(stopped) == 1 and "lost quorum" in stopped[0][1].reason
    lost_at = agent.self_fence.lost_since
    assert lost_at is not None and stopped[0][0] == lost_at + grace, "a shorter loss is no event"
    assert all(any(isinstance(o, PetWatchdog) for o in outputs[t]) for t in outputs if t < lost_at + grace)
    assert not any(isinstance(o, PetWatchdog) for o in agent.tick(2400 + grace + 1100))


def test_quorum_back_within_the_grace_keeps_the_watchdog_petted() -> None:
    agent = _follower_with_grant("h2", cfg=ARMED)
    agent.step(LocalVmsObserved(vms={"vm1": "running"}, now_ms=1250))
    agent.tick(1300)
    grace = ARMED.timing.self_fence_grace_ms
    silent = [o for t in range(1400, 1400 + grace - 500, 100) for o in agent.tick(t)]
    assert agent.self_fence.lost_since is not None, "quorum was lost"
    assert not [o for o in silent if isinstance(o, StopPettingWatchdog)]
    after = []
    for t in range(1400 + grace - 400, 1400 + 2 * grace, 100):
        hear_all(agent, t)
        after += agent.tick(t)
    assert not [o for o in after if isinstance(o, StopPettingWatchdog)]
    assert agent.self_fence.lost_since is None and agent.petting


def test_a_host_with_a_fence_device_never_arms_its_watchdog_by_default() -> None:
    # The majority powers it off before anything of it runs elsewhere: its own reset would
    # only take down VMs that a switch reboot would have left running.
    agent = _follower_with_grant("h2")
    agent.step(LocalVmsObserved(vms={"vm1": "running"}, now_ms=1250))
    out = [o for t in range(1300, 12_000, 100) for o in agent.tick(t)]
    assert not [o for o in out if isinstance(o, PetWatchdog | StopPettingWatchdog)]
    assert [o for o in agent.tick(12_100) if isinstance(o, StartVm)] == [], "it started vm1 once, earlier"


def test_a_new_agent_alone_never_pets_even_without_vms() -> None:
    # Its first scan may not show its VMs yet, and its host may already be declared dead.
    agent = ClusterMember(ARMED, incarnation=1, now_ms=0)
    agent.step(LocalVmsObserved(vms={}, now_ms=100))
    assert not any(isinstance(o, PetWatchdog) for o in agent.tick(5000))


# ---- the coordinator: fence first ---------------------------------------------------

def test_an_armed_watchdog_is_a_fence_for_a_host_whose_device_fails() -> None:
    # `arm: always`: h2 has a fence device that fails, and a watchdog that confirmed 2 s; once
    # its deadline (declaration + grace + timeout + margin) has passed, h2 has been reset.
    t = ClusterTiming()
    f = Fencing(watchdog_margin_ms=t.watchdog_margin_ms, self_fence_grace_ms=t.self_fence_grace_ms,
                fence_timeout_ms=t.fence_timeout_ms, backoff_ms=t.fence_backoff_ms)
    f.declare("h2", device=True, now_ms=1000, watchdog_ms=2000)
    f.declare("h3", device=True, now_ms=1000)                  # arm: auto: no watchdog
    commands, _ = f.poll(1000, iter(["c2", "c3"]).__next__)
    for cmd in commands:
        assert f.result(cmd.id, False, "device unreachable", 1100) is not None
    deadline = 1000 + t.self_fence_grace_ms + 2000 + t.watchdog_margin_ms
    assert not f.confirmed("h2", deadline - 1) and f.confirmed("h2", deadline)
    assert not f.confirmed("h3", 10**7), "without a watchdog only the device fences"


def _confirmed(**hosts: HostRecord) -> dict[str, HostRecord]:
    """Host records as the coordinator keeps them: the live hosts' watchdogs confirmed."""
    return {"h1": HostRecord(watchdog_ms=WATCHDOG_MS), "h3": HostRecord(watchdog_ms=WATCHDOG_MS), **hosts}


def _views(dead: bool) -> dict[str, HostView]:
    return {"h1": HostView(name="h1", alive=True, dead=False, beat=beat("h1", hears=frozenset({"h3"}))),
            "h2": HostView(name="h2", alive=False, dead=dead, beat=None),
            "h3": HostView(name="h3", alive=True, dead=False, beat=beat("h3", hears=frozenset({"h1"})))}


def test_a_dead_hosts_vms_move_only_after_a_confirmed_fence() -> None:
    ids = iter(f"f{i}" for i in range(100))
    c = Coordinator(config("h1"), term=2, new_id=lambda: next(ids))
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2", generation=1)},
                         hosts=_confirmed(**initial_state([], ["h2"]).hosts))
    new, out = c.plan(state, _views(dead=True), 1000)
    assert new is None, "nothing changes before the fence"
    fences = [o for o in out if isinstance(o, FenceHost)]
    assert [(f.host, f.term) for f in fences] == [("h2", 2)]
    assert c.fencing.result(fences[0].id, False, "ipmi timeout", 1300) is not None
    new, out = c.plan(state, _views(dead=True), 1400)
    assert new is None and not [o for o in out if isinstance(o, FenceHost)], "backoff"
    new, out = c.plan(state, _views(dead=True), 1900)
    retry = [o for o in out if isinstance(o, FenceHost)]
    assert retry
    c.fencing.result(retry[0].id, True, "", 2000)
    new, _ = c.plan(state, _views(dead=True), 2100)
    assert new is not None and new.host("h2").fenced
    assert new.vms["vm1"].owner in {"h1", "h3"} and new.vms["vm1"].generation == 2


def test_a_host_heard_again_before_its_fence_keeps_its_vms() -> None:
    c = Coordinator(config("h1", ), term=2, new_id=lambda: "f")
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")})
    c.plan(state, _views(dead=True), 1000)
    c.plan(state, _views(dead=False), 1100)
    assert c.fencing.pending() == []


def _unfenced() -> CoreConfig:
    return CoreConfig(me="h1", hosts={n: HostSpec(name=n, memory_mib=8192, vcpus=8) for n in HOSTS}, vms=VMS)


def test_without_a_fence_device_the_watchdog_deadline_is_awaited() -> None:
    cfg = _unfenced()
    c = Coordinator(cfg, term=2, new_id=lambda: "f")
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")},
                         hosts=_confirmed(h2=HostRecord(watchdog_ms=WATCHDOG_MS)))
    t = cfg.timing
    wait = t.watchdog_timeout_ms + t.self_fence_grace_ms + t.watchdog_margin_ms
    new, out = c.plan(state, _views(dead=True), 1000)
    assert new is None and out == []
    assert c.plan(state, _views(dead=True), 1000 + wait - 1)[0] is None
    new, _ = c.plan(state, _views(dead=True), 1000 + wait)
    assert new is not None and new.vms["vm1"].owner in {"h1", "h3"}


def test_the_coordinator_waits_the_timeout_the_hosts_device_confirmed_not_the_configured_one() -> None:
    # The configuration says 2 s; h2's device confirmed 60 s (softdog's default when the timeout is
    # never set): recovering its VMs after 2 s + margin would run them twice for 58 s.
    cfg = _unfenced()
    c = Coordinator(cfg, term=2, new_id=lambda: "f")
    device_ms = 60_000
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")},
                         hosts=_confirmed(h2=HostRecord(watchdog_ms=device_ms)))
    c.plan(state, _views(dead=True), 1000)
    late = 1000 + cfg.timing.watchdog_timeout_ms + cfg.timing.watchdog_margin_ms
    assert c.plan(state, _views(dead=True), late)[0] is None, "the configured timeout is no fence"
    wait = device_ms + cfg.timing.self_fence_grace_ms + cfg.timing.watchdog_margin_ms
    assert c.plan(state, _views(dead=True), 1000 + wait - 1)[0] is None
    new, _ = c.plan(state, _views(dead=True), 1000 + wait)
    assert new is not None and new.vms["vm1"].owner in {"h1", "h3"}


def test_a_host_with_no_confirmed_watchdog_and_no_device_is_never_recovered_by_deadline() -> None:
    c = Coordinator(_unfenced(), term=2, new_id=lambda: "f")
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")},
                         hosts=_confirmed(h2=HostRecord(watchdog_ms=0)))
    _, out = c.plan(state, _views(dead=True), 1000)
    alerts = [o for o in out if isinstance(o, RaiseAlert)]
    assert len(alerts) == 1 and "cannot fence h2" in alerts[0].reason
    for now in (10_000, 100_000, 1_000_000):
        new, out = c.plan(state, _views(dead=True), now)
        assert new is None and not out, "no deadline, no recovery, and the alert only once"


def test_a_host_whose_watchdog_does_not_confirm_the_configured_timeout_gets_no_vm() -> None:
    c = Coordinator(_unfenced(), term=2, new_id=lambda: "f")
    views = {h: HostView(name=h, alive=True, dead=False, beat=beat(h, watchdog_ms=60_000)) for h in HOSTS}
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner=None)})
    new, out = c.plan(state, views, 1000)
    assert new is not None and new.vms["vm1"].owner is None
    reasons = next(o.reasons for o in out if isinstance(o, PlacementDecided))
    assert "h1: no fence device and no watchdog confirming the configured timeout" in reasons
    assert new.host("h1").watchdog_ms == 60_000, "the device's value is committed for a later fence"
    views["h3"] = HostView(name="h3", alive=True, dead=False, beat=beat("h3"))
    new, out = c.plan(state, views, 1100)
    assert new is not None and new.vms["vm1"].owner == "h3"


def test_a_confirmed_watchdog_timeout_is_never_lowered_under_the_hosts_vms() -> None:
    c = Coordinator(_unfenced(), term=2, new_id=lambda: "f")
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")},
                         hosts={"h2": HostRecord(watchdog_ms=60_000)})
    views = {h: HostView(name=h, alive=True, dead=False, beat=beat(h)) for h in HOSTS}
    new, _ = c.plan(state, views, 1000)
    assert new is not None and new.host("h2").watchdog_ms == 60_000, "kept: h2 holds vm1"
    assert new.host("h1").watchdog_ms == WATCHDOG_MS
    failed = dict(views, h2=HostView(name="h2", alive=True, dead=False, beat=beat("h2", watchdog_ms=0)))
    new, _ = c.plan(state, failed, 1100)
    assert new is not None and new.host("h2").watchdog_ms == 0, "a failed device: no deadline at once"


def test_a_host_without_device_starts_nothing_until_its_watchdog_confirms_the_timeout() -> None:
    agent = _follower_with_grant("h2", cfg=replace(_unfenced(), me="h2"))
    assert not [o for o in agent.tick(1300) if isinstance(o, StartVm)], "no watchdog confirmed yet"
    agent.step(WatchdogConfirmed(timeout_ms=60_000, now_ms=1300))
    assert not [o for o in agent.tick(1400) if isinstance(o, StartVm)], "not the configured timeout"
    agent.step(WatchdogConfirmed(timeout_ms=WATCHDOG_MS, now_ms=1400))
    out = agent.tick(1500)
    assert [o.vm for o in out if isinstance(o, StartVm)] == ["vm1"]
    sent = [o.message for o in out if isinstance(o, Send) and isinstance(o.message, Heartbeat)]
    assert sent and all(b.watchdog_ms == WATCHDOG_MS for b in sent), "its heartbeat says so"


def test_fence_results_come_back_through_the_agent() -> None:
    agent = ClusterMember(config("h1"), incarnation=1, now_ms=0)
    _elect(agent)
    assert agent.coordinator is not None
    agent.coordinator.fencing.declare("h2", device=True, now_ms=0)
    cmds, _ = agent.coordinator.fencing.poll(10, lambda: "h1/1/fence")
    out = agent.step(CommandFinished(id=cmds[0].id, ok=False, reason="no route", now_ms=20))
    assert [type(o) for o in out] == [RaiseAlert] and "no route" in out[0].reason  # type: ignore[union-attr]


def test_a_hosts_own_fence_timeout_decides_when_a_hung_fence_counts_as_failed() -> None:
    # h2's device answers within 60 s (a real fence agent's default): the runtime passes its
    # timeout plus a margin; h3 keeps the core's default.
    hosts = dict(HOSTS, h2=HostSpec(name="h2", memory_mib=8192, vcpus=8, fence_device=True,
                                    fence_timeout_ms=65_000))
    ids = iter(f"f{i}" for i in range(100))
    c = Coordinator(CoreConfig(me="h1", hosts=hosts, vms=VMS), term=2, new_id=lambda: next(ids))
    assert c.fencing.timeout_ms("h2") == 65_000 and c.fencing.timeout_ms("h3") == 3000
    state = ClusterState(term=2, version=5, vms={"vm1": VmRecord(owner="h2")},
                         hosts=initial_state([], list(HOSTS)).hosts)
    _new, out = c.plan(state, _views(dead=True), 1000)
    assert [o.host for o in out if isinstance(o, FenceHost)] == ["h2"]
    _new, out = c.plan(state, _views(dead=True), 1000 + 30_000)
    assert not [o for o in out if isinstance(o, RaiseAlert)], "still within the device's own timeout"
    _new, out = c.plan(state, _views(dead=True), 1000 + 65_000)
    alerts = [o for o in out if isinstance(o, RaiseAlert)]
    assert alerts and "no answer within 65000 ms" in alerts[0].reason


# ---- the gossip layout ------------------------------------------------------------------

def test_ring_neighbours_are_bounded_and_symmetric() -> None:
    hosts = [f"h{i:04d}" for i in range(1000)]
    for me in ("h0000", "h0500", "h0999"):
        near = ring_neighbours(hosts, me, 4)
        assert len(near) == 4 and me not in near
        assert all(me in ring_neighbours(hosts, peer, 4) for peer in near), "symmetric"
    assert ring_neighbours(hosts[:5], "h0002", 4) == frozenset(hosts[:5]) - {"h0002"}, "small: full mesh"


def _large(me: str, n: int = 40) -> CoreConfig:
    hosts = {f"h{i:02d}": HostSpec(name=f"h{i:02d}", memory_mib=8192, vcpus=8) for i in range(n)}
    return CoreConfig(me=me, hosts=hosts, vms=VMS)


def test_relay_tiers_bound_every_hosts_intake_and_survive_one_lost_aggregator() -> None:
    hosts = [f"h{i:04d}" for i in range(1000)]
    layout = relay_layout(hosts, 4, 4)
    assert [len(t) for t in layout.tiers] == [500, 126, 32, 8, 2]
    takes: dict[str | None, int] = {}
    for roles in layout.roles.values():
        for role in roles:
            takes[role.parent] = takes.get(role.parent, 0) + 1
    assert max(n for p, n in takes.items() if p is not None) <= 4, "an aggregator takes at most 4 digests"
    assert takes[None] <= 4, "so does the coordinator"
    aggregators = [h for t in layout.tiers[1:] for h in t]
    assert len(set(aggregators)) == len(aggregators), "no host holds two aggregator slots"

    def path(reporter: str) -> list[str]:
        up, at = [], reporter
        while True:
            parent = next(r.parent for r in layout.roles_of(at) if r.tier == len(up) + 1)
            if parent is None:
                return up
            up.append(parent)
            at = parent

    for me in hosts:
        reporters = {h for h in ring_neighbours(hosts, me, 4) | {me}
                     if any(r.tier == 1 for r in layout.roles_of(h))}
        assert len(reporters) >= 2, f"{me} is reported by two hosts at least"
        # A path: the reporter (unless it is the host itself, whose loss does not matter) and up.
        shared = set.intersection(*({r} - {me} | set(path(r)) for r in reporters))
        assert not shared, f"{me}: every path to the coordinator goes through {shared}"
    assert not relay_layout(hosts[:5], 4, 4).enabled, "a full mesh needs no relays"


def test_a_follower_of_a_large_cluster_sends_to_its_neighbours_and_relays_up_a_digest() -> None:
    agent = ClusterMember(_large("h10"), incarnation=1, now_ms=0)
    connected(agent)
    assert agent.ping_targets() == {"h08", "h09", "h11", "h12"}
    lease = Heartbeat(sender="h00", incarnation=1, term=3, hears=frozenset(), reaches=frozenset(),
                      accepted=(3, 4), quorate=True, vms={}, coordinator=True, unheard=frozenset(),
                      committed=(3, 4))
    joined = agent.step(MessageReceived(message=lease, now_ms=100))
    assert agent.election.following(100) == "h00" and "h00" in agent.ping_targets()
    # Joined: it asks the coordinator to confirm an ack (a read index), nothing more.
    assert [(type(o.message), o.message.to) for o in joined if isinstance(o, Send)] == [(Ack, "h00")]
    near = Heartbeat(sender="h11", incarnation=1, term=3, hears=frozenset({"h10"}), reaches=frozenset(),
                     accepted=(3, 4), quorate=True, vms={"vm1": "running"})
    agent.step(MessageReceived(message=near, now_ms=150))
    sent = [o.message for o in agent.tick(200) if isinstance(o, Send)]
    beats = [m for m in sent if isinstance(m, Heartbeat)]
    assert sorted(m.to or "" for m in beats) == ["h08", "h09", "h11", "h12"], "not to the coordinator"
    digests = [m for m in sent if isinstance(m, Digest)]
    parent = next(r.parent for r in agent.layout.roles_of("h10") if r.tier == 1)
    # Its neighbourhood to its aggregator, and (news: a neighbour heard for the first time) at once
    # to the coordinator.
    assert sorted(d.to for d in digests) == sorted([parent, "h00"]), digests
    assert digests[0].entries == digests[1].entries
    entries = {e.host: e for e in digests[0].entries}
    assert set(entries) == {"h10", "h11"} and entries["h11"].heard_age_ms == 50
    assert all(e.reporter == "h10" and e.relay_age_ms == 0 for e in entries.values())
    # A heartbeat that says the same again is no news: only the periodic digest goes.
    agent.step(MessageReceived(message=replace(near, seq=2), now_ms=350))
    sent = [o.message for o in agent.tick(400) if isinstance(o, Send)]
    assert [d.to for d in sent if isinstance(d, Digest)] == [parent]
    # Its VMs changed: news.
    agent.step(MessageReceived(message=replace(near, seq=3, vms={}), now_ms=450))
    sent = [o.message for o in agent.tick(500) if isinstance(o, Send)]
    assert [d.to for d in sent if isinstance(d, Digest)] == ["h00"]


def test_a_relayed_heartbeat_travels_whole_only_when_its_content_changed_or_is_due_again() -> None:
    reporter = ClusterMember(_large("h10"), incarnation=1, now_ms=0)
    connected(reporter)
    parent = next(r.parent for r in reporter.layout.roles_of("h10") if r.tier == 1)
    assert parent is not None
    aggregator = ClusterMember(_large(parent), incarnation=1, now_ms=0)
    near = Heartbeat(sender="h11", incarnation=1, term=0, hears=frozenset({"h10"}), reaches=frozenset(),
                     accepted=(0, 0), quorate=True, vms={"vm1": "running"}, seq=1)

    def digest(now: int, beat: Heartbeat) -> Digest:
        reporter.step(MessageReceived(message=beat, now_ms=now - 50))
        sent = [o.message for o in reporter.tick(now) if isinstance(o, Send)]
        (d,) = [m for m in sent if isinstance(m, Digest) and m.to == parent]
        aggregator.step(MessageReceived(message=d, now_ms=now + 5))
        return d

    def h11(d: Digest) -> RelayEntry:
        return next(e for e in d.entries if e.host == "h11")

    assert h11(digest(200, near)).beat == near, "first time: whole"
    again = digest(400, replace(near, seq=2))
    assert h11(again).beat is None and h11(again).seq == 2 and h11(again).since == 1, "same content"
    kept = next(e for e in aggregator.relay._digests[("h10", 0)][1] if e.host == "h11")
    assert kept.beat == near and kept.seq == 2, "the aggregator takes the content it had"
    moved = replace(near, seq=3, vms={})
    assert h11(digest(600, moved)).beat == moved, "changed: whole again"
    assert h11(digest(800, replace(moved, seq=4))).beat is None
    assert h11(digest(800 + RELAY_REFRESH_MS, replace(moved, seq=5))).beat is not None, "refreshed"
    # A receiver without that content (restarted, or a lost digest) drops the entry until then.
    fresh = ClusterMember(_large(parent), incarnation=1, now_ms=0)
    d = digest(800 + RELAY_REFRESH_MS + 200, replace(moved, seq=6))
    fresh.step(MessageReceived(message=d, now_ms=800 + RELAY_REFRESH_MS + 205))
    assert "h11" not in {e.host for e in fresh.relay._digests[("h10", 0)][1]}


def test_the_coordinator_takes_relayed_heartbeats_as_heard_when_they_were() -> None:
    agent = ClusterMember(_large("h20"), incarnation=1, now_ms=0)
    connected(agent, now=0)
    agent.election.role, agent.election.term = Role.COORDINATOR, 3
    agent.retrack()                                # the coordinator watches every host
    beat = Heartbeat(sender="h31", incarnation=1, term=3, hears=frozenset({"h20"}), reaches=frozenset(),
                     accepted=(3, 4), quorate=True, vms={"vm2": "running"})
    entry = RelayEntry(host="h31", reporter="h30", incarnation=1, seq=5, since=5, heard_age_ms=120,
                       relay_age_ms=380, beat=beat)
    agent.step(MessageReceived(message=Digest(sender="h02", term=3, entries=(entry,), to="h20"),
                               now_ms=1000))
    assert agent.beats["h31"][0] == 500, "heard 500 ms ago, not when the digest came"
    suspect = agent.config.detector.suspect_timeout_ms
    assert "h31" in agent.detector.hears(500 + suspect + agent.lag_ms), "relayed news may be late"
    assert "h31" not in agent.detector.hears(500 + suspect + agent.lag_ms + 1)
    # Its reporter says it no longer hears it: that news is taken at once, the allowance goes.
    later = 500 + suspect + 100
    assert "h31" in agent.detector.hears(later)
    # (without its heartbeat: the coordinator has this content already)
    silent = RelayEntry(host="h31", reporter="h30", incarnation=1, seq=5, since=5,
                        heard_age_ms=later - 20 - 500, relay_age_ms=20)
    agent.step(MessageReceived(message=Digest(sender="h02", term=3, entries=(silent,), to="h20"),
                               now_ms=later))
    assert agent.beats["h31"][0] == 500
    assert "h31" not in agent.detector.hears(later)


def test_the_coordinator_summarises_whom_it_does_not_hear() -> None:
    agent = ClusterMember(_large("h00", n=7), incarnation=1, now_ms=0, persisted=PersistedState())
    connected(agent)
    hosts = sorted(agent.config.hosts)
    for now in (100, 200, 300):
        for peer in hosts[1:5]:                    # a majority with h00: h01..h04; h05, h06 silent
            b = Heartbeat(sender=peer, incarnation=1, term=0, hears=frozenset({"h00"}),
                          reaches=frozenset(), accepted=(0, 0), quorate=True, vms={})
            agent.step(MessageReceived(message=b, now_ms=now))
        out = agent.tick(now)
        requests = [o.message for o in out if isinstance(o, Send) and isinstance(o.message, VoteRequest)]
        for r in requests:
            for peer in hosts[1:5]:
                agent.step(MessageReceived(message=VoteGranted(sender=peer, term=r.term, to="h00"),
                                           now_ms=now))
    assert agent.role == Role.COORDINATOR
    assert agent.ping_targets() == frozenset(hosts) - {"h00"}, "the coordinator watches everyone"
    beats = [o.message for o in agent.tick(700) if isinstance(o, Send) and isinstance(o.message, Heartbeat)]
    assert len(beats) == 1 and beats[0].to is None and beats[0].coordinator
    assert beats[0].unheard == {"h05", "h06"}
