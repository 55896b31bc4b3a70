"""QMP adapter: qemu.qmp with deadlines and haguard's errors.

qemu.qmp has no timeouts of its own and a monitor serves one client at a time
(a second client waits silently), so every connect and command here has a deadline.
The minimal client without qemu.qmp (`LeanQmp`, the VM watcher's heartbeat and the
launcher's stop and status) is haguard/vm/monitor.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from haguard.errors import QmpCommandError, QmpError, QmpTimeout
from haguard.vm.monitor import setup_qmp_logging

# qemu.qmp's own logging: quiet, or the whole conversation with HAGUARD_QMP_LOG=FILE.
setup_qmp_logging()


class QmpCommands(Protocol):
    """What a caller that only asks questions needs of a monitor session: `Qmp`, or a
    stand-in that records the questions (agent/migrate_rpc.py)."""

    @property
    def has_oob(self) -> bool: ...

    async def cmd(self, command: str, args: dict[str, Any] | None = None, *,
                  timeout_s: float | None = None) -> Any: ...


class _QuietClient(QMPClient):
    """qemu.qmp pretty-prints every message for its debug log even when nobody listens
    (`str(msg)` is evaluated eagerly): with a hundred VMs polled that is most of the
    agent's CPU.  Format only when debug logging is on."""

    def _cb_outbound(self, msg: Any) -> Any:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Any) -> Any:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class Qmp:
    def __init__(self, path: str | Path, *, timeout_s: float = 5.0, name: str = "haguard") -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._client = _QuietClient(name)

    @classmethod
    @contextlib.asynccontextmanager
    async def session(cls, path: str | Path, *, timeout_s: float = 5.0) -> AsyncIterator[Qmp]:
        qmp = cls(path, timeout_s=timeout_s)
        await qmp.connect()
        try:
            yield qmp
        finally:
            await qmp.close()

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.connect(self.path)
        except TimeoutError:
            await self.close()
            raise QmpTimeout(f"QMP monitor {self.path} did not answer within {self.timeout_s:g} s "
                             "(QEMU hung, or another client holds the monitor)") from None
        except ConnectError as exc:
            cause = exc.exc
            why = getattr(cause, "strerror", None) or str(cause)
            raise QmpError(f"cannot connect to QMP monitor {self.path}: {why}") from None

    async def reconnect(self) -> None:
        """A fresh session on the same socket (qemu.qmp clients are not reusable after a drop)."""
        await self.close()
        self._client = _QuietClient(self._client.name)
        await self.connect()

    @property
    def has_oob(self) -> bool:
        greeting = self._client.greeting
        return bool(greeting and "oob" in greeting.QMP.capabilities)

    async def cmd(self, command: str, args: dict[str, Any] | None = None, *,
                  oob: bool = False, timeout_s: float | None = None) -> Any:
        deadline = timeout_s if timeout_s is not None else self.timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._client.execute(command, args, oob=oob and self.has_oob)
        except TimeoutError:
            raise QmpTimeout(f"{command} on {self.path}: no reply within {deadline:g} s") from None
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, exc.error.error.desc) from None
        except QMPError as exc:
            raise QmpError(f"{command} on {self.path}: monitor connection lost ({exc})") from None
        except (OSError, EOFError) as exc:
            raise QmpError(f"{command} on {self.path}: monitor connection lost ({exc})") from None

    def listener(self, names: Iterable[str] = ()) -> contextlib.AbstractContextManager[EventListener]:
        return self._client.listener(list(names))

    @property
    def connected(self) -> bool:
        return str(self._client.runstate.name) == "RUNNING"

    async def close(self) -> None:
        # disconnect() re-raises whatever broke the connection; closing is best effort.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._client.disconnect()
