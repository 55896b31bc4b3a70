"""The MQTT gossip transport against real mosquittos: exchange, rejection, outages, several
brokers used at once (copies dropped, a dead or hung one costs nothing, a stale will is
dropped), last will, TLS with passwords and ACLs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.adapters.mqtt import GossipTransport, Topics
from haguard.config.cluster import MqttConfig
from haguard.core.hostkeys import HostKeys, signer_of
from haguard.core.wire import MAX_MESSAGE_BYTES, Envelope, encode
from haguard.errors import ConfigError
from tests.helpers.mosquitto import HOSTS_ACL, Mosquitto, free_port

KEY = b"test-cluster-key-0123456789abcdef"
KEEPALIVE_S = 2
TOPICS = Topics(prefix="haguard", cluster="c1")


class Peer:
    """One transport and everything its callbacks saw."""

    def __init__(self, cfg: MqttConfig, host: str, *, incarnation: int = 1, cluster: str = "c1",
                 own: Ed25519PrivateKey | None = None, keys: HostKeys | None = None) -> None:
        self.host = host
        self.envelopes: list[Envelope] = []
        self.rejects: list[tuple[str, str]] = []
        self.connections: list[tuple[bool, str]] = []
        self.transport = GossipTransport(
            cfg, cluster=cluster, host=host, incarnation=incarnation, key=KEY,
            on_envelope=self.envelopes.append, on_reject=lambda t, r: self.rejects.append((t, r)),
            on_connection=lambda up, detail: self.connections.append((up, detail)), backoff_max_s=1.0,
            signer=signer_of(own) if own is not None else None, host_keys=keys)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Peer:
        self.task = asyncio.create_task(self.transport.run(), name=f"transport-{self.host}")
        return self

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def heard(self, host: str, kind: str = "heartbeat", **body: object) -> list[Envelope]:
        return [e for e in self.envelopes if e.host == host and e.kind == kind
                and all(e.body.get(k) == v for k, v in body.items())]


async def eventually(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def exchange(a: Peer, b: Peer, tag: str, timeout_s: float = 5.0) -> None:
    """Both send heartbeats tagged `tag` until each has heard the other's."""
    deadline = time.monotonic() + timeout_s
    while not (b.heard(a.host, tag=tag) and a.heard(b.host, tag=tag)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no heartbeat exchange ({tag}) within {timeout_s} s: "
                                 f"{a.host} saw {a.envelopes[-3:]}, {b.host} saw {b.envelopes[-3:]}")
        a.transport.publish("heartbeat", {"tag": tag})
        b.transport.publish("heartbeat", {"tag": tag})
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def peers(*ps: Peer) -> AsyncIterator[tuple[Peer, ...]]:
    try:
        for p in ps:
            p.start()
        yield ps
    finally:
        for p in ps:
            await p.close()


@contextlib.asynccontextmanager
async def raw_client(broker: Mosquitto, **kw: object) -> AsyncIterator[aiomqtt.Client]:
    host, port = broker.bind, broker.port
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5, **kw) as client:  # type: ignore[arg-type]
        yield client


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as b:
        yield b


# ---- exchange and rejection ------------------------------------------------------

