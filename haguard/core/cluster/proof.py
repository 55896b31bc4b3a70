"""A heartbeat signed by its own host, so that a relayed copy proves where it came from.

Beyond a full mesh, the coordinator learns most hosts' heartbeats from digests that other
hosts relay (relay.py).  The envelope of a digest is signed by its sender, not by the
hosts whose heartbeats it carries: with the cluster key alone, one member could relay a
heartbeat "from" another host saying its VMs are gone, and the coordinator would start
them elsewhere while they still ran.  With host keys (core/hostkeys.py) every heartbeat
carries `proof`, its sender's signature over its canonical encoding (the codec's, with
`to` and `proof` left out, so one signature serves every copy), and a relayed heartbeat
of a host whose public key is configured is taken only with a valid one.

The signature covers the heartbeat's number too: an old heartbeat cannot come back as a
new one.  Each verified heartbeat is remembered per host, so the same copy arriving
through both relay halves is checked once.
"""

from __future__ import annotations

from dataclasses import replace

from haguard.core.cluster import codec
from haguard.core.cluster.types import Heartbeat
from haguard.core.hostkeys import HostKeys, Signer, verify
from haguard.core.wire import canonical


def content(beat: Heartbeat) -> bytes:
    return canonical(codec.to_data(replace(beat, to=None, proof=""))).encode("ascii")


def signed(beat: Heartbeat, signer: Signer | None) -> Heartbeat:
    return beat if signer is None else replace(beat, proof=signer(content(beat)))


class ProofCheck:
    def __init__(self, keys: HostKeys, *, required: bool = True) -> None:
        self.keys = keys
        self.required = required            # off while a cluster switches over: "" is taken
        self.refused = 0
        self._verified: dict[str, Heartbeat] = {}      # host -> the last heartbeat verified

    def trusted(self, beat: Heartbeat) -> bool:
        """Whether a relayed heartbeat may be believed: its host has no key, or it proves it."""
        keys = self.keys.get(beat.sender)
        if not keys or (not beat.proof and not self.required):
            return True
        last = self._verified.get(beat.sender)
        if last is not None and last.proof == beat.proof and last == beat and last.seq == beat.seq:
            return True
        if not verify(keys, content(beat), beat.proof):
            self.refused += 1
            return False
        self._verified[beat.sender] = beat
        return True
