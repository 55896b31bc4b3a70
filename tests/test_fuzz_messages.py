"""Fuzz: a validly signed envelope whose body has any JSON shape never crashes the host core.

`haguard/core/wire.py`'s own tests (tests/test_wire.py) already feed arbitrary bytes and
objects to `decode`; this file covers the next parser: `HostCore.step(EnvelopeReceived(...))`
with arbitrary bodies, after a real encode/decode round trip, then the views built
from what was remembered (`status`, `heartbeat`), which must stay JSON data.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haguard.core import wire
from haguard.core.detector import BrokerConnectionChanged, DetectorTiming, PeerState, PeerStateChanged
from haguard.core.host import HostCore
from haguard.core.host_types import EnvelopeReceived, HostConfig
from haguard.core.peers import VmSize

KEY = b"k" * 32
CFG = HostConfig(me="h1", peers=("h1", "h2", "h3"),
                 timing=DetectorTiming(suspect_timeout_ms=900, dead_timeout_ms=1500),
                 memory_mib=8192, vcpus=8, vm_sizes={"web": VmSize(memory_mib=2048, vcpus=2)})
FUZZ = settings(max_examples=200, deadline=500, suppress_health_check=[HealthCheck.too_slow])

leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_data = st.recursive(leaf, lambda inner: st.lists(inner, max_size=5)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=10)
# The keys a heartbeat body really has, with values of any shape: reaches the typed paths.
known = st.sampled_from(["health", "failing", "capacity", "vms", "hears", "reaches", "reason"])
bodies = st.dictionaries(known | st.text(max_size=8), json_data, max_size=6)
kinds = st.sampled_from(["heartbeat", "offline", "state", "probe-request", "alert"])


def signed(host: str, kind: str, body: dict[str, Any], seq: int) -> EnvelopeReceived:
    """The body as the agent gets it: encoded, signed, decoded (floats and keys as JSON makes them)."""
    data = wire.encode(wire.Envelope(cluster="c1", host=host, incarnation=1, seq=seq, kind=kind,
                                     body=body), KEY)
    env = wire.decode(data, KEY, "c1")
    assert isinstance(env, wire.Envelope)
    return EnvelopeReceived(host=env.host, incarnation=env.incarnation, kind=env.kind, body=env.body,
                          now_ms=100 * seq)


@pytest.mark.timeout(30)
@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["h2", "h3", "h9"]), kinds, bodies), min_size=1, max_size=4))
def test_any_body_is_absorbed_and_views_stay_json(msgs: list[tuple[str, str, dict[str, Any]]]) -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    for seq, (host, kind, body) in enumerate(msgs, start=1):
        n.step(signed(host, kind, body, seq))
        n.tick(100 * seq + 50)
    now = 100 * len(msgs) + 100
    status = n.status(now)
    json.dumps(status, allow_nan=False)         # the status file must stay writable
    json.dumps(n.report(now), allow_nan=False)
    assert {h["name"] for h in status["hosts"]} == {"h1", "h2", "h3"}   # h9 is no member: ignored
    for host in ("h2", "h3"):
        hb = n.peer_report(host)
        if hb is None:
            continue
        assert all(isinstance(x, str) for x in hb["hears"] + hb["reaches"])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in hb.get("vms", {}).items())
        assert all(type(v) is int for v in hb.get("capacity", {}).values())
    assert all(isinstance(v["name"], str) and isinstance(v["state"], str) for v in status["vms"])


@pytest.mark.timeout(30)
@FUZZ
@given(bodies)
def test_a_heartbeat_of_any_shape_still_counts_as_liveness(body: dict[str, Any]) -> None:
    # Garbage inside a signed heartbeat is dropped field by field; the heartbeat itself is evidence.
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(BrokerConnectionChanged(connected=True, now_ms=0))
    out = n.step(signed("h2", "heartbeat", body, 1))
    assert [(o.host, o.new) for o in out if isinstance(o, PeerStateChanged)] == [("h2", PeerState.ALIVE)]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("body", [
    {"hears": "h1", "reaches": {"h1": 1}, "vms": ["db"], "capacity": [1], "failing": "x", "health": 3},
    {"hears": [1, None, ["h1"]], "vms": {"db": 1, "web": "running"}, "capacity": {"vcpus": True, "m": 2},
     "failing": [1, {"name": ["x"]}, {"reason": "r" * 1000}]},
    {"hears": [f"h{i}" for i in range(5000)]},
])
def test_mistyped_heartbeat_fields_are_dropped(body: dict[str, Any]) -> None:
    n = HostCore(CFG, incarnation=1, now_ms=0)
    n.step(signed("h2", "heartbeat", body, 1))
    hb = n.peer_report("h2")
    assert hb is not None
    assert len(hb["hears"]) <= 256 and all(isinstance(x, str) for x in hb["hears"])
    assert hb.get("vms", {}) in ({}, {"web": "running"})
    assert hb.get("capacity", {}) in ({}, {"m": 2})
    assert all(len(f["reason"]) <= 200 for f in hb.get("failing", []))
    json.dumps(n.status(200), allow_nan=False)
