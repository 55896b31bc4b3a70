"""Fuzz: QEMU monitor replies of any shape become a value or one clear error.

Covers haguard/migration/replies.py (query-migrate -> MigrationSample, the engine's
only path), the preflight reply handling (`source_state`, `identity_from_replies`),
the capability schema lookup (`features._schema_lookup`) and the guest status dump
parser (`guest.build.parse_status`).  Real replies from QEMU 7.2 are the seeds; they
are mutated key by key and replaced by arbitrary JSON.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haguard.core.strategy import MigrationSample
from haguard.errors import HaguardError, PreflightError, QmpError
from haguard.guest.build import GuestStatus, parse_status
from haguard.migration import preflight, replies
from haguard.migration.features import _schema_lookup
from haguard.migration.replies import MalformedReply

FUZZ = settings(max_examples=300, deadline=500)

leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats() | st.text(max_size=12))
json_data = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)

# query-migrate from QEMU 7.2 during pre-copy (trimmed to what haguard reads, plus neighbours).
ACTIVE = {"status": "active", "expected-downtime": 300, "setup-time": 12, "total-time": 1500,
          "ram": {"transferred": 123456789, "remaining": 4096000, "total": 1074987008,
                  "duplicate": 250000, "normal": 30000, "normal-bytes": 122880000,
                  "dirty-pages-rate": 1200, "mbps": 953.7, "dirty-sync-count": 3,
                  "page-size": 4096, "multifd-bytes": 0, "pages-per-second": 29000,
                  "postcopy-requests": 0, "precopy-bytes": 0, "downtime-bytes": 0,
                  "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}}
COMPLETED = {"status": "completed", "setup-time": 12, "downtime": 41, "total-time": 3200,
             "ram": dict(ACTIVE["ram"], remaining=0)}      # type: ignore[arg-type]
SAMPLE_KEYS = ("transferred", "remaining", "total", "dirty-pages-rate", "mbps", "dirty-sync-count",
               "page-size")


def check_sample(s: MigrationSample) -> None:
    assert isinstance(s.status, str) and s.status
    for v in (s.passes, s.transferred_bytes, s.remaining_bytes, s.total_bytes, s.dirty_rate_bps,
              s.throughput_bps):
        assert type(v) is int and 0 <= v < 2**65
    assert s.expected_downtime_ms is None or (type(s.expected_downtime_ms) is int
                                              and s.expected_downtime_ms >= 0)


def check_error(exc: HaguardError) -> None:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) < 300, text


@st.composite
def mutated(draw: st.DrawFn, seed: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`seed` with one key (top level or in `ram`) deleted or given any value; and that key."""
    reply = copy.deepcopy(seed)
    where = draw(st.sampled_from(["top", "ram"]))
    target = reply if where == "top" else reply["ram"]
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(json_data)
    return reply, key


