"""A 3-host cluster in HA mode: real agents in namespaces, real QEMU guests, a fence
stand-in, and a thread that samples every host's QEMUs and records any instant at which
one VM runs twice."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from haguard.lab.softdog import Faults, SoftdogFarm
from haguard.vm.definition import VmDefinition
from tests.helpers.cluster import Cluster
from tests.helpers.vms import RunningOnceMonitor, guest_vm

# Test timing: dead after 1.5 s without news; hosts take ~3 s to agree on a coordinator.
HA_TIMING = {"heartbeat_interval_ms": 200, "suspect_timeout_ms": 800, "dead_timeout_ms": 1500,
             "ping_interval_ms": 200, "ping_timeout_ms": 150, "isolation_timeout_ms": 5000}


def ha_vms(n: int, **extra: Any) -> tuple[VmDefinition, ...]:
    return tuple(guest_vm(f"vm{i + 1}", memory_mib=64, mib=8, rate=0, **extra) for i in range(n))


class TwiceWatch:
    """`RunningOnceMonitor` on every host's run dir, in its own thread and event loop."""

    def __init__(self, run_dirs: list[Path], interval_s: float = 0.1) -> None:
        self.monitor = RunningOnceMonitor(run_dirs, interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="twice-watch",
                                        daemon=True)

    async def _main(self) -> None:
        async with self.monitor:
            while not self._stop.is_set():
                await asyncio.sleep(0.05)

    def __enter__(self) -> TwiceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> None:
        self.monitor.assert_never_twice()


@contextlib.contextmanager
def ha_cluster(vms: tuple[VmDefinition, ...], *, fence: bool = True, ha: str = "",
               timing: dict[str, int] | None = None, host_extra: str = "", extra: str = "",
               prepare: Callable[[Cluster], None] | None = None,
               hosts: tuple[str, ...] = ("h1", "h2", "h3"),
               shipped_timing: bool = False, brokers_on: tuple[str, ...] = (),
               host_keys: bool = False, fence_levels: tuple[str, ...] = ("fence",)) -> Iterator[Cluster]:
    """Agents (three by default) with `ha.enabled`; every host gets the fence stand-in when
    `fence`, and `host_extra` (more fields of its `hosts:` entry, e.g. "memory_mib: 200").
    `shipped_timing`: the defaults an operator gets (no `timing:` section).  `fence_levels`:
    the stand-ins' state directories under the cluster's, tried in this order (several: a
    list of devices, fencing levels; `fence_calls` reads the one named "fence")."""
    cluster_dir_hint: dict[str, str] = {}
    c = Cluster(hosts=hosts, timing=dict(HA_TIMING, **(timing or {})), vms=vms,
                extra=extra + "ha:\n  enabled: true\n" + ha, host_fields=cluster_dir_hint,
                default_timing=shipped_timing, brokers_on=brokers_on, host_keys=host_keys)
    for h in c.hosts:
        fields = [host_extra] if host_extra else []
        if fence:
            devices = []
            for name in fence_levels:
                state = c.dir / name
                state.mkdir(exist_ok=True)
                devices.append(f"{{kind: command, agent: '{sys.executable} -m haguard.lab.fence', "
                               f"timeout_s: 10, options: {{plug: {h}, state_dir: '{state}', "
                               f"run_dir: '{c.run_dir(h)}'}}}}")
            fields.append(f"fence: {devices[0] if len(devices) == 1 else '[' + ', '.join(devices) + ']'}")
        if fields:
            cluster_dir_hint[h] = ", ".join(fields)
    try:
        if prepare is not None:
            prepare(c)
        c.start()
        yield c
    finally:
        c.close()


