"""Recovering a paused postcopy: the destination listens again, the source resumes.

A paused destination takes *any* connection to one of its migration listeners as the
recovery stream.  QEMU keeps the first `migrate-incoming` listener open for the whole
move, and each `migrate-recover` listener until the next one replaces it.  A
connection that then closes at once (a reachability probe) fails the recovery; QEMU
7.2's destination cannot go from `postcopy-recover` back to `postcopy-paused` (fixed
in 8.2) and its postcopy listen thread dereferences a NULL stream: the VM is lost.

So haguard never connects to a port a QEMU of this move may listen on: each recovery
listens on a port (or unix path) no listener of this move has used, the original
port + 1, + 2, ...  Before `migrate-recover` that port is probed: `refused` means
the path is back and the port free; `open` is some other program's listener, and the
next port is taken.  `migrate-recover` is accepted once the destination has itself
noticed the broken stream; the source's resume is sent once per listener (a second
one while the first still connects would be a second stream).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.errors import HaguardError, QmpCommandError
from haguard.migration import preflight
from haguard.migration.uri import MigrationUri

log = logging.getLogger("haguard.migration")

# A resume whose connection never came up is sent again only after TCP's own connect
# attempts would have given up.
RESUME_RETRY_MS = 130_000


class PostcopyRecovery:
    def __init__(self, source: Qmp, dest: Qmp, uri: MigrationUri) -> None:
        self.source, self.dest, self.uri = source, dest, uri
        self.resumes = 0
        self._listening: MigrationUri | None = None
        self._used = 0  # recovery listeners taken so far: the next one is uri + used + 1
        self._resume_sent_ms: int | None = None

    def stream_restored(self) -> None:
        """The postcopy runs again: a later pause needs a new migrate-recover."""
        self._listening = None

    async def attempt(self, now_ms: int) -> None:
        if self._listening is None:
            uri = self._recovery_uri(self._used + 1)
            if uri.scheme == "tcp":
                # Only ports no QEMU of this move listens on are ever connected to.
                probe = await asyncio.to_thread(preflight.tcp_probe, uri.host, uri.port, 2.0)
                if probe == "open":
                    log.info("%s is taken on the destination: trying the next port", uri.where)
                    self._used += 1
                if probe != "refused":
                    return  # the path is not back yet, or the port is taken
            try:
                await self.dest.cmd("migrate-recover", {"uri": str(uri)}, oob=True, timeout_s=5)
            except QmpCommandError as exc:
                log.info("migrate-recover refused: %s", exc.desc)
                return
            except HaguardError as exc:
                log.info("migrate-recover failed: %s", exc)
                return
            self._used += 1
            self._listening, self._resume_sent_ms = uri, None
        if self._resume_sent_ms is not None and now_ms - self._resume_sent_ms < RESUME_RETRY_MS:
            return
        try:
            await self.source.cmd("migrate", {"uri": str(self._listening), "resume": True},
                                  timeout_s=5)
            self._resume_sent_ms = now_ms
            self.resumes += 1
        except HaguardError as exc:
            log.info("migrate resume not accepted yet: %s", exc)

    def _recovery_uri(self, n: int) -> MigrationUri:
        uri = self.uri
        if uri.scheme == "unix":
            return uri.with_path(f"{uri.path}.recover{n}")
        return uri.with_port(uri.port + n)


def event_times(listener: Any, name: str) -> list[float]:
    """QEMU's own timestamps (seconds) of the `name` events a listener has seen."""
    if listener is None:
        return []
    return [ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            for ev in listener.history if ev.get("event") == name]


def guest_pause_ms(stops: list[float], resumes: list[float]) -> int | None:
    """How long the guest was paused by the switchover: from the source's last STOP to
    the destination's first RESUME after it; None without both events."""
    if not resumes:
        return None
    before = [t for t in stops if t <= resumes[0]]
    if not before:
        return None
    return round((resumes[0] - before[-1]) * 1000)
