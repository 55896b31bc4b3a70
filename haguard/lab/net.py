"""The lab's network: three hosts in namespaces behind one bridge, or on loopback.

    hub namespace:  bridge `br0` 198.18.7.254/24 (the broker listens here)
    host namespace: `eth0` 198.18.7.{1,2,3}/24, a veth whose other end is on the bridge

`cut(host)` sets the hub end of the host's veth down: the host loses the broker and its
peers, as a host whose power went off would.  Without root there are no namespaces: the
hosts are 127.0.0.{1,2,3} and a link cannot be cut (`can_cut` is False).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

SUBNET = "198.18.7"
HUB_ADDR = f"{SUBNET}.254"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class LabNet:
    hosts: tuple[str, ...]
    namespaces: bool = field(default_factory=lambda: os.geteuid() == 0)
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    made: list[str] = field(default_factory=list)       # namespaces to delete

    @property
    def hub(self) -> str:
        return f"hgd{self.tag}hub"

    def ns(self, host: str) -> str | None:
        return f"hgd{self.tag}{host}"[:32] if self.namespaces else None

    def hub_dev(self, host: str) -> str:
        return f"hd{self.tag}{self.hosts.index(host)}"[:15]

    def addr(self, host: str) -> str:
        i = self.hosts.index(host) + 1
        return f"{SUBNET}.{i}" if self.namespaces else f"127.0.0.{i}"

    @property
    def broker_addr(self) -> str:
        return HUB_ADDR if self.namespaces else "127.0.0.1"

    @property
    def can_cut(self) -> bool:
        return self.namespaces

    def prefix(self, host: str | None) -> list[str]:
        """argv prefix that runs a command inside `host` (the hub for None)."""
        if not self.namespaces:
            return []
        return ["ip", "netns", "exec", self.hub if host is None else self.ns(host) or ""]

    def _in(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *args, check=check)

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.made.append(name)
        self._in(name, "ip", "link", "set", "lo", "up")

    def up(self) -> None:
        if not self.namespaces:
            return
        self._add_ns(self.hub)
        self._in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.hub, "ip", "addr", "add", f"{HUB_ADDR}/24", "dev", "br0")
        self._in(self.hub, "ip", "link", "set", "br0", "up")
        for h in self.hosts:
            ns, dev = self.ns(h) or "", self.hub_dev(h)
            self._add_ns(ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", dev,
               "netns", self.hub)
            self._in(ns, "ip", "addr", "add", f"{self.addr(h)}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(self.hub, "ip", "link", "set", dev, "master", "br0")
            self._in(self.hub, "ip", "link", "set", dev, "up")

    def cut(self, host: str) -> None:
        self._in(self.hub, "ip", "link", "set", self.hub_dev(host), "down")

    def down(self) -> None:
        """Delete every namespace made (their veths and the bridge go with them)."""
        while self.made:
            sh("ip", "netns", "del", self.made.pop(), check=False)
