"""Signed beats straight between hosts (adapters/directbeat.py), over real UDP on loopback
addresses: a peer counts as reached only when its own signed beat says it hears us."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.adapters.directbeat import DirectBeats
from haguard.core.detector import PingObserved
from haguard.core.hostkeys import HostKeys, signer_of
from haguard.core.wire import Envelope, encode
from tests.helpers.mosquitto import free_port
from tests.helpers.tasks import cancel_all

KEY = b"direct-beat-test-key-0123456789ab"
ADDR = {"h1": "127.0.0.2", "h2": "127.0.0.3"}


class Host:
    def __init__(self, me: str, port: int, *, own: Ed25519PrivateKey | None = None,
                 keys: HostKeys | None = None) -> None:
        self.seen: list[PingObserved] = []
        peers = {h: a for h, a in ADDR.items() if h != me}
        self.beats = DirectBeats(me=me, cluster="c1", incarnation=1, key=KEY, address=ADDR[me], port=port,
                                 peers=peers, on_result=self.seen.append, interval_ms=50, window_ms=150,
                                 signer=signer_of(own) if own is not None else None, host_keys=keys)

    def reached(self, peer: str) -> bool:
        return any(r.host == peer and r.ok and r.signed for r in self.seen[-2:])


@contextlib.asynccontextmanager
async def running(*hosts: Host) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(h.beats.run()) for h in hosts]
    try:
        yield
    finally:
        await cancel_all(tasks)


@pytest.mark.timeout(20)
async def test_two_hosts_reach_each_other_and_a_stopped_one_is_no_longer_reached() -> None:
    port = free_port()
    a, b = Host("h1", port), Host("h2", port)
    async with running(a):
        async with running(b):
            await asyncio.sleep(0.5)
            assert a.reached("h2") and b.reached("h1")
        await asyncio.sleep(0.4)
        assert not a.reached("h2"), "h2's agent stopped: no beat, not reached"


@pytest.mark.timeout(20)
async def test_a_path_that_works_one_way_only_is_not_counted() -> None:
    # h2 gets h1's beats but sends none back (as a firewall dropping h2's outgoing beats would):
    # h1 must not count h2, and h2 must not count h1 (h1 never says it hears h2).
    port = free_port()
    a, b = Host("h1", port), Host("h2", port)
    b.beats.set_targets(set())
    async with running(a, b):
        await asyncio.sleep(0.6)
    assert a.seen and not any(r.ok for r in a.seen)
    assert not b.seen


@pytest.mark.timeout(20)
async def test_forged_misaddressed_and_spoofed_beats_are_rejected_and_counted() -> None:
    port = free_port()
    a = Host("h1", port)

    def beat(key: bytes = KEY, **body: object) -> bytes:
        return encode(Envelope(cluster="c1", host="h2", incarnation=1, seq=10**6, kind="beat",
                               body={"to": "h1", "hears": True} | body), key)

    async with running(a):
        await asyncio.sleep(0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.3", 0))                      # h2's address
            s.sendto(beat(key=b"not-the-cluster-key-0123456789"), ("127.0.0.2", port))
            s.sendto(beat(to="h9"), ("127.0.0.2", port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.4", 0))                      # not h2's address
            s.sendto(beat(), ("127.0.0.2", port))
        await asyncio.sleep(0.3)
    assert a.beats.rejected == 3
    assert not any(r.ok for r in a.seen), "nothing forged or spoofed counts"


@pytest.mark.timeout(20)
async def test_with_host_keys_a_member_cannot_beat_for_another_host() -> None:
    # A beat "h2 hears you" from h2's address, signed with the cluster key alone (what any
    # member can make, spoofing the source on a shared segment), kept an isolated h1 petting.
    port = free_port()
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys: HostKeys = {"h1": (k1.public_key(),), "h2": (k2.public_key(),)}
    a, trusting = Host("h1", port, own=k1, keys=keys), Host("h1", free_port())
    forged = encode(Envelope(cluster="c1", host="h2", incarnation=1, seq=10**6, kind="beat",
                             body={"to": "h1", "hears": True}), KEY)
    async with running(a, trusting):
        for _ in range(6):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.3", 0))                  # h2's address
                s.sendto(forged, ("127.0.0.2", port))
                s.sendto(forged, ("127.0.0.2", trusting.beats.port))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
    assert a.beats.rejected >= 1 and not any(r.ok for r in a.seen), "a forged beat counted"
    assert any(r.ok for r in trusting.seen), "without host keys the forgery counts (the hole this closes)"
    # The real h2 with its key is counted.
    b = Host("h2", port, own=k2, keys=keys)
    a2 = Host("h1", port, own=k1, keys=keys)
    async with running(a2, b):
        await asyncio.sleep(0.5)
        assert a2.reached("h2") and b.reached("h1")
