"""One broker connection of the gossip transport (adapters/mqtt.py): connect, subscribe,
send and receive, and reconnect to the same broker with capped backoff.

Every configured broker gets its own link, all up at once (active-active): a dead broker
only costs its own link's retries, never a wait before the live one is used.

aiomqtt 2.x does not reconnect by itself, and a `Client` reused after a lost connection
can skip the CONNACK wait, so every attempt makes a new `Client`.  A clean DISCONNECT
suppresses the last will: a stopping link publishes the "offline" state itself; a
cancelled one (the agent going down without `stop()`) publishes the pre-signed will before
disconnecting, so peers learn at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from haguard.adapters.mqtt_topics import KINDS, Topics
from haguard.config.cluster import MqttConfig
from haguard.core.wire import OFFLINE
from haguard.errors import HaguardError

log = logging.getLogger("haguard.adapters.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int


class LinkOwner(Protocol):
    """What a link needs of the transport that owns it."""

    host: str
    cluster: str
    incarnation: int
    topics: Topics

    def link_up(self, link: BrokerLink) -> None: ...
    def link_down(self, link: BrokerLink, why: str) -> None: ...
    def deliver(self, link: BrokerLink, topic: str, data: bytes, *, retained: bool) -> None: ...
    def sign_offline(self, reason: str) -> bytes: ...


class _AttemptFailed(HaguardError):
    """A connection attempt failed, or a connection was lost soon after it was made: back off."""


class BrokerLink:
    def __init__(self, owner: LinkOwner, cfg: MqttConfig, url: str, index: int, *, will: bytes,
                 backoff_max_s: float, max_message_bytes: int, outbox_size: int) -> None:
        self.owner, self.cfg, self.url, self.index = owner, cfg, url, index
        self.will = will
        self.backoff_max_s = backoff_max_s
        self.max_bytes = max_message_bytes
        self.attempts = 0
        self.client: aiomqtt.Client | None = None      # set while connected and subscribed
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=outbox_size)
        self.stopping = False
        self.stop_requested = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.client is not None

    def put(self, out: Outgoing) -> bool:
        if self.client is None or self.stopping:
            return False
        try:
            self.outbox.put_nowait(out)
        except asyncio.QueueFull:
            log.warning("mqtt %s: outbox full, dropping a message on %s", self.url, out.topic)
            return False
        return True

    def stop(self) -> None:
        self.stopping = True
        self.stop_requested.set()

    async def run(self) -> None:
        """Stay connected to this broker until `stop()`."""
        try:
            while not self.stopping:
                # A fresh retry state per stable session: backoff starts small again after one.
                retrying = AsyncRetrying(
                    retry=retry_if_exception_type(_AttemptFailed),
                    wait=wait_exponential_jitter(multiplier=0.2, max=self.backoff_max_s, jitter=0.5),
                    sleep=self._pause)
                await retrying(self._attempt)
        finally:
            self.client = None

    async def _pause(self, seconds: float) -> None:
        # tenacity's sleep: cut short by stop().
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop_requested.wait()

    async def _attempt(self) -> None:
        if self.stopping:
            return
        try:
            lost_after_s = await self._session()
        except _AttemptFailed:
            raise
        except Exception:
            # A bug, not the network: say so loudly, and keep the agent connected all the same.
            log.exception("mqtt session with %s failed", self.url)
            self._down("internal error (see the log)")
            raise _AttemptFailed from None
        # A connection that lasted is worth retrying at once; a short one backs off.
        if lost_after_s is not None and lost_after_s < max(5.0, 2.0 * self.cfg.keepalive_s):
            raise _AttemptFailed

    async def _session(self) -> float | None:
        """One connection: how long it lasted once lost, None after stop(); _AttemptFailed if refused."""
        try:
            client = self._new_client()
        except (OSError, ValueError, ssl.SSLError) as exc:
            self._down(f"cannot set up the connection: {exc}")
            raise _AttemptFailed from None
        await self._connect(client)
        started = time.monotonic()
        try:
            try:
                await self._subscribe(client)
            except aiomqtt.MqttError as exc:
                self._down(f"subscribe failed: {exc}")
                raise _AttemptFailed from None
            self.client = client
            log.info("mqtt connected to %s as %s", self.url, client.identifier)
            self.owner.link_up(self)
            error = await self._serve(client)
        finally:
            self.client = None
            while not self.outbox.empty():
                self.outbox.get_nowait()
            await _disconnect(client)
        if error is None:
            self.owner.link_down(self, "stopped")
            return None
        lasted = time.monotonic() - started
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        self._down(f"connection lost after {lasted:.1f} s: {error}{cause}")
        return lasted

    def _down(self, why: str) -> None:
        log.warning("mqtt %s: %s", self.url, why)
        self.owner.link_down(self, why)

    def _new_client(self) -> aiomqtt.Client:
        scheme, hostname, port = parse_url(self.url)
        password = None
        if self.cfg.password_file is not None:
            password = self.cfg.password_file.read_text().rstrip("\r\n")
        # The ACL pattern `hosts/%u/#` wants username = host name; that is the default.
        username = self.cfg.username
        if username is None and password is not None:
            username = self.owner.host
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.MessageExpiryInterval = KINDS[OFFLINE].expiry_s
        connect_props = Properties(PacketTypes.CONNECT)
        # The broker will not send us anything bigger than a message we would accept.
        connect_props.MaximumPacketSize = self.max_bytes + 1024
        self.attempts += 1
        return aiomqtt.Client(
            hostname, port, username=username, password=password, identifier=self._client_id(),
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.cfg.keepalive_s,
            # Under keepalive: paho silently drops a connection whose CONNACK is that late, and
            # we want to send a DISCONNECT first (see _abandon).  Also bounds publish and exit waits.
            timeout=max(0.5, min(self.cfg.keepalive_s - 0.5, 5.0)),
            will=aiomqtt.Will(topic=self.owner.topics.host(self.owner.host, "state"), payload=self.will,
                              qos=1, retain=True, properties=will_props),
            properties=connect_props, tls_context=self._tls_context(scheme),
            max_queued_incoming_messages=1024)

    def _client_id(self) -> str:
        # One id per connection: an abandoned attempt that a slow broker processes late must
        # not take over the live connection (a takeover fires the old connection's will), nor
        # may two links to nodes of one clustered broker take each other over.
        o = self.owner
        suffix = f"-b{self.index}" if self.index else ""
        return f"haguard-{o.cluster}-{o.host}-{o.incarnation}-{self.attempts}{suffix}"

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

    async def _connect(self, client: aiomqtt.Client) -> None:
        # aiomqtt connects in a thread that cannot be interrupted: on cancellation let it
        # finish (bounded by its own timeouts) and close what it opened, so no orphan
        # connection carrying our client id and will outlives the task.
        entering = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            await asyncio.wait({entering})
            if not entering.cancelled() and entering.exception() is None:
                await _disconnect(client)
            else:
                _abandon(client)
            raise
        except aiomqtt.MqttError as exc:
            _abandon(client)
            self._down(_connect_error(exc))
            raise _AttemptFailed from None
        except Exception as exc:  # paho raises more than MqttError on odd input; never let it kill run()
            _abandon(client)
            self._down(f"{type(exc).__name__}: {exc}")
            raise _AttemptFailed from None

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # noLocal: the broker does not echo our own messages back to us.
        wanted = self.owner.topics.subscriptions(self.owner.host)
        topics = [(t, SubscribeOptions(qos=1, noLocal=True)) for t in wanted]
        codes = await client.subscribe(topics)
        refused = [t for t, code in zip(wanted, codes, strict=False) if _code(code) >= 0x80]
        if refused:
            raise aiomqtt.MqttError(f"the broker refused the subscription to {', '.join(refused)}")

    async def _serve(self, client: aiomqtt.Client) -> BaseException | None:
        """Receive and send until the connection drops (returns why) or stop() (returns None)."""
        tag = f"{self.owner.host}-b{self.index}"
        receiver = asyncio.create_task(self._receive(client), name=f"mqtt-receive-{tag}")
        sender = asyncio.create_task(self._send(client), name=f"mqtt-send-{tag}")
        stopper = asyncio.create_task(self.stop_requested.wait(), name=f"mqtt-stop-{tag}")
        state_topic = self.owner.topics.host(self.owner.host, "state")
        try:
            await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Going down without stop(): tell peers now rather than after 1.5 x keepalive.
            await bounded(_publish(client, state_topic, self.will, OFFLINE), 1.0)
            raise
        finally:
            for task in (receiver, sender, stopper):
                task.cancel()
            results = await asyncio.gather(receiver, sender, stopper, return_exceptions=True)
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            return error
        if not stopper.cancelled():
            await bounded(_publish(client, state_topic, self.owner.sign_offline("stopped"), OFFLINE), 2.0)
            return None
        return ConnectionError("receiver ended")    # not expected: treat as a lost connection

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            out = await self.outbox.get()
            try:
                await client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain,
                                     properties=_expiry(out.expiry_s))
            except aiomqtt.MqttError as exc:
                # The receiver notices a dead connection; here just count the loss.
                log.warning("mqtt publish on %s via %s failed: %s", out.topic, self.url, exc)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            self.owner.deliver(self, message.topic.value, data, retained=bool(message.retain))


async def _publish(client: aiomqtt.Client, topic: str, payload: bytes, kind: str) -> None:
    policy = KINDS[kind]
    with contextlib.suppress(aiomqtt.MqttError):
        await client.publish(topic, payload, qos=policy.qos, retain=policy.retain,
                             properties=_expiry(policy.expiry_s))


async def _disconnect(client: aiomqtt.Client) -> None:
    with contextlib.suppress(Exception):
        await client.__aexit__(None, None, None)


def _abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a failed connect.  aiomqtt leaves it open when the CONNACK does not
    come in time; a broker that wakes up later would then take it for a live client with our
    id and will (and fire the will when it finally closes).  A DISCONNECT ends it cleanly."""
    paho = getattr(client, "_client", None)     # aiomqtt 2.x's paho client: no public handle
    if paho is not None:
        with contextlib.suppress(Exception):
            paho.disconnect()


def parse_url(url: str) -> tuple[str, str, int]:
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


async def bounded(coro: Coroutine[Any, Any, None], seconds: float) -> None:
    """Run `coro` for at most `seconds`, even inside a task being cancelled, swallowing its errors."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())   # retrieved: never logged as lost
    try:
        await asyncio.wait({task}, timeout=seconds)
    finally:
        task.cancel()
