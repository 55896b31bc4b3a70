"""MQTT transport for the gossip: signed envelopes through every configured broker at once.

Topic layout, QoS, retain and expiry: docs/mqtt-topics.md (mqtt_topics.py).  A broker is
only a relay: every message is a signed `Envelope` (haguard.core.wire), checked for its
signature, its cluster, the topic it came on and its order (`ReplayGuard`) before it
reaches `on_envelope`; anything else goes to `on_reject` and is dropped.

Active-active: each URL in `mqtt.urls` is a broker of its own (plain mosquittos on two or
three hypervisors, not bridged), each with its own link (mqtt_link.py).  A message is
signed once and published on every live link; a receiver takes the first copy and drops
the others as duplicates.  Losing one broker costs nothing but its link (and a
`broker-down` alert, raised by the runtime); a dead broker is retried on its own link and
never delays the others.  Two corner cases of several brokers:

- a copy from the slower broker can come after a later message from the faster one: it
  is late, not a replay (dropped and counted, never reported as rejected).  A second copy
  through the broker that delivered the first is a replay all the same;
- a broker that loses one host's connection publishes that host's last will while the
  host still talks through another broker.  So a will is held for `WILL_HOLD_S` and
  dropped if anything newer of its host comes through any broker meanwhile: a host that
  died falls silent on every link at once (its peers learn it 1 s later than with one
  broker, still before the detector's own timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from haguard.adapters.mqtt_link import BrokerLink, Outgoing
from haguard.adapters.mqtt_topics import CHANNEL_KINDS, KINDS, Topics
from haguard.config.cluster import MqttConfig
from haguard.core.hostkeys import HostKeys, Signer
from haguard.core.wire import (
    MAX_MESSAGE_BYTES,
    MIN_KEY_BYTES,
    NAME_PATTERN,
    OFFLINE,
    Envelope,
    MessageTooLarge,
    Rejected,
    ReplayGuard,
    decode,
    encode,
    incarnation_too_far_ahead,
)
from haguard.errors import ConfigError

__all__ = ["KINDS", "GossipTransport", "Topics"]

log = logging.getLogger(__name__)

RECENT = 8192               # (host, incarnation, seq) of the messages taken lately: duplicates
LATE_WITHIN = 256           # a message this close behind the newest taken from its sender is late
WILL_HOLD_S = 1.0           # several brokers: a last will waits this long for news that belies it


class GossipTransport:
    """Signed gossip over MQTT.  `await run()` keeps a link to every broker of `cfg.urls` up
    (reconnecting each with capped exponential backoff); `publish()` signs and sends through
    every live link; `await stop()` says goodbye.  Callbacks run on the event loop and must
    not block:

    - `on_envelope(env)`: a valid, new message from another host;
    - `on_reject(topic, reason)`: a message dropped (bad signature, replay, garbage, ...);
    - `on_connection(connected, detail)`: whether any broker is connected now, on each
      connection (detail: the url), each failed attempt, each loss and the final stop
      (detail: "url: why").

    The last "state" body published is re-sent (with a new seq) on every reconnection, so
    the retained state on a broker never stays "offline" while this host is up.  Use it
    from the event loop's thread; it runs once (after `stop()`, `run()` returns at once).
    """

    def __init__(self, cfg: MqttConfig, *, cluster: str, host: str, incarnation: int, key: bytes,
                 on_envelope: Callable[[Envelope], None], on_reject: Callable[[str, str], None],
                 on_connection: Callable[[bool, str], None], backoff_max_s: float = 3.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, outbox_size: int = 256,
                 clock_ms: Callable[[], int] | None = None, signer: Signer | None = None,
                 host_keys: HostKeys | None = None, require_host_keys: bool = True) -> None:
        for what, name in (("cluster", cluster), ("host", host)):
            if not re.fullmatch(NAME_PATTERN, name):
                raise ConfigError(f"{name!r} is not a valid name", field=what)
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the cluster key is {len(key)} bytes: use at least {MIN_KEY_BYTES}",
                              field="key_file")
        self.cfg = cfg
        self.cluster, self.host, self.incarnation = cluster, host, incarnation
        self.topics = Topics(prefix=cfg.topic_prefix, cluster=cluster)
        self._key = key
        self._signer, self._host_keys = signer, host_keys      # this host's own key, and the others'
        self._require = require_host_keys
        self._on_envelope, self._on_reject, self._on_connection = on_envelope, on_reject, on_connection
        self._max_bytes = max_message_bytes
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._guard = ReplayGuard()
        self._seq = 0                                   # seq 0 is the will's; messages start at 1
        self.too_large = 0                              # messages dropped: over the wire's limit
        self.duplicates = 0                             # copies through a second broker, late copies
        self.stale_wills = 0                            # wills of hosts still heard through another
        self._recent: OrderedDict[tuple[str, int, int], int] = OrderedDict()   # -> the link it came by
        self._held: dict[str, tuple[Envelope, BrokerLink, bool]] = {}   # host -> its will, waiting
        self._last_state: dict[str, Any] | None = None
        self._stopping = False
        self._running = False
        self._finished = asyncio.Event()
        # Signed once, in advance: a broker publishes it if this host's connection to it dies.
        will = self._will()
        self.links = [BrokerLink(self, cfg, url, i, will=will, backoff_max_s=backoff_max_s,
                                 max_message_bytes=max_message_bytes, outbox_size=outbox_size)
                      for i, url in enumerate(dict.fromkeys(cfg.urls))]

    def _will(self) -> bytes:
        return encode(Envelope(cluster=self.cluster, host=self.host, incarnation=self.incarnation, seq=0,
                               kind=OFFLINE, body={"reason": "connection lost"}, sent_ms=self._clock_ms()),
                      self._key, signer=self._signer)

    # ---- public API --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Some broker is connected."""
        return any(link.connected for link in self.links)

    def rekey(self, signer: Signer | None, host_keys: HostKeys | None) -> None:
        """A reloaded key set (core/hostkeys.py, rotation): sign with `signer` from now on and
        check senders against `host_keys`.  The will is signed again for the next connection
        of each link; one already handed to a broker keeps the old signature (a receiver that
        no longer knows that key refuses it, and the host's silence tells the same)."""
        self._signer, self._host_keys = signer, host_keys
        will = self._will()
        for link in self.links:
            link.will = will

    def links_up(self) -> dict[str, bool]:
        """Each broker's url: whether its link is connected now."""
        return {link.url: link.connected for link in self.links}

    @property
    def attempts(self) -> int:
        return sum(link.attempts for link in self.links)

    @property
    def guard(self) -> ReplayGuard:
        return self._guard

    def publish(self, kind: str, body: dict[str, Any], *, retain: bool | None = None,
                expiry_s: int | None = None, to: str | None = None,
                only: BrokerLink | None = None) -> bool:
        """Sign `body` as a `kind` message with the next seq and queue it on every live link
        (or on `only`).

        `retain`/`expiry_s` default to the kind's policy (KINDS).  Returns False, dropping
        the message, when no link took it (none connected, outboxes full) or the message is
        over the wire's size limit (counted in `too_large`, logged): delivery is at most
        once, and one message that cannot go never stops the caller's next ones.  Raises
        ValueError on an unknown kind or a body that is not JSON data (a bug in the caller).
        """
        policy = KINDS.get(kind)
        if policy is None:
            raise ValueError(f"unknown message kind {kind!r}; known: {', '.join(KINDS)}")
        try:
            payload = self._sign(kind, body)
        except MessageTooLarge as exc:
            self.too_large += 1
            if self.too_large in (1, 10, 100) or self.too_large % 1000 == 0:
                log.error("mqtt: dropping a %s message: %s (%d so far)", kind, exc, self.too_large)
            return False
        if kind == "state":
            self._last_state = body
        if self._stopping:
            return False
        out = Outgoing(topic=self.topics.for_kind(self.host, kind, to), payload=payload, qos=policy.qos,
                       retain=policy.retain if retain is None else retain,
                       expiry_s=policy.expiry_s if expiry_s is None else expiry_s)
        taken = [link.put(out) for link in (self.links if only is None else [only])]
        return any(taken)

    async def run(self) -> None:
        """Stay connected until `stop()`; never raises but CancelledError."""
        if self._running:
            raise RuntimeError("GossipTransport.run() is already running")
        self._running = True
        self._finished.clear()
        try:
            await asyncio.gather(*(link.run() for link in self.links))
        finally:
            self._running = False
            self._finished.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Publish the retained "offline" state on every live link, disconnect, end `run()`."""
        self._stopping = True
        for link in self.links:
            link.stop()
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._finished.wait()

    # ---- the links' side (mqtt_link.LinkOwner) -----------------------------------

    def link_up(self, link: BrokerLink) -> None:
        self._notify(self._on_connection, True, link.url)
        if self._last_state is not None:
            self.publish("state", self._last_state, only=link)

    def link_down(self, link: BrokerLink, why: str) -> None:
        self._notify(self._on_connection, self.connected, f"{link.url}: {why}")

    def sign_offline(self, reason: str) -> bytes:
        return self._sign(OFFLINE, {"reason": reason})

    def deliver(self, link: BrokerLink, topic: str, data: bytes, *, retained: bool) -> None:
        env = self._checked(topic, data, retained)
        if env is None:
            return
        key = (env.host, env.incarnation, env.seq)
        # A copy through another broker; through the same one it is a replay (below).
        if self._recent.get(key, link.index) != link.index:
            self.duplicates += 1
            return
        if env.kind == OFFLINE and env.seq == 0 and len(self.links) > 1:
            if env.host not in self._held:
                self._held[env.host] = (env, link, retained)
                asyncio.get_running_loop().call_later(WILL_HOLD_S, self._release, env)
            return
        held = self._held.get(env.host)
        if held is not None and env.incarnation >= held[0].incarnation:
            del self._held[env.host]            # the host still talks: its will is stale
            self.stale_wills += 1
        self._take(env, link, topic, retained)

    def _release(self, will: Envelope) -> None:
        held = self._held.get(will.host)
        if held is not None and held[0] is will:
            del self._held[will.host]
            self._take(will, held[1], self.topics.host(will.host, "state"), retained=held[2])

    def _take(self, env: Envelope, link: BrokerLink, topic: str, retained: bool) -> None:
        verdict = self._guard.check(env)
        if verdict is not None:
            # A retained copy redelivered on (re)subscription is old news, not an attack.
            if retained:
                log.debug("mqtt: old retained message on %s: %s", topic, verdict.reason)
            elif self._late(env):
                self.duplicates += 1
            else:
                self._reject(topic, verdict.reason)
            return
        self._guard.accept(env)
        self._recent[(env.host, env.incarnation, env.seq)] = link.index
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        self._notify(self._on_envelope, env)

    # ---- receiving -----------------------------------------------------------------

    def _checked(self, topic: str, data: bytes, retained: bool) -> Envelope | None:
        """The envelope if it is well formed, signed, on its sender's topic and not our own."""
        where = self.topics.parse(topic, self.host)
        if where is None:
            self._reject(topic, "unexpected topic")
            return None
        channel, topic_host = where
        env = decode(data, self._key, self.cluster, max_size=self._max_bytes, host_keys=self._host_keys,
                     require_host_keys=self._require)
        if isinstance(env, Rejected):
            self._reject(topic, env.reason)
            return None
        if env.host != topic_host:
            self._reject(topic, f"sent as host {env.host!r} on another host's topic")
            return None
        if env.kind not in CHANNEL_KINDS[channel]:
            self._reject(topic, f"kind {env.kind!r} does not belong on this topic")
            return None
        ahead = incarnation_too_far_ahead(env, self._clock_ms())
        if ahead is not None:
            self._reject(topic, ahead.reason)
            return None
        if env.host == self.host:
            # Our own retained state from before, or an echo: not news.  Another incarnation
            # talking live under our name is a second agent configured as this host.
            if env.incarnation > self.incarnation or (not retained and env.incarnation != self.incarnation):
                self._reject(topic, f"another agent uses host name {self.host!r} "
                                    f"(incarnation {env.incarnation}, ours {self.incarnation})")
            return None
        return env

    def _late(self, env: Envelope) -> bool:
        """A copy that a slower broker delivered after a later message came through a faster one."""
        mark = self._guard.mark(env.host)
        return (len(self.links) > 1 and mark is not None and env.incarnation == mark[0]
                and (env.seq == 0 or mark[1] - env.seq < LATE_WITHIN))

    def _reject(self, topic: str, reason: str) -> None:
        log.warning("mqtt message on %r rejected: %s", topic[:200], reason)
        self._notify(self._on_reject, topic, reason)

    def _sign(self, kind: str, body: dict[str, Any]) -> bytes:
        self._seq += 1
        return encode(Envelope(cluster=self.cluster, host=self.host, incarnation=self.incarnation,
                               seq=self._seq, kind=kind, body=body, sent_ms=self._clock_ms()), self._key,
                      signer=self._signer)

    def _notify(self, callback: Callable[..., None], *args: Any) -> None:
        # A failing callback is a bug in the caller: log it loudly, keep the transport alive.
        try:
            callback(*args)
        except Exception:
            log.exception("mqtt transport callback %s failed", getattr(callback, "__name__", callback))
