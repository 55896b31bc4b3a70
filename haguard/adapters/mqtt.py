"""MQTT transport for the gossip: signed envelopes through a broker, failover, last will.

Topic layout, QoS, retain and expiry: docs/mqtt-topics.md.  The broker is only a
relay: every message is a signed `Envelope` (haguard.core.wire), checked for its
signature, its cluster, the topic it came on and its order (`ReplayGuard`) before
it reaches `on_envelope`; anything else goes to `on_reject` and is dropped.

aiomqtt 2.x does not reconnect by itself, and a `Client` reused after a lost
connection can skip the CONNACK wait, so every connection attempt makes a new
`Client`.  A clean DISCONNECT suppresses the last will: `stop()` publishes the
retained "offline" state itself; a cancelled `run()` (the agent going down without
`stop()`) publishes the pre-signed will before disconnecting, so peers learn at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from haguard.config.cluster import MqttConfig
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
from haguard.errors import ConfigError, HaguardError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, kw_only=True)
class KindPolicy:
    channel: str            # the topic a kind travels on: heartbeat, state, probe, alerts, ...
    qos: int
    retain: bool
    expiry_s: int           # MQTT v5 message expiry: a stale copy is never delivered


# Who sends what where: keep in step with docs/mqtt-topics.md.
KINDS: dict[str, KindPolicy] = {
    "heartbeat": KindPolicy(channel="heartbeat", qos=0, retain=False, expiry_s=10),
    "state": KindPolicy(channel="state", qos=1, retain=True, expiry_s=3600),
    OFFLINE: KindPolicy(channel="state", qos=1, retain=True, expiry_s=86400),
    "probe-request": KindPolicy(channel="probe", qos=0, retain=False, expiry_s=10),
    "probe-reply": KindPolicy(channel="probe", qos=0, retain=False, expiry_s=10),
    "alert": KindPolicy(channel="alerts", qos=1, retain=False, expiry_s=3600),
    # The cluster core's messages: broadcasts (heartbeats, votes asked, proposals) and the
    # ones for one host (votes granted, acks, migration requests and replies) in its inbox.
    "cluster": KindPolicy(channel="cluster", qos=0, retain=False, expiry_s=10),
    "direct": KindPolicy(channel="inbox", qos=1, retain=False, expiry_s=30),
}
CHANNELS = ("heartbeat", "state", "probe", "alerts", "cluster", "inbox")
# Every channel but the inboxes is under its sender's own `hosts/{host}/`: the receiver checks
# the envelope's host against the topic, and a broker ACL can bind the topic to a login.
_HOST_CHANNELS = ("heartbeat", "state", "probe", "alerts", "cluster")
_CHANNEL_KINDS = {ch: frozenset(k for k, p in KINDS.items() if p.channel == ch) for ch in CHANNELS}


@dataclass(frozen=True, kw_only=True)
class Topics:
    """`{prefix}/{cluster}/hosts/{host}/{heartbeat,state,probe,alerts,cluster}`,
    `{prefix}/{cluster}/inbox/{to}/{from}`; `{prefix}/{cluster}/coord/...` is reserved."""

    prefix: str
    cluster: str

    def __post_init__(self) -> None:
        p = self.prefix
        if not p or p.startswith("/") or p.endswith("/") or "//" in p or any(c in p for c in "+#\0"):
            raise ConfigError(f"{p!r}: use topic levels without wildcards, e.g. 'haguard' or 'site1/haguard'",
                              field="mqtt.topic_prefix")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.cluster}"

    @property
    def coord(self) -> str:
        return f"{self.base}/coord"

    def host(self, host: str, channel: str) -> str:
        return f"{self.base}/hosts/{host}/{channel}"

    def inbox(self, to: str, sender: str) -> str:
        return f"{self.base}/inbox/{to}/{sender}"

    def for_kind(self, host: str, kind: str, to: str | None = None) -> str:
        channel = KINDS[kind].channel
        if channel == "inbox":
            if to is None:
                raise ValueError(f"a {kind!r} message needs a recipient")
            return self.inbox(to, host)
        return self.host(host, channel)

    def subscriptions(self, me: str | None = None) -> list[str]:
        topics = [self.host("+", ch) for ch in ("heartbeat", "state", "probe", "alerts")]
        if me is not None:
            topics += [self.host("+", "cluster"), self.inbox(me, "+")]
        return topics

    def parse(self, topic: str, me: str | None = None) -> tuple[str, str] | None:
        """(channel, sending host) of a topic this transport subscribes to."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) == 3 and parts[0] == "hosts" and parts[2] in _HOST_CHANNELS:
            return parts[2], parts[1]
        if len(parts) == 3 and parts[0] == "inbox" and me is not None and parts[1] == me:
            return "inbox", parts[2]
        return None


