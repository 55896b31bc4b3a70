"""`haguard drain` and `haguard migrate VM --to HOST` after the request: follow the
committed cluster state until the host holds no VM (for undrain: until its maintenance
flag is gone; for a move: until the VM's owner is the target), one progress bar per
move, read from the agent's status file."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from haguard.agent.status import read_status, status_path
from haguard.config.cluster import ClusterConfig
from haguard.errors import HaguardError

POLL_S = 0.3


def _cluster(cfg: ClusterConfig) -> dict[str, Any] | None:
    try:
        cluster = read_status(status_path(cfg.run_dir)).get("cluster")
    except HaguardError:
        return None
    return cluster if isinstance(cluster, dict) else None


def drained(cluster: dict[str, Any], host: str) -> bool:
    hosts, vms = cluster.get("hosts") or {}, cluster.get("vms") or {}
    if not (hosts.get(host) or {}).get("maintenance"):
        return False
    owned = [vm for vm, rec in vms.items() if isinstance(rec, dict) and rec.get("owner") == host]
    moving = [m for m in cluster.get("migrations") or [] if m.get("source") == host]
    return not owned and not moving


def _bars(console: Console) -> Progress:
    """One bar per move, drawn only on a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, disable=not console.is_terminal)


def follow(cfg: ClusterConfig, host: str, *, drain: bool, timeout_s: float) -> bool:
    console = Console(stderr=not sys.stdout.isatty())
    deadline = time.monotonic() + timeout_s
    bars: dict[str, TaskID] = {}
    with _bars(console) as progress:
        while time.monotonic() < deadline:
            cluster = _cluster(cfg)
            if cluster is not None:
                flag = bool(((cluster.get("hosts") or {}).get(host) or {}).get("maintenance"))
                if not drain and not flag:
                    console.print(f"{host}: out of maintenance")
                    return True
                for m in cluster.get("migrations") or []:
                    if m.get("source") != host:
                        continue
                    vm = str(m.get("vm"))
                    if vm not in bars:
                        bars[vm] = progress.add_task(f"{vm} {host} -> {m.get('target')}", total=100)
                        if not console.is_terminal:
                            console.print(f"moving {vm} to {m.get('target')}")
                    progress.update(bars[vm], completed=float(m.get("percent") or 0))
                for vm, task in bars.items():
                    if not any(m.get("vm") == vm for m in cluster.get("migrations") or []):
                        progress.update(task, completed=100)
                if drain and drained(cluster, host):
                    owners = {vm: rec.get("owner") for vm, rec in (cluster.get("vms") or {}).items()
                              if vm in bars}
                    for vm, owner in sorted(owners.items()):
                        console.print(f"{vm}: now on {owner}")
                    console.print(f"{host}: drained (in maintenance, no VM left)")
                    return True
            time.sleep(POLL_S)
    console.print(f"haguard: {host}: not {'drained' if drain else 'undrained'} after {timeout_s:.0f} s; "
                  "the cluster goes on (haguard status shows it)")
    return False


def follow_move(cfg: ClusterConfig, vm: str, target: str, *, timeout_s: float) -> bool:
    console = Console(stderr=not sys.stdout.isatty())
    deadline = time.monotonic() + timeout_s
    seen_move = False
    with _bars(console) as progress:
        bar = progress.add_task(f"{vm} -> {target}", total=100)
        while time.monotonic() < deadline:
            cluster = _cluster(cfg)
            if cluster is not None:
                owner = ((cluster.get("vms") or {}).get(vm) or {}).get("owner")
                if owner == target:
                    progress.update(bar, completed=100)
                    console.print(f"{vm}: now on {target}")
                    return True
                move = next((m for m in cluster.get("migrations") or [] if m.get("vm") == vm), None)
                if move is not None:
                    seen_move = True
                    progress.update(bar, completed=float(move.get("percent") or 0))
            time.sleep(POLL_S)
    why = "the move did not finish" if seen_move else \
        "the coordinator did not start it (see `journalctl -u haguard HAGUARD_EVENT=placement`)"
    console.print(f"haguard: {vm} not on {target} after {timeout_s:.0f} s: {why}")
    return False
