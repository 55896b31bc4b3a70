"""Each host's own signing key (Ed25519): a message signed with it was sent by that host.

The cluster key (an HMAC every member holds) proves only that some member sent a
message; any member can sign as any other.  With host keys, every envelope also carries
`hsig`, the sender's Ed25519 signature over the same canonical fields (core/wire.py), and
a receiver that knows the sender's public key (`hosts[].public_keys` in the cluster
file) refuses a message without a valid one: a compromised member, or anyone holding the
cluster key, can no longer speak as another host.  Several public keys per host let a
key be rotated host by host without a restart: the new one is added everywhere first,
the host switches, the old one is removed, each step picked up by a reload (SIGHUP).  A
key is named by its id, `key_id()`: the first 16 characters of the base64 SHA-256 of its
raw bytes (as OpenSSH's fingerprints), shown by `haguard keygen`, `check-config` and the
status; the wire needs no id, since a receiver tries the few keys of one host.

Keys travel as base64 of the raw 32 bytes, as WireGuard and OpenSSH's wire format do.
The `cryptography` library (OpenSSL) does the arithmetic; nothing here touches a file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

Signer = Callable[[bytes], str]                          # canonical bytes -> hsig
HostKeys = Mapping[str, tuple[Ed25519PublicKey, ...]]    # host -> its accepted public keys

SIG_PATTERN = r"^[A-Za-z0-9+/]{86}==$"                   # 64 bytes in base64
_SIG = re.compile(SIG_PATTERN)
_RAW = serialization.Encoding.Raw


def _raw(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, an Ed25519 {what} key has 32")
    return raw


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key from base64 of its 32 raw bytes; ValueError says what is wrong."""
    return Ed25519PublicKey.from_public_bytes(_raw(text, "public"))


def parse_private(text: str) -> Ed25519PrivateKey:
    """A private key from base64 of its 32 raw bytes (what `haguard keygen` writes)."""
    return Ed25519PrivateKey.from_private_bytes(_raw(text, "private"))


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(_RAW, serialization.PublicFormat.Raw)).decode()


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey | str) -> str:
    """A short name for a public key (of a private key: of its public half)."""
    text = key if isinstance(key, str) else public_text(key)
    return "SHA256:" + base64.b64encode(hashlib.sha256(_raw(text, "public")).digest()).decode()[:16]


def private_text(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def signer_of(key: Ed25519PrivateKey) -> Signer:
    return lambda data: base64.b64encode(key.sign(data)).decode()


def verify(keys: tuple[Ed25519PublicKey, ...], data: bytes, sig: object) -> bool:
    """Whether `sig` is a signature of `data` by one of `keys`."""
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        return False
    raw = base64.b64decode(sig)
    for key in keys:
        try:
            key.verify(raw, data)
            return True
        except InvalidSignature:
            continue
    return False