@pytest.mark.timeout(20)
async def test_two_transports_exchange_heartbeats_and_state(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
        await exchange(a, b, "hello")
        assert a.connections[0] == (True, broker.url) and b.connections[0] == (True, broker.url)
        hb = b.heard("h1", tag="hello")[0]
        assert (hb.cluster, hb.incarnation) == ("c1", 1) and hb.seq >= 1 and hb.sent_ms > 0
        # Its own messages never come back to a transport.
        assert not a.heard("h1", tag="hello") and not b.heard("h2", tag="hello")
        assert a.transport.publish("state", {"vms": ["web1"]})
        assert a.transport.publish("alert", {"text": "disk full"})
        await eventually(lambda: b.heard("h1", "state") and b.heard("h1", "alert"), 3, "state and alert")
        # A late joiner gets the retained state at once, without anyone re-sending it.
        async with peers(Peer(cfg, "h3")) as (c,):
            await eventually(lambda: c.heard("h1", "state", vms=["web1"]), 3, "retained state")
            assert not c.heard("h1", "alert")                  # alerts are not retained
        assert not a.rejects and not b.rejects
        seqs = [e.seq for e in b.envelopes if e.host == "h1"]
        assert seqs == sorted(set(seqs))


@pytest.mark.timeout(20)
async def test_forged_replayed_foreign_and_garbage_messages_are_rejected(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b), raw_client(broker) as raw:
        # Capture one real heartbeat of h1 off the wire, to replay it later.
        await raw.subscribe(TOPICS.host("h1", "heartbeat"))
        await exchange(a, b, "before")
        captured = None
        async with asyncio.timeout(3):
            async for msg in raw.messages:
                captured = msg.payload
                break
        assert isinstance(captured, bytes)
        await eventually(lambda: b.heard("h1", tag="before"), 3, "the captured heartbeat delivered once")
        delivered = len(b.envelopes)

        def signed(key: bytes = KEY, **kw: object) -> bytes:
            fields: dict = dict(cluster="c1", host="h1", incarnation=1, seq=10**6, kind="heartbeat",
                                body={"tag": "evil"}, sent_ms=0) | kw
            return encode(Envelope(**fields), key)

        hb1 = TOPICS.host("h1", "heartbeat")
        attacks = [
            (hb1, signed(key=b"not-the-cluster-key-000000"), "bad signature"),
            (hb1, captured, "replay: seq"),
            (hb1, signed(cluster="c2"), "foreign cluster 'c2'"),
            (hb1, b"\x00\xffgarbage", "not UTF-8"),
            (hb1, b'{"v":1}', "missing field"),
            (hb1, signed(host="h3"), "sent as host 'h3'"),                   # h3 speaking on h1's topic
            (TOPICS.host("h1", "state"), signed(kind="heartbeat"), "kind 'heartbeat' does not belong"),
            (hb1, signed(incarnation=0), "replay: incarnation 0 < 1"),
        ]
        for topic, payload, _ in attacks:
            await raw.publish(topic, payload, qos=1)
        # A valid message sent the same raw way gets through: the channel works, the checks bite.
        await raw.publish(TOPICS.host("h9", "heartbeat"), signed(host="h9", seq=1, body={"tag": "ok"}), qos=1)
        await eventually(lambda: b.heard("h9", tag="ok"), 3, "the valid raw message")
        await eventually(lambda: len(b.rejects) >= len(attacks), 3, "all rejections")
        reasons = [r for _, r in b.rejects]
        for (topic, _, why), (got_topic, got) in zip(attacks, b.rejects, strict=True):
            assert why in got and got_topic == topic, (why, got)
        assert not any(e.body.get("tag") == "evil" for e in b.envelopes), reasons
        assert len(b.envelopes) == delivered + 1                        # only h9's
        # h1 itself, sharing the topics, rejected them too (its own name misused or not).
        assert a.rejects and not a.heard("h1")


@pytest.mark.timeout(20)
async def test_a_forged_alert_cannot_silence_a_host(broker: Mosquitto) -> None:
    """One alert signed as h1 with the largest incarnation once made every receiver drop all of
    h1's later messages as replays: alerts travelled on a topic naming no host, so the sender
    check was skipped while the replay guard still recorded the incarnation."""
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b), raw_client(broker) as raw:
        await exchange(a, b, "before")
        huge = 2**63 - 1
        forged = encode(Envelope(cluster="c1", host="h1", incarnation=huge, seq=1, kind="alert",
                                 body={"what": "forged"}), KEY)
        for topic in ("haguard/c1/alerts",                   # the topic alerts once shared
                      TOPICS.host("h3", "alerts"),          # another host's topic
                      TOPICS.host("h1", "alerts")):         # h1's own, beyond any real incarnation
            await raw.publish(topic, forged, qos=1)
        await eventually(lambda: len(b.rejects) >= 2, 3, "the forged alerts rejected")
        await exchange(a, b, "after")                       # h1 is still heard
        assert not b.heard("h1", "alert", what="forged")
        assert b.transport.guard.mark("h1") == (1, b.transport.guard.mark("h1")[1])  # type: ignore[index]
        reasons = " | ".join(r for _, r in b.rejects)
        assert "sent as host 'h1' on another host's topic" in reasons, reasons
        assert "incarnation" in reasons and "ahead of this host's clock" in reasons, reasons


