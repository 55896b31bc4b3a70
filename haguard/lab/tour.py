"""The cluster acts of `haguard demo`: a 3-host cluster forms and places its VMs, one host
is drained live (`haguard drain`, progress bars), another loses its power and is fenced,
its VMs restarted elsewhere.  Every step is checked; QEMUs are sampled throughout and a
VM that runs twice, even for one sample, fails the demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from haguard.agent.status import render
from haguard.errors import HaguardError
from haguard.guest.build import build_guest
from haguard.lab.cluster import Lab
from haguard.lab.watch import RunWatch
from haguard.vm.definition import VmDefinition

Check = Callable[[str, bool, str], bool]

# (name, anti-affinity group): the two databases never share a host.
VMS = (("web1", None), ("web2", None), ("web3", None), ("db1", "db"), ("db2", "db"), ("cache1", None))


def demo_vms(kernel: Path) -> tuple[VmDefinition, ...]:
    # 64 MiB guests rewriting 8 MiB at 4 MiB/s: alive (their page checks run), quick to move.
    return tuple(VmDefinition(name=n, memory_mib=64, machine="pc-i440fx-7.2", firmware="qboot",
                              kernel=kernel, append="mib=8 rate=4", anti_affinity=g)
                 for n, g in VMS)


class ClusterTour:
    def __init__(self, console: Console, root: Path, check: Check, *,
                 namespaces: bool | None = None) -> None:
        """`namespaces`: None for namespaces when root, else loopback."""
        self.console = console
        self.namespaces = namespaces
        self.root = root
        self.check = check
        self.lab: Lab | None = None
        self.watch: RunWatch | None = None
        self.names: list[str] = []
        self.recovery_s: float | None = None

    # ---- what the cluster looks like ---------------------------------------------------

    def coordinator_view(self) -> tuple[str | None, dict[str, Any]]:
        """The coordinator's status (the committed state), else any agent's."""
        assert self.lab is not None
        views = {h: s for h in self.lab.hosts if self.lab.agent_alive(h) and (s := self.lab.status(h))}
        for data in views.values():
            coord = (data.get("cluster") or {}).get("coordinator")
            if coord in views:
                return coord, views[coord]
        for host, data in views.items():
            return host, data
        return None, {}

    def table(self) -> RenderableType:
        assert self.lab is not None and self.watch is not None
        lab = self.lab
        _, data = self.coordinator_view()
        cluster = data.get("cluster") or {}
        coord = cluster.get("coordinator")
        seen = {str(h.get("name")): str(h.get("state")) for h in data.get("hosts", [])}
        flags = cluster.get("hosts") or {}
        where = self.watch.where()
        t = Table(title=f"Cluster {lab.cluster}: term {cluster.get('term', '-')}, coordinator "
                        f"{coord or 'none yet'}" + ("" if cluster.get("quorate", True) else ", NO QUORUM"),
                  title_justify="left")
        for col in ("host", "address", "state", "role", "VMs running (sampled from QEMU)"):
            t.add_column(col)
        for h in lab.hosts:
            state = seen.get(h, "-")
            colour = {"alive": "green", "dead": "bold red"}.get(state, "yellow")
            role = ", ".join([*(["coordinator"] if h == coord else []),
                              *[k for k in ("maintenance", "fenced") if (flags.get(h) or {}).get(k)]])
            vms = sorted(vm for vm, hs in where.items() if h in hs)
            t.add_row(f"[bold]{h}[/]", lab.net.addr(h), f"[{colour}]{state}[/]", role or "-",
                      " ".join(vms) or "[dim]none[/]")
        moves = [f"{m.get('vm')} {m.get('source')} → {m.get('target')} {m.get('percent') or 0:.0f}%"
                 for m in cluster.get("migrations") or []]
        extra = [f"moving: {'; '.join(moves)}"] if moves else []
        if cluster.get("fencing"):
            extra.append(f"[bold red]fencing: {', '.join(cluster['fencing'])}[/]")
        return Group(t, *extra) if extra else t

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float,
             tick: Callable[[], None] | None = None) -> float:
        """Poll `done` (showing the live cluster on a terminal), calling `tick` on each round;
        seconds taken, or HaguardError."""
        start = time.monotonic()
        live = Live(self.table(), console=self.console, refresh_per_second=8, transient=True) \
            if self.console.is_terminal else None
        try:
            if live:
                live.start()
            while time.monotonic() - start < timeout_s:
                if tick:
                    tick()
                if done():
                    return time.monotonic() - start
                if live:
                    live.update(self.table())
                time.sleep(0.05)
        finally:
            if live:
                live.stop()
        assert self.lab is not None
        tails = "\n".join(f"--- {h}\n{self.lab.log_tail(h, 5)}" for h in self.lab.hosts)
        raise HaguardError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")

    def placed(self, avoid: str | None = None) -> bool:
        assert self.watch is not None
        where = self.watch.where()
        return all(len(where.get(n, [])) == 1 and where[n][0] != avoid for n in self.names)

    def on(self, host: str) -> list[str]:
        assert self.watch is not None
        return sorted(vm for vm, hs in self.watch.where().items() if host in hs)

    # ---- the acts ----------------------------------------------------------------------

    def run(self) -> bool:
        c = self.console
        c.rule("[bold]haguard demo: a 3-host cluster")
        vms = demo_vms(build_guest(self.root / "guest"))
        self.names = [v.name for v in vms]
        self.lab = lab = Lab(self.root, vms, namespaces=self.namespaces)
        how = ("network namespaces joined by a bridge, 198.18.7.0/24" if lab.net.namespaces else
               "loopback addresses (no namespaces, so no link to cut)")
        c.print(f"Hosts [bold]{', '.join(lab.hosts)}[/] on {how}; a private mosquitto; "
                f"{len(vms)} VMs of 64 MiB ({', '.join(self.names)}; db1 and db2 never share a host); "
                "each host runs [bold]haguard run[/] with HA on and a fence device stand-in.")
        lab.start()
        self.watch = RunWatch({h: lab.run_dir(h) for h in lab.hosts}).start()
        took = self.wait("a coordinator and every VM running once", self.placed, 90)
        coord, data = self.coordinator_view()
        self.check("cluster formed, every VM placed and running once", True,
                   f"coordinator {coord}, {took:.1f} s")
        c.print(self.table())
        if coord:
            c.rule(f"[dim]haguard status (on {coord})", style="dim")
            render(data, c)
        ok = self.drain()
        ok &= self.power_off()
        c.rule("[bold]Cluster: end")
        c.print(self.table())
        watch = self.watch
        ok &= self.check("no VM ever ran on two hosts", watch.samples > 0 and not watch.twice,
                         f"{watch.samples} samples of every host's QEMUs"
                         + (f"; twice: {watch.twice[:2]}" if watch.twice else ""))
        return ok

    def drain(self) -> bool:
        c, lab = self.console, self.lab
        assert lab is not None
        victim = max(lab.hosts, key=lambda h: (len(self.on(h)), h))
        moving = self.on(victim)
        c.rule(f"[bold]Drain {victim}: move its VMs live ({', '.join(moving)})")
        where = f"inside {victim}'s namespace" if lab.net.namespaces else "on loopback"
        c.print(f"[bold]$ haguard drain {victim}[/]   [dim]({where}, with {victim}'s config)[/]")
        start = time.monotonic()
        out = lab.haguard(victim, "drain", victim, "--timeout", "120", capture=not c.is_terminal)
        for line in (out.stdout or "").splitlines() + (out.stderr or "").splitlines():
            c.print(f"  {line}", highlight=False)
        ok = self.check(f"haguard drain {victim} finished", out.returncode == 0,
                        f"exit {out.returncode}, {time.monotonic() - start:.1f} s")
        self.wait(f"every VM running once, none on {victim}", lambda: self.placed(victim), 30)
        ok &= self.check(f"every VM running once, none on {victim}", True,
                         f"{len(moving)} moved live in {time.monotonic() - start:.1f} s")
        ok &= self.check("no fence for a drain", not lab.fence_calls(), "; ".join(lab.fence_calls()))
        c.print(self.table())
        out = lab.haguard(victim, "undrain", victim, "--timeout", "30")
        said = (out.stdout + out.stderr).strip().splitlines()
        ok &= self.check(f"haguard undrain {victim}: back in service", out.returncode == 0,
                         said[-1] if said else f"exit {out.returncode}")
        return ok

    def power_off(self) -> bool:
        c, lab = self.console, self.lab
        assert lab is not None
        coord, _ = self.coordinator_view()
        candidates = ([h for h in lab.hosts if h != coord and self.on(h)]
                      or [h for h in lab.hosts if self.on(h)])
        victim = max(candidates, key=lambda h: (len(self.on(h)), h))
        lost = self.on(victim)
        c.rule(f"[bold]Power-off {victim}: fence, then recover ({', '.join(lost)})")
        if not lab.net.can_cut:
            c.print(f"[yellow]On loopback there is no link to cut: {victim}'s address still answers "
                    "pings, so the cluster would (rightly) see only its agent down and not recover. "
                    "Run the demo as root without --loopback (network namespaces) to see the fenced "
                    "recovery.[/]")
            return True
        c.print(f"Cutting {victim}'s link and SIGKILLing its agent and QEMUs (a power cut)…")
        cut_wall, cut = time.time(), time.monotonic()
        seen: dict[str, float] = {}          # milestone -> seconds after the cut, first seen

        def tick() -> None:
            now = time.monotonic() - cut
            _, data = self.coordinator_view()
            for h in data.get("hosts", []):
                if h.get("name") == victim and h.get("state") not in ("alive", None):
                    seen.setdefault(f"{victim} {h['state']}", now)
            where = self.watch.where() if self.watch else {}
            for vm in lost:
                if (hs := where.get(vm)) and victim not in hs:
                    seen.setdefault(f"{vm} running on {hs[0]}", now)

        lab.power_off(victim)
        self.wait(f"{', '.join(lost)} running again elsewhere", lambda: self.placed(victim), 45, tick)
        self.recovery_s = took = time.monotonic() - cut
        calls = [line.split() for line in lab.fence_calls()]
        fenced = [float(w[0]) - cut_wall for w in calls if w[1:] == ["off", victim, "0"]]
        if fenced:
            seen[f"fence device: off {victim} done"] = fenced[0]
        for what, at in sorted(seen.items(), key=lambda kv: kv[1]):
            c.print(f"  [dim]{at:5.2f} s[/]  {what}")
        ok = self.check(f"{victim} fenced (fence device: off {victim})", bool(fenced),
                        f"{fenced[0]:.2f} s after the cut" if fenced else f"calls: {calls}")
        ok &= self.check(f"{len(lost)} VMs recovered, each running once, none on {victim}", True,
                         f"[bold]{took:.2f} s[/] from the cut to all running")
        c.print(f"Recovery: [bold]{took:.2f} s[/] from the cut to {', '.join(lost)} running elsewhere"
                + (f" (fenced at {fenced[0]:.2f} s)" if fenced else ""))
        return ok

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.lab is not None:
            self.lab.close()
