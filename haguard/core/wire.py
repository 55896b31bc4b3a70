"""The gossip wire format: signed envelopes, and the replay guard that orders them.

Every message between agents is one `Envelope`, encoded as canonical JSON (sorted
keys, no whitespace, ASCII with \\u escapes, so valid UTF-8) with an HMAC-SHA256
of the other fields under the cluster key in `"sig"`:

    {"body":{...},"cluster":"c1","host":"h1","incarnation":7,"kind":"heartbeat",
     "sent_ms":1700000000000,"seq":42,"sig":"<64 hex>","v":1}

`decode` accepts exactly what `encode` produces: anything else (oversize, not UTF-8,
not JSON, a missing or mistyped field, another version, a bad signature, a
non-canonical spelling, another cluster) comes back as `Rejected(reason=...)`; it
never raises on bytes.  A valid signature proves a cluster member sent the message,
not that it is fresh: `ReplayGuard` drops anything not newer than what was accepted
from that host before.

Ordering: an agent bumps its `incarnation` at every start and numbers its messages
with a strictly increasing `seq` from 1.  An incarnation starts at the wall clock in
milliseconds when a host has no counter, and only grows by one per start after that, so
one more than a day ahead of the receiver's clock is not a real one: accepting it would
make the guard drop the host's every real message (`MAX_INCARNATION_LEAD_MS`).

seq 0 is the MQTT last will: a signed "offline" envelope handed to the broker at
connect time, published by the broker when the connection dies, so it cannot carry a
fresh seq.

Host keys (core/hostkeys.py): a sender with its own key adds `"hsig"`, its Ed25519
signature over the canonical fields without `sig` and `hsig`; the HMAC then covers
`hsig` too.  A receiver given the sender's public keys (`host_keys`) refuses a message
without a valid `hsig` (while a cluster switches over, `require_host_keys` off, one
without any `hsig` is still taken; a wrong one never is).  A host with no configured key
is checked by the HMAC alone, and receivers of the previous release refuse `hsig`: turn
host keys on once every agent runs this release (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any

from haguard.core.errors import HaguardError
from haguard.core.hostkeys import HostKeys, Signer
from haguard.core.hostkeys import verify as verify_host_signature

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 65536
MIN_KEY_BYTES = 16
# Same as haguard.names.NAME_RE (not imported: the core stays free of pydantic).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
KIND_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
OFFLINE = "offline"
# A day: clocks that disagree by more are broken; a real host counts up from its clock.
MAX_INCARNATION_LEAD_MS = 86_400_000
# Integers travel as JSON numbers: keep them within a signed 64-bit range.
_MAX_INT = 2**63 - 1

_NAME = re.compile(NAME_PATTERN)
_KIND = re.compile(KIND_PATTERN)
_SIG = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = frozenset({"v", "cluster", "host", "incarnation", "seq", "kind", "body", "sent_ms", "sig"})
_OPTIONAL = frozenset({"hsig"})


@dataclass(frozen=True, kw_only=True)
class Envelope:
    cluster: str
    host: str
    incarnation: int            # bumped at every agent start
    seq: int                    # strictly increasing within an incarnation; 0 only for the last will
    kind: str                   # "heartbeat", "state", "offline", "probe-request", "probe-reply", "alert"
    body: dict[str, Any] = field(default_factory=dict)   # JSON data
    sent_ms: int = 0            # the sender's clock: informational, never used for ordering


@dataclass(frozen=True, kw_only=True)
class Rejected:
    reason: str


class MessageTooLarge(HaguardError, ValueError):
    """A well-formed envelope over MAX_MESSAGE_BYTES: not a bug in the caller but a size the
    wire does not carry (a sender drops it, counts it and goes on)."""


def encode(env: Envelope, key: bytes, *, signer: Signer | None = None) -> bytes:
    """The signed canonical encoding of `env` (with `signer`, this host's key, also `hsig`).
    Raises ValueError on an envelope that `decode` would refuse (bad names, negative
    numbers, a body that is not JSON data), and MessageTooLarge on one over MAX_MESSAGE_BYTES."""
    _check_key(key)
    fields = _fields(env)
    problem = _field_problem(fields) or _data_problem(env.body, depth=0)
    if problem is not None:
        raise ValueError(f"cannot encode envelope: {problem}")
    if signer is not None:
        fields["hsig"] = signer(canonical(fields).encode("ascii"))
    signed = dict(fields, sig=_sign(canonical(fields), key))
    data = canonical(signed).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"cannot encode envelope: {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes, key: bytes, cluster: str, *, max_size: int = MAX_MESSAGE_BYTES,
           host_keys: HostKeys | None = None, require_host_keys: bool = True) -> Envelope | Rejected:
    """The envelope in `data` if it is well formed, signed with `key` and from `cluster`, and
    signed by its host's own key where `host_keys` holds that host's (`require_host_keys`
    False, while a cluster switches over: a message without `hsig` is taken on the HMAC)."""
    _check_key(key)
    if not isinstance(data, bytes | bytearray | memoryview):
        return Rejected(reason=f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_size:
        return Rejected(reason=f"oversize: {len(data)} bytes, limit {max_size}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(reason="not UTF-8")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return Rejected(reason="not JSON")
    if not isinstance(obj, dict):
        return Rejected(reason="not a JSON object")
    version = obj.get("v")
    if type(version) is not int:
        return Rejected(reason="no version")
    if version != WIRE_VERSION:
        return Rejected(reason=f"unknown version {version}")
    missing = _FIELDS - obj.keys()
    if missing:
        return Rejected(reason=f"missing field {sorted(missing)[0]!r}")
    extra = obj.keys() - _FIELDS - _OPTIONAL
    if extra:
        return Rejected(reason=f"unknown field {_short(sorted(extra)[0])}")
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    problem = _field_problem(unsigned)
    if problem is not None:
        return Rejected(reason=problem)
    if obj["cluster"] != cluster:
        return Rejected(reason=f"foreign cluster {_short(obj['cluster'])}")
    sig = obj["sig"]
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        return Rejected(reason="bad signature")
    try:
        expected = _sign(canonical(unsigned), key)
        spelled = canonical(obj)
    except (ValueError, RecursionError):
        return Rejected(reason="body is not JSON data")
    if not hmac.compare_digest(expected, sig):
        return Rejected(reason="bad signature")
    keys = host_keys.get(obj["host"]) if host_keys is not None else None
    if keys and ("hsig" in obj or require_host_keys):
        plain = {k: v for k, v in unsigned.items() if k != "hsig"}
        if not verify_host_signature(keys, canonical(plain).encode("ascii"), obj.get("hsig")):
            return Rejected(reason=f"not signed with the host key of {_short(obj['host'])}")
    # The same content spelled another way: refuse, so one message has exactly one encoding.
    if spelled != text:
        return Rejected(reason="not in canonical form")
    return Envelope(cluster=obj["cluster"], host=obj["host"], incarnation=obj["incarnation"],
                    seq=obj["seq"], kind=obj["kind"], body=obj["body"], sent_ms=obj["sent_ms"])


def _fields(env: Envelope) -> dict[str, Any]:
    return {"v": WIRE_VERSION, "cluster": env.cluster, "host": env.host, "incarnation": env.incarnation,
            "seq": env.seq, "kind": env.kind, "body": env.body, "sent_ms": env.sent_ms}


def _field_problem(obj: dict[str, Any]) -> str | None:
    for name in ("cluster", "host"):
        value = obj[name]
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            return f"bad {name} {_short(value)}"
    if not isinstance(obj["kind"], str) or not _KIND.fullmatch(obj["kind"]):
        return f"bad kind {_short(obj['kind'])}"
    for name in ("incarnation", "seq", "sent_ms"):
        value = obj[name]
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            return f"bad {name} {_short(value)}"
    if not isinstance(obj["body"], dict):
        return "body is not an object"
    return None


def _data_problem(value: object, *, depth: int) -> str | None:
    """Why `value` would not come back equal from JSON (tuples are fine: they come back as lists)."""
    if depth > 32:
        return "body nested too deep"
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if value == value and abs(value) != float("inf") else f"body holds {value}"
    if isinstance(value, list | tuple):
        return next((p for v in value if (p := _data_problem(v, depth=depth + 1))), None)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "body has a key that is not a string"
        return next((p for v in value.values() if (p := _data_problem(v, depth=depth + 1))), None)
    return f"body holds a {type(value).__name__}"


def canonical(obj: dict[str, Any]) -> str:
    """The one JSON spelling of `obj` that is signed (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def incarnation_too_far_ahead(env: Envelope, wall_ms: int) -> Rejected | None:
    """An incarnation no real agent can have at the receiver's clock `wall_ms` (checked before
    the replay guard records it, and before anything else trusts it)."""
    if env.incarnation > wall_ms + MAX_INCARNATION_LEAD_MS:
        return Rejected(reason=f"incarnation {env.incarnation} is more than a day ahead of "
                               f"this host's clock ({wall_ms} ms)")
    return None


def _sign(canonical: str, key: bytes) -> str:
    return hmac.new(key, canonical.encode("ascii"), hashlib.sha256).hexdigest()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the cluster key must be at least {MIN_KEY_BYTES} bytes")


def _short(value: object) -> str:
    # Peer-supplied text goes into log lines: quoted, and cut short.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, kw_only=True)
class _Mark:
    incarnation: int
    seq: int
    offline_seen: bool


class ReplayGuard:
    """Per-host high-water mark of (incarnation, seq): `check` an envelope, then `accept` it.

    A lower incarnation is a replay; within an incarnation seq must grow; a higher
    incarnation resets the mark.  The last will ("offline" with seq 0, signed before the
    messages that follow it) is accepted once per incarnation, if that incarnation is
    not older than the mark.  One entry per host, and at most `max_hosts` hosts: past
    that, new hosts are refused rather than old marks forgotten (forgetting would
    reopen them to replays).
    """

    def __init__(self, *, max_hosts: int = 1024) -> None:
        self.max_hosts = max_hosts
        self._marks: dict[str, _Mark] = {}

    def check(self, env: Envelope) -> Rejected | None:
        mark = self._marks.get(env.host)
        if mark is None:
            if len(self._marks) >= self.max_hosts:
                return Rejected(reason=f"too many hosts (limit {self.max_hosts})")
            return None
        if env.incarnation < mark.incarnation:
            return Rejected(reason=f"replay: incarnation {env.incarnation} < {mark.incarnation}")
        if env.incarnation > mark.incarnation:
            return None
        if env.kind == OFFLINE and env.seq == 0:
            if mark.offline_seen:
                return Rejected(reason=f"replay: offline already seen for incarnation {env.incarnation}")
            return None
        if env.seq <= mark.seq:
            return Rejected(reason=f"replay: seq {env.seq} <= {mark.seq} in incarnation {env.incarnation}")
        return None

    def accept(self, env: Envelope) -> None:
        verdict = self.check(env)
        if verdict is not None:
            raise ValueError(f"accept() after a rejecting check(): {verdict.reason}")
        mark = self._marks.get(env.host)
        if mark is None or env.incarnation > mark.incarnation:
            self._marks[env.host] = _Mark(incarnation=env.incarnation, seq=env.seq,
                                          offline_seen=env.kind == OFFLINE)
        else:
            self._marks[env.host] = _Mark(incarnation=mark.incarnation, seq=max(mark.seq, env.seq),
                                          offline_seen=mark.offline_seen or env.kind == OFFLINE)

    def mark(self, host: str) -> tuple[int, int] | None:
        """The (incarnation, seq) last accepted from `host`."""
        m = self._marks.get(host)
        return None if m is None else (m.incarnation, m.seq)

    def forget(self, host: str) -> None:
        """Drop a host that left the cluster for good."""
        self._marks.pop(host, None)

    def __len__(self) -> int:
        return len(self._marks)