@pytest.mark.timeout(20)
async def test_a_member_with_the_cluster_key_cannot_speak_as_another_host_that_has_a_host_key(
        broker: Mosquitto) -> None:
    """Anyone holding the cluster key could sign as any host: a message as h1 with the largest
    seq was taken, and every later real message of h1 dropped as a replay (h1 silenced, and
    any forged content believed).  With h1's public key configured, only h1 can speak as h1."""
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys: HostKeys = {"h1": (k1.public_key(),), "h2": (k2.public_key(),)}
    async with peers(Peer(cfg, "h1", own=k1, keys=keys), Peer(cfg, "h2", own=k2, keys=keys),
                     Peer(cfg, "h3")) as (a, b, old), raw_client(broker) as raw:
        await exchange(a, b, "before")
        await exchange(a, old, "before")
        forged = encode(Envelope(cluster="c1", host="h1", incarnation=1, seq=2**62, kind="heartbeat",
                                 body={"tag": "forged"}), KEY)
        await raw.publish(TOPICS.host("h1", "heartbeat"), forged, qos=1)
        await eventually(lambda: b.rejects and old.heard("h1", tag="forged"), 3, "the forgery seen")
        assert b.rejects[-1][1] == "not signed with the host key of 'h1'", b.rejects
        await exchange(a, b, "after")                       # h1 is still heard where its key is known
        assert not b.heard("h1", tag="forged")
        # Where h1's key is not configured (the previous way), the forgery silenced h1.
        a.transport.publish("heartbeat", {"tag": "after"})
        await asyncio.sleep(0.5)
        assert not old.heard("h1", tag="after") and any("replay" in r for _, r in old.rejects), old.rejects


