"""ICMP pings to loopback and to a peer in a network namespace this test creates.

Traffic stays on loopback or inside the test's veth pair (198.19.0.0/16, part of the
198.18.0.0/15 benchmark range); a lower-priority unreachable route keeps the peer's
address from ever leaving through the default route.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from haguard.adapters.icmp import PeerPinger
from haguard.config.cluster import TimingConfig
from haguard.core.probes import PingObserved, PingStats

TIMEOUT_MS = 300


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Peer:
    netns: str
    host_if: str
    peer_if: str
    subnet: str
    address: str


@pytest.fixture
def peer() -> Iterator[Peer]:
    """A namespace reachable over a veth pair; names and a /30 derived from our pid."""
    pid = os.getpid()
    n = pid & 0x3FFF
    net = f"198.19.{n >> 6}.{(n & 63) * 4}"
    base = net.rsplit(".", 1)[0] + "."
    last = (n & 63) * 4
    p = Peer(netns=f"hgicmp{pid}", host_if=f"hgi{pid}a", peer_if=f"hgi{pid}b", subnet=f"{net}/30",
             address=f"{base}{last + 2}")
    try:
        ip("netns", "add", p.netns)
        ip("link", "add", p.host_if, "type", "veth", "peer", "name", p.peer_if)
        ip("route", "add", "unreachable", p.subnet, "metric", "4000")
        ip("link", "set", p.peer_if, "netns", p.netns)
        ip("addr", "add", f"{base}{last + 1}/30", "dev", p.host_if)
        ip("link", "set", p.host_if, "up")
        ip("-n", p.netns, "addr", "add", f"{p.address}/30", "dev", p.peer_if)
        ip("-n", p.netns, "link", "set", p.peer_if, "up")
        ip("-n", p.netns, "link", "set", "lo", "up")
        yield p
    finally:
        for args in (("link", "del", p.host_if), ("route", "del", "unreachable", p.subnet, "metric", "4000"),
                     ("netns", "del", p.netns)):
            with contextlib.suppress(RuntimeError):
                ip(*args)


@pytest.mark.timeout(10)
async def test_loopback_answers_with_an_rtt() -> None:
    seen: list[PingObserved] = []
    pinger = PeerPinger({"self": "127.0.0.1"}, seen.append, timeout_ms=TIMEOUT_MS)
    [r] = await pinger.ping_round()
    assert r.ok and r.host == "self" and r.error == ""
    assert r.rtt_ms is not None and 0 < r.rtt_ms < TIMEOUT_MS
    assert seen == [r]
    st = pinger.stats()["self"]
    assert (st.sent, st.lost, st.last_rtt_ms) == (1, 0, r.rtt_ms)


@pytest.mark.timeout(20)
async def test_peer_in_a_namespace_then_its_link_goes_down(peer: Peer) -> None:
    seen: list[PingObserved] = []
    pinger = PeerPinger({"self": "127.0.0.1", "h2": peer.address}, seen.append,
                        interval_ms=100, timeout_ms=TIMEOUT_MS, window=10)
    for _ in range(3):
        results = {r.host: r for r in await pinger.ping_round()}
        assert results["h2"].ok, results["h2"]
        assert results["self"].ok
    st = pinger.stats()["h2"]
    assert (st.sent, st.lost, st.loss_ratio) == (3, 0, 0.0)
    assert st.avg_rtt_ms is not None and st.last_rtt_ms is not None

    ip("-n", peer.netns, "link", "set", peer.peer_if, "down")
    for _ in range(2):
        t0 = time.monotonic()
        results = {r.host: r for r in await pinger.ping_round()}
        took = time.monotonic() - t0
        assert not results["h2"].ok and results["h2"].rtt_ms is None
        assert results["self"].ok  # one lost peer does not spoil the others
        assert took < 2 * TIMEOUT_MS / 1000  # peers are pinged concurrently, one deadline per round
    st = pinger.stats()["h2"]
    assert (st.sent, st.lost, st.last_ok) == (5, 2, False)
    assert st.loss_ratio == pytest.approx(0.4)

    # The loop keeps going on its interval, and the peer comes back.
    ip("-n", peer.netns, "link", "set", peer.peer_if, "up")
    seen.clear()
    task = asyncio.create_task(pinger.run())
    try:
        deadline = time.monotonic() + 5
        while not any(r.host == "h2" and r.ok for r in seen):
            assert time.monotonic() < deadline, seen[-4:]
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pinger.stats()["h2"].last_ok

    # Our side down: no route but the unreachable one, the echo cannot even leave.
    ip("link", "set", peer.host_if, "down")
    [r] = [r for r in await pinger.ping_round() if r.host == "h2"]
    assert not r.ok and r.error == "echo request could not be sent (no route?)"


@pytest.mark.timeout(5)
def test_peers_are_ip_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        PeerPinger({"h2": "h2.example"}, lambda r: None)
    pinger = PeerPinger.from_timing({"self": "127.0.0.1"}, lambda r: None, TimingConfig())
    assert (pinger.interval_ms, pinger.timeout_ms) == (250, 200)
    pinger.set_peers({})
    assert pinger.peers == {} and pinger.stats() == {}


def ping(host: str, ok: bool, rtt: float | None, now: int) -> PingObserved:
    return PingObserved(host=host, address="198.19.0.2", ok=ok, rtt_ms=rtt, now_ms=now)


@pytest.mark.timeout(5)
def test_ping_stats_slide_over_a_window() -> None:
    stats = PingStats(window=4)
    stats.record(ping("a", True, 1.0, 0))
    stats.record(ping("a", True, 3.0, 1))
    s = stats.record(ping("a", False, None, 2))
    assert (s.sent, s.lost, s.last_rtt_ms, s.avg_rtt_ms, s.last_reply_ms) == (3, 1, 3.0, 2.0, 1)
    for t in (3, 4, 5):
        s = stats.record(ping("a", False, None, t))
    assert (s.sent, s.lost, s.loss_ratio) == (4, 4, 1.0)
    assert s.last_rtt_ms is None and s.avg_rtt_ms is None
    assert s.last_reply_ms == 1  # remembered beyond the window
    assert stats.stats("b") is None
    with pytest.raises(ValueError):
        PingStats(window=0)
