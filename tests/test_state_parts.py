"""No size cliff: a cluster state of thousands of VMs travels in parts under the wire's limit.

Before, a proposal carried the whole proposed and committed state in one message: 500 VMs
encoded to about 65 KB, over the wire's 64 KiB, so a coordinator of a larger inventory
could commit nothing.  Here three real cores talk through the real codec and the real
signed envelope (core/wire.py), which refuses anything over the limit as the transport
does."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core import wire
from haguard.core.cluster import codec
from haguard.core.cluster.member import ClusterMember
from haguard.core.cluster.parts import PART_RECORDS, PartsInbox, apply, split
from haguard.core.cluster.placement import VmSpec
from haguard.core.cluster.state import ClusterState, HostRecord, MigrationRecord, VmRecord
from haguard.core.cluster.types import (
    WHOLE,
    CoreConfig,
    HostSpec,
    Message,
    MessageReceived,
    PersistedState,
    Send,
    StatePart,
)
from haguard.core.detector import BrokerConnectionChanged

KEY = b"state-parts-test-key-0123456789ab"
HOSTS = ("h1", "h2", "h3")


def _config(me: str, vms: int) -> CoreConfig:
    specs = {h: HostSpec(name=h, memory_mib=1 << 20, vcpus=1 << 16, fence_device=True) for h in HOSTS}
    inventory = {f"vm{i:05d}": VmSpec(name=f"vm{i:05d}", memory_mib=64, vcpus=1) for i in range(vms)}
    return CoreConfig(me=me, hosts=specs, vms=inventory)


def _over_the_wire(sender: str, message: Message, seq: int) -> Message | None:
    """As the runtime sends it (executor.py, adapters/mqtt.py) and receives it (core/host.py)."""
    kind = "cluster" if message.to is None else "direct"
    env = wire.Envelope(cluster="c1", host=sender, incarnation=1, seq=seq, kind=kind,
                        body={"msg": codec.to_data(message)})
    try:
        data = wire.encode(env, KEY)
    except wire.MessageTooLarge:
        return None
    got = wire.decode(data, KEY, "c1")
    assert isinstance(got, wire.Envelope)
    return codec.from_data(got.body["msg"])


class _Bus:
    def __init__(self, vms: int) -> None:
        self.members = {h: ClusterMember(_config(h, vms), incarnation=1, now_ms=0, persisted=PersistedState())
                        for h in HOSTS}
        self.down: set[str] = set()
        self.sent: list[tuple[str, int]] = []           # (type, bytes)
        self.dropped: list[str] = []
        self.seq = 0
        for m in self.members.values():
            m.step(BrokerConnectionChanged(connected=True, now_ms=0))

    def run(self, until: int, start: int = 0) -> None:
        for now in range(start, until, 100):
            queue: list[tuple[str, Message]] = []
            for name, m in self.members.items():
                if name not in self.down:
                    queue += [(name, o.message) for o in m.tick(now) if isinstance(o, Send)]
            while queue:
                sender, message = queue.pop(0)
                self.seq += 1
                got = _over_the_wire(sender, message, self.seq)
                if got is None:
                    self.dropped.append(type(message).__name__)
                    continue
                self.sent.append((type(message).__name__, len(codec.to_data(message))))
                for name, m in self.members.items():
                    if name != sender and name not in self.down and got.to in (None, name):
                        queue += [(name, o.message) for o in m.step(MessageReceived(message=got, now_ms=now))
                                  if isinstance(o, Send)]


@pytest.mark.timeout(120)
def test_three_thousand_vms_are_placed_and_committed_through_the_real_wire() -> None:
    bus = _Bus(3000)
    bus.run(8000)
    assert not bus.dropped, bus.dropped[:5]
    types = {t for t, _ in bus.sent}
    assert "StatePart" in types, "the state went in parts"
    states = {h: m.committed for h, m in bus.members.items()}
    coordinator = next(h for h, m in bus.members.items() if m.role == "coordinator")
    placed = states[coordinator]
    assert len(placed.vms) == 3000 and all(r.owner in HOSTS for r in placed.vms.values())
    assert all(s.key == placed.key and s == placed for s in states.values()), "every host holds it"


@pytest.mark.timeout(120)
def test_a_host_that_was_away_catches_up_in_parts() -> None:
    bus = _Bus(1500)
    bus.down = {"h3"}
    bus.run(8000)
    leader = next(m for m in bus.members.values() if m.role == "coordinator")
    assert leader.committed.vms["vm00000"].owner is not None
    assert bus.members["h3"].committed.key == (0, 0)
    bus.down = set()
    bus.run(12_000, start=8000)
    assert bus.members["h3"].committed == leader.committed
    assert not bus.dropped


def test_a_small_state_still_goes_as_one_proposal() -> None:
    # What the previous release understands: every cluster that worked before keeps its wire.
    bus = _Bus(20)
    bus.run(6000)
    types = {t for t, _ in bus.sent}
    assert "Proposal" in types and "StatePart" not in types


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=63)
_vm = st.builds(VmRecord, owner=st.one_of(st.none(), _names), generation=st.integers(0, 2**63 - 1),
                desired=st.sampled_from(["running", "stopped"]))
_host = st.builds(HostRecord, maintenance=st.booleans(), fenced=st.booleans(),
                  watchdog_ms=st.integers(0, 2**63 - 1))
_mig = st.builds(MigrationRecord, source=_names, target=_names, generation=st.integers(0, 2**63 - 1))


def _state(term: int, version: int) -> st.SearchStrategy[ClusterState]:
    return st.builds(ClusterState, term=st.just(term), version=st.just(version),
                     vms=st.dictionaries(_names, _vm, max_size=450),
                     hosts=st.dictionaries(_names, _host, max_size=30),
                     migrations=st.dictionaries(_names, _mig, max_size=30),
                     kills=st.dictionaries(_names, _names, max_size=10))


@settings(max_examples=60, deadline=None)
@given(old=_state(3, 7), new=_state(4, 1))
def test_parts_rebuild_the_state_from_its_base_or_from_nothing_and_each_fits(old: ClusterState,
                                                                             new: ClusterState) -> None:
    new = replace(new, hosts={**old.hosts, **new.hosts})        # hosts are configured: never removed
    for base in (old, None):
        parts = split(sender="h" * 63, term=4, base=base, state=new, committed=old.key, to="x" * 63)
        sizes = [len(p.vms) + len(p.hosts) + len(p.migrations) + len(p.kills) for p in parts]
        assert max(sizes) <= PART_RECORDS
        assert all(_over_the_wire("h" * 63, p, 2**63 - 1) is not None for p in parts), "a part over the limit"
        inbox = PartsInbox()
        done = None
        for p in reversed(parts):                               # any order
            done = inbox.add(p)
        assert done is not None
        rebuilt = apply(base or ClusterState(), done)
        assert rebuilt == new and rebuilt.key == new.key
        assert (done[0].base == WHOLE) == (base is None)


def test_a_malformed_or_foreign_part_is_ignored() -> None:
    inbox = PartsInbox()
    part = StatePart(sender="h1", term=2, key=(2, 3), base=(2, 2), part=0, parts=2, committed=(2, 2))
    assert inbox.add(replace(part, part=5)) is None and inbox.add(replace(part, parts=0)) is None
    assert inbox.add(part) is None
    assert inbox.add(replace(part, key=(2, 4), part=1)) is None, "another state's part starts over"
    assert inbox.add(replace(part, key=(2, 4), part=0)) is not None
