"""Recovering a paused postcopy: the destination listens again, the source resumes.

migrate-recover is accepted once per pause, and only once the destination has itself
noticed the broken stream.  The destination is never queried while it pauses: on QEMU
7.2, monitor traffic at that moment can crash its postcopy listen thread.  The
source's resume is sent once per listener: a second one while the first still tries
to connect would reach the destination as a second stream (the same crash), so the
path is probed first, while nothing listens on the port.
"""

from __future__ import annotations

import asyncio
import logging

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
        self._port_offset = 0
        self._resume_sent_ms: int | None = None

    def stream_restored(self) -> None:
        """The postcopy runs again: a later pause needs a new migrate-recover."""
        self._listening = None

    async def attempt(self, now_ms: int) -> None:
        if self._listening is None:
            uri = self._next_uri()
            if uri.scheme == "tcp":
                probe = await asyncio.to_thread(preflight.tcp_probe, uri.host, uri.port, 2.0)
                if probe == "open":
                    self._port_offset += 1  # an old listener holds the port
                if probe != "refused":
                    return  # the path is not back yet
            try:
                await self.dest.cmd("migrate-recover", {"uri": str(uri)}, oob=True, timeout_s=5)
            except QmpCommandError as exc:
                log.info("migrate-recover refused: %s", exc.desc)
                return
            except HaguardError as exc:
                log.info("migrate-recover failed: %s", exc)
                return
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

    def _next_uri(self) -> MigrationUri:
        uri, n = self.uri, self._port_offset
        if uri.scheme == "unix":
            return uri.with_path(f"{uri.path}.recover{n}")
        return uri.with_port(uri.port + n) if n else uri
