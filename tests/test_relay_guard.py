"""The destination side of a move between hosts refuses what a peer should never get: the
real `DestinationServer` with a real incoming QEMU, driven as a source's requests arrive
(the MQTT inbox in between only carries them).  A member with a committed move into this
host gets a session; through it, it must not run a command on the host, open a listener
anywhere else, or export the host's files."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest

from haguard.adapters.qmp import Qmp
from haguard.agent.migrate_rpc import DestinationServer
from haguard.migration import tls as migration_tls
from haguard.vm import launcher
from tests.helpers.tlscerts import host_credentials, make_ca
from tests.helpers.vms import guest_vm

ADDRESS = "127.0.0.1"


class Peer:
    """A source host's requests to the server, and the server's replies to it."""

    def __init__(self, server: DestinationServer) -> None:
        self.server = server
        self.replies: dict[str, dict[str, Any]] = {}
        self.ids = 0
        server.reply = self._replied

    def _replied(self, _to: str, body: dict[str, Any]) -> bool:
        self.replies[body["id"]] = body
        return True

    async def ask(self, **body: Any) -> dict[str, Any]:
        self.ids += 1
        rid = f"h2-{self.ids}"
        await self.server.handle("h2", {"rpc": "request", "id": rid, "to": "h1", **body})
        return self.replies.pop(rid)


def _listening(port: int) -> bool:
    """A TCP listener on `port` (read from /proc: connecting would be taken as the stream)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


async def _drill(base: Path, marker: Path) -> None:
    vm = guest_vm("vm1", memory_mib=64, mib=4)
    server = DestinationServer(me="h1", address=ADDRESS, base=base, vms=lambda: {"vm1": vm},
                               authorise=lambda _vm, sender, _gen: None if sender == "h2" else "no move",
                               reply=lambda _to, _body: True)
    peer = Peer(server)
    try:
        prepared = await peer.ask(op="prepare", vm="vm1", generation=1)
        assert prepared["ok"] is True, prepared
        sid, port = prepared["session"], prepared["port"]
        assert (await peer.ask(op="connect", session=sid))["ok"] is True

        async def qmp(command: str, args: dict[str, Any]) -> dict[str, Any]:
            return await peer.ask(op="qmp", session=sid, command=command, args=args)

        shell = f"exec:touch {marker}"
        for command, args in [
            ("migrate-incoming", {"uri": shell}),                       # a shell command, as root
            ("migrate-recover", {"uri": shell}),
            ("migrate-incoming", {"uri": f"file:{marker}"}),
            ("migrate-incoming", {"uri": "fd:3"}),
            ("migrate-incoming", {"uri": f"unix:{base}/sock"}),
            ("migrate-incoming", {"uri": f"tcp:198.51.100.7:{port}"}),   # a listener elsewhere
            ("migrate-incoming", {"uri": f"tcp:{ADDRESS}:{port + 1}"}),  # not the chosen port
            ("migrate-incoming", {"uri": f"tcp:{ADDRESS}:{port}", "exit-on-error": False}),
            ("blockdev-add", {"node-name": "shadow", "driver": "raw",     # the host's files
                              "file": {"driver": "file", "filename": "/etc/shadow"}}),
            ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": ADDRESS, "port": "10899"}}}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "disk0", "writable": True}),
            ("human-monitor-command", {"command-line": "info version"}),
            ("migrate-set-parameters", {"tls-creds": "other", "multifd-channels": 2}),
        ]:
            reply = await qmp(command, args)
            assert reply["ok"] is False and "refused on h1" in reply["error"]["desc"], (command, args, reply)
        await asyncio.sleep(0.5)
        assert not marker.exists(), "QEMU ran a peer's shell command"
        answer = await qmp("query-named-block-nodes", {})
        assert answer["ok"] is True, answer
        nodes = answer["return"]
        assert "shadow" not in {n.get("node-name") for n in nodes}
        assert not _listening(10899), "an NBD server was started"
        assert server.refused == 13
        assert (await qmp("migrate-set-parameters", {"multifd-channels": 2}))["ok"] is True
        # The move itself still works: the listener this host chose, then a recovery port.
        assert (await qmp("migrate-incoming", {"uri": f"tcp:{ADDRESS}:{port}"}))["ok"] is True
        assert _listening(port)
        status = await qmp("query-migrate", {})
        assert status["ok"] is True and status["return"].get("status") in (None, "setup"), status
    finally:
        await server.close()
        launcher.kill(launcher.current_paths("vm1", base))


@pytest.mark.timeout(60)
def test_a_peer_cannot_run_commands_open_listeners_or_export_files_through_a_move(tmp_path: Path) -> None:
    asyncio.run(_drill(tmp_path / "run", tmp_path / "pwned"))


async def _stranger_first(base: Path, creds: Path, source_base: Path) -> None:
    vm = guest_vm("vm1", memory_mib=64, mib=4)
    server = DestinationServer(me="h1", address=ADDRESS, base=base, vms=lambda: {"vm1": vm},
                               authorise=lambda _vm, sender, _gen: None if sender == "h2" else "no move",
                               reply=lambda _to, _body: True, tls_dir=creds)
    peer = Peer(server)
    try:
        prepared = await peer.ask(op="prepare", vm="vm1", generation=1)
        sid, port = prepared["session"], prepared["port"]
        assert (await peer.ask(op="connect", session=sid))["ok"] is True

        async def qmp(command: str, args: dict[str, Any]) -> dict[str, Any]:
            return await peer.ask(op="qmp", session=sid, command=command, args=args)

        params = await qmp("query-migrate-parameters", {})
        assert params["return"].get("tls-creds") == "haguard-migration-tls", params
        assert (await qmp("migrate-incoming", {"uri": f"tcp:{ADDRESS}:{port}"}))["ok"] is True
        # A stranger on the migration network reaches the port first and speaks clear text
        # (a migration stream's magic), as a source without the cluster's certificate would.
        reader, writer = await asyncio.open_connection(ADDRESS, port)
        writer.write(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)
        await writer.drain()
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(3):
                while chunk := await reader.read(4096):
                    got += chunk
        writer.close()
        # It learns nothing (at most a TLS alert), and the destination still waits for the real
        # source: QEMU drops a connection whose handshake fails, it never takes it as a guest.
        assert len(got) < 64 and b"QEVM" not in got, got
        source = await asyncio.to_thread(launcher.start, vm, source_base)
        src = Qmp(source.paths.qmp, timeout_s=5.0)
        await src.connect()
        try:
            await migration_tls.enable(src, creds, "client", ADDRESS)
            await src.cmd("migrate", {"uri": f"tcp:{ADDRESS}:{port}"})
            state = ""
            async with asyncio.timeout(30):
                while state not in ("completed", "failed"):
                    await asyncio.sleep(0.1)
                    state = (await src.cmd("query-migrate")).get("status", "")
            assert state == "completed", await src.cmd("query-migrate")
            assert (await qmp("query-status", {}))["return"]["status"] == "running"
        finally:
            await src.close()
            launcher.kill(source.paths)
    finally:
        await server.close()
        launcher.kill(launcher.current_paths("vm1", base))


@pytest.mark.timeout(60)
def test_with_tls_a_stranger_on_the_migration_port_learns_nothing_and_the_real_source_moves_in(
        tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    creds = host_credentials(tmp_path / "tls", "h1", ADDRESS, ca)
    with tempfile.TemporaryDirectory(prefix="hgs-") as short:     # unix socket paths stay short
        asyncio.run(_stranger_first(tmp_path / "run", creds, Path(short)))
