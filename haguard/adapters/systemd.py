"""Talk to the service manager: readiness, status lines and a watchdog tied to real progress.

The sd_notify protocol is one datagram of newline-separated `KEY=value` lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (abstract namespace when it starts with '@').
systemd-python's `systemd.daemon.notify` is used when installed (an optional extra);
otherwise the datagram is sent here.  Without $NOTIFY_SOCKET everything is a no-op, so
the agent runs the same under a terminal, a container or systemd.

The watchdog must prove the agent works, not merely that some thread is alive:
`ProgressWatchdog` pings only while every supervised loop has beaten recently.  The ping
task runs on the agent's own event loop, so a blocked loop sends nothing either.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping

import structlog

try:  # optional extra: haguard[systemd]
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the installation
    _sd_daemon = None

log = structlog.get_logger("haguard.systemd")

STATUS_MAX_CHARS = 200  # `systemctl status` shows one line; keep it readable


def one_line(text: str, limit: int = STATUS_MAX_CHARS) -> str:
    """A STATUS= value: newlines would end the field, long lines get cut by every viewer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def summary(**facts: object) -> str:
    """A STATUS= line from facts, in the order given; None values are left out.

    summary(role="leader", hosts="3/3 up", vms=5) -> "role leader, hosts 3/3 up, vms 5"
    """
    return one_line(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items() if v is not None))


def send_datagram(address: str, payload: bytes) -> None:
    """Send one notify datagram; '@name' is an abstract socket (leading NUL on the wire)."""
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(1.0)  # systemd reads promptly; never hang the agent on a stuck manager
        sock.sendto(payload, target)


class Notifier:
    """sd_notify for the agent.  Every method returns whether a message was sent.

    `env` defaults to os.environ; tests pass their own mapping, which also forces the
    direct protocol (the library only reads the process environment).
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, use_library: bool | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._socket = self._env.get("NOTIFY_SOCKET") or None
        if use_library is None:
            use_library = env is None and _sd_daemon is not None
        self.use_library = bool(use_library and _sd_daemon is not None)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of $WATCHDOG_USEC (systemd's advice), or None when no watchdog is meant for us."""
        usec = self._env.get("WATCHDOG_USEC")
        pid = self._env.get("WATCHDOG_PID")
        if not usec or not self.enabled:
            return None
        if pid and pid.strip() != str(os.getpid()):
            return None  # inherited from a parent: the watchdog is someone else's
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None

    def notify(self, *lines: str) -> bool:
        if self._socket is None or not lines:
            return False
        text = "\n".join(lines)
        try:
            if self.use_library:
                assert _sd_daemon is not None
                return bool(_sd_daemon.notify(text))
            send_datagram(self._socket, text.encode())
        except OSError as exc:
            # Losing a notification must never stop the agent; a missed ping shows as a timeout.
            log.warning("sd-notify-failed", socket=self._socket, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append("STATUS=" + one_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + one_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"] + (["STATUS=" + one_line(status)] if status is not None else [])
        return self.notify(*lines)

    def reloading(self) -> bool:
        """Start of a reload; send `ready()` when it is done.

        MONOTONIC_USEC is what Type=notify-reload (systemd >= 253) requires; older
        managers ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


class ProgressWatchdog:
    """Pings the watchdog only while every supervised loop makes progress.

    Each supervised loop calls `beat(name)` once per iteration.  `run()` wakes every
    watchdog interval and sends WATCHDOG=1 only if each loop beat within
    `stale_after_s`; otherwise it withholds the ping (systemd then restarts the agent,
    which leaves the VMs running) and says which loop stalled in STATUS=.
    """

    def __init__(self, notifier: Notifier, loops: Iterable[str], stale_after_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        self.notifier = notifier
        self.stale_after_s = stale_after_s
        self._clock = clock
        now = clock()
        # Registration counts as a beat: each loop gets stale_after_s to start.
        self._last_beat: dict[str, float] = {name: now for name in loops}
        self._held: tuple[str, ...] = ()
        self.pings_sent = 0

    @property
    def loops(self) -> tuple[str, ...]:
        return tuple(self._last_beat)

    def register(self, name: str) -> None:
        self._last_beat[name] = self._clock()

    def unregister(self, name: str) -> None:
        self._last_beat.pop(name, None)

    def beat(self, name: str) -> None:
        if name not in self._last_beat:
            raise KeyError(f"loop {name!r} is not supervised by the watchdog")
        self._last_beat[name] = self._clock()

    def stale(self, now: float | None = None) -> dict[str, float]:
        """Loops silent for longer than stale_after_s, with how long they have been silent."""
        at = self._clock() if now is None else now
        return {name: at - last for name, last in self._last_beat.items()
                if at - last > self.stale_after_s}

    def check(self) -> bool:
        """Ping if every loop is fresh; returns whether a ping was sent."""
        stale = self.stale()
        held = tuple(sorted(stale))
        if held != self._held:
            self._held = held
            if held:
                worst = max(stale.values())
                log.error("watchdog-held", loops=list(held), silent_s=round(worst, 1))
                self.notifier.status(f"watchdog held: loop {', '.join(held)} silent for {worst:.1f} s")
            else:
                log.info("watchdog-resumed")
        if stale:
            return False
        if self.notifier.watchdog():
            self.pings_sent += 1
            return True
        return False

    async def run(self) -> None:
        """Ping at the watchdog interval until cancelled; returns at once without a watchdog."""
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.check()
            await asyncio.sleep(interval)