class WatchdogHardware:
    """The hosts' watchdog devices: softdog stand-ins (haguard/lab/softdog.py) that answer the
    real ioctls, one per host.  A device not petted for its timeout "resets" its host: its
    QEMUs and its agent SIGKILLed, as a hardware reset does.  Enter it before the cluster (the
    agents must see the mount when they start), put `ha(timeout_s)` in its `ha:` section and
    `attach()` the cluster."""

    def __init__(self, hosts: tuple[str, ...] = ("h1", "h2", "h3"),
                 faults: dict[str, Faults] | None = None) -> None:
        self.hosts = hosts
        self.faults = faults or {}
        self.c: Cluster | None = None
        self.reset_at: dict[str, float] = {}       # host -> wall-clock time of its reset
        self._root = Path(tempfile.mkdtemp(prefix="hgt-dogs-"))
        self.farm = SoftdogFarm(self._root / "dev", hosts, on_expire=self._expired, faults=self.faults)

    def ha(self, timeout_s: int) -> str:
        return f"  watchdog: {{device: '{self.farm.mountpoint}/{{host}}', timeout_s: {timeout_s}}}\n"

    def attach(self, c: Cluster) -> None:
        self.c = c

    def _expired(self, host: str) -> None:
        self.reset_at[host] = time.time()
        if self.c is not None:
            self.c.kill_vms(host)
            if host in self.c.procs:
                self.c.kill9(host)

    @property
    def last_pet(self) -> dict[str, float]:
        """host -> wall-clock time of its last pet (the devices keep monotonic times)."""
        offset = time.time() - time.monotonic()
        return {h: st.last_ping + offset for h, st in self.farm.statuses().items()
                if st.last_ping is not None}

    def __enter__(self) -> WatchdogHardware:
        self.farm.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.farm.close(raise_callback_errors=exc[0] is None)
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


def running_on(c: Cluster) -> dict[str, list[str]]:
    """vm -> hosts whose agent reports its QEMU running (from the status files of the agents
    still running: a killed agent's file is stale, and so is one a fence powered off)."""
    out: dict[str, list[str]] = {}
    for h in c.hosts:
        if h not in c.procs or c.procs[h].poll() is not None:
            continue
        for v in (c.status(h) or {}).get("vms", []):
            if v.get("host") == h and v.get("state") == "running":
                out.setdefault(str(v["name"]), []).append(h)
    return out


def qemu_pids(c: Cluster, host: str) -> dict[str, int]:
    """vm -> pid of the QEMU the host's run dir points at."""
    from haguard.vm import launcher
    out, base = {}, c.run_dir(host)
    for link in base.iterdir() if base.exists() else ():
        if link.is_symlink() and (pid := launcher.read_pid(launcher.current_paths(link.name, base))):
            out[link.name] = pid
    return out


def all_qemu_pids(c: Cluster) -> dict[str, tuple[str, int]]:
    """vm -> (host, pid) over every host (a VM restarted or moved gets another pid)."""
    return {vm: (h, pid) for h in c.hosts for vm, pid in qemu_pids(c, h).items()}


def stop_agent(c: Cluster, host: str, timeout_s: float = 30) -> int:
    """SIGTERM, as `systemctl stop` does; waits for the agent to exit, returns its code."""
    proc = c.procs.pop(host)
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


def wait_placed(c: Cluster, names: list[str], timeout_s: float = 60, *, avoid: tuple[str, ...] = ()) -> float:
    """Until each VM runs once, on none of `avoid`.  Before any fault, also checks that the
    start cost nothing: no host stopped petting its watchdog (every real cluster start of
    the suite is one more sample of this)."""
    def placed() -> bool:
        where = running_on(c)
        return all(len(where.get(n, [])) == 1 and where[n][0] not in avoid for n in names)
    took = c.wait_for(f"{names} running once each, not on {avoid}", placed, timeout_s)
    if not c.faults:
        stopped = {h: c.events(h, "watchdog-stop-petting") for h in c.hosts}
        assert not any(stopped.values()), f"a cluster start stopped petting: {stopped}"
    return took


def fence_calls(c: Cluster) -> list[str]:
    path = c.dir / "fence" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def now() -> float:
    return time.monotonic()


def coordinator_of(c: Cluster) -> str:
    views = {c.cluster_view(h).get("coordinator") for h in c.procs}
    views.discard(None)
    assert len(views) == 1, views
    return str(views.pop())


def rejoined(c: Cluster, host: str, armed: bool) -> bool:
    view = c.cluster_view(host)
    return (view.get("coordinator") is not None and view.get("quorum_lost_ms") == 0
            and (not armed or view.get("watchdog") == "petting"))


def no_harm(c: Cluster, hw: WatchdogHardware, before: dict[str, tuple[str, int]], *,
            quorum_kept: bool = True, steps: list[tuple[float, str]] | None = None) -> None:
    stops = [(e["timestamp"], h, e.get("reason"))
             for h in c.hosts for e in c.events(h, "watchdog-stop-petting")]
    assert not stops, (sorted(stops), steps)
    if quorum_kept:
        lost = [(e["timestamp"], h)
                for h in c.hosts for e in c.events(h, "alert") if e.get("alert") == "quorum-lost"]
        assert not lost, (sorted(lost), steps)
    assert not hw.reset_at, hw.reset_at
    assert not fence_calls(c)
    assert all_qemu_pids(c) == before, "a VM was restarted, moved or stopped"
