"""Signed heartbeats straight between hosts (UDP): the evidence that a peer is reachable,
which keeps a host's watchdog petted when the broker is away.

Why not ICMP, which served before: an echo reply proves neither who sent it nor that the
path works both ways.  A host whose firewall drops incoming echo requests still gets
replies to its own, so it counted peers that could not reach it: cut from the broker, it
kept petting its watchdog while the coordinator, seeing it dead, waited out its deadline
and restarted its VMs, which then ran twice (tests/test_cluster_ha.py).  Forged replies do
the same.  Echo replies still keep a peer from being declared dead (the host answers them
when only its agent crashed) and measure round trips for the status view.

Every ping interval this host sends each peer it watches one datagram: a signed envelope
(core/wire.py, the cluster key, kind `beat`) whose body names the addressee and says
whether this host heard that peer's own beat within the window.  A peer counts as reached
(`PingObserved(signed=True)`) when its beat came within the window, from its configured
address, and said it hears this host: a path that works both ways.  A datagram that fails
any check is counted (`rejected`) and dropped.

Own code rather than a library: it is one datagram endpoint around core/wire.py's envelope
and replay guard, which the broker path already uses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from haguard.core.detector import PingObserved
from haguard.core.hostkeys import HostKeys, Signer
from haguard.core.wire import Envelope, Rejected, ReplayGuard, decode, encode, incarnation_too_far_ahead

log = logging.getLogger(__name__)

KIND = "beat"
MAX_BEAT_BYTES = 1024


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, take: Callable[[bytes, tuple[Any, ...]], None]) -> None:
        self.take = take

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.take(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("direct beat: %s", exc)             # e.g. a peer's port unreachable: it is down


class DirectBeats:
    def __init__(self, *, me: str, cluster: str, incarnation: int, key: bytes, address: str, port: int,
                 peers: Mapping[str, str], on_result: Callable[[PingObserved], None],
                 interval_ms: int, window_ms: int, clock: Callable[[], int] = _monotonic_ms,
                 wall: Callable[[], int] = _wall_ms, signer: Signer | None = None,
                 host_keys: HostKeys | None = None, require_host_keys: bool = True) -> None:
        self.me, self.cluster, self.incarnation, self.key = me, cluster, incarnation, key
        self.signer, self.host_keys = signer, host_keys     # this host's own key, and the others'
        self.require = require_host_keys
        self.address, self.port = address, port
        self.peers = dict(peers)                        # every configured peer: whose beats count
        self.targets = set(self.peers)                  # those this host sends beats to and judges
        self.on_result = on_result
        self.interval_ms, self.window_ms = interval_ms, window_ms
        self.clock, self.wall = clock, wall
        self.rejected = 0
        self._heard: dict[str, tuple[int, bool]] = {}     # peer -> (its beat came at, it hears us)
        self._guard = ReplayGuard()
        self._seq = 0

    def rekey(self, signer: Signer | None, host_keys: HostKeys | None) -> None:
        """A reloaded key set: the next beat is signed with `signer`, peers checked against
        `host_keys`."""
        self.signer, self.host_keys = signer, host_keys

    def set_targets(self, targets: set[str] | frozenset[str]) -> None:
        """The peers the core watches (its neighbours and coordinator, everyone while it
        coordinates).  Beats of any configured peer are still taken."""
        self.targets = set(targets) & set(self.peers)

    async def _resolved(self) -> None:
        """Peers given by name get their address once (the source check compares addresses)."""
        loop = asyncio.get_running_loop()
        for peer, address in list(self.peers.items()):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                infos = await loop.getaddrinfo(address, self.port, type=socket.SOCK_DGRAM)
                self.peers[peer] = str(infos[0][4][0])

    async def run(self) -> None:
        """Beat every interval until cancelled.  Each host binds its own address: hosts that
        share one (a lab of several agents on loopback) cannot all bind the port."""
        loop = asyncio.get_running_loop()
        await self._resolved()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self._take),
                                                           local_addr=(self.address, self.port))
        try:
            while True:
                started = loop.time()
                self.round(transport)
                await asyncio.sleep(max(0.0, self.interval_ms / 1000 - (loop.time() - started)))
        finally:
            transport.close()

    def hears(self, peer: str, now: int) -> bool:
        got = self._heard.get(peer)
        return got is not None and now - got[0] <= self.window_ms

    def round(self, transport: asyncio.DatagramTransport) -> None:
        """Judge every peer from the beats received, then send each its beat."""
        now = self.clock()
        for peer in sorted(self.targets):
            address = self.peers[peer]
            hears = self.hears(peer, now)
            # Reached: its beat came lately and said it hears us (a path both ways).
            self.on_result(PingObserved(host=peer, ok=hears and self._heard[peer][1],
                                        now_ms=now, address=address, signed=True))
            self._seq += 1
            body = {"to": peer, "hears": hears}
            data = encode(Envelope(cluster=self.cluster, host=self.me, incarnation=self.incarnation,
                                   seq=self._seq, kind=KIND, body=body, sent_ms=self.wall()), self.key,
                          signer=self.signer)
            transport.sendto(data, (address, self.port))

    def _take(self, data: bytes, addr: tuple[Any, ...]) -> None:
        why = self._check(data, addr)
        if why is not None:
            self.rejected += 1
            log.debug("direct beat from %s rejected: %s", addr[0], why)

    def _check(self, data: bytes, addr: tuple[Any, ...]) -> str | None:
        env = decode(data, self.key, self.cluster, max_size=MAX_BEAT_BYTES, host_keys=self.host_keys,
                     require_host_keys=self.require)
        if isinstance(env, Rejected):
            return env.reason
        if env.kind != KIND or self.peers.get(env.host) != addr[0]:
            return f"{env.kind!r} from {env.host!r} at {addr[0]}: not a peer's beat from its address"
        if env.body.get("to") != self.me or not isinstance(env.body.get("hears"), bool):
            return "not addressed to this host"
        ahead = incarnation_too_far_ahead(env, self.wall())
        verdict = ahead or self._guard.check(env)
        if verdict is not None:
            return verdict.reason
        self._guard.accept(env)
        self._heard[env.host] = (self.clock(), env.body["hears"])
        return None