@pytest.mark.timeout(30)
@FUZZ
@given(json_data)
def test_any_json_is_a_sample_or_a_malformed_reply(reply: Any) -> None:
    try:
        check_sample(replies.migration_sample(reply, now_ms=5))
    except MalformedReply as exc:
        check_error(exc)
        assert str(exc).startswith("malformed query-migrate reply from QEMU: ")


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from([ACTIVE, COMPLETED]).flatmap(mutated))
def test_one_bad_field_is_named_or_harmless(case: tuple[dict[str, Any], str]) -> None:
    reply, key = case
    try:
        s = replies.migration_sample(reply, now_ms=5)
    except MalformedReply as exc:
        check_error(exc)
        assert key in str(exc)                  # the message names the field that broke
        return
    check_sample(s)
    if key not in (*SAMPLE_KEYS, "status", "ram", "expected-downtime"):
        seed = ACTIVE if reply.get("status", "x") == "active" or "expected-downtime" in reply else COMPLETED
        assert s == replies.migration_sample(seed, now_ms=5)   # keys haguard does not read: no effect


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("reply", "why"), [
    ([], "reply is list, not an object"),
    ({"status": 3}, "status is 3, not a state name"),
    ({"status": "active\nfailed"}, "not a state name"),
    ({"status": "active", "ram": "full"}, "ram is str, not an object"),
    ({"status": "active", "ram": {"transferred": "12"}}, "ram.transferred is '12', not a counter"),
    ({"status": "active", "ram": {"remaining": -1}}, "ram.remaining is -1, not a counter"),
    ({"status": "active", "ram": {"total": 1.5}}, "ram.total is 1.5, not a counter"),
    ({"status": "active", "ram": {"dirty-sync-count": True}}, "not a counter"),
    ({"status": "active", "ram": {"mbps": "fast"}}, "ram.mbps is 'fast', not a rate"),
    ({"status": "active", "ram": {"mbps": float("nan")}}, "not a rate"),
    ({"status": "active", "ram": {"transferred": 2**64}}, "not a counter"),
    ({"status": "active", "expected-downtime": -300}, "expected-downtime is -300"),
])
def test_malformed_replies_are_named(reply: Any, why: str) -> None:
    with pytest.raises(MalformedReply, match=why.replace("(", r"\(").replace(")", r"\)")) as info:
        replies.migration_sample(reply, now_ms=0)
    assert isinstance(info.value, QmpError)     # the engine treats it like a monitor it cannot read
    check_error(info.value)


@pytest.mark.timeout(10)
def test_real_replies_and_defaults() -> None:
    s = replies.migration_sample(ACTIVE, now_ms=7)
    assert (s.now_ms, s.status, s.passes, s.remaining_bytes) == (7, "active", 3, 4096000)
    assert s.dirty_rate_bps == 1200 * 4096 and s.throughput_bps == int(953.7e6 / 8)
    assert s.expected_downtime_ms == 300
    assert replies.migration_sample({}, now_ms=0) == MigrationSample(now_ms=0, status="none")
    assert replies.migration_sample({"status": "setup"}, now_ms=1).total_bytes == 0
    assert replies.migration_sample({"status": "active", "ram": {"page-size": 0, "dirty-pages-rate": 2}},
                                    now_ms=0).dirty_rate_bps == 2 * 4096
    assert replies.optional_ms(COMPLETED, "downtime") == 41
    assert replies.optional_ms({"downtime": "41"}, "downtime") is None
    assert replies.optional_ms(None, "setup-time") is None


# ---- preflight ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
@FUZZ
@given(json_data | st.fixed_dictionaries({"status": json_data}),
       json_data | st.fixed_dictionaries({"status": json_data}))
def test_source_state_is_a_run_state_or_a_preflight_error(status: Any, migrate: Any) -> None:
    try:
        assert preflight.source_state(status, migrate) in ("running", "paused")
    except PreflightError as exc:
        check_error(exc)


@pytest.mark.timeout(10)
def test_source_state_cases() -> None:
    assert preflight.source_state({"status": "running", "running": True}, {}) == "running"
    assert preflight.source_state({"status": "paused"}, {"status": "completed"}) == "paused"
    for status, migrate, why in [
        ({"status": "postmigrate"}, {}, "is 'postmigrate', not running"),
        ({"status": "running"}, {"status": "active"}, "already has a migration in state 'active'"),
        ({}, {}, "malformed query-status reply from QEMU: status is missing"),
        ({"status": "running"}, [], "malformed query-migrate reply"),
    ]:
        with pytest.raises(PreflightError, match=why):
            preflight.source_state(status, migrate)


@pytest.mark.timeout(30)
@FUZZ
@given(json_data | st.fixed_dictionaries({"base-memory": json_data}), json_data, json_data)
def test_identity_is_well_typed_or_a_preflight_error(mem: Any, machine: Any, cpu: Any) -> None:
    try:
        ident = preflight.identity_from_replies(mem, machine, cpu)
    except PreflightError as exc:
        check_error(exc)
        return
    assert type(ident["ram_bytes"]) is int and ident["ram_bytes"] > 0
    assert isinstance(ident["machine"], str) and isinstance(ident["cpu"], str)


