"""Copy local (non-shared) disks during a migration: mirror to an NBD export.

libvirt's order: the destination exports its empty copies over NBD, the source
mirrors each disk into them; once every mirror is READY the RAM migration runs
with `pause-before-switchover`; at `pre-switchover` the ready mirrors are
cancelled (leaving a consistent copy) and the migration continues.  The old
`migrate blk/inc` flags (gone in QEMU 9.1) are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.errors import HaguardError, MigrationError
from haguard.migration.uri import MigrationUri


def _nbd_addr(uri: MigrationUri) -> dict[str, object]:
    if uri.scheme == "unix":
        return {"type": "unix", "data": {"path": uri.path}}
    return {"type": "inet", "data": {"host": uri.host, "port": str(uri.port)}}


def _nbd_server(uri: MigrationUri) -> dict[str, object]:
    if uri.scheme == "unix":
        return {"type": "unix", "path": uri.path}
    return {"type": "inet", "host": uri.host, "port": str(uri.port)}


class DiskMirror:
    def __init__(self, source: Qmp, dest: Qmp, nodes: tuple[str, ...], nbd: MigrationUri) -> None:
        self.source, self.dest, self.nodes, self.nbd = source, dest, nodes, nbd
        self._exported: list[str] = []
        self._targets: list[str] = []
        self._jobs: list[str] = []
        self._server = False

    async def start(self) -> None:
        await self.dest.cmd("nbd-server-start", {"addr": _nbd_addr(self.nbd)})
        self._server = True
        for node in self.nodes:
            await self.dest.cmd("block-export-add", {
                "type": "nbd", "id": f"export-{node}", "node-name": node, "name": node,
                "writable": True})
            self._exported.append(node)
        for node in self.nodes:
            target = f"mirror-target-{node}"
            await self.source.cmd("blockdev-add", {
                "driver": "nbd", "node-name": target, "server": _nbd_server(self.nbd),
                "export": node})
            self._targets.append(target)
            job = f"mirror-{node}"
            await self.source.cmd("blockdev-mirror", {
                "job-id": job, "device": node, "target": target, "sync": "full",
                "auto-dismiss": True})
            self._jobs.append(job)

    async def _jobs_state(self) -> dict[str, dict[str, Any]]:
        """query-block-jobs by job: QEMU's JSON objects as they came."""
        jobs = await self.source.cmd("query-block-jobs")
        return {j["device"]: j for j in jobs}

    async def wait_ready(self, deadline_s: float,
                         on_progress: Callable[[int, int], None] | None = None) -> None:
        async with asyncio.timeout(deadline_s):
            while True:
                state = await self._jobs_state()
                missing = [j for j in self._jobs if j not in state]
                if missing:
                    raise MigrationError(f"disk mirror {', '.join(missing)} stopped before it was "
                                         "ready (destination disk or NBD link failed)")
                done = sum(int(state[j]["offset"]) for j in self._jobs)
                total = sum(int(state[j]["len"]) for j in self._jobs)
                if on_progress:
                    on_progress(done, total)
                if all(state[j].get("ready") for j in self._jobs):
                    return
                await asyncio.sleep(0.1)

    async def complete_at_switchover(self) -> None:
        """Cancel the ready mirrors: each leaves a consistent copy on the destination."""
        for job in self._jobs:
            await self.source.cmd("block-job-cancel", {"device": job})
        async with asyncio.timeout(30):
            while await self._jobs_state_any():
                await asyncio.sleep(0.05)
        self._jobs.clear()

    async def _jobs_state_any(self) -> bool:
        state = await self._jobs_state()
        return any(j in state for j in self._jobs)

    async def release_destination(self) -> None:
        """After a completed migration: the destination's exports go away."""
        for node in self._exported:
            with contextlib.suppress(HaguardError):
                await self.dest.cmd("block-export-del", {"id": f"export-{node}"})
        self._exported.clear()
        if self._server:
            with contextlib.suppress(HaguardError):
                await self.dest.cmd("nbd-server-stop")
            self._server = False

    async def abort(self) -> None:
        """After a failed migration: stop the mirrors and drop their targets."""
        for job in self._jobs:
            with contextlib.suppress(HaguardError):
                await self.source.cmd("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(HaguardError, TimeoutError):
            async with asyncio.timeout(10):
                while await self._jobs_state_any():
                    await asyncio.sleep(0.05)
        for target in self._targets:
            with contextlib.suppress(HaguardError):
                await self.source.cmd("blockdev-del", {"node-name": target})
        self._jobs.clear()
        self._targets.clear()
        await self.release_destination()