@pytest.mark.timeout(15)
async def test_a_second_agent_with_the_same_host_name_is_reported(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1", incarnation=1), Peer(cfg, "h2")) as (a, b), raw_client(broker) as raw:
        await exchange(a, b, "x")
        impostor = encode(Envelope(cluster="c1", host="h1", incarnation=7, seq=1, kind="heartbeat"), KEY)
        await raw.publish(TOPICS.host("h1", "heartbeat"), impostor, qos=1)
        await eventually(lambda: a.rejects, 3, "the duplicate-name report")
        assert "another agent uses host name 'h1' (incarnation 7, ours 1)" in a.rejects[0][1]


# ---- outages, failover --------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_both_reconnect_after_a_broker_outage(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
        await exchange(a, b, "before")
        broker.kill()
        await eventually(lambda: not a.transport.connected and not b.transport.connected, 3, "disconnection")
        # Without a broker the agent goes on: publishing just says no.
        assert a.transport.publish("heartbeat", {"tag": "lost"}) is False
        await asyncio.sleep(2.5)
        assert any(not up and "connection lost" in why for up, why in a.connections)
        assert any(not up and "Connection refused" in why for up, why in a.connections), a.connections
        broker.start()
        t0 = time.monotonic()
        await exchange(a, b, "after", timeout_s=8)
        assert time.monotonic() - t0 < 4                                 # backoff capped (1 s here)
        assert sum(up for up, _ in a.connections) == 2 and sum(up for up, _ in b.connections) == 2
        assert not a.rejects and not b.rejects                           # retained copies are not "replays"


async def all_links_up(*ps: Peer) -> None:
    await eventually(lambda: all(all(p.transport.links_up().values()) for p in ps), 5, "every link up")


def _once_each(p: Peer) -> bool:
    """Every message taken once: no (host, incarnation, seq) twice."""
    keys = [(e.host, e.incarnation, e.seq) for e in p.envelopes]
    return len(keys) == len(set(keys))


@pytest.mark.timeout(30)
async def test_every_broker_carries_every_message_and_copies_are_dropped() -> None:
    with Mosquitto() as first, Mosquitto() as second:
        cfg = first.mqtt_config(keepalive_s=KEEPALIVE_S, urls=(first.url, second.url))
        async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
            await all_links_up(a, b)
            await exchange(a, b, "both")
            await asyncio.sleep(0.3)
            assert {(True, first.url), (True, second.url)} <= set(a.connections)
            assert b.transport.duplicates > 0 and _once_each(b) and _once_each(a)
            assert not a.rejects and not b.rejects, (a.rejects, b.rejects)


@pytest.mark.timeout(30)
async def test_a_dead_broker_delays_nothing_and_either_one_suffices() -> None:
    with Mosquitto() as first, Mosquitto() as second:
        first.kill()
        cfg = first.mqtt_config(keepalive_s=KEEPALIVE_S, urls=(first.url, second.url))
        t0 = time.monotonic()
        async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
            # Listed first and dead: the live one carries at once, no failover wait.
            await exchange(a, b, "on-second", timeout_s=8)
            assert time.monotonic() - t0 < 1.5
            assert any(not up and first.url in why for up, why in a.connections)
            # The first comes back, the second goes: no message waits for a reconnection.
            first.start()
            await eventually(lambda: a.transport.links_up()[first.url] and b.transport.links_up()[first.url],
                             8, "the first broker's links up again")
            second.kill()
            t1 = time.monotonic()
            await exchange(a, b, "on-first", timeout_s=5)
            assert time.monotonic() - t1 < 1.0
            assert a.transport.connected and not a.transport.links_up()[second.url]
            assert not a.rejects and not b.rejects and _once_each(a) and _once_each(b)


@pytest.mark.timeout(30)
async def test_a_hung_broker_costs_no_message() -> None:
    with Mosquitto() as first, Mosquitto() as second:
        cfg = first.mqtt_config(keepalive_s=KEEPALIVE_S, urls=(first.url, second.url))
        async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
            await all_links_up(a, b)
            first.freeze()                    # sockets stay open, nothing answers
            try:
                t0 = time.monotonic()
                await exchange(a, b, "while-hung", timeout_s=5)
                assert time.monotonic() - t0 < 1.0
                # paho notices a missing PINGRESP within about 2 x keepalive.
                await eventually(lambda: not a.transport.links_up()[first.url], 2 * KEEPALIVE_S + 4,
                                 "the hung link noticed")
                assert any(up and first.url in why and "connection lost" in why for up, why in a.connections)
            finally:
                first.thaw()


@pytest.mark.timeout(30)
async def test_a_will_from_one_broker_is_dropped_while_the_host_talks_through_another() -> None:
    with Mosquitto() as first, Mosquitto() as second:
        cfg = first.mqtt_config(keepalive_s=KEEPALIVE_S, urls=(first.url, second.url))
        async with peers(Peer(cfg, "h1", incarnation=3), Peer(cfg, "h2")) as (a, b):
            await all_links_up(a, b)
            await exchange(a, b, "up")
            # The first broker loses h1 (a client takes over its id): it publishes h1's will.
            async with raw_client(first, identifier="haguard-c1-h1-3-1"):
                for i in range(30):
                    a.transport.publish("heartbeat", {"tag": f"alive-{i}"})
                    await asyncio.sleep(0.1)
            assert b.heard("h1", tag="alive-29") and not b.heard("h1", "offline")
            assert b.transport.stale_wills == 1 and not b.rejects
            # h1 dies for real: silent on both brokers, one offline within the hold.
            t0 = time.monotonic()
            await a.close()
            await eventually(lambda: b.heard("h1", "offline"), 3, "h1's will")
            assert time.monotonic() - t0 < 2.0
            await asyncio.sleep(1.5)
            assert len(b.heard("h1", "offline")) == 1 and not b.rejects, b.rejects


# ---- last will, graceful stop -------------------------------------------------------

@pytest.mark.timeout(20)
async def test_cancelled_transport_leaves_its_signed_will(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1", incarnation=5), Peer(cfg, "h2")) as (a, b):
        await exchange(a, b, "up")
        t0 = time.monotonic()
        await a.close()                                  # cancelled, no stop()
        await eventually(lambda: b.heard("h1", "offline"), 2, "h1's will")
        assert time.monotonic() - t0 < 1.5
        will = b.heard("h1", "offline")[0]
        assert (will.incarnation, will.seq, will.body) == (5, 0, {"reason": "connection lost"})
        # Retained: a newcomer learns h1 is gone, once.
        async with peers(Peer(cfg, "h3")) as (c,):
            await eventually(lambda: c.heard("h1", "offline"), 3, "retained will")
            await asyncio.sleep(0.3)
            assert len(c.heard("h1", "offline")) == 1 and not c.rejects


_AGENT = """
import asyncio, json, sys
from haguard.adapters.mqtt import GossipTransport
from haguard.config.cluster import MqttConfig

async def main():
    cfg = MqttConfig.model_validate_json(sys.argv[1])
    t = GossipTransport(cfg, cluster="c1", host="h1", incarnation=int(sys.argv[3]), key=sys.argv[2].encode(),
                        on_envelope=lambda e: None, on_reject=lambda t, r: None,
                        on_connection=lambda up, d: print("up" if up else "down", flush=True))
    task = asyncio.create_task(t.run())
    while True:
        t.publish("heartbeat", {"tag": "alive"})
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


# mosquitto 2.0 checks keepalives only every ~6 s (keepalive__check: `last_check + 5 < now`),
# so a hung client's will fires between 1.5 x keepalive and 1.5 x keepalive + 6 s.
MOSQUITTO_KEEPALIVE_TICK_S = 6.0


@contextlib.contextmanager
def agent_process(cfg: MqttConfig, incarnation: int) -> Iterator[subprocess.Popen[bytes]]:
    """A transport for h1 in its own process, sending heartbeats."""
    argv = [sys.executable, "-c", _AGENT, cfg.model_dump_json(), KEY.decode(), str(incarnation)]
    proc = subprocess.Popen(argv, cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert "Traceback" not in err, err


@pytest.mark.timeout(30)
async def test_a_killed_or_hung_agent_is_declared_offline_by_its_will(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h2")) as (b,):
        # Killed: the kernel closes the socket, the broker publishes the will at once.
        with agent_process(cfg, 3) as proc:
            await eventually(lambda: b.heard("h1", tag="alive"), 10, "the agent's heartbeats")
            proc.kill()
            t0 = time.monotonic()
            await eventually(lambda: b.heard("h1", "offline"), 2, "the will of a killed agent")
            assert time.monotonic() - t0 < 1.0
            assert [(e.incarnation, e.seq) for e in b.heard("h1", "offline")] == [(3, 0)]
        # Hung (SIGSTOP): the socket stays open, only the keepalive timeout gives it away.
        with agent_process(cfg, 4) as proc:
            await eventually(lambda: any(e.incarnation == 4 for e in b.heard("h1", tag="alive")), 10,
                             "the second agent's heartbeats")
            os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            limit = 1.5 * KEEPALIVE_S + MOSQUITTO_KEEPALIVE_TICK_S + 0.5
            await eventually(lambda: len(b.heard("h1", "offline")) == 2, limit, "the will of a hung agent")
            elapsed = time.monotonic() - t0
            assert 1.5 * KEEPALIVE_S - 0.5 <= elapsed <= limit, elapsed
            assert [(e.incarnation, e.seq) for e in b.heard("h1", "offline")] == [(3, 0), (4, 0)]
        assert not b.rejects


@pytest.mark.timeout(20)
async def test_graceful_stop_publishes_retained_offline_and_ends_run(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
        await exchange(a, b, "up")
        await a.transport.stop()
        assert a.task is not None
        await asyncio.wait_for(a.task, 1)                        # run() returned by itself
        await eventually(lambda: b.heard("h1", "offline"), 2, "h1's goodbye")
        bye = b.heard("h1", "offline")[0]
        assert bye.seq > 0 and bye.body == {"reason": "stopped"}
        assert a.connections[-1] == (False, f"{broker.url}: stopped")
        assert a.transport.publish("heartbeat", {}) is False
        # The clean disconnect suppressed the will: no second "offline".
        await asyncio.sleep(1.5 * KEEPALIVE_S)
        assert len(b.heard("h1", "offline")) == 1 and not b.rejects


@pytest.mark.timeout(20)
async def test_state_is_resent_on_reconnect_replacing_the_will(broker: Mosquitto) -> None:
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
        await exchange(a, b, "up")
        a.transport.publish("state", {"gen": 1})
        await eventually(lambda: b.heard("h1", "state", gen=1), 3, "state")
        broker.restart()                                        # retained store empty again
        await exchange(a, b, "again", timeout_s=8)
        async with peers(Peer(cfg, "h3")) as (c,):
            await eventually(lambda: c.heard("h1", "state", gen=1), 3, "state re-sent after reconnect")


# ---- TLS, passwords, ACL --------------------------------------------------------------

@pytest.fixture
def secure_broker() -> Iterator[Mosquitto]:
    with Mosquitto(tls=True, users={"h1": "pw-one", "h2": "pw-two"}, acl=HOSTS_ACL) as b:
        yield b


@pytest.mark.timeout(25)
async def test_tls_with_passwords_and_acl(secure_broker: Mosquitto) -> None:
    broker = secure_broker
    assert broker.url.startswith("mqtts://")
    cfg1 = broker.mqtt_config(username="h1")
    cfg2 = broker.mqtt_config(username="h2", client_cert=True)
    async with peers(Peer(cfg1, "h1"), Peer(cfg2, "h2")) as (a, b):
        await exchange(a, b, "secure")
        assert a.transport.publish("alert", {"text": "x"})
        await eventually(lambda: b.heard("h1", "alert"), 3, "alert through the ACL")
        # h1's credentials cannot write under h2's subtree: the broker drops it, nobody hears it.
        ctx = __import__("ssl").create_default_context(cafile=str(broker.ca_file))
        forged_as_h2 = encode(Envelope(cluster="c1", host="h2", incarnation=9, seq=1, kind="heartbeat",
                                       body={"tag": "via-h1"}), KEY)
        async with raw_client(broker, username="h1", password="pw-one", tls_context=ctx) as raw:
            with contextlib.suppress(aiomqtt.MqttError):
                await raw.publish(TOPICS.host("h2", "heartbeat"), forged_as_h2, qos=1)
            await raw.publish(TOPICS.host("h1", "probe"), b"not json", qos=1)     # allowed, and rejected
        await eventually(lambda: b.rejects, 3, "the allowed garbage")
        await asyncio.sleep(0.3)
        assert not a.heard("h2", tag="via-h1")
        assert b.rejects == [(TOPICS.host("h1", "probe"), "not JSON")]


@pytest.mark.timeout(20)
async def test_wrong_password_and_untrusted_server_are_reported(secure_broker: Mosquitto) -> None:
    broker = secure_broker
    bad_pw = broker.mqtt_config(username="h1", password="wrong")
    no_ca = MqttConfig(urls=(broker.url,), keepalive_s=KEEPALIVE_S)        # system CAs only
    plain = MqttConfig(urls=(broker.url.replace("mqtts", "mqtt"),), keepalive_s=KEEPALIVE_S)
    async with peers(Peer(bad_pw, "h1"), Peer(no_ca, "h2"), Peer(plain, "h3")) as (a, b, c):
        await eventually(lambda: a.connections and b.connections and c.connections, 10, "reports")
        await asyncio.sleep(0.5)
        assert not any(up for p in (a, b, c) for up, _ in p.connections)
        assert "refused by the broker: [code:135] Not authorized" in a.connections[0][1]
        assert "CERTIFICATE_VERIFY_FAILED" in b.connections[0][1], b.connections
        assert c.connections[0][1].startswith(broker.url.replace("mqtts", "mqtt"))
        assert not a.transport.connected and a.transport.publish("heartbeat", {}) is False


@pytest.mark.timeout(10)
async def test_unreachable_url_and_missing_password_file_are_reported_not_raised() -> None:
    port = free_port()
    cfg = MqttConfig(urls=(f"mqtt://127.0.0.1:{port}",), keepalive_s=KEEPALIVE_S,
                     password_file=Path("/nonexistent/haguard-pw"))
    async with peers(Peer(cfg, "h1")) as (a,):
        await eventually(lambda: len(a.connections) >= 2, 5, "two failed attempts")
        assert all(not up and "No such file" in why for up, why in a.connections), a.connections
        assert a.task is not None and not a.task.done()
    bad = (("a/+", KEY, "h1", "topic_prefix"), ("haguard", b"short", "h1", "key_file"),
           ("haguard", KEY, "H 1", "host"))
    for prefix, key, host, field in bad:
        with pytest.raises(ConfigError, match=field):
            GossipTransport(MqttConfig(urls=("mqtt://x",), topic_prefix=prefix), cluster="c1", host=host,
                            incarnation=1, key=key, on_envelope=print, on_reject=print, on_connection=print)
    assert TOPICS.subscriptions() == [
        "haguard/c1/hosts/+/heartbeat", "haguard/c1/hosts/+/state", "haguard/c1/hosts/+/probe",
        "haguard/c1/hosts/+/alerts"]


@pytest.mark.timeout(30)
async def test_a_message_over_the_wire_limit_is_dropped_and_counted_and_the_next_one_goes() -> None:
    # A proposal of a few hundred VMs once went over 64 KiB: publish raised, and every output after
    # it in the batch (pets, heartbeats) was lost with the core task.
    with Mosquitto() as broker:
        cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
        async with peers(Peer(cfg, "h1"), Peer(cfg, "h2")) as (a, b):
            await exchange(a, b, "before")
            big = {"blob": "x" * (MAX_MESSAGE_BYTES + 1)}
            assert a.transport.publish("cluster", big) is False
            assert a.transport.too_large == 1
            await exchange(a, b, "after")


@pytest.fixture
def debug_broker() -> Iterator[Mosquitto]:
    with Mosquitto(extra_config="log_type debug") as b:
        yield b


@pytest.mark.timeout(20)
async def test_cancel_while_connecting_and_stop_while_backing_off_end_promptly(
        debug_broker: Mosquitto) -> None:
    broker = debug_broker
    cfg = broker.mqtt_config(keepalive_s=KEEPALIVE_S)
    broker.freeze()                           # TCP connects (backlog), CONNACK never comes
    try:
        p = Peer(cfg, "h1").start()
        await eventually(lambda: p.connections, 3, "a first attempt timing out")
        await eventually(lambda: p.transport.attempts == 2, 2, "a second attempt")
        await asyncio.sleep(0.2)              # in its CONNACK wait
        t0 = time.monotonic()
        await p.close()
        assert p.task is not None and p.task.cancelled()
        assert time.monotonic() - t0 < 2.5    # the connect thread's CONNACK wait (1.5 s) at most
        assert p.connections == [(False, f"{broker.url}: Operation timed out")]
    finally:
        broker.thaw()
    # The broker, awake, reads both abandoned attempts: each ends with a DISCONNECT, so no
    # will is published for a host that never got connected.
    async with peers(Peer(cfg, "h3")) as (c,):
        await eventually(lambda: c.transport.connected, 3, "h3 connected")
        await asyncio.sleep(0.5)
        assert not c.heard("h1", "offline")
    assert broker.log_text().count("Received DISCONNECT from haguard-c1-h1-1-") == 2, broker.log_text()
    broker.kill()
    q = Peer(cfg, "h2").start()
    await eventually(lambda: len(q.connections) >= 2, 5, "failed attempts")
    t0 = time.monotonic()
    await q.transport.stop()
    assert q.task is not None
    await asyncio.wait_for(q.task, 1)
    assert time.monotonic() - t0 < 1 and q.task.exception() is None
