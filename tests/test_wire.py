"""The gossip wire format: encoding, signature, strict decoding and replay ordering."""

from __future__ import annotations

import ast
import inspect
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haguard.core import hostkeys, wire
from haguard.core.wire import Envelope, Rejected, ReplayGuard, decode, encode
from haguard.names import NAME_RE

KEY = b"0123456789abcdef-cluster-key"
OTHER_KEY = b"fedcba9876543210-other-key"
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(wire.NAME_PATTERN, fullmatch=True)
kinds = st.sampled_from(["heartbeat", "state", "offline", "probe-request", "probe-reply", "alert"])
counters = st.integers(min_value=0, max_value=2**63 - 1)
json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_data = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
bodies = st.dictionaries(st.text(max_size=8), json_data, max_size=5)


@st.composite
def envelopes(draw: st.DrawFn, cluster: str | None = None) -> Envelope:
    return Envelope(cluster=cluster or draw(names), host=draw(names), incarnation=draw(counters),
                    seq=draw(counters), kind=draw(kinds), body=draw(bodies), sent_ms=draw(counters))


def env(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(cluster="c1", host="h1", incarnation=1, seq=1, kind="heartbeat",
                                body={}, sent_ms=0)
    return Envelope(**(base | kw))


def signed_raw(obj: dict[str, Any], key: bytes = KEY) -> bytes:
    """A hand-built message, signed the way encode() signs, to test decode's other checks."""
    import hashlib
    import hmac
    unsigned = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    sig = hmac.new(key, unsigned.encode(), hashlib.sha256).hexdigest()
    return json.dumps(obj | {"sig": sig}, sort_keys=True, separators=(",", ":")).encode()


def fields(**kw: Any) -> dict[str, Any]:
    return {"v": 1, "cluster": "c1", "host": "h1", "incarnation": 1, "seq": 1, "kind": "heartbeat",
            "body": {}, "sent_ms": 0} | kw


# ---- encoding ------------------------------------------------------------------

@pytest.mark.timeout(30)
@QUICK
@given(envelopes())
def test_round_trip(e: Envelope) -> None:
    data = encode(e, KEY)
    assert decode(data, KEY, e.cluster) == e
    # Canonical: sorted keys, no whitespace, ASCII.
    obj = json.loads(data)
    assert list(obj) == sorted(obj) and obj["v"] == 1 and len(obj["sig"]) == 64
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


@pytest.mark.timeout(10)
def test_encoding_is_deterministic_and_keyed() -> None:
    e = env(body={"b": [1, 2], "a": "é"})
    assert encode(e, KEY) == encode(e, KEY)
    assert encode(e, KEY) != encode(e, OTHER_KEY)
    assert encode(e, KEY).startswith(b'{"body":{"a":"\\u00e9","b":[1,2]},"cluster":"c1",')


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("kw", "why"), [
    ({"host": "Bad/Host"}, "bad host"),
    ({"cluster": ""}, "bad cluster"),
    ({"kind": "Heart Beat"}, "bad kind"),
    ({"seq": -1}, "bad seq"),
    ({"incarnation": True}, "bad incarnation"),
    ({"sent_ms": 2**64}, "bad sent_ms"),
    ({"body": {1: "x"}}, "key that is not a string"),
    ({"body": {"x": float("nan")}}, "nan"),
    ({"body": {"x": {1, 2}}}, "set"),
    ({"body": {"x": "y" * 70000}}, "over 65536"),
])
def test_encode_refuses_what_decode_would_refuse(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        encode(env(**kw), KEY)


@pytest.mark.timeout(10)
def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        encode(env(), b"short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        decode(b"{}", b"", "c1")


# ---- decoding: never raises, rejects everything that is not exactly right --------

@pytest.mark.timeout(30)
@QUICK
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(decode(data, KEY, "c1"), Rejected)


@pytest.mark.timeout(30)
@QUICK
@given(json_data)
def test_arbitrary_json_never_raises(value: Any) -> None:
    out = decode(json.dumps(value).encode(), KEY, "c1")
    assert isinstance(out, Rejected)


@pytest.mark.timeout(30)
@QUICK
@given(st.dictionaries(st.sampled_from(sorted(wire._FIELDS)), json_data))
def test_arbitrary_objects_with_the_right_field_names_never_raise(obj: dict[str, Any]) -> None:
    assert isinstance(decode(json.dumps(obj).encode(), KEY, "c1"), Rejected)


@pytest.mark.timeout(60)
@QUICK
@given(envelopes(cluster="c1"), st.data())
def test_any_single_bit_flip_is_rejected(e: Envelope, data: st.DataObject) -> None:
    good = encode(e, KEY)
    bit = data.draw(st.integers(min_value=0, max_value=len(good) * 8 - 1))
    bad = bytearray(good)
    bad[bit // 8] ^= 1 << (bit % 8)
    assert isinstance(decode(bytes(bad), KEY, "c1"), Rejected)


@pytest.mark.timeout(30)
def test_every_single_bit_flip_of_one_message_is_rejected() -> None:
    good = encode(env(body={"vm": "web1", "load": 0.25, "name": "\u00e9t\u00e9", "ok": True}), KEY)
    for bit in range(len(good) * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        out = decode(bytes(bad), KEY, "c1")
        assert isinstance(out, Rejected), f"bit {bit} flipped: {bytes(bad)!r} accepted"


@pytest.mark.timeout(10)
def test_escape_case_change_is_caught_by_the_canonical_check() -> None:
    good = encode(env(body={"x": "\u00e9"}), KEY)
    bad = good.replace(b"\\u00e9", b"\\u00E9")    # same content, one bit away
    assert decode(bad, KEY, "c1") == Rejected(reason="not in canonical form")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("data", "reason"), [
    (b"x" * 70000, "oversize: 70000 bytes, limit 65536"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{\"v\":1", "not JSON"),
    (b"", "not JSON"),
    (b"[" * 50000 + b"]" * 50000, "oversize"),
    (b"[" * 30000 + b"]" * 30000, "not JSON"),          # nesting past the parser's recursion limit
    (b"1" * 5000, "not JSON"),                          # past Python's int digit limit
    (b'{"v":NaN}', "not JSON"),
    (b"[1,2]", "not a JSON object"),
    (b"{}", "no version"),
    (b'{"v":true}', "no version"),
    (b'{"v":2}', "unknown version 2"),
    (json.dumps({k: v for k, v in fields().items() if k != "seq"} | {"sig": "0" * 64}).encode(),
     "missing field 'seq'"),
    (json.dumps(fields(extra=1, sig="0" * 64)).encode(), "unknown field 'extra'"),
    (json.dumps(fields(sig="0" * 64)).encode(), "bad signature"),
    (json.dumps(fields(sig=None)).encode(), "bad signature"),
    (json.dumps(fields(sig="ab")).encode(), "bad signature"),
])
def test_malformed_messages_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    out = decode(data, KEY, "c1")
    assert isinstance(out, Rejected)
    assert out.reason.startswith(reason), out.reason


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("obj", "reason"), [
    (fields(seq=True), "bad seq True"),
    (fields(seq=1.0), "bad seq 1.0"),
    (fields(incarnation=-1), "bad incarnation -1"),
    (fields(sent_ms=2**63), "bad sent_ms"),
    (fields(host="H1"), "bad host 'H1'"),
    (fields(host="a/b"), "bad host"),
    (fields(host=None), "bad host None"),
    (fields(kind=""), "bad kind"),
    (fields(body=[]), "body is not an object"),
    (fields(cluster="c2"), "foreign cluster 'c2'"),
])
def test_signed_but_mistyped_or_foreign_messages_are_rejected(obj: dict[str, Any], reason: str) -> None:
    out = decode(signed_raw(obj), KEY, "c1")
    assert isinstance(out, Rejected) and out.reason.startswith(reason), out


@pytest.mark.timeout(10)
def test_signature_checks() -> None:
    good = encode(env(), KEY)
    assert isinstance(decode(good, KEY, "c1"), Envelope)
    assert decode(good, OTHER_KEY, "c1") == Rejected(reason="bad signature")
    # A message signed with the right key but re-spelled (whitespace) is refused.
    spaced = json.dumps(json.loads(good), sort_keys=True).encode()
    assert decode(spaced, KEY, "c1") == Rejected(reason="not in canonical form")
    # A message from another cluster (even one sharing the key) is refused.
    assert decode(encode(env(cluster="c2"), KEY), KEY, "c1") == Rejected(reason="foreign cluster 'c2'")
    # A smaller size limit applies.
    assert decode(good, KEY, "c1", max_size=10) == Rejected(reason=f"oversize: {len(good)} bytes, limit 10")
    assert decode("text", KEY, "c1") == Rejected(reason="payload is str, not bytes")  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_a_host_key_signature_is_required_where_the_host_has_a_key() -> None:
    # A member holding the cluster key can sign as any host: with host keys it cannot.
    h1, h2, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rotated = Ed25519PrivateKey.generate()
    keys = {"h1": (h1.public_key(), rotated.public_key()), "h2": (h2.public_key(),)}
    e = Envelope(cluster="c1", host="h1", incarnation=1, seq=5, kind="cluster", body={"x": [1, "y"]})
    signed = encode(e, KEY, signer=hostkeys.signer_of(h1))
    assert decode(signed, KEY, "c1", host_keys=keys) == e
    assert decode(encode(e, KEY, signer=hostkeys.signer_of(rotated)), KEY, "c1", host_keys=keys) == e
    assert decode(signed, KEY, "c1") == e                 # no keys given: the HMAC alone
    for forged in (encode(e, KEY), encode(e, KEY, signer=hostkeys.signer_of(forger)),
                   encode(e, KEY, signer=hostkeys.signer_of(h2))):
        refused = Rejected(reason="not signed with the host key of 'h1'")
        assert decode(forged, KEY, "c1", host_keys=keys) == refused
    # The signature covers every field: another seq under a copied hsig fails.
    obj = json.loads(signed)
    later = Envelope(cluster="c1", host="h1", incarnation=1, seq=6, kind="cluster", body={"x": [1, "y"]})
    other = encode(later, KEY, signer=lambda _: obj["hsig"])
    assert isinstance(decode(other, KEY, "c1", host_keys=keys), Rejected)
    # Switching over (require_host_keys off): a message without hsig is taken, a wrong one never.
    assert decode(encode(e, KEY), KEY, "c1", host_keys=keys, require_host_keys=False) == e
    wrong = encode(e, KEY, signer=hostkeys.signer_of(forger))
    assert isinstance(decode(wrong, KEY, "c1", host_keys=keys, require_host_keys=False), Rejected)
    # A host without a configured key (a cluster switching over) is taken on the HMAC.
    e3 = Envelope(cluster="c1", host="h3", incarnation=1, seq=1, kind="cluster")
    assert decode(encode(e3, KEY), KEY, "c1", host_keys=keys) == e3
    public = hostkeys.parse_public(hostkeys.public_text(h1))
    assert public.public_bytes_raw() == h1.public_key().public_bytes_raw()
    with pytest.raises(ValueError, match="32"):
        hostkeys.parse_public("AAAA")
    with pytest.raises(ValueError, match="base64"):
        hostkeys.parse_private("not base64!")


def test_wire_names_follow_the_config_names_and_the_core_stays_pure() -> None:
    assert wire.NAME_PATTERN == NAME_RE
    tree = ast.parse(inspect.getsource(wire))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("haguard.core.")}
    # Only the standard library's pure parts, and the core itself (tests/test_walls.py checks all of it).
    assert imported <= {"__future__", "hashlib", "hmac", "json", "re", "dataclasses", "typing"}, imported


# ---- replay guard --------------------------------------------------------------

def run_guard(guard: ReplayGuard, *msgs: Envelope) -> list[bool]:
    out = []
    for m in msgs:
        ok = guard.check(m) is None
        if ok:
            guard.accept(m)
        out.append(ok)
    return out


@pytest.mark.timeout(10)
def test_replay_rules() -> None:
    g = ReplayGuard()
    assert run_guard(
        g,
        env(incarnation=3, seq=5),                  # first sight: accepted
        env(incarnation=3, seq=5),                  # same again: replay
        env(incarnation=3, seq=4),                  # older: replay
        env(incarnation=3, seq=6),                  # newer
        env(incarnation=2, seq=100),                # older incarnation: replay whatever the seq
        env(incarnation=3, seq=0, kind="offline"),  # the last will of incarnation 3: once
        env(incarnation=3, seq=0, kind="offline"),  # ... and only once
        env(incarnation=3, seq=7),                  # reconnected in the same incarnation
        env(incarnation=4, seq=1),                  # restarted: reset
        env(incarnation=3, seq=8),                  # the old incarnation is gone
        env(incarnation=3, seq=0, kind="offline"),  # and so is its will
        env(incarnation=4, seq=0, kind="offline"),  # the new incarnation's will
        env(incarnation=5, seq=0, kind="offline"),  # a will first, for a newer incarnation
        env(incarnation=5, seq=1),
        env(host="h2", incarnation=1, seq=1),       # marks are per host
    ) == [True, False, False, True, False, True, False, True, True, False, False, True, True, True, True]
    assert g.mark("h1") == (5, 1) and g.mark("h2") == (1, 1) and len(g) == 2


@pytest.mark.timeout(10)
def test_replay_reasons_and_misuse() -> None:
    g = ReplayGuard()
    run_guard(g, env(incarnation=3, seq=5))
    assert g.check(env(incarnation=3, seq=5)) == Rejected(reason="replay: seq 5 <= 5 in incarnation 3")
    assert g.check(env(incarnation=2, seq=9)) == Rejected(reason="replay: incarnation 2 < 3")
    with pytest.raises(ValueError, match="replay"):
        g.accept(env(incarnation=3, seq=1))
    assert g.mark("h1") == (3, 5)
    # A graceful offline (seq > 0) follows the ordinary rule and uses up the will.
    assert run_guard(g, env(incarnation=3, seq=6, kind="offline"),
                     env(incarnation=3, seq=0, kind="offline")) == [True, False]
    g.forget("h1")
    assert g.mark("h1") is None and g.check(env(incarnation=1, seq=1)) is None


@pytest.mark.timeout(10)
def test_memory_is_bounded() -> None:
    g = ReplayGuard(max_hosts=3)
    assert run_guard(g, *(env(host=f"h{i}") for i in range(5))) == [True, True, True, False, False]
    assert g.check(env(host="h9")) == Rejected(reason="too many hosts (limit 3)")
    assert run_guard(g, env(host="h0", seq=2)) == [True]      # known hosts still go on
    assert len(g) == 3


@pytest.mark.timeout(60)
@QUICK
@given(st.lists(st.tuples(st.sampled_from(["h1", "h2"]), st.integers(0, 3), st.integers(0, 4),
                          st.sampled_from(["heartbeat", "offline"])), max_size=40))
def test_replays_are_never_accepted(msgs: list[tuple[str, int, int, str]]) -> None:
    g = ReplayGuard()
    accepted: list[Envelope] = []
    for host, inc, seq, kind in msgs:
        e = env(host=host, incarnation=inc, seq=seq, kind=kind)
        if g.check(e) is None:
            g.accept(e)
            accepted.append(e)
    for host in ("h1", "h2"):
        mine = [e for e in accepted if e.host == host]
        # Nothing accepted twice, incarnations never go back.
        assert len({(e.incarnation, e.seq, e.kind) for e in mine}) == len(mine)
        assert [e.incarnation for e in mine] == sorted(e.incarnation for e in mine)
        # Within an incarnation, ordinary messages strictly increase; at most one will.
        for inc in {e.incarnation for e in mine}:
            seqs = [e.seq for e in mine if e.incarnation == inc and not (e.kind == "offline" and e.seq == 0)]
            assert seqs == sorted(set(seqs))
            wills = [e for e in mine if e.incarnation == inc and e.kind == "offline" and e.seq == 0]
            assert len(wills) <= 1
        # Everything accepted is rejected when sent again.
        for e in mine:
            assert g.check(e) is not None


@pytest.mark.timeout(10)
def test_a_replayed_signed_message_is_valid_on_the_wire_but_stopped_by_the_guard() -> None:
    data = encode(env(incarnation=2, seq=10, body={"load": 1}), KEY)
    g = ReplayGuard()
    first = decode(data, KEY, "c1")
    again = decode(data, KEY, "c1")
    assert isinstance(first, Envelope) and isinstance(again, Envelope)
    assert run_guard(g, first, again) == [True, False]