@pytest.mark.timeout(10)
def test_identity_cases() -> None:
    ident = preflight.identity_from_replies({"base-memory": 268435456, "plugged-memory": 0},
                                            "pc-q35-7.2-machine", "qemu64-x86_64-cpu")
    assert ident == {"ram_bytes": 268435456, "machine": "pc-q35-7.2", "cpu": "qemu64"}
    with pytest.raises(PreflightError, match="base-memory is '256M', not a counter"):
        preflight.identity_from_replies({"base-memory": "256M"}, "pc", "")
    with pytest.raises(PreflightError, match="type is None, not a type name"):
        preflight.identity_from_replies({"base-memory": 1}, None, "")
    assert replies.first_cpu_path([]) is None
    assert replies.first_cpu_path([{"qom-path": "/machine/unattached/device[0]"}]) \
        == "/machine/unattached/device[0]"
    for bad in ({}, [1], [{"qom-path": 3}], [{}]):
        with pytest.raises(MalformedReply, match="query-cpus-fast"):
            replies.first_cpu_path(bad)


# ---- query-qmp-schema -------------------------------------------------------------------

SCHEMA = [
    {"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
    {"name": "query-migrate", "meta-type": "command", "arg-type": "0", "ret-type": "2"},
    {"name": "yank", "meta-type": "command", "arg-type": "3", "ret-type": "0"},
    {"name": "1", "meta-type": "object", "members": [
        {"name": "downtime-limit", "type": "int", "default": None},
        {"name": "multifd-compression", "type": "4", "default": None}]},
    {"name": "4", "meta-type": "enum", "values": ["none", "zlib", "zstd"],
     "members": [{"name": "none"}, {"name": "zlib"}, {"name": "zstd"}]},
]


@st.composite
def damaged_schema(draw: st.DrawFn) -> list[Any]:
    schema = copy.deepcopy(SCHEMA)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        i = draw(st.integers(min_value=0, max_value=len(schema) - 1))
        if not isinstance(schema[i], dict) or not schema[i] or draw(st.booleans()):
            schema[i] = draw(json_data)
            continue
        key = draw(st.sampled_from(sorted(schema[i])))
        schema[i][key] = draw(json_data)
    return schema


@pytest.mark.timeout(30)
@FUZZ
@given(json_data | damaged_schema())
def test_schema_lookup_never_raises(schema: Any) -> None:
    commands, compressions = _schema_lookup(schema)
    assert all(isinstance(c, str) for c in commands | compressions)
    listed = {e["name"] for e in schema if isinstance(e, dict) and e.get("meta-type") == "command"
              and isinstance(e.get("name"), str)} if isinstance(schema, list) else set()
    assert commands == listed


@pytest.mark.timeout(10)
def test_schema_lookup_reads_the_real_shape() -> None:
    assert _schema_lookup(SCHEMA) == (frozenset({"migrate-set-parameters", "query-migrate", "yank"}),
                                      frozenset({"none", "zlib", "zstd"}))
    assert _schema_lookup({"return": []}) == (frozenset(), frozenset())


# ---- the guest's status dump --------------------------------------------------------------

def xp_dump(words: list[int]) -> str:
    lines = []
    for i in range(0, len(words), 4):
        lines.append(f"{0x7000 + 4 * i:016x}: " + " ".join(f"0x{w:08x}" for w in words[i:i + 4]))
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(30)
@FUZZ
@given(st.text(max_size=400) | st.binary(max_size=50) | json_data)
def test_status_dump_is_parsed_or_refused(text: Any) -> None:
    try:
        assert isinstance(parse_status(text), GuestStatus)
    except HaguardError as exc:
        check_error(exc)


@pytest.mark.timeout(30)
@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=12, max_size=12))
def test_status_dump_round_trip(words: list[int]) -> None:
    s = parse_status(xp_dump(words))
    assert s.magic == words[0] and s.ms == words[2] | words[3] << 32
    assert s.passes == words[10] | words[11] << 32
    with pytest.raises(HaguardError, match="unexpected guest status dump"):
        parse_status(xp_dump(words[:11]))
