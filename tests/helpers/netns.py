"""Two 'hosts' in network namespaces joined by a veth pair (198.18.0.0/15 only).

Faults: `cut()` drops every packet between them (a stalled link: TCP on both ends
just waits), `abort()` additionally kills the TCP sockets on both ends with
`ss -K` (both sides see an error), `restore()` removes the rules.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class HostPair:
    a: str
    b: str
    addr_a: str = "198.18.0.1"
    addr_b: str = "198.18.0.2"

    def ns(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", host, *args, check=check)

    def cut(self) -> None:
        for host, peer in ((self.a, self.addr_b), (self.b, self.addr_a)):
            self.ns(host, "iptables", "-I", "INPUT", "-s", peer, "-j", "DROP")
            self.ns(host, "iptables", "-I", "OUTPUT", "-d", peer, "-j", "DROP")

    def abort(self) -> None:
        """Cut, then kill the established TCP connections on both ends."""
        self.cut()
        for host, peer in ((self.a, self.addr_b), (self.b, self.addr_a)):
            self.ns(host, "ss", "-K", "dst", peer, check=False)

    def restore(self) -> None:
        for host in (self.a, self.b):
            self.ns(host, "iptables", "-F", "INPUT", check=False)
            self.ns(host, "iptables", "-F", "OUTPUT", check=False)


@contextlib.contextmanager
def host_pair(tag: str = "mig"):  # type: ignore[no-untyped-def]
    suffix = f"{tag}{os.getpid() % 100000}"
    a, b = f"hga{suffix}", f"hgb{suffix}"
    va, vb = f"va{suffix}"[:15], f"vb{suffix}"[:15]
    pair = HostPair(a, b)
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        pair.ns(a, "ip", "addr", "add", f"{pair.addr_a}/24", "dev", va)
        pair.ns(b, "ip", "addr", "add", f"{pair.addr_b}/24", "dev", vb)
        for host, dev in ((a, va), (b, vb)):
            pair.ns(host, "ip", "link", "set", dev, "up")
            pair.ns(host, "ip", "link", "set", "lo", "up")
        yield pair
    finally:
        for host in (a, b):
            sh("ip", "netns", "del", host, check=False)
