"""Failure detection: latency of a hard failure, false deaths under loss, agent cost.

Three real agents (`haguard run`) in network namespaces with one mosquitto in a
fourth (tests/helpers/cluster.py), at the shipped default timing (heartbeat 300 ms,
suspect 900 ms, dead 1500 ms, pings every 250 ms, MQTT keepalive 5 s):

  latency      a host's link is cut (its veth set down); measured from the cut to
               the first other agent logging it `dead` (the log line's timestamp);
               the link is mended and all three agents alive again before the next
  loss         30 % of one host's packets dropped at random, both ways (iptables
               statistic match in its namespace); every agent's status file sampled
               every 50 ms and every `peer-state` log line read: any `dead` is a false death
  cost         one agent on loopback watching N local QEMU VMs (kernel-less qboot
               guests of 16 MiB whose vCPU halts: QMP-wise a running VM, but no CPU
               taken from the agent); CPU = utime + stime from /proc/PID/stat over the
               interval, as % of one core; RSS from /proc/PID/status.  With
               --baseline REV the agent of that git revision (git archive, run with
               PYTHONPATH) and the current one take turns on the same VMs, --rounds
               times each, alternating which goes first: medians of the turns

Anchors, not measured here: corosync 3.1 with its defaults drops a cut node after
7.9 s (median) on this kind of machine; Proxmox VE's HA stack acts after about a minute.

  busy         (--busy, alone) five agents while guests spin 3 vCPUs per core: heartbeat
               gaps at the broker, suspicions and resets, at normal and real-time
               scheduling side by side (bench/busy.py)

Usage: .venv/bin/python bench/detection.py [--quick] [--cuts N] [--loss-s S] [--vms N]
           [--cost-only] [--baseline REV [--rounds N]] [--busy [--busy-s S]]
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from bench.busy import busy_phase, print_busy
from bench.common import base_parser, emit_result, log, scratch_dir
from haguard.vm import launcher
from haguard.vm.definition import VmDefinition
from tests.helpers.cluster import REPO, Cluster, DeathWatch, LocalAgent
from tests.helpers.mosquitto import Mosquitto

LOSS = 0.3
TARGET_P99_S = 2.0
TARGET_CPU_PCT = 2.0
TARGET_RSS_MIB = 80.0
COROSYNC_MEDIAN_S = 7.9
PROXMOX_S = 60.0
MIN_FREE_MIB = 1024       # stop starting VMs when the machine has less than this left


# ---- small helpers ------------------------------------------------------------------------

def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(rec["timestamp"])).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: with 20 samples, p99 is the largest."""
    if not values:
        return None
    ranked = sorted(values)
    k = max(0, min(len(ranked) - 1, int(-(-q * len(ranked) // 100)) - 1))
    return ranked[k]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


# ---- cluster phases ----------------------------------------------------------------------

def _first_dead(c: Cluster, target: str, seen: dict[str, int]) -> float | None:
    """The earliest `dead` for `target` logged by another agent after its `seen` lines."""
    times = [_ts(e) for o in seen for e in c.events(o, "peer-state")[seen[o]:]
             if e.get("host") == target and e.get("new") == "dead"]
    return min(times) if times else None


def measure_cuts(c: Cluster, n: int) -> tuple[list[float], int]:
    """n hard failures, rotating the host cut; (latencies in s, cuts never detected)."""
    latencies: list[float] = []
    missed = 0
    for i in range(n):
        target = c.hosts[i % len(c.hosts)]
        c.wait_for("all alive", c.all_alive, 30)
        time.sleep(0.5)
        seen = {o: len(c.events(o, "peer-state")) for o in c.hosts if o != target}
        t0 = time.time()
        c.cut(target)
        try:
            try:
                c.wait_for(f"{target} dead", lambda t=target, s=seen: _first_dead(c, t, s) is not None, 15)
            except AssertionError:
                missed += 1
                log(f"cut {i + 1}/{n}: {target} never declared dead within 15 s")
                continue
            at = _first_dead(c, target, seen)
            assert at is not None
            latencies.append(at - t0)
            log(f"cut {i + 1}/{n}: {target} dead after {at - t0:.2f} s")
        finally:
            c.mend(target)
    c.wait_for("all alive", c.all_alive, 30)
    return latencies, missed


def measure_loss(c: Cluster, seconds: float) -> dict[str, Any]:
    target = c.hosts[-1]
    c.wait_for("all alive", c.all_alive, 30)
    seen = {o: len(c.events(o, "peer-state")) for o in c.hosts}
    cpu0 = {h: cpu_seconds(p) for h in c.hosts if (p := c.agent_pid(h))}
    c.lossy(target, LOSS)
    t0 = time.monotonic()
    try:
        with DeathWatch(c) as watch:
            while (left := seconds - (time.monotonic() - t0)) > 0:
                time.sleep(min(10.0, left))
                log(f"loss: {time.monotonic() - t0:.0f}/{seconds:.0f} s, dead seen {len(watch.deaths)}")
        loss_seen = [h.get("loss") for o in c.hosts if o != target
                     for h in (c.status(o) or {}).get("hosts", []) if h["name"] == target]
    finally:
        c.clear_loss(target)
    took = time.monotonic() - t0
    cpu = {h: round(100 * (cpu_seconds(p) - cpu0[h]) / took, 2)
           for h in c.hosts if (p := c.agent_pid(h)) and h in cpu0}
    changes = [e for o in c.hosts for e in c.events(o, "peer-state")[seen[o]:]]
    dead_lines = [e for e in changes if e.get("new") == "dead"]
    suspects = [e for e in changes if e.get("new") == "suspect"]
    return {"false_deaths": len(dead_lines) + (1 if watch.deaths and not dead_lines else 0),
            "dead_samples": len(watch.deaths), "samples": watch.samples,
            "suspect_transitions": len(suspects), "seconds": round(took, 1),
            "ping_loss_seen": [x for x in loss_seen if isinstance(x, float)],
            "cluster_agent_cpu_pct": cpu}


def cluster_phases(cuts: int, loss_s: float) -> dict[str, Any]:
    c = Cluster(default_timing=True, keepalive_s=5)
    try:
        log("starting 3 agents in namespaces (default timing)")
        c.start()
        c.wait_for("all three alive", c.all_alive, 30)
        latencies, missed = measure_cuts(c, cuts)
        log(f"{LOSS:.0%} loss on {c.hosts[-1]} for {loss_s:.0f} s")
        loss = measure_loss(c, loss_s)
        return {"latencies": latencies, "missed": missed, "loss": loss}
    finally:
        c.close()


# ---- agent cost with N local VMs ---------------------------------------------------------

def tiny_vm(i: int) -> VmDefinition:
    # No kernel: qboot finds nothing to boot and halts the vCPU.  QEMU reports "running".
    return VmDefinition(name=f"b{i:03d}", memory_mib=16, firmware="qboot")


class TreeAgent(LocalAgent):
    """A LocalAgent run from another source tree (a baseline revision), same config and files."""

    def __init__(self, root: Path, port: int, tree: Path | None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.tree = tree

    def start(self) -> None:
        if self.tree is None:
            super().start()
            return
        env = {**self.env, "PYTHONPATH": str(self.tree)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haguard", "run", "--config", str(self.config),
                 "--log-format", self.log_format], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=self.tree, env=env, start_new_session=True)


def extract_tree(rev: str, into: Path) -> Path:
    """The repository at `rev` as plain files (git archive: the repository is not touched)."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True,
                             check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    return into


def start_vms(root: Path, want: int) -> tuple[int, str, int]:
    """Start up to `want` tiny VMs; (started, why it stopped, their RSS in KiB)."""
    started, why = 0, f"all {want} started"
    (root / "vms").mkdir(exist_ok=True)
    qemu_rss = 0
    with ThreadPoolExecutor(max_workers=4) as pool:   # QEMU start-up is mostly waiting
        for first in range(0, want, 4):
            if mem_available_mib() < MIN_FREE_MIB:
                why = f"stopped at {started}: less than {MIN_FREE_MIB} MiB available"
                break
            vms = [tiny_vm(i) for i in range(first, min(want, first + 4))]
            for vm in vms:
                (root / "vms" / f"{vm.name}.yaml").write_text(
                    f"name: {vm.name}\nmemory_mib: 16\nfirmware: qboot\n")
            try:
                for inst in pool.map(lambda vm: launcher.start(vm, root / "run"), vms):
                    started += 1
                    qemu_rss += status_kib(inst.pid, "VmRSS")
            except Exception as exc:  # any refusal ends the ramp: report how many fit
                why = f"stopped at {started}: {exc}"
                break
    return started, why, qemu_rss


def running_vms(agent: LocalAgent) -> int:
    return sum(1 for v in (agent.status() or {}).get("vms", []) if v["state"] == "running")


def measure_agent(agent: LocalAgent, seconds: float) -> dict[str, Any]:
    """CPU % of one core over `seconds`, peak RSS and HWM in KiB, VMs seen running at the end."""
    pid = agent.proc.pid if agent.proc else 0
    c0, t0 = cpu_seconds(pid), time.monotonic()
    rss_max = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        rss_max = max(rss_max, status_kib(pid, "VmRSS"))
    cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    return {"cpu": cpu, "rss": rss_max, "hwm": status_kib(pid, "VmHWM"), "running": running_vms(agent)}


def restart_agent(agent: LocalAgent, vms: int) -> None:
    """Start `agent` afresh on the running VMs; return once it sees them all running."""
    agent.stop()
    agent.status_file.unlink(missing_ok=True)   # the last agent's status would pass the wait
    agent.start()
    agent.wait_for(f"{vms} VMs running in the status", lambda: running_vms(agent) >= vms, 60)
    time.sleep(2.0)


def cost_phase(root: Path, want: int, measure_s: float, idle_s: float, baseline: str | None,
               rounds: int) -> dict[str, Any]:
    """The agent's cost with no VM, then with `want` VMs.  With a baseline revision the two
    agents take turns on the same VMs, `rounds` times each (alternating which goes first),
    so that both see the same machine; the figures are medians of the turns."""
    broker = Mosquitto()
    agent: TreeAgent | None = None
    base_agent: TreeAgent | None = None
    try:
        broker.start()
        agent = TreeAgent(root, broker.port, None, keepalive_s=5)
        agent.start()
        agent.wait_for("agent ready", lambda: bool((agent.status() or {}).get("ready")), 20)
        pid = agent.proc.pid if agent.proc else 0
        time.sleep(2.0)
        idle_cpu = measure_agent(agent, idle_s)["cpu"]
        idle_rss = status_kib(pid, "VmRSS") / 1024
        log(f"agent with no VM: {idle_cpu:.2f} % of a core, RSS {idle_rss:.1f} MiB")
        started, why, qemu_rss = start_vms(root, want)
        log(f"{started} QEMUs running ({why}); {qemu_rss / 1024:.0f} MiB RSS in all")
        os.kill(pid, signal.SIGHUP)     # the inventory grew: the agent owns them now
        agent.wait_for(f"{started} VMs running in the status", lambda: running_vms(agent) >= started, 60)
        time.sleep(2.0)
        turns: dict[str, list[dict[str, Any]]] = {"current": [], "baseline": []}
        if baseline is None:
            turns["current"].append(measure_agent(agent, measure_s))
        else:
            tree = extract_tree(baseline, root / "baseline")
            base_agent = TreeAgent(root, broker.port, tree, keepalive_s=5)
            agent.stop()
            for i in range(rounds):
                order = [("baseline", base_agent), ("current", agent)]
                for name, a in order if i % 2 == 0 else order[::-1]:
                    restart_agent(a, started)
                    turns[name].append(m := measure_agent(a, measure_s))
                    a.stop()
                    log(f"turn {i + 1}/{rounds} {name}: {m['cpu']:.2f} % of a core")
        cur = turns["current"]
        cpu = statistics.median(m["cpu"] for m in cur)
        rss_max = max(m["rss"] for m in cur)
        log(f"agent with {started} VMs: {cpu:.2f} % of a core ({len(cur)} x {measure_s:.0f} s), "
            f"RSS {rss_max / 1024:.1f} MiB")
        base_cpu = statistics.median(m["cpu"] for m in turns["baseline"]) if turns["baseline"] else None
        if base_cpu is not None:
            log(f"baseline {baseline} with {started} VMs: {base_cpu:.2f} % of a core")
        return {"vms_wanted": want, "vms_running": started,
                "vms_seen_running": min(m["running"] for m in cur), "why": why,
                "cpu_pct": round(cpu, 2), "rss_mib": round(rss_max / 1024, 1),
                "cpu_turns": [round(m["cpu"], 2) for m in cur],
                "baseline": baseline, "baseline_cpu_pct": None if base_cpu is None else round(base_cpu, 2),
                "baseline_cpu_turns": [round(m["cpu"], 2) for m in turns["baseline"]],
                "hwm_mib": round(max(m["hwm"] for m in cur) / 1024, 1),
                "idle_cpu_pct": round(idle_cpu, 2), "idle_rss_mib": round(idle_rss, 1),
                "qemu_rss_mib_each": round(qemu_rss / 1024 / max(1, started), 1),
                "measure_s": round(measure_s, 1),
                "dropped": (agent.status() or {}).get("dropped")}
    finally:
        for a in (agent, base_agent):
            if a is not None:
                a.stop()
        broker.stop()


# ---- report ---------------------------------------------------------------------------

def figures(cl: dict[str, Any] | None, cost: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Every figure; with `cl` None (--cost-only) the cluster's are None and not targets."""
    lat = cl["latencies"] if cl else []
    missed = cl["missed"] if cl else 0
    p50 = statistics.median(lat) if lat else None
    p99 = percentile(lat, 99)
    loss: dict[str, Any] = cl["loss"] if cl else dict.fromkeys(
        ("seconds", "false_deaths", "dead_samples", "samples", "suspect_transitions",
         "ping_loss_seen", "cluster_agent_cpu_pct"))
    f: dict[str, Any] = {
        "quick": quick,
        "timing": "defaults: heartbeat 300 ms, suspect 900 ms, dead 1500 ms, ping 250 ms, keepalive 5 s",
        "cuts": len(lat) + missed if cl else None, "cuts_missed": missed if cl else None,
        "detect_p50_s": None if p50 is None else round(p50, 3),
        "detect_p99_s": None if p99 is None else round(p99, 3),
        "detect_min_s": round(min(lat), 3) if lat else None,
        "detect_max_s": round(max(lat), 3) if lat else None,
        "loss_ratio": LOSS, "loss_seconds": loss["seconds"], "false_deaths": loss["false_deaths"],
        "loss_dead_samples": loss["dead_samples"], "loss_samples": loss["samples"],
        "loss_suspect_transitions": loss["suspect_transitions"],
        "loss_ping_loss_seen": loss["ping_loss_seen"],
        "cluster_agent_cpu_pct": loss["cluster_agent_cpu_pct"],
        "vms_wanted": cost["vms_wanted"], "vms_running": cost["vms_running"],
        "vms_seen_running": cost["vms_seen_running"], "vms_limit": cost["why"],
        "agent_cpu_pct": cost["cpu_pct"], "agent_cpu_turns": cost["cpu_turns"],
        "baseline_rev": cost["baseline"], "baseline_agent_cpu_pct": cost["baseline_cpu_pct"],
        "baseline_agent_cpu_turns": cost["baseline_cpu_turns"],
        "agent_rss_mib": cost["rss_mib"], "agent_hwm_mib": cost["hwm_mib"],
        "agent_idle_cpu_pct": cost["idle_cpu_pct"], "agent_idle_rss_mib": cost["idle_rss_mib"],
        "qemu_rss_mib_each": cost["qemu_rss_mib_each"], "cost_measure_s": cost["measure_s"],
        "agent_dropped": cost["dropped"],
        "anchor_corosync_median_s": COROSYNC_MEDIAN_S, "anchor_proxmox_s": PROXMOX_S,
    }
    f["targets"] = {} if cl is None else {
        "detect_p99_le_2s": {"ok": p99 is not None and p99 <= TARGET_P99_S and not missed,
                             "p99_s": f["detect_p99_s"], "missed": missed},
        "no_false_deaths": {"ok": loss["false_deaths"] == 0 and loss["dead_samples"] == 0,
                            "false_deaths": loss["false_deaths"]},
    }
    f["targets"] |= {
        "cpu_le_2pct": {"ok": cost["cpu_pct"] <= TARGET_CPU_PCT, "cpu_pct": cost["cpu_pct"],
                        "vms": cost["vms_running"]},
        "rss_le_80mib": {"ok": cost["rss_mib"] <= TARGET_RSS_MIB, "rss_mib": cost["rss_mib"]},
        "vms_100": {"ok": cost["vms_running"] >= 100, "vms": cost["vms_running"]},
    }
    f["all_targets_met"] = all(t["ok"] for t in f["targets"].values())
    return f


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def print_tables(f: dict[str, Any]) -> None:
    con = Console(width=120, highlight=False)
    if f["cuts"] is not None:
        print_cluster(con, f)
    con.print(f"agent cost: {f['vms_running']} VMs ({f['vms_limit']}): {f['agent_cpu_pct']:.2f} % of a core "
              f"(turns {f['agent_cpu_turns']}), RSS {f['agent_rss_mib']:.1f} MiB "
              f"(peak {f['agent_hwm_mib']:.1f}); with no VM {f['agent_idle_cpu_pct']:.2f} %, "
              f"{f['agent_idle_rss_mib']:.1f} MiB; "
              f"each QEMU {f['qemu_rss_mib_each']:.1f} MiB RSS")
    if f["baseline_rev"]:
        con.print(f"baseline {f['baseline_rev']} on the same VMs, turns interleaved: "
                  f"{f['baseline_agent_cpu_pct']:.2f} % of a core (turns {f['baseline_agent_cpu_turns']})")
    tt = Table(title="Targets")
    for col in ("target", "result", "figures"):
        tt.add_column(col)
    for name, t in f["targets"].items():
        tt.add_row(name, "[green]PASS[/]" if t["ok"] else "[red]FAIL[/]",
                   ", ".join(f"{k}={v}" for k, v in t.items() if k != "ok"))
    con.print(tt)


def print_cluster(con: Console, f: dict[str, Any]) -> None:
    tab = Table(title=f"Detection of a cut host ({f['cuts']} cuts, {f['timing']})")
    for col in ("system", "p50", "p99", "min", "max", "false deaths"):
        tab.add_column(col, justify="left" if col == "system" else "right")
    tab.add_row("haguard", _s(f["detect_p50_s"]), _s(f["detect_p99_s"]), _s(f["detect_min_s"]),
                _s(f["detect_max_s"]), f"{f['false_deaths']} in {f['loss_seconds']:.0f} s of {LOSS:.0%} loss")
    tab.add_row("corosync 3.1 defaults (anchor)", _s(COROSYNC_MEDIAN_S), "-", "-", "-", "-")
    tab.add_row("Proxmox VE HA (anchor)", f"~{PROXMOX_S:.0f} s", "-", "-", "-", "-")
    con.print(tab)
    con.print(f"under loss: {f['loss_suspect_transitions']} suspect transitions, {f['loss_samples']} "
              f"status samples, ping loss seen {f['loss_ping_loss_seen']}; agents' CPU meanwhile "
              f"{f['cluster_agent_cpu_pct']} % of a core")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--cuts", type=int, help="hard failures to time (default 20; --quick 5)")
    ap.add_argument("--loss-s", type=float, help="seconds of 30%% loss (default 600; --quick 60)")
    ap.add_argument("--vms", type=int, default=100, help="local VMs for the cost (default 100)")
    ap.add_argument("--cost-only", action="store_true", help="only the agent's cost with local VMs")
    ap.add_argument("--baseline", metavar="REV",
                    help="also measure the agent of git revision REV on the same VMs, turns interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="turns per agent with --baseline (default 3)")
    ap.add_argument("--busy", action="store_true",
                    help="only busy hosts: heartbeat jitter with 3 spinning vCPUs per core, normal and "
                         "real-time scheduling side by side (bench/busy.py)")
    ap.add_argument("--busy-s", type=float, help="seconds per busy run (default 600; --quick 30)")
    args = ap.parse_args()
    if args.busy:
        return busy_main(args.busy_s or (30.0 if args.quick else 600.0))
    cuts = args.cuts or (5 if args.quick else 20)
    loss_s = args.loss_s or (60.0 if args.quick else 600.0)
    measure_s = 12.0 if args.quick else 60.0
    os.environ["HAGUARD_NO_SCOPE"] = "1"   # the benchmark owns and kills its QEMUs
    # SIGTERM unwinds like Ctrl-C, so every finally block (namespaces, agents, QEMUs) runs.
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        with scratch_dir("det") as root:
            cost = cost_phase(root, args.vms, measure_s, idle_s=measure_s / 2,
                              baseline=args.baseline, rounds=args.rounds)
            cl = None if args.cost_only else cluster_phases(cuts, loss_s)
    except KeyboardInterrupt:
        print("interrupted: agents, namespaces, QEMUs and temp dirs removed", file=sys.stderr)
        return 130
    except (AssertionError, subprocess.SubprocessError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    f = figures(cl, cost, args.quick)
    f["bench_seconds"] = round(time.monotonic() - t0, 1)
    print_tables(f)
    emit_result(f)
    return 0 if f["all_targets_met"] else 1


def busy_main(seconds: float) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        f = busy_phase(seconds)
    except KeyboardInterrupt:
        print("interrupted: agents, namespaces, QEMUs and temp dirs removed", file=sys.stderr)
        return 130
    f["bench_seconds"] = round(time.monotonic() - t0, 1)
    print_busy(f)
    emit_result(f)
    return 0 if all(f["busy_targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
