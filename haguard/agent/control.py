"""The agent's control socket: operators' requests from `haguard drain|undrain`.

A unix socket next to the status file, mode 0600 (root only: whoever can write to it
can move VMs).  One JSON object per line in, one JSON object per line back:

    {"action": "drain", "host": "h2"}      ->  {"ok": true}
                                             or {"ok": false, "error": "unknown host 'h9'"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from haguard.config.cluster import ClusterConfig
from haguard.errors import ConfigError, HaguardError

log = structlog.get_logger("haguard.control")

CONTROL_SOCKET = "agent-control.sock"
MAX_REQUEST = 4096
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def control_path(run_dir: Path) -> Path:
    return run_dir.parent / CONTROL_SOCKET


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                               limit=MAX_REQUEST)
            finally:
                os.umask(old)
        except OSError as exc:
            # The agent matters more than its control socket.
            log.error("control-socket-failed", path=str(self.path), error=exc.strerror or str(exc))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    reply: dict[str, Any] = {"ok": False, "error": f"malformed request: {exc}"}
                else:
                    reply = await self.handler(request)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
            log.warning("control-request-failed", error=str(exc) or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def request(path: Path, body: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request to the agent; OSError when no agent listens."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(body).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    reply = json.loads(line) if line else {"ok": False, "error": "the agent closed the connection"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "malformed reply"}


def ask_agent(cfg: ClusterConfig, body: dict[str, Any], *, host_field: str | None) -> None:
    """An operator's request to this host's agent about cluster host `body["host"]` (none
    for a cluster-wide one, `host_field` None): ConfigError for a host not in the cluster,
    HaguardError when the agent cannot be reached or refuses."""
    if host_field is not None and cfg.peer(str(body.get("host"))) is None:
        raise ConfigError(f"{body.get('host')!r} is not a host of cluster {cfg.cluster} "
                          f"({', '.join(h.name for h in cfg.hosts)})", field=host_field)
    path = control_path(cfg.run_dir)
    try:
        reply = asyncio.run(request(path, body))
    except (OSError, TimeoutError) as exc:
        raise HaguardError(f"cannot reach the agent at {path}: {getattr(exc, 'strerror', None) or exc} "
                           "(is haguard run active on this host?)") from None
    if not reply.get("ok"):
        raise HaguardError(str(reply.get("error", "refused")))
