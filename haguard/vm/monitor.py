"""A QEMU instance's monitor, spoken directly: `LeanQmp`, a minimal QMP client.

It lives with the launcher (vm/) because starting, stopping and asking a QEMU its run
state are the launcher's job, and the launcher sits below the adapters: adapters/qmp.py
(the full client, qemu.qmp with deadlines) and adapters/vmwatch.py import from vm/, never
the other way.  No third-party library: one asyncio protocol.

HAGUARD_QMP_LOG=FILE records every QMP conversation, LeanQmp's and qemu.qmp's alike
(both log under the `qemu.qmp` logger): `setup_qmp_logging`, run on import here and by
adapters/qmp.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haguard.errors import QmpCommandError, QmpError, QmpTimeout

log = logging.getLogger(__name__)
# LeanQmp's conversation, under qemu.qmp so that HAGUARD_QMP_LOG records it too.
_trace_log = logging.getLogger("qemu.qmp.lean")
_logging_set_up = False


def setup_qmp_logging() -> None:
    """qemu.qmp logs every message at DEBUG and connection drops at ERROR; haguard reports
    those itself.  HAGUARD_QMP_LOG=FILE records the whole QMP conversation instead, for
    debugging a QEMU.  Idempotent."""
    global _logging_set_up
    if _logging_set_up:
        return
    _logging_set_up = True
    qmp_log = logging.getLogger("qemu.qmp")
    qmp_log.setLevel(logging.CRITICAL)
    if trace := os.environ.get("HAGUARD_QMP_LOG"):
        handler = logging.FileHandler(trace)
        handler.setFormatter(logging.Formatter("%(created).3f %(name)s %(message)s"))
        qmp_log.addHandler(handler)
        qmp_log.setLevel(logging.DEBUG)


setup_qmp_logging()


async def monitor_command(path: str | Path, command: str, *, timeout_s: float) -> Any:
    """One command (no arguments) on a fresh monitor session: its `return` value.  Connecting
    and the command each have `timeout_s`.  Raises QmpTimeout, QmpCommandError or QmpError."""
    monitor = LeanQmp(path, timeout_s=timeout_s)
    try:
        await monitor.connect()
        return await monitor.cmd(command)
    finally:
        monitor.close()
        # The socket closes in the loop's next round: wait for it, so that a caller that then
        # blocks (or another client, QEMU serves one at a time) never finds the monitor taken.
        await asyncio.shield(monitor.closed)


class LeanQmp(asyncio.Protocol):
    """A minimal QMP client for one caller that sends one command at a time and wants
    QEMU's events: the VM watcher's heartbeat to every local VM.

    qemu.qmp runs reader/writer tasks, queues and message objects for every command:
    with a hundred VMs polled that is most of the agent's CPU.  This one is a plain
    asyncio protocol: a command is one write, its reply one `data_received`.  Replies
    are matched by id, so a late reply to a command that timed out is dropped.
    `closed` completes when the monitor's connection ends (QEMU exited or closed it),
    which tells the watcher of a crash without waiting for the next poll.
    """

    MAX_LINE = 1 << 20     # a monitor that sends more than this without a newline is broken

    def __init__(self, path: str | Path, *, timeout_s: float = 5.0,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._on_event = on_event
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._waiter: asyncio.Future[dict[str, Any]] | None = None
        self._want: int | None = None      # the id of the awaited reply; None: the greeting
        self._ids = 0
        self._sleeper: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation, within timeout_s."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                self._waiter = loop.create_future()
                await loop.create_unix_connection(lambda: self, self.path)
                greeting = await self._waiter
                if "QMP" not in greeting:
                    raise QmpError(f"QMP monitor {self.path}: no greeting ({str(greeting)[:80]})")
                await self._execute("qmp_capabilities")
        except TimeoutError:
            self.close()
            raise QmpTimeout(f"QMP monitor {self.path} did not answer within {self.timeout_s:g} s "
                             "(QEMU hung, or another client holds the monitor)") from None
        except OSError as exc:
            self.close()
            raise QmpError(f"cannot connect to QMP monitor {self.path}: {exc.strerror or exc}") from None
        except QmpError:
            self.close()
            raise

    async def cmd(self, command: str, *, timeout_s: float | None = None) -> Any:
        """`command` (no arguments) within the deadline; its `return` value."""
        deadline = timeout_s if timeout_s is not None else self.timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._execute(command)
        except TimeoutError:
            self._waiter = self._want = None   # a late reply finds nobody waiting
            raise QmpTimeout(f"{command} on {self.path}: no reply within {deadline:g} s") from None

    async def _execute(self, command: str) -> Any:
        if self._transport is None or self.closed.done():
            raise QmpError(f"{command} on {self.path}: monitor connection lost")
        self._ids += 1
        self._want = self._ids
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        line = b'{"execute":"%s","id":%d}\n' % (command.encode(), self._ids)
        if _trace_log.isEnabledFor(logging.DEBUG):
            _trace_log.debug("%s <-- %s", self.path, line.decode().strip())
        self._transport.write(line)
        reply = await waiter
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return reply.get("return")

    async def idle_until(self, when: float) -> None:
        """Sleep until loop time `when`, or until the connection ends if that comes first."""
        loop = asyncio.get_running_loop()
        if self.closed.done():
            return
        self._sleeper = sleeper = loop.create_future()
        timer = loop.call_at(when, _wake, sleeper)
        try:
            await sleeper
        finally:
            timer.cancel()
            self._sleeper = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        elif not self.closed.done():
            self.closed.set_result(None)

    # ---- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if b"\n" not in data:
            self._buf = buf
            if len(buf) > self.MAX_LINE:
                self._broken("a message without end")
            return
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            if _trace_log.isEnabledFor(logging.DEBUG):
                _trace_log.debug("%s --> %s", self.path, line.decode(errors="replace").strip())
            try:
                msg = json.loads(line)
            except ValueError:
                self._broken(f"not JSON: {line[:80]!r}")
                return
            if isinstance(msg, dict):
                self._message(msg)

    def _message(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            if self._on_event is not None:
                self._on_event(msg)
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        awaited = "QMP" in msg if self._want is None else msg.get("id") == self._want
        if awaited:
            self._waiter = self._want = None
            waiter.set_result(msg)

    def _broken(self, why: str) -> None:
        log.debug("QMP monitor %s: %s", self.path, why)
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(QmpError(f"QMP monitor {self.path}: connection lost"))
        self._waiter = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self._sleeper is not None:
            _wake(self._sleeper)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
