"""ICMP echo to the peers, one round every interval, all peers at once.

Each peer gets its own `icmplib.async_ping` (one echo, its own socket and id) in
one `gather`: `async_multiping` would lose the whole batch to one peer's error.
icmplib has no overall deadline of its own, so every ping also runs under
`asyncio.timeout`.  Raw sockets need root (or CAP_NET_RAW); without it, the
unprivileged datagram ICMP sockets are used, which need net.ipv4.ping_group_range.

Results (`PingObserved`) go to the caller's callback and into per-peer statistics
(`PingStats`: loss over a sliding window, last and average RTT).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Callable, Mapping

from icmplib import ICMPLibError, async_ping

from haguard.config.cluster import TimingConfig
from haguard.core.detector import PingObserved
from haguard.core.probes import PeerPingStats, PingStats

Clock = Callable[[], int]
# Beyond the echo timeout: room for socket setup before asyncio.timeout gives up.
DEADLINE_SLACK_S = 0.5


def _checked(peers: Mapping[str, str]) -> dict[str, str]:
    for host, addr in peers.items():
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise ValueError(f"peer {host}: {addr!r} is not an IP address") from None
    return dict(peers)


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class PeerPinger:
    def __init__(self, peers: Mapping[str, str], on_result: Callable[[PingObserved], None], *,
                 interval_ms: int = 250, timeout_ms: int = 200, window: int = 20,
                 privileged: bool | None = None, clock: Clock = _monotonic_ms) -> None:
        """`peers`: peer name -> IP address (names would need a resolver on every round)."""
        if interval_ms <= 0 or timeout_ms <= 0:
            raise ValueError("interval_ms and timeout_ms must be positive")
        self.peers = _checked(peers)
        self.on_result = on_result
        self.interval_ms = interval_ms
        self.timeout_ms = timeout_ms
        self.privileged = os.geteuid() == 0 if privileged is None else privileged
        self.clock = clock
        self._stats = PingStats(window=window)

    @classmethod
    def from_timing(cls, peers: Mapping[str, str], on_result: Callable[[PingObserved], None],
                    timing: TimingConfig, *, window: int = 20) -> PeerPinger:
        return cls(peers, on_result, interval_ms=timing.ping_interval_ms,
                   timeout_ms=timing.ping_timeout_ms, window=window)

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Takes effect at the next round; statistics of removed peers are dropped."""
        checked = _checked(peers)
        for gone in set(self.peers) - set(checked):
            self._stats.forget(gone)
        self.peers = checked

    def stats(self) -> dict[str, PeerPingStats]:
        return self._stats.all()

    async def run(self) -> None:
        """Ping every interval until cancelled (a slow round delays the next one, never overlaps)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.ping_round()
            await asyncio.sleep(max(0.0, self.interval_ms / 1000 - (loop.time() - started)))

    async def ping_round(self) -> list[PingObserved]:
        peers = list(self.peers.items())
        results = await asyncio.gather(*(self._ping(host, addr) for host, addr in peers))
        for r in results:
            self._stats.record(r)
            self.on_result(r)
        return list(results)

    async def _ping(self, host: str, address: str) -> PingObserved:
        timeout_s = self.timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s + DEADLINE_SLACK_S):
                reply = await async_ping(address, count=1, timeout=timeout_s,
                                         privileged=self.privileged)
        except TimeoutError:
            return self._lost(host, address, f"no reply within {timeout_s + DEADLINE_SLACK_S:g} s")
        except (ICMPLibError, OSError) as exc:
            return self._lost(host, address, f"{type(exc).__name__}: {exc}")
        if reply.packets_sent == 0:
            return self._lost(host, address, "echo request could not be sent (no route?)")
        if not reply.rtts:
            return self._lost(host, address, "")
        return PingObserved(host=host, address=address, ok=True, rtt_ms=float(reply.rtts[-1]),
                          now_ms=self.clock())

    def _lost(self, host: str, address: str, error: str) -> PingObserved:
        return PingObserved(host=host, address=address, ok=False, rtt_ms=None, now_ms=self.clock(),
                          error=error)
