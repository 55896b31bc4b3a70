"""Live migration between hosts: the destination's monitor, relayed by its agent.

The migration engine drives both QEMUs through their QMP monitors.  Across hosts the
destination's monitor is a unix socket on the other machine, so the destination's
agent relays it (libvirt's peer-to-peer migration works the same way):

    source agent                                   destination agent
    MigrateVm(vm, target) from the core
    RpcClient.call(prepare) ------- inbox --------> DestinationServer: authorise (the
                                                    cluster state holds this move from the
                                                    sender to us), start QEMU -incoming defer,
    <------------------------------ inbox --------  reply address + free port
    run_migration(source, RemoteQmp) : each dest.cmd() is one `qmp` call, run on that
                                       instance's control monitor: allow-listed commands
                                       only, listeners only on this host's own address
                                       and the ports it chose

Every request and reply is a signed "direct" envelope in the recipient's inbox
(haguard.adapters.mqtt); the body names its recipient, so a message moved to another
inbox is refused.  The server only ever touches the QEMU instance it started for that
session: it can never stop or change a VM that runs on its host.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from haguard.adapters.qmp import Qmp
from haguard.errors import HaguardError, QmpCommandError, QmpError, QmpTimeout
from haguard.migration import features, preflight, tls
from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.definition import VmDefinition

log = structlog.get_logger("haguard.migrate-rpc")

Publish = Callable[[str, dict[str, Any]], bool]        # (to, body) -> sent
Authorise = Callable[[str, str, int], str | None]      # (vm, sender, generation) -> why not, or None

# What a source may run on the destination's QEMU: the engine's destination side of a
# move between hosts (plus any query-*).  No disk export or block device: cluster moves
# are of VMs on shared storage, and `blockdev-add` of any host path with a writable NBD
# export would hand the host's files to the peer.
DEST_COMMANDS = frozenset({
    "qom-get", "migrate-set-capabilities", "migrate-set-parameters", "migrate-incoming",
    "migrate-recover", "migrate-pause", "quit", "yank",
})
# The parameters a source may set on the destination (the engine's multifd settings,
# migration/plan.py): nothing else, e.g. no `tls-creds` pointing QEMU at other credentials.
DEST_PARAMETERS = frozenset({"multifd-channels", "multifd-compression"})
# The listeners a source may open on the destination: the port the destination chose at
# `prepare`, and for postcopy recovery the ports after it (postcopy.py takes port + 1, + 2, ...).
RECOVERY_PORTS = 64
CALL_TIMEOUT_S = 10.0
AUTHORISE_WAIT_S = 2.0         # for this host's copy of the cluster state to show the move
PREPARE_TIMEOUT_S = 15.0        # starting the incoming QEMU takes well under a second


class RpcError(HaguardError):
    """The other agent did not answer, or refused."""


# ---- source side --------------------------------------------------------------------------

class RpcClient:
    def __init__(self, me: str, publish: Publish) -> None:
        self.me = me
        self.publish = publish
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    async def call(self, to: str, body: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        rid = f"{self.me}-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (to, future)
        try:
            if not self.publish(to, {"rpc": "request", "id": rid, "to": to, **body}):
                raise RpcError(f"cannot reach {to}: no broker connection")
            async with asyncio.timeout(timeout_s):
                reply = await future
        except TimeoutError:
            raise RpcError(f"{to} did not answer {body.get('op')} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
        return reply

    def on_reply(self, sender: str, body: dict[str, Any]) -> None:
        rid = body.get("id")
        entry = self._pending.get(rid) if isinstance(rid, str) else None
        if entry is None or entry[0] != sender or entry[1].done():
            return                      # late, duplicate, or from someone we did not ask
        entry[1].set_result(body)


class RemoteQmp(Qmp):
    """The destination's monitor as the engine sees it, relayed by the destination's agent."""

    def __init__(self, rpc: RpcClient, host: str, session: str, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        super().__init__(f"{host}:{session}", timeout_s=timeout_s, name="haguard-migrate-remote")
        self.rpc, self.host, self.session_id = rpc, host, session
        self._connected = False
        self._oob = False
        # Answers the destination's agent fetched at connect time, each used once, all dropped
        # at the first command that changes something: a move relays 4 commands, not 13.
        self._prefetched: dict[tuple[str, str], Any] = {}

    async def _call(self, op: str, timeout_s: float, **body: Any) -> dict[str, Any]:
        try:
            reply = await self.rpc.call(self.host, {"op": op, "session": self.session_id, **body},
                                        timeout_s=timeout_s + 2)
        except RpcError as exc:
            raise QmpTimeout(f"destination {self.host}: {exc}") from None
        self._connected = bool(reply.get("connected"))
        if reply.get("ok") is not True:
            error = reply.get("error") or {}
            if not isinstance(error, dict):
                error = {}
            cls, desc = str(error.get("class", "")), str(error.get("desc", "refused"))[:500]
            if cls:
                raise QmpCommandError(str(body.get("command", op)), cls, desc)
            raise QmpError(f"destination {self.host}: {desc}")
        return reply

    async def connect(self) -> None:
        reply = await self._call("connect", self.timeout_s)
        self._oob = bool(reply.get("oob"))
        self._prefetched = {}
        records = reply.get("prefetched")
        for record in records if isinstance(records, list) else []:
            if isinstance(record, list) and len(record) == 3 and isinstance(record[0], str):
                self._prefetched[_key(record[0], record[1])] = record[2]

    async def reconnect(self) -> None:
        await self.connect()

    @property
    def has_oob(self) -> bool:
        return self._oob

    @property
    def connected(self) -> bool:
        return self._connected

    async def cmd(self, command: str, args: dict[str, Any] | None = None, *,
                  oob: bool = False, timeout_s: float | None = None) -> Any:
        key = _key(command, args or {})
        if key in self._prefetched:
            return self._prefetched.pop(key)
        if not _reads_only(command):
            self._prefetched = {}
        deadline = timeout_s if timeout_s is not None else self.timeout_s
        reply = await self._call("qmp", deadline, command=command, args=args or {}, oob=oob,
                                 timeout_ms=int(deadline * 1000))
        return reply.get("return")

    def listener(self, names: Iterable[str] = ()) -> contextlib.AbstractContextManager[Any]:
        raise QmpError("events of a remote destination are not relayed")

    async def close(self) -> None:
        if self._connected:
            with contextlib.suppress(HaguardError):
                await self._call("close", 3.0)
        self._connected = False


def _key(command: str, args: object) -> tuple[str, str]:
    return command, json.dumps(args, sort_keys=True)


def _reads_only(command: str) -> bool:
    return command.startswith("query-") or command == "qom-get"


# ---- destination side ---------------------------------------------------------------------

class _Recorder:
    """A monitor that remembers every reply: what the source's engine will ask first."""

    def __init__(self, qmp: Qmp) -> None:
        self.qmp = qmp
        self.records: list[list[Any]] = []

    @property
    def has_oob(self) -> bool:
        return self.qmp.has_oob

    async def cmd(self, command: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        result = await self.qmp.cmd(command, args, **kw)
        self.records.append([command, args or {}, result])
        return result


async def prefetch(qmp: Qmp) -> list[list[Any]]:
    """The engine's opening questions to a destination (features, identity, state), asked
    here with the engine's own functions so the questions match exactly."""
    recorder = _Recorder(qmp)
    with contextlib.suppress(HaguardError, KeyError, TypeError, ValueError):
        await features.detect(recorder)
        await preflight.vm_identity(recorder)
        await recorder.cmd("query-status")
        await recorder.cmd("query-migrate")
    return recorder.records


@dataclass
class _Session:
    vm: str
    source: str
    generation: int
    paths: InstancePaths
    port: int = 0                  # the incoming listener's port, chosen here at `prepare`
    qmp: Qmp | None = None


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class DestinationServer:
    """Answers migration requests addressed to this host's agent."""

    def __init__(self, *, me: str, address: str, base: Path, vms: Callable[[], dict[str, VmDefinition]],
                 authorise: Authorise, reply: Publish,
                 started: Callable[[str], None] | None = None, tls_dir: Path | None = None) -> None:
        self.me, self.address, self.base = me, address, base
        self.tls_dir = tls_dir                # moves in over TLS, set up here (migration/tls.py)
        self.vms = vms
        self.authorise = authorise
        self.reply = reply
        self.started = started
        self.sessions: dict[str, _Session] = {}
        self.refused = 0                  # relayed commands refused (the status's cluster.relay_refused)
        self._ids = itertools.count(1)

    async def handle(self, sender: str, body: dict[str, Any]) -> None:
        rid = body.get("id")
        if not isinstance(rid, str) or body.get("to") != self.me:
            log.warning("migration-request-refused", sender=sender, reason="no id, or not for this host")
            return
        try:
            answer = await self._answer(sender, body)
        except HaguardError as exc:
            answer = {"ok": False, "error": {"desc": str(exc)}}
        except (TypeError, ValueError, KeyError) as exc:
            answer = {"ok": False, "error": {"desc": f"malformed request: {exc}"}}
        self.reply(sender, {"rpc": "reply", "id": rid, "to": sender, **answer})

    async def _answer(self, sender: str, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op == "prepare":
            return await self._prepare(sender, body)
        session = self.sessions.get(str(body.get("session")))
        if session is None or session.source != sender:
            return {"ok": False, "error": {"desc": "no such migration session"}}
        why = self.authorise(session.vm, sender, session.generation)
        if why is not None:
            return {"ok": False, "error": {"desc": why}}
        if op == "connect":
            if session.qmp is None or not session.qmp.connected:
                session.qmp = Qmp(session.paths.qmp, timeout_s=5.0, name="haguard-migrate-dst")
                await session.qmp.connect()
                if self.tls_dir is not None:
                    # This host's own credentials, set here: never a parameter from the source.
                    await tls.enable(session.qmp, self.tls_dir, "server")
            return {"ok": True, "connected": True, "oob": session.qmp.has_oob,
                    "prefetched": await prefetch(session.qmp)}
        if op == "close":
            await self.close_session(body["session"])
            return {"ok": True, "connected": False}
        if op == "qmp":
            return await self._qmp(session, body)
        return {"ok": False, "error": {"desc": f"unknown operation {str(op)[:40]!r}"}}

    async def _prepare(self, sender: str, body: dict[str, Any]) -> dict[str, Any]:
        vm_name, generation = body["vm"], body["generation"]
        if not isinstance(vm_name, str) or not isinstance(generation, int):
            raise ValueError("vm and generation")
        why = self.authorise(vm_name, sender, generation)
        waited = 0.0
        while why is not None and waited < AUTHORISE_WAIT_S:
            # The source acts on a committed state this host may not have accepted yet.
            await asyncio.sleep(0.05)
            waited += 0.05
            why = self.authorise(vm_name, sender, generation)
        if why is not None:
            return {"ok": False, "error": {"desc": why}}
        vm = self.vms().get(vm_name)
        if vm is None:
            return {"ok": False, "error": {"desc": f"VM {vm_name} is not in this host's inventory"}}
        current = launcher.current_paths(vm_name, self.base)
        if launcher.read_pid(current) is not None:
            return {"ok": False, "error": {"desc": f"a QEMU of {vm_name} already runs on {self.me}"}}
        for sid, old in list(self.sessions.items()):        # an earlier attempt of the same move
            if old.vm == vm_name:
                await self.close_session(sid)
        instance = await asyncio.to_thread(launcher.start, vm, self.base, incoming=True)
        # Our agent watches it from now on (reported as `inmigrate`): a move that dies leaves
        # a stray incoming QEMU that the cluster core has killed.
        launcher.promote(vm_name, self.base, instance.paths)
        sid = f"{vm_name}-{next(self._ids)}"
        port = free_port(self.address)
        self.sessions[sid] = _Session(vm=vm_name, source=sender, generation=generation, paths=instance.paths,
                                      port=port)
        log.info("migration-incoming", vm=vm_name, source=sender, session=sid, pid=instance.pid)
        if self.started is not None:
            self.started(vm_name)
        return {"ok": True, "session": sid, "address": self.address, "port": port}

    async def _qmp(self, session: _Session, body: dict[str, Any]) -> dict[str, Any]:
        command, args = body["command"], body.get("args") or {}
        if not isinstance(command, str) or not isinstance(args, dict):
            raise ValueError("command and args")
        why = self._refusal(session, command, args)
        if why is not None:
            log.warning("migration-command-refused", sender=session.source, vm=session.vm,
                        command=command[:60], reason=why)
            self.refused += 1
            return {"ok": False, "connected": True,
                    "error": {"class": "GenericError", "desc": f"{command[:60]} refused on {self.me}: {why}"}}
        if session.qmp is None:
            return {"ok": False, "connected": False, "error": {"desc": "not connected"}}
        timeout_ms = body.get("timeout_ms", 10_000)
        timeout_s = min(60.0, max(0.1, timeout_ms / 1000 if isinstance(timeout_ms, int) else 10.0))
        try:
            result = await session.qmp.cmd(command, args, oob=bool(body.get("oob")), timeout_s=timeout_s)
        except QmpCommandError as exc:
            return {"ok": False, "connected": session.qmp.connected,
                    "error": {"class": exc.error_class, "desc": exc.desc}}
        except QmpError as exc:
            return {"ok": False, "connected": session.qmp.connected, "error": {"desc": str(exc)}}
        if command == "quit":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while session.qmp.connected:
                        await asyncio.sleep(0.02)
        return {"ok": True, "connected": session.qmp.connected, "return": result}

    def _refusal(self, session: _Session, command: str, args: dict[str, Any]) -> str | None:
        """Why a source may not run this on the destination's QEMU (None: it may).  A URI
        from the network reaches QEMU only as the listener this host chose itself: never
        `exec:` (a shell command), `fd:`, `file:`, `unix:` or another address."""
        if command not in DEST_COMMANDS and not command.startswith("query-"):
            return "not a command of a move's destination"
        if command == "migrate-set-parameters" and not set(args) <= DEST_PARAMETERS:
            return f"only {', '.join(sorted(DEST_PARAMETERS))} may be set here"
        if command not in ("migrate-incoming", "migrate-recover"):
            return None
        if set(args) != {"uri"} or not isinstance(args["uri"], str):
            return "only a uri is accepted"
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme, _, rest = args["uri"].partition(":")
        where, _, port = rest.rpartition(":")
        if scheme != "tcp" or where != host or not port.isdigit():
            return f"listens only on tcp:{host}:PORT, not {args['uri'][:80]!r}"
        first = session.port + (1 if command == "migrate-recover" else 0)
        last = session.port + (RECOVERY_PORTS if command == "migrate-recover" else 0)
        if not first <= int(port) <= last:
            return f"port {port} is not this move's ({first}-{last})"
        return None

    def stale(self) -> list[str]:
        """Sessions whose move the cluster state no longer holds (the source gave up or died)."""
        return [sid for sid, s in self.sessions.items()
                if self.authorise(s.vm, s.source, s.generation) is not None]

    async def close_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None and session.qmp is not None:
            await session.qmp.close()

    async def close(self) -> None:
        for sid in list(self.sessions):
            await self.close_session(sid)
