"""`haguard status --check`: the agent's status as one line and a monitoring exit code.

The codes are those of Nagios plugins and `crm_mon -s`, so any monitoring system that
runs checks can use it as it is:

    0 OK        the agent is current, and so is the cluster it sees
    1 WARNING   something to look at: a peer not alive, a broker down, another cluster
                definition heard, a setting changed in the file that waits for a restart
    2 CRITICAL  VMs or hosts at risk: quorum lost, the watchdog no longer petted, no
                coordinator, VMs that should run and run nowhere
    3 UNKNOWN   no status, or a status too old to tell (the agent is down or stuck)

Pure: the status data and the time in, (code, line) out.
"""

from __future__ import annotations

from typing import Any

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
STALE_S = 10.0          # the agent writes its status at least once a second


def check(data: dict[str, Any] | None, now: float, *, stale_s: float = STALE_S) -> tuple[int, str]:
    if data is None:
        return _line(UNKNOWN, ["no status file: is the agent running?"])
    written = data.get("written_at")
    if not isinstance(written, int | float):
        return _line(UNKNOWN, ["the status has no time"])
    if now - written > stale_s:
        return _line(UNKNOWN, [f"the status is {now - written:.0f} s old: is the agent running?"])
    critical: list[str] = []
    warning: list[str] = []
    cluster = data.get("cluster")
    if isinstance(cluster, dict):
        _cluster(cluster, critical, warning)
    else:                                   # peers watched, no cluster: the detector's view
        hosts = [h for h in data.get("hosts") or () if isinstance(h, dict)]
        if any(h.get("self") and h.get("state") == "isolated" for h in hosts):
            critical.append("this host is isolated")
        peers = {h.get("name"): h.get("state") for h in hosts
                 if not h.get("self") and h.get("state") != "alive"}
        if peers:
            warning.append("peers " + ", ".join(f"{h} {s}" for h, s in sorted(peers.items())))
    down = sorted(url for url, up in (data.get("brokers") or {}).items() if not up)
    if down:
        warning.append(f"broker{'s' * (len(down) > 1)} down: {', '.join(down)}")
    if data.get("config_needs_restart"):
        warning.append(f"waiting for a restart: {', '.join(data['config_needs_restart'])}")
    if critical:
        return _line(CRITICAL, critical + warning)
    if warning:
        return _line(WARNING, warning)
    return _line(OK, [_summary(data)])


def _cluster(c: dict[str, Any], critical: list[str], warning: list[str]) -> None:
    lost_ms = int(c.get("quorum_lost_ms") or 0)
    if lost_ms:
        critical.append(f"quorum lost for {lost_ms / 1000:.1f} s")
    if c.get("watchdog") == "stopped":
        critical.append("the watchdog is no longer petted: this host resets")
    if not c.get("coordinator"):
        critical.append("no coordinator")
    unplaced = sorted(vm for vm, r in (c.get("vms") or {}).items()
                      if r.get("desired") == "running" and not r.get("owner"))
    if unplaced:
        critical.append(f"{len(unplaced)} VM{'s' * (len(unplaced) > 1)} should run and run nowhere: "
                        f"{', '.join(unplaced[:5])}{' ...' * (len(unplaced) > 5)}")
    peers = {h: s for h, s in (c.get("peers") or {}).items() if s != "alive"}
    if peers:
        warning.append("peers " + ", ".join(f"{h} {s}" for h, s in sorted(peers.items())))
    if c.get("maintenance"):
        warning.append("cluster maintenance on: nothing is recovered (haguard maintenance off)")
    if c.get("definition_differs"):
        warning.append(f"another cluster definition heard from {', '.join(c['definition_differs'])}")


def _summary(data: dict[str, Any]) -> str:
    c = data.get("cluster")
    if not isinstance(c, dict):
        return "agent running"
    vms = c.get("vms") or {}
    placed = sum(1 for r in vms.values() if r.get("owner"))
    hosts = 1 + len(c.get("peers") or {})
    return (f"term {c.get('term')}, coordinator {c.get('coordinator')}, {hosts} hosts alive, "
            f"{placed} VMs placed, {len(c.get('migrations') or ())} moves in flight")


def _line(code: int, parts: list[str]) -> tuple[int, str]:
    return code, f"HAGUARD {NAMES[code]} - {'; '.join(parts)}"
