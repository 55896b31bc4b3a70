"""The gossip's topics and what travels on each (docs/mqtt-topics.md is the operators' copy)."""

from __future__ import annotations

from dataclasses import dataclass

from haguard.core.wire import OFFLINE
from haguard.errors import ConfigError


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
HOST_CHANNELS = ("heartbeat", "state", "probe", "alerts", "cluster")
CHANNEL_KINDS = {ch: frozenset(k for k, p in KINDS.items() if p.channel == ch) for ch in CHANNELS}


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
        if len(parts) == 3 and parts[0] == "hosts" and parts[2] in HOST_CHANNELS:
            return parts[2], parts[1]
        if len(parts) == 3 and parts[0] == "inbox" and me is not None and parts[1] == me:
            return "inbox", parts[2]
        return None
