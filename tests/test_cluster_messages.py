"""Cluster messages on the wire: the codec round-trips every message type, and anything
malformed, forged or misrouted is rejected and logged, never acted on.

The last gate before the cluster membership is `HostCore.step(EnvelopeReceived(...))`
(after the signature and replay checks of haguard.core.wire): a signed body of any shape
must never crash it and never reach the membership unless it is a well-formed message
from its own sender; migration requests go to the executor (`ClusterExecutor.on_rpc`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haguard.agent.derive import host_config
from haguard.agent.executor import ClusterExecutor, load_persisted, save_persisted
from haguard.config.cluster import ClusterConfig
from haguard.core.cluster import codec
from haguard.core.cluster.state import ClusterState, HostRecord, MigrationRecord, VmRecord
from haguard.core.cluster.types import (
    Ack,
    Digest,
    Heartbeat,
    MessageReceived,
    MigrationReport,
    PersistState,
    Proposal,
    RelayEntry,
    VoteGranted,
    VoteRequest,
)
from haguard.core.host import HostCore
from haguard.core.host_types import EnvelopeReceived, MessageRejected
from haguard.core.vmhealth import VmHealthPolicy
from haguard.errors import ConfigError

STATE = ClusterState(term=2, version=5, vms={"a": VmRecord(owner="h1", generation=3)},
                     hosts={"h1": HostRecord(maintenance=True)},
                     migrations={"a": MigrationRecord(source="h1", target="h2", generation=3)},
                     kills={"b": "h3"})
MESSAGES = [
    Heartbeat(sender="h2", incarnation=3, term=2, hears=frozenset({"h1"}), reaches=frozenset(),
              accepted=(2, 5), quorate=True, vms={"a": "running"},
              migrations=(MigrationReport(vm="a", generation=3, target="h2", ok=True),),
              requests=frozenset({("drain", "h1")})),
    Proposal(sender="h2", term=2, state=STATE, committed=STATE, confirmed={"h1": (3, 4)}),
    Ack(sender="h2", term=2, accepted=(2, 5), to="h1", incarnation=1, seq=3),
    VoteRequest(sender="h2", term=3, accepted=(2, 5)),
    VoteGranted(sender="h2", term=3, to="h1"),
    Digest(sender="h4", term=2, to="h1", entries=(
        RelayEntry(host="h3", reporter="h4", incarnation=1, seq=7, since=6, heard_age_ms=120, relay_age_ms=40,
                   beat=Heartbeat(sender="h3", incarnation=1, term=2, hears=frozenset({"h4"}),
                                  reaches=frozenset(), accepted=(2, 5), quorate=True, vms={"b": "inmigrate"},
                                  seq=7)),
        RelayEntry(host="h5", reporter="h4", incarnation=2, seq=9, since=3, heard_age_ms=80,
                   relay_age_ms=0))),
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: Any) -> None:
    data = json.loads(json.dumps(codec.to_data(message)))
    assert codec.from_data(data) == message
    if isinstance(message, Digest):             # not part of a heartbeat's equality, but carried
        decoded = codec.from_data(data)
        assert isinstance(decoded, Digest) and decoded.entries[0].beat.seq == 7


@pytest.mark.parametrize("bad, where", [
    ({"type": "Ack"}, "Ack.sender: missing"),
    ({"type": "Ack", "sender": "h2", "term": "x", "accepted": [1, 2], "to": "h1"}, "Ack.term"),
    ({"type": "Ack", "sender": "h2", "term": True, "accepted": [1, 2], "to": "h1"}, "Ack.term"),
    ({"type": "Ack", "sender": "h2", "term": 1, "accepted": [1, 2, 3], "to": "h1"}, "Ack.accepted"),
    ({"type": "VoteGranted", "sender": "h2", "term": 1, "to": "h1", "Extra field": 1}, "unknown field"),
    ({"type": "VoteGranted", "sender": "h2", "term": 1, "to": "h1", **{f"f{i}": 1 for i in range(9)}},
     "unknown field"),
    ({"type": "Nope"}, "unknown type"),
    ({"type": "Heartbeat", **{k: v for k, v in codec.to_data(MESSAGES[0]).items() if k != "type"},
      "vms": {"a": "flying"}}, "Heartbeat.vms[a]"),
])
def test_malformed_messages_name_the_field(bad: dict[str, Any], where: str) -> None:
    with pytest.raises(codec.CodecError, match=where.replace("[", r"\[")):
        codec.from_data(bad)


def test_a_newer_releases_field_is_ignored_so_a_rolling_upgrade_does_not_split_the_cluster() -> None:
    data = {**codec.to_data(MESSAGES[0]), "added_later": {"any": ["shape"]}}
    assert codec.from_data(data) == MESSAGES[0]


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4),
                    max_leaves=20))
@FUZZ
def test_any_json_is_either_a_message_or_a_codec_error(data: Any) -> None:
    for candidate in (data, {"type": "Proposal", "sender": "h2", "term": 1, "state": data,
                             "committed": data}, {"type": "Heartbeat", "vms": data}):
        with contextlib.suppress(codec.CodecError):
            codec.from_data(candidate)


# ---- the runtime's gate -----------------------------------------------------------------

def _config(tmp: Path) -> ClusterConfig:
    key = tmp / "key"
    key.write_text("k" * 32)
    return ClusterConfig.model_validate({
        "cluster": "c1", "host": "h1", "key_file": str(key), "mqtt": {"urls": ["mqtt://127.0.0.1"]},
        "hosts": [{"name": h, "address": f"198.18.0.{i + 1}", "fence": {"agent": "fence_dummy"}}
                  for i, h in enumerate(("h1", "h2", "h3"))],
        "vm_dir": str(tmp / "vms"), "run_dir": str(tmp / "run" / "vms"), "state_dir": str(tmp / "state"),
        "ha": {"enabled": True}})


class Gate:
    def __init__(self, tmp: Path) -> None:
        cfg = _config(tmp)
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.core = HostCore(host_config(cfg, {}, health_policy=VmHealthPolicy()), incarnation=1, now_ms=0)
        self.executor = ClusterExecutor(cfg, {}, publish=self._publish, offer=lambda item: None,
                                        alert=lambda alert: None, clock=lambda: 0, rescan=lambda: None,
                                        may_receive=self.core.may_receive, nothing_here=lambda: True)
        self.seen: list[Any] = []
        self.rejected = 0
        member = self.core.member
        assert member is not None
        original = member.step

        def step(event: Any) -> Any:
            if isinstance(event, MessageReceived):
                self.seen.append(event.message)
            return original(event)
        member.step = step  # type: ignore[method-assign]

    def _publish(self, kind: str, body: dict[str, Any], **_: Any) -> bool:
        self.published.append((kind, body))
        return True

    def deliver(self, host: str, kind: str, body: dict[str, Any]) -> None:
        """What the agent does with a verified envelope (runtime.Agent._on_envelope)."""
        if kind == "direct" and body.get("rpc") in ("request", "reply"):
            self.executor.on_rpc(host, body)
            return
        out = self.core.step(EnvelopeReceived(host=host, incarnation=1, kind=kind, body=body, now_ms=0))
        self.rejected += sum(isinstance(o, MessageRejected) for o in out)


def test_well_formed_messages_reach_the_core_and_misrouted_ones_do_not(tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    gate.deliver("h2", "cluster", {"msg": codec.to_data(MESSAGES[3])})           # a broadcast
    gate.deliver("h2", "direct", {"msg": codec.to_data(MESSAGES[4])})            # to h1: us
    assert gate.seen == [MESSAGES[3], MESSAGES[4]]
    forged = [
        ("h3", "cluster", {"msg": codec.to_data(MESSAGES[3])}),                   # h3 speaking for h2
        ("h2", "cluster", {"msg": codec.to_data(MESSAGES[4])}),                   # direct sent as broadcast
        ("h2", "direct", {"msg": codec.to_data(VoteGranted(sender="h2", term=3, to="h3"))}),  # not ours
        ("h2", "cluster", {"msg": {"type": "Ack", "sender": "h2"}}),              # malformed
        ("h2", "cluster", {}),                                                   # no message
    ]
    for host, kind, body in forged:
        gate.deliver(host, kind, body)
    assert gate.seen == [MESSAGES[3], MESSAGES[4]]
    assert gate.rejected == len(forged)


@given(st.dictionaries(st.sampled_from(["msg", "rpc", "id", "to", "op", "x"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                                    max_leaves=12), max_size=4))
@FUZZ
def test_any_signed_body_never_crashes_the_gate(tmp_path_factory: Any, body: dict[str, Any]) -> None:
    gate = Gate(tmp_path_factory.mktemp("gate"))

    async def deliver() -> None:
        gate.deliver("h2", "cluster", body)
        gate.deliver("h2", "direct", body)
        await asyncio.sleep(0)          # let an rpc request, if any, run its handler
        for entry in list(gate.executor.running.values()):
            if entry.task is not None:
                await asyncio.wait_for(entry.task, 5)
    asyncio.run(deliver())
    assert all(isinstance(m, (Heartbeat, Proposal, Ack, VoteRequest, VoteGranted)) for m in gate.seen)


def test_saved_state_round_trips_and_a_damaged_file_stops_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster-state.json"
    save_persisted(path, PersistState(id="x", term=4, voted_for="h2", accepted=STATE, committed=STATE))
    saved = load_persisted(path)
    assert saved is not None and (saved.term, saved.voted_for, saved.committed) == (4, "h2", STATE)
    path.write_text('{"term": 4, "voted_for": "h2", "accepted": {"vms": 3}, "committed": {}}')
    with pytest.raises(ConfigError, match="malformed"):
        load_persisted(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read the saved cluster state"):
        load_persisted(path)