@dataclass(frozen=True, kw_only=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int


class _AttemptFailed(HaguardError):
    """A connection attempt failed, or a connection was lost soon after it was made: back off."""


class GossipTransport:
    """Signed gossip over MQTT.  `await run()` keeps a connection up (forever, failing over
    round-robin across `cfg.urls` with capped exponential backoff); `publish()` signs and
    sends; `await stop()` says goodbye.  Callbacks run on the event loop and must not block:

    - `on_envelope(env)`: a valid, new message from another host;
    - `on_reject(topic, reason)`: a message dropped (bad signature, replay, garbage, ...);
    - `on_connection(connected, detail)`: `(True, url)` on each connection, `(False, "url: why")`
      on each failed attempt, each loss and the final stop.

    The last "state" body published is re-sent (with a new seq) on every reconnection, so
    the retained state on the broker never stays "offline" while this host is up.  Use it
    from the event loop's thread; it runs once (after `stop()`, `run()` returns at once).
    """

    def __init__(self, cfg: MqttConfig, *, cluster: str, host: str, incarnation: int, key: bytes,
                 on_envelope: Callable[[Envelope], None], on_reject: Callable[[str, str], None],
                 on_connection: Callable[[bool, str], None], backoff_max_s: float = 3.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, outbox_size: int = 256,
                 clock_ms: Callable[[], int] | None = None) -> None:
        for what, name in (("cluster", cluster), ("host", host)):
            if not re.fullmatch(NAME_PATTERN, name):
                raise ConfigError(f"{name!r} is not a valid name", field=what)
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the cluster key is {len(key)} bytes: use at least {MIN_KEY_BYTES}",
                              field="key_file")
        self.cfg = cfg
        self.cluster, self.host, self.incarnation = cluster, host, incarnation
        self.topics = Topics(prefix=cfg.topic_prefix, cluster=cluster)
        self._attempts = 0
        self._key = key
        self._on_envelope, self._on_reject, self._on_connection = on_envelope, on_reject, on_connection
        self._backoff_max_s = backoff_max_s
        self._max_bytes = max_message_bytes
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._guard = ReplayGuard()
        self._seq = 0                                   # seq 0 is the will's; messages start at 1
        self.too_large = 0                              # messages dropped: over the wire's limit
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=outbox_size)
        self._client: aiomqtt.Client | None = None      # set while connected and subscribed
        self._url_index = 0
        self._last_state: dict[str, Any] | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()
        # Signed once, in advance: the broker publishes it if this connection dies.
        self._will = encode(Envelope(cluster=cluster, host=host, incarnation=incarnation, seq=0, kind=OFFLINE,
                                     body={"reason": "connection lost"}, sent_ms=self._clock_ms()), key)

    # ---- public API --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def guard(self) -> ReplayGuard:
        return self._guard

    def publish(self, kind: str, body: dict[str, Any], *, retain: bool | None = None,
                expiry_s: int | None = None, to: str | None = None) -> bool:
        """Sign `body` as a `kind` message with the next seq and queue it on the live connection.

        `retain`/`expiry_s` default to the kind's policy (KINDS).  Returns False, dropping
        the message, when there is no connection, the outbox is full or the message is over
        the wire's size limit (counted in `too_large`, logged): delivery is at most once, and
        one message that cannot go never stops the caller's next ones.  Raises ValueError on
        an unknown kind or a body that is not JSON data (a bug in the caller).
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
        if self._client is None or self._stopping:
            return False
        out = _Outgoing(topic=self.topics.for_kind(self.host, kind, to), payload=payload, qos=policy.qos,
                        retain=policy.retain if retain is None else retain,
                        expiry_s=policy.expiry_s if expiry_s is None else expiry_s)
        try:
            self._outbox.put_nowait(out)
        except asyncio.QueueFull:
            log.warning("mqtt outbox full: dropping a %s message", kind)
            return False
        return True

    async def run(self) -> None:
        """Stay connected until `stop()`; never raises but CancelledError."""
        if self._running:
            raise RuntimeError("GossipTransport.run() is already running")
        self._running = True
        self._finished.clear()
        try:
            while not self._stopping:
                # A fresh retry state per stable session: backoff starts small again after one.
                retrying = AsyncRetrying(
                    retry=retry_if_exception_type(_AttemptFailed),
                    wait=wait_exponential_jitter(multiplier=0.2, max=self._backoff_max_s, jitter=0.5),
                    sleep=self._pause)
                await retrying(self._attempt)
        finally:
            self._client = None
            self._running = False
            self._finished.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Publish the retained "offline" state (if connected), disconnect, and end `run()`."""
        self._stopping = True
        self._stop_requested.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._finished.wait()

    # ---- connection loop -------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        # tenacity's sleep: cut short by stop().
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_requested.wait()

    async def _attempt(self) -> None:
        if self._stopping:
            return
        url = self.cfg.urls[self._url_index % len(self.cfg.urls)]
        try:
            lost_after_s = await self._session(url)
        except _AttemptFailed:
            self._url_index += 1                # round robin: the next attempt tries the next broker
            raise
        except Exception:
            # A bug, not the network: say so loudly, and keep the agent connected all the same.
            log.exception("mqtt session with %s failed", url)
            self._report_down(url, "internal error (see the log)")
            self._url_index += 1
            raise _AttemptFailed from None
        # A connection that lasted is worth retrying at once, on the same broker; a short one backs off.
        if lost_after_s is not None and lost_after_s < max(5.0, 2.0 * self.cfg.keepalive_s):
            self._url_index += 1
            raise _AttemptFailed

    async def _session(self, url: str) -> float | None:
        """One connection: how long it lasted once lost, None after stop(); _AttemptFailed if refused."""
        try:
            client = self._new_client(url)
        except (OSError, ValueError, ssl.SSLError) as exc:
            self._report_down(url, f"cannot set up the connection: {exc}")
            raise _AttemptFailed from None
        await self._connect(client, url)
        started = time.monotonic()
        try:
            try:
                await self._subscribe(client)
            except aiomqtt.MqttError as exc:
                self._report_down(url, f"subscribe failed: {exc}")
                raise _AttemptFailed from None
            self._client = client
            log.info("mqtt connected to %s as %s", url, client.identifier)
            self._notify(self._on_connection, True, url)
            if self._last_state is not None:
                self.publish("state", self._last_state)
            error = await self._serve(client)
        finally:
            self._client = None
            self._drain_outbox()
            await self._disconnect(client)
        if error is None:
            self._notify(self._on_connection, False, f"{url}: stopped")
            return None
        lasted = time.monotonic() - started
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        self._report_down(url, f"connection lost after {lasted:.1f} s: {error}{cause}")
        return lasted

    def _new_client(self, url: str) -> aiomqtt.Client:
        scheme, hostname, port = _parse_url(url)
        password = None
        if self.cfg.password_file is not None:
            password = self.cfg.password_file.read_text().rstrip("\r\n")
        # The ACL pattern `hosts/%u/#` wants username = host name; that is the default.
        username = self.cfg.username
        if username is None and password is not None:
            username = self.host
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.MessageExpiryInterval = KINDS[OFFLINE].expiry_s
        connect_props = Properties(PacketTypes.CONNECT)
        # The broker will not send us anything bigger than a message we would accept.
        connect_props.MaximumPacketSize = self._max_bytes + 1024
        self._attempts += 1
        return aiomqtt.Client(
            hostname, port, username=username, password=password, identifier=self._client_id(),
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.cfg.keepalive_s,
            # Under keepalive: paho silently drops a connection whose CONNACK is that late, and
            # we want to send a DISCONNECT first (see _abandon).  Also bounds publish and exit waits.
            timeout=max(0.5, min(self.cfg.keepalive_s - 0.5, 5.0)),
            will=aiomqtt.Will(topic=self.topics.host(self.host, "state"), payload=self._will, qos=1,
                              retain=True, properties=will_props),
            properties=connect_props, tls_context=self._tls_context(scheme),
            max_queued_incoming_messages=1024)

    def _client_id(self) -> str:
        # One id per connection: an abandoned attempt that a slow broker processes late must
        # not take over the live connection (a takeover fires the old connection's will).
        return f"haguard-{self.cluster}-{self.host}-{self.incarnation}-{self._attempts}"

    def _tls_context(self, scheme: str) -> ssl.SSLContext | None:
        tls = self.cfg.tls
        if scheme != "mqtts" and tls is None:
            return None
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls is not None and tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if tls is not None and tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self, client: aiomqtt.Client, url: str) -> None:
        # aiomqtt connects in a thread that cannot be interrupted: on cancellation let it
        # finish (bounded by its own timeouts) and close what it opened, so no orphan
        # connection carrying our client id and will outlives the task.
        entering = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            await asyncio.wait({entering})
            if not entering.cancelled() and entering.exception() is None:
                await self._disconnect(client)
            else:
                _abandon(client)
            raise
        except aiomqtt.MqttError as exc:
            _abandon(client)
            self._report_down(url, _connect_error(exc))
            raise _AttemptFailed from None
        except Exception as exc:  # paho raises more than MqttError on odd input; never let it kill run()
            _abandon(client)
            self._report_down(url, f"{type(exc).__name__}: {exc}")
            raise _AttemptFailed from None

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # noLocal: the broker does not echo our own messages back to us.
        wanted = self.topics.subscriptions(self.host)
        topics = [(t, SubscribeOptions(qos=1, noLocal=True)) for t in wanted]
        codes = await client.subscribe(topics)
        refused = [t for t, code in zip(wanted, codes, strict=False)
                   if _code(code) >= 0x80]
        if refused:
            raise aiomqtt.MqttError(f"the broker refused the subscription to {', '.join(refused)}")

    async def _serve(self, client: aiomqtt.Client) -> BaseException | None:
        """Receive and send until the connection drops (returns why) or stop() (returns None)."""
        receiver = asyncio.create_task(self._receive(client), name=f"mqtt-receive-{self.host}")
        sender = asyncio.create_task(self._send(client), name=f"mqtt-send-{self.host}")
        stopper = asyncio.create_task(self._stop_requested.wait(), name=f"mqtt-stop-{self.host}")
        try:
            await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Going down without stop(): tell peers now rather than after 1.5 x keepalive.
            await _bounded(self._publish_raw(client, self.topics.host(self.host, "state"), self._will,
                                             KINDS[OFFLINE]), 1.0)
            raise
        finally:
            for task in (receiver, sender, stopper):
                task.cancel()
            results = await asyncio.gather(receiver, sender, stopper, return_exceptions=True)
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            return error
        if not stopper.cancelled():
            offline = self._sign(OFFLINE, {"reason": "stopped"})
            await _bounded(self._publish_raw(client, self.topics.host(self.host, "state"), offline,
                                             KINDS[OFFLINE]), 2.0)
            return None
        return ConnectionError("receiver ended")    # not expected: treat as a lost connection

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)

    def _drain_outbox(self) -> None:
        while not self._outbox.empty():
            self._outbox.get_nowait()

    # ---- traffic ---------------------------------------------------------------

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            out = await self._outbox.get()
            try:
                await client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain,
                                     properties=_expiry(out.expiry_s))
            except aiomqtt.MqttError as exc:
                # The receiver notices a dead connection; here just count the loss.
                log.warning("mqtt publish on %s failed: %s", out.topic, exc)

    async def _publish_raw(self, client: aiomqtt.Client, topic: str, payload: bytes,
                           policy: KindPolicy) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, payload, qos=policy.qos, retain=policy.retain,
                                 properties=_expiry(policy.expiry_s))

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            self._deliver(message.topic.value, data, retained=bool(message.retain))

    def _deliver(self, topic: str, data: bytes, *, retained: bool) -> None:
        where = self.topics.parse(topic, self.host)
        if where is None:
            self._reject(topic, "unexpected topic")
            return
        channel, topic_host = where
        env = decode(data, self._key, self.cluster, max_size=self._max_bytes)
        if isinstance(env, Rejected):
            self._reject(topic, env.reason)
            return
        if env.host != topic_host:
            self._reject(topic, f"sent as host {env.host!r} on another host's topic")
            return
        if env.kind not in _CHANNEL_KINDS[channel]:
            self._reject(topic, f"kind {env.kind!r} does not belong on this topic")
            return
        ahead = incarnation_too_far_ahead(env, self._clock_ms())
        if ahead is not None:
            self._reject(topic, ahead.reason)
            return
        if env.host == self.host:
            # Our own retained state from before, or an echo: not news.  Another incarnation
            # talking live under our name is a second agent configured as this host.
            if env.incarnation > self.incarnation or (not retained and env.incarnation != self.incarnation):
                self._reject(topic, f"another agent uses host name {self.host!r} "
                                    f"(incarnation {env.incarnation}, ours {self.incarnation})")
            return
        verdict = self._guard.check(env)
        if verdict is not None:
            # A retained copy redelivered on (re)subscription is old news, not an attack.
            if retained:
                log.debug("mqtt: old retained message on %s: %s", topic, verdict.reason)
            else:
                self._reject(topic, verdict.reason)
            return
        self._guard.accept(env)
        self._notify(self._on_envelope, env)

    def _reject(self, topic: str, reason: str) -> None:
        log.warning("mqtt message on %r rejected: %s", topic[:200], reason)
        self._notify(self._on_reject, topic, reason)

    def _sign(self, kind: str, body: dict[str, Any]) -> bytes:
        self._seq += 1
        return encode(Envelope(cluster=self.cluster, host=self.host, incarnation=self.incarnation,
                               seq=self._seq, kind=kind, body=body, sent_ms=self._clock_ms()), self._key)

    def _report_down(self, url: str, why: str) -> None:
        log.warning("mqtt %s: %s", url, why)
        self._notify(self._on_connection, False, f"{url}: {why}")

    def _notify(self, callback: Callable[..., None], *args: Any) -> None:
        # A failing callback is a bug in the caller: log it loudly, keep the transport alive.
        try:
            callback(*args)
        except Exception:
            log.exception("mqtt transport callback %s failed", getattr(callback, "__name__", callback))


def _abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a failed connect.  aiomqtt leaves it open when the CONNACK does not
    come in time; a broker that wakes up later would then take it for a live client with our
    id and will (and fire the will when it finally closes).  A DISCONNECT ends it cleanly."""
    paho = getattr(client, "_client", None)     # aiomqtt 2.x's paho client: no public handle
    if paho is not None:
        with contextlib.suppress(Exception):
            paho.disconnect()


def _parse_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except (ValueError, KeyError):
        raise ValueError(f"bad broker URL {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"bad broker URL {url!r}: no host")
    return parts.scheme, parts.hostname, port


def _connect_error(exc: aiomqtt.MqttError) -> str:
    if isinstance(exc, MqttConnectError):
        return f"refused by the broker: {exc}"
    return str(exc) or type(exc).__name__


def _code(code: object) -> int:
    if isinstance(code, ReasonCode):
        return int(code.value)
    return code if isinstance(code, int) else 0x80


def _expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


async def _bounded(coro: Coroutine[Any, Any, None], seconds: float) -> None:
    """Run `coro` for at most `seconds`, even inside a task being cancelled, swallowing its errors."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())   # retrieved: never logged as lost
    try:
        await asyncio.wait({task}, timeout=seconds)
    finally:
        task.cancel()
