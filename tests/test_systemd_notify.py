"""sd_notify and the progress watchdog, against a real AF_UNIX datagram socket.

The agent side runs as a separate process (the venv's python) so its event loop can be
blocked for real while this process keeps receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from haguard.adapters.systemd import Notifier, ProgressWatchdog, one_line, summary

AGENT = textwrap.dedent("""
    import asyncio, os, sys, time
    from haguard.adapters.systemd import Notifier, ProgressWatchdog

    async def main(mode: str) -> None:
        n = Notifier(use_library=os.environ["T_LIBRARY"] == "1")
        wd = ProgressWatchdog(n, ["probe", "gossip"], stale_after_s=0.3)
        stalled = False

        async def loop(name: str) -> None:
            while True:
                if not (name == "gossip" and stalled):
                    wd.beat(name)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(loop("probe")), asyncio.create_task(loop("gossip")),
                 asyncio.create_task(wd.run())]
        n.ready("up: 2 loops")
        await asyncio.sleep(1.0)
        n.status("phase: " + mode)
        if mode == "block":
            time.sleep(2.0)          # a blocking call inside a coroutine: the whole loop stops
        else:
            stalled = True           # one loop stops beating while the event loop runs on
            await asyncio.sleep(2.0)
            stalled = False
        n.status("phase: resume")
        await asyncio.sleep(1.0)
        n.stopping("bye")
        for t in tasks:
            t.cancel()

    asyncio.run(main(sys.argv[1]))
""")


@dataclass
class Received:
    at: float
    lines: list[str]


@dataclass
class NotifySocket:
    """A bound datagram socket standing in for systemd's notify socket."""
    address: str                      # what goes into $NOTIFY_SOCKET
    sock: socket.socket
    got: list[Received] = field(default_factory=list)

    def pump(self, stop: threading.Event) -> None:
        self.sock.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(4096)
                self.got.append(Received(time.monotonic(), data.decode().split("\n")))


@contextlib.contextmanager
def notify_socket(kind: str) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tmp = tempfile.mkdtemp(prefix="hg-notify-")
    try:
        if kind == "abstract":
            name = f"haguard-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = os.path.join(tmp, "notify")
            sock.bind(address)
        yield NotifySocket(address, sock)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tmp, "notify"))
        os.rmdir(tmp)


def run_agent(ns: NotifySocket, mode: str, library: bool) -> list[Received]:
    stop = threading.Event()
    pump = threading.Thread(target=ns.pump, args=(stop,), daemon=True)
    pump.start()
    env = {**os.environ, "NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "200000",
           "T_LIBRARY": "1" if library else "0"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-c", AGENT, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        time.sleep(0.1)
        stop.set()
        pump.join(timeout=5)
    assert proc.returncode == 0, err
    return ns.got


def index_of(got: list[Received], line: str) -> int:
    return next(i for i, r in enumerate(got) if line in r.lines)


def pings(got: list[Received], start: int = 0, end: int | None = None) -> list[Received]:
    return [r for r in got[start:end] if "WATCHDOG=1" in r.lines]


def check_common(got: list[Received], mode: str) -> tuple[int, int]:
    assert got[0].lines == ["READY=1", "STATUS=up: 2 loops"]
    assert got[-1].lines == ["STOPPING=1", "STATUS=bye"]
    begin, resume = index_of(got, f"STATUS=phase: {mode}"), index_of(got, "STATUS=phase: resume")
    before = pings(got, 0, begin)
    assert len(before) >= 6, before          # ~10 expected in 1 s at a 100 ms interval
    gaps = [b.at - a.at for a, b in itertools.pairwise(before)]
    assert max(gaps) < 0.6, gaps             # regular, at half of WATCHDOG_USEC (0.1 s)
    after = pings(got, resume)
    assert len(after) >= 4, after            # pings come back once every loop beats again
    return begin, resume


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("kind", "library"), [("path", True), ("abstract", False)])
def test_blocked_event_loop_sends_no_pings(kind: str, library: bool) -> None:
    with notify_socket(kind) as ns:
        got = run_agent(ns, "block", library)
    begin, resume = check_common(got, "block")
    assert got[resume].at - got[begin].at > 1.8
    assert pings(got, begin, resume) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("kind", "library"), [("path", False), ("abstract", True)])
def test_stalled_loop_withholds_pings(kind: str, library: bool) -> None:
    with notify_socket(kind) as ns:
        got = run_agent(ns, "stall", library)
    begin, resume = check_common(got, "stall")
    during = pings(got, begin, resume)
    # gossip's last beat is at most 50 ms before the stall: stale 300 ms later, so at most
    # a few pings slip through, all early; for the rest of the 2 s there are none.
    assert len(during) <= 5, during
    assert all(r.at - got[begin].at < 1.0 for r in during), [r.at - got[begin].at for r in during]
    held = [r for r in got[begin:resume] if any(x.startswith("STATUS=watchdog held: loop gossip")
                                                   for x in r.lines)]
    assert len(held) == 1, got[begin:resume]


@pytest.mark.timeout(10)
def test_everything_is_a_noop_without_notify_socket() -> None:
    n = Notifier(env={"WATCHDOG_USEC": "200000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not any([n.ready("x"), n.status("x"), n.watchdog(), n.stopping(), n.reloading()])
    wd = ProgressWatchdog(n, ["a"], stale_after_s=1)
    asyncio.run(asyncio.wait_for(wd.run(), timeout=1))   # returns at once: no watchdog
    assert wd.pings_sent == 0


@pytest.mark.timeout(10)
def test_watchdog_interval_honours_watchdog_pid(tmp_path: Path) -> None:
    sock = str(tmp_path / "n")
    base = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "10000000"}
    assert Notifier(env=base).watchdog_interval_s == 5.0
    assert Notifier(env={**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 5.0
    assert Notifier(env={**base, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier(env={**base, "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


@pytest.mark.timeout(10)
def test_progress_watchdog_in_process() -> None:
    now = [100.0]
    with notify_socket("path") as ns:
        n = Notifier(env={"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "200000"})
        wd = ProgressWatchdog(n, ["probe", "gossip"], stale_after_s=1.0, clock=lambda: now[0])
        assert wd.check()                     # registration counts as a beat
        now[0] += 1.5
        wd.beat("probe")
        assert wd.stale() == {"gossip": 1.5}
        assert not wd.check()
        wd.beat("gossip")
        assert wd.check()
        with pytest.raises(KeyError):
            wd.beat("nosuch")
        ns.sock.settimeout(1)
        got = [ns.sock.recv(4096).decode() for _ in range(3)]
    assert got == ["WATCHDOG=1", "STATUS=watchdog held: loop gossip silent for 1.5 s", "WATCHDOG=1"]
    assert wd.pings_sent == 2


def test_status_is_one_line() -> None:
    assert one_line("3 hosts up,\n 1 suspect\t ") == "3 hosts up, 1 suspect"
    assert len(one_line("x" * 500)) == 200
    assert summary(role="leader", hosts="3/3 up", vms=5, migrating=None, suspect_hosts=["h2"]) == (
        "role leader, hosts 3/3 up, vms 5, suspect hosts ['h2']")
