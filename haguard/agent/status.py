"""The agent's status file and its rendering for `haguard status`.

The agent writes `<run_dir>/../agent-status.json` (with the default run_dir:
/run/haguard/agent-status.json) at every heartbeat, atomically (write a temp file,
then rename), so a reader never sees half a file.  It holds `HostCore.status()` plus
`written_at` (Unix time, seconds) for the age shown to the operator.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from haguard.errors import HaguardError

STATUS_FILE_NAME = "agent-status.json"


def status_path(run_dir: Path) -> Path:
    return run_dir.parent / STATUS_FILE_NAME


def write_status(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            # dumps, not dump: json.dump always takes the pure-Python encoder (10x the CPU).
            f.write(json.dumps(data, separators=(",", ":")))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HaguardError(f"{path}: no status file: is the agent running (haguard run)?") from None
    except OSError as exc:
        raise HaguardError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise HaguardError(f"{path}: not a status file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
        raise HaguardError(f"{path}: not a status file")
    return data


def age_s(data: dict[str, Any], now: float | None = None) -> float | None:
    written = data.get("written_at")
    if not isinstance(written, int | float):
        return None
    return max(0.0, (time.time() if now is None else now) - written)


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.0f} s"


def _load(cap: Any) -> str:
    if not isinstance(cap, dict) or not cap.get("memory_mib"):
        return "-"
    used_mem = cap["memory_mib"] - cap.get("memory_mib_free", 0)
    used_cpu = cap.get("vcpus", 0) - cap.get("vcpus_free", 0)
    return f"{used_mem}/{cap['memory_mib']} MiB, {used_cpu}/{cap.get('vcpus', 0)} vCPUs"


_STATE_STYLE = {"alive": "green", "suspect": "yellow", "unreachable": "yellow", "agent-down": "red",
                "dead": "bold red", "isolated": "bold red", "running": "green"}


def render(data: dict[str, Any], console: Console) -> None:
    age = age_s(data)
    stale = age is not None and age > 10
    when = "age unknown" if age is None else f"{age:.1f} s old"
    console.print(f"haguard on [bold]{data.get('host', '?')}[/]: broker "
                  f"{'up' if data.get('broker') else 'down'}; status {when}"
                  + (" [bold red](stale: is the agent running?)[/]" if stale else ""))
    hosts = Table(title="Hosts", title_justify="left")
    for col in ("host", "state", "last heard", "RTT", "loss", "load", "reason"):
        hosts.add_column(col)
    for h in data.get("hosts", []):
        state = str(h.get("state", "?"))
        loss = h.get("loss")
        hosts.add_row(str(h.get("name")) + (" (this)" if h.get("self") else ""),
                      f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
                      _ms(h.get("last_heard_ms_ago")) + (" ago" if h.get("last_heard_ms_ago") else ""),
                      "-" if h.get("rtt_ms") is None else f"{h['rtt_ms']:.2f} ms",
                      "-" if loss is None else f"{loss:.0%}",
                      _load(h.get("capacity")), str(h.get("reason", "")))
    console.print(hosts)
    vms = Table(title="VMs", title_justify="left")
    for col in ("VM", "state", "host"):
        vms.add_column(col)
    for v in data.get("vms", []):
        state = str(v.get("state", "?"))
        vms.add_row(str(v.get("name")), f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
                    str(v.get("host")))
    console.print(vms if data.get("vms") else "No VMs known.")
    cluster = data.get("cluster")
    if isinstance(cluster, dict):
        render_cluster(cluster, console)


def render_cluster(cluster: dict[str, Any], console: Console) -> None:
    """The committed cluster state: coordinator, owners, maintenance, moves and fences."""
    coordinator = cluster.get("coordinator") or "none"
    quorum = "quorate" if cluster.get("quorate") else "[bold red]no quorum[/]"
    console.print(f"Cluster: term {cluster.get('term')}, coordinator [bold]{coordinator}[/], this agent "
                  f"{cluster.get('role')}, {quorum}, watchdog {cluster.get('watchdog')}")
    if cluster.get("maintenance"):
        console.print("[bold yellow]Cluster maintenance on[/]: nothing is started, stopped, moved or fenced "
                      "(haguard maintenance off)")
    hosts = cluster.get("hosts") or {}
    flags = [f"{h} ({', '.join(k for k in ('maintenance', 'fenced') if v.get(k))})"
             for h, v in sorted(hosts.items())
             if isinstance(v, dict) and (v.get("maintenance") or v.get("fenced"))]
    if flags:
        console.print("Hosts out of service: " + "; ".join(flags))
    owners = Table(title="Placement (committed)", title_justify="left")
    for col in ("VM", "owner", "generation", "desired"):
        owners.add_column(col)
    for vm, rec in sorted((cluster.get("vms") or {}).items()):
        if isinstance(rec, dict):
            owners.add_row(vm, str(rec.get("owner") or "[bold red]none[/]"), str(rec.get("generation")),
                           str(rec.get("desired")))
    console.print(owners)
    moves = cluster.get("migrations") or []
    if moves:
        table = Table(title="Moves in flight", title_justify="left")
        for col in ("VM", "from", "to", "progress"):
            table.add_column(col)
        for m in moves:
            pct = m.get("percent")
            table.add_row(str(m.get("vm")), str(m.get("source")), str(m.get("target")),
                          "-" if pct is None else f"{pct:.0f}% {m.get('step', '')}")
        console.print(table)
    if cluster.get("fencing"):
        console.print("Fencing: " + ", ".join(cluster["fencing"]))
