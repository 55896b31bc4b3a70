"""Where every VM runs, sampled from the QEMUs themselves (not from the agents' word).

`RunWatch` runs in its own thread and event loop: every `interval_s` it asks each live
QEMU under each host's runtime directory for its run state over QMP (the operator
socket, which the agents leave alone).  `where()` is the last sample (VM -> hosts on
which it is running); `twice` keeps every instant at which one VM ran on two hosts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from haguard.vm import launcher
from haguard.vm.cmdline import InstancePaths
from haguard.vm.monitor import LeanQmp


class RunWatch:
    def __init__(self, run_dirs: dict[str, Path], interval_s: float = 0.1) -> None:
        self.run_dirs = run_dirs
        self.interval_s = interval_s
        self.samples = 0
        self.twice: list[tuple[float, str, list[str]]] = []
        self._where: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="run-watch",
                                        daemon=True)

    def where(self) -> dict[str, list[str]]:
        with self._lock:
            return {vm: list(hosts) for vm, hosts in self._where.items()}

    async def _state(self, d: Path) -> str | None:
        # The lean client: a QEMU killed mid-sample (the power-off) is just "not running".
        qmp = LeanQmp(InstancePaths(d).ops, timeout_s=1.0)
        try:
            await qmp.connect()
            return str((await qmp.cmd("query-status"))["status"])
        except Exception:
            return None
        finally:
            qmp.close()

    async def sample(self) -> None:
        live = [(host, d) for host, base in self.run_dirs.items() if base.exists()
                for d in sorted(base.iterdir())
                if d.is_dir() and not d.is_symlink() and launcher.read_pid(InstancePaths(d))]
        # All at once: one sample is one instant, not a walk across the hosts.
        states = await asyncio.gather(*(self._state(d) for _, d in live))
        running: dict[str, list[tuple[str, Path]]] = {}
        for (host, d), state in zip(live, states, strict=True):
            if state == "running":
                running.setdefault(d.name.split("@", 1)[0], []).append((host, d))
        with self._lock:
            self._where = {vm: [h for h, _ in on] for vm, on in running.items()}
            self.samples += 1
        for vm, on in running.items():
            if len(on) > 1 and await self._confirm(on[0][1], on[1][1]):
                self.twice.append((time.time(), vm, [h for h, _ in on]))

    async def _confirm(self, a: Path, b: Path) -> bool:
        """Both running at one instant?  The replies of one sample come at different moments:
        a source asked just before its switchover and its destination just after both say
        "running".  Asked in turn A, B, A (or B, A, B), all three "running" means the first
        ran before and after a moment at which the other ran (a QEMU that stopped for a
        switchover never runs again: a failed move's resumed source would be two copies)."""
        for x, y in ((a, b), (b, a)):
            if (await self._state(x) == "running" and await self._state(y) == "running"
                    and await self._state(x) == "running"):
                return True
        return False

    async def _main(self) -> None:
        while not self._stop.is_set():
            await self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> RunWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
