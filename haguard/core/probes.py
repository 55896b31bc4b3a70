"""Local health: host probe results folded into host health, and ping bookkeeping.

`HostProbes` turns probe results (adapters/hostprobe.py) into `HostHealth`:
healthy, or degraded with the failing probes' names and reasons.  A probe that
times out has failed.  Against flapping, a probe must fail `fail_after` times in a
row to count as failing, and pass `pass_after` times in a row to clear.

`PingStats` keeps per-peer loss over the last `window` pings and the round-trip
times (last, average) for the ICMP adapter (adapters/icmp.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from haguard.core.detector import PingObserved

# ---- host probes -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProbePassed:
    probe: str
    now_ms: int
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class ProbeFailed:
    probe: str
    now_ms: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class ProbeTimedOut:
    probe: str
    now_ms: int
    timeout_ms: int


ProbeInput = ProbePassed | ProbeFailed | ProbeTimedOut


class HostStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"


@dataclass(frozen=True, kw_only=True)
class FailingProbe:
    name: str
    reason: str
    since_ms: int                # first failure of the streak


@dataclass(frozen=True, kw_only=True)
class HostHealth:
    status: HostStatus
    failing: tuple[FailingProbe, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.status is HostStatus.HEALTHY

    def summary(self) -> str:
        if self.healthy:
            return "healthy"
        return "degraded: " + "; ".join(f"{p.name}: {p.reason}" for p in self.failing)


@dataclass(frozen=True, kw_only=True)
class HostHealthChanged:
    """The set of failing probes changed (a reason changing alone is not news)."""

    old: HostHealth
    new: HostHealth


@dataclass(frozen=True, kw_only=True)
class ProbePolicy:
    fail_after: int = 2
    pass_after: int = 2

    def __post_init__(self) -> None:
        if self.fail_after < 1 or self.pass_after < 1:
            raise ValueError("fail_after and pass_after must be at least 1")


@dataclass
class _Probe:
    fails: int = 0
    passes: int = 0
    failing: bool = False
    reason: str = ""
    streak_ms: int = 0


class HostProbes:
    def __init__(self, policy: ProbePolicy | None = None) -> None:
        self.policy = policy or ProbePolicy()
        self._probes: dict[str, _Probe] = {}

    def step(self, result: ProbeInput) -> list[HostHealthChanged]:
        before = self.health()
        p = self._probes.setdefault(result.probe, _Probe())
        match result:
            case ProbePassed():
                p.fails = 0
                p.passes += 1
                if p.failing and p.passes >= self.policy.pass_after:
                    p.failing = False
            case ProbeFailed() | ProbeTimedOut():
                if p.fails == 0:
                    p.streak_ms = result.now_ms
                p.fails += 1
                p.passes = 0
                p.reason = (result.reason if isinstance(result, ProbeFailed)
                            else f"timed out after {result.timeout_ms / 1000:g} s")
                if p.fails >= self.policy.fail_after:
                    p.failing = True
        return self._changed(before)

    def forget(self, probe: str) -> list[HostHealthChanged]:
        """A probe removed from the configuration no longer counts."""
        before = self.health()
        self._probes.pop(probe, None)
        return self._changed(before)

    def health(self) -> HostHealth:
        failing = tuple(FailingProbe(name=name, reason=p.reason, since_ms=p.streak_ms)
                        for name, p in sorted(self._probes.items()) if p.failing)
        return HostHealth(status=HostStatus.DEGRADED if failing else HostStatus.HEALTHY,
                          failing=failing)

    def _changed(self, before: HostHealth) -> list[HostHealthChanged]:
        after = self.health()
        if [p.name for p in before.failing] == [p.name for p in after.failing]:
            return []
        return [HostHealthChanged(old=before, new=after)]


# ---- pings ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PeerPingStats:
    host: str
    address: str
    sent: int                    # pings in the window
    lost: int
    last_ok: bool
    last_rtt_ms: float | None    # newest reply in the window
    avg_rtt_ms: float | None     # over the replies in the window
    last_reply_ms: int | None    # when the newest reply (ever) came

    @property
    def loss_ratio(self) -> float:
        return self.lost / self.sent if self.sent else 0.0


@dataclass
class _Peer:
    address: str
    results: deque[PingObserved]
    last_reply_ms: int | None = None


@dataclass
class PingStats:
    window: int = 20
    _peers: dict[str, _Peer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")

    def record(self, r: PingObserved) -> PeerPingStats:
        peer = self._peers.get(r.host)
        if peer is None or peer.address != r.address:
            peer = self._peers[r.host] = _Peer(r.address, deque(maxlen=self.window))
        peer.results.append(r)
        if r.ok:
            peer.last_reply_ms = r.now_ms
        return self._stats(r.host, peer)

    def stats(self, host: str) -> PeerPingStats | None:
        peer = self._peers.get(host)
        return self._stats(host, peer) if peer else None

    def all(self) -> dict[str, PeerPingStats]:
        return {h: self._stats(h, p) for h, p in sorted(self._peers.items())}

    def forget(self, host: str) -> None:
        self._peers.pop(host, None)

    @staticmethod
    def _stats(host: str, peer: _Peer) -> PeerPingStats:
        rtts = [r.rtt_ms for r in peer.results if r.ok and r.rtt_ms is not None]
        return PeerPingStats(
            host=host, address=peer.address, sent=len(peer.results),
            lost=sum(1 for r in peer.results if not r.ok), last_ok=peer.results[-1].ok,
            last_rtt_ms=rtts[-1] if rtts else None,
            avg_rtt_ms=sum(rtts) / len(rtts) if rtts else None,
            last_reply_ms=peer.last_reply_ms)
