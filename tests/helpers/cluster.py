"""A 3-host cluster of real agents: each `haguard run` in its own network namespace.

    hub namespace: bridge 198.18.1.254/24 + mosquitto on 198.18.1.254:1883
    h1, h2, h3:    one namespace each, 198.18.1.{1,2,3}/24, a veth into the hub's bridge

`cut(host)` sets the hub side of that host's veth down (no broker, no pings);
`mend(host)` brings it back.  `lossy(host, p)` drops a random share `p` of that host's
packets both ways (iptables statistic match in its namespace); `clear_loss(host)` ends it.
`DeathWatch` samples every agent's status file in a thread and records any "dead".
Agents log JSON to files; their status files are read directly.  Everything
(processes, namespaces, files) goes on `close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.core.hostkeys import private_text, public_text
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.netns import sh

HUB_ADDR = "198.18.1.254"
TIMING = {"heartbeat_interval_ms": 200, "suspect_timeout_ms": 800, "dead_timeout_ms": 1500,
          "ping_interval_ms": 200, "ping_timeout_ms": 150, "isolation_timeout_ms": 5000}
REPO = Path(__file__).resolve().parents[2]


class Cluster:
    def __init__(self, hosts: tuple[str, ...] = ("h1", "h2", "h3"),
                 timing: dict[str, int] | None = None, *, keepalive_s: int = 2,
                 default_timing: bool = False, extra: str = "",
                 host_fields: dict[str, str] | None = None, vms: tuple[Any, ...] = (),
                 brokers_on: tuple[str, ...] = (), host_keys: bool = False) -> None:
        """`default_timing`: leave `timing:` out of the configs (the shipped defaults).
        `brokers_on`: run one mosquitto on each of these hosts (in its namespace, on its
        address) and list them all in `mqtt.urls` instead of the hub's broker.  `host_keys`:
        every host gets its own Ed25519 key (`host_key_file`, `public_keys`).
        `extra`: more YAML for every config (an `ha:` section, say); `host_fields`: more
        fields of a host's entry in `hosts:` (`fence: {...}`); `vms`: VmDefinitions
        written to every host's vm_dir."""
        tag = f"{os.getpid() % 100000}"
        self.hosts = hosts
        self.timing = {} if default_timing else dict(TIMING, **(timing or {}))
        self.keepalive_s = keepalive_s
        self.hub = f"hgc{tag}hub"
        self.ns = {h: f"hgc{tag}{h}" for h in hosts}
        self.hub_dev = {h: f"hc{tag}{h}"[:15] for h in hosts}
        self.addr = {h: f"198.18.1.{i + 1}" for i, h in enumerate(hosts)}
        self.dir = Path(tempfile.mkdtemp(prefix="hg-cluster-"))
        self.broker: Mosquitto | None = None
        self.brokers: dict[str, Mosquitto] = {}          # host -> the broker running on it
        self.brokers_on = brokers_on
        self.public_keys: dict[str, list[str]] = {}     # host -> its public keys (host_keys)
        if host_keys:
            for h in hosts:
                key = Ed25519PrivateKey.generate()
                path = self.dir / f"{h}.hostkey"
                path.write_text(private_text(key) + "\n")
                path.chmod(0o600)
                self.public_keys[h] = [public_text(key)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.faults = 0         # faults injected so far (cut, loss, kill -9, QEMUs killed)
        self.cluster = "c" + tag
        self.extra = extra
        self.host_fields = host_fields if host_fields is not None else {}
        self.vms = vms

    # ---- set-up ----------------------------------------------------------------------

    def start(self) -> None:
        sh("ip", "netns", "add", self.hub)
        self._in(self.hub, "ip", "link", "set", "lo", "up")
        self._in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.hub, "ip", "addr", "add", f"{HUB_ADDR}/24", "dev", "br0")
        self._in(self.hub, "ip", "link", "set", "br0", "up")
        for h in self.hosts:
            ns = self.ns[h]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", self.hub_dev[h],
               "netns", self.hub)
            self._in(ns, "ip", "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(self.hub, "ip", "link", "set", self.hub_dev[h], "master", "br0")
            self._in(self.hub, "ip", "link", "set", self.hub_dev[h], "up")
        if self.brokers_on:
            for h in self.brokers_on:
                self.brokers[h] = Mosquitto(netns=self.ns[h], bind=self.addr[h])
                self.brokers[h].start()
        else:
            self.broker = Mosquitto(netns=self.hub, bind=HUB_ADDR)
            self.broker.start()
        key = self.dir / "key"
        key.write_bytes(os.urandom(32).hex().encode())
        key.chmod(0o600)
        for h in self.hosts:
            self.config_path(h).write_text(self.config_text(h))
            (self.dir / h / "vms").mkdir(parents=True, exist_ok=True)
            for vm in self.vms:
                (self.dir / h / "vms" / f"{vm.name}.yaml").write_text(
                    yaml.safe_dump(vm.model_dump(mode="json", exclude_defaults=True)))
        for h in self.hosts:
            self.start_agent(h)

    def config_text(self, host: str, **timing: int) -> str:
        t = dict(self.timing, **timing)
        keys = {h: ", public_keys: [" + ", ".join(f"'{k}'" for k in ks) + "]"
                for h, ks in self.public_keys.items()}
        hosts = "\n".join(f"  - {{name: {h}, address: {self.addr[h]}"
                          + (f", {self.host_fields[h]}" if h in self.host_fields else "")
                          + keys.get(h, "") + "}"
                          for h in self.hosts)
        d = self.dir / host
        return (f"cluster: {self.cluster}\nhost: {host}\nhosts:\n{hosts}\n"
                f"key_file: {self.dir / 'key'}\n"
                + (f"host_key_file: {self.dir / f'{host}.hostkey'}\n" if self.public_keys else "") +
                f"mqtt:\n  urls: [{self.urls()}]\n  keepalive_s: {self.keepalive_s}\n"
                + ("timing:\n" + "".join(f"  {k}: {v}\n" for k, v in t.items()) if t else "") +
                f"vm_dir: {d / 'vms'}\nrun_dir: {d / 'run' / 'vms'}\nstate_dir: {d / 'state'}\n"
                + self.extra.replace("{host}", host).replace("{dir}", str(self.dir)))

    def urls(self) -> str:
        if not self.brokers_on:
            return f"'mqtt://{HUB_ADDR}:1883'"
        return ", ".join(f"'{self.brokers[h].url}'" for h in self.brokers_on)

    def host_key_path(self, host: str) -> Path:
        return self.dir / f"{host}.hostkey"

    def config_path(self, host: str) -> Path:
        return self.dir / f"{host}.yaml"

    def status_file(self, host: str) -> Path:
        return self.dir / host / "run" / "agent-status.json"

    def log_file(self, host: str) -> Path:
        return self.dir / f"{host}.log"

    def start_agent(self, host: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.status_file(host).unlink(missing_ok=True)
        with open(self.log_file(host), "ab") as log:
            # Real-time from exec, as the unit starts it (CPUSchedulingPolicy=rr, priority 10,
            # reset on fork): started at normal priority, a restarted agent waited behind its
            # real-time peers and, on 12 busy hosts, did not even finish its imports within the
            # 10 s watchdog timeout the agent it replaced had left armed (a kill -9).
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[host], "chrt", "--rr", "--reset-on-fork", "10",
                 sys.executable, "-m", "haguard", "run",
                 "--config", str(self.config_path(host)), "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                start_new_session=True, env={**os.environ, **(env or {})})
        self.procs[host] = proc
        return proc

    def _in(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *args, check=check)

    # ---- faults ------------------------------------------------------------------------

    def kill9(self, host: str) -> None:
        self.faults += 1
        proc = self.procs.pop(host)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def cut(self, host: str) -> None:
        self.faults += 1
        self._in(self.hub, "ip", "link", "set", self.hub_dev[host], "down")

    def mend(self, host: str) -> None:
        self._in(self.hub, "ip", "link", "set", self.hub_dev[host], "up")

    def lossy(self, host: str, probability: float) -> None:
        self.faults += 1
        """Drop a random `probability` of the host's packets on its link, in and out."""
        for chain, opt in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._in(self.ns[host], "iptables", "-I", chain, opt, "eth0", "-m", "statistic",
                     "--mode", "random", "--probability", f"{probability}", "-j", "DROP")

    def clear_loss(self, host: str) -> None:
        for chain in ("INPUT", "OUTPUT"):
            self._in(self.ns[host], "iptables", "-F", chain, check=False)

    # ---- observing --------------------------------------------------------------------

    def status(self, host: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file(host).read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def state_of(self, observer: str, target: str) -> str | None:
        data = self.status(observer)
        if data is None:
            return None
        return next((h["state"] for h in data["hosts"] if h["name"] == target), None)

    def wait_for(self, what: str, predicate: Any, timeout_s: float) -> float:
        """Poll `predicate()` every 50 ms; the seconds it took, or AssertionError with logs."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if predicate():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                             f"states: {self.states()}; logs: {self.log_tail()}")

    def states(self) -> dict[str, dict[str, str | None]]:
        return {o: {t: self.state_of(o, t) for t in self.hosts if t != o} for o in self.hosts}

    def all_alive(self, hosts: tuple[str, ...] | None = None) -> bool:
        hs = hosts or self.hosts
        return all(self.state_of(o, t) == "alive" for o in hs for t in hs if t != o)

    def events(self, host: str, event: str) -> list[dict[str, Any]]:
        out = []
        try:
            lines = self.log_file(host).read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == event:
                out.append(rec)
        return out

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for h in self.hosts:
            try:
                text = self.log_file(h).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = []
            parts.append(f"--- {h}\n" + "\n".join(text))
        return "\n".join(parts)

    def run_dir(self, host: str) -> Path:
        return self.dir / host / "run" / "vms"

    def cluster_view(self, host: str) -> dict[str, Any]:
        data = self.status(host) or {}
        view = data.get("cluster")
        return view if isinstance(view, dict) else {}

    def owners(self, host: str) -> dict[str, str | None]:
        return {vm: rec.get("owner") for vm, rec in (self.cluster_view(host).get("vms") or {}).items()}

    def haguard(self, host: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """`haguard ARGS --config <host's config>` inside the host's namespace."""
        return subprocess.run(["ip", "netns", "exec", self.ns[host], sys.executable, "-m", "haguard",
                               *args, "--config", str(self.config_path(host))],
                              capture_output=True, text=True, timeout=timeout_s, cwd=REPO, check=False)

    def scrape(self, host: str) -> str:
        """The host agent's Prometheus endpoint (127.0.0.1:9464 in its namespace)."""
        code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9464/metrics',timeout=5).read().decode())"
        return self._in(self.ns[host], sys.executable, "-c", code).stdout

    def kill_vms(self, host: str) -> None:
        """SIGKILL every QEMU of `host` (a power cut)."""
        self.faults += 1
        subprocess.run(["pkill", "-KILL", "-f", str(self.run_dir(host))], check=False)

    def agent_pid(self, host: str) -> int | None:
        """The agent's own pid (the status file's; `ip netns exec` execs into it)."""
        data = self.status(host)
        pid = None if data is None else data.get("pid")
        return pid if isinstance(pid, int) else None

    # ---- tear-down -----------------------------------------------------------------------

    def close(self) -> None:
        # Copies: a watchdog stand-in that fires meanwhile may reset a host (another thread).
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
        for h in self.hosts:                 # agents never stop VMs: the test does
            self.kill_vms(h)
        for broker in [self.broker, *self.brokers.values()]:
            if broker is not None:
                broker.stop()
        for ns in [*self.ns.values(), self.hub]:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class DeathWatch:
    """Samples every agent's view every `every_s` in a thread; keeps each "dead" seen."""

    def __init__(self, cluster: Cluster, every_s: float = 0.05) -> None:
        self.cluster = cluster
        self.every_s = every_s
        self.deaths: list[tuple[float, str, str, str]] = []   # (when, observer, target, reason)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="death-watch", daemon=True)

    def __enter__(self) -> DeathWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for o in self.cluster.hosts:
                data = self.cluster.status(o)
                for h in (data or {}).get("hosts", []):
                    if h.get("state") == "dead":
                        self.deaths.append((time.monotonic(), o, str(h.get("name")), str(h.get("reason"))))
            self.samples += 1
            self._stop.wait(self.every_s)


class LocalAgent:
    """One `haguard run` for host h1 on loopback (no namespace), against a broker on
    127.0.0.1:`port`; its files live in `root` (the VM lab's root when it watches VMs)."""

    def __init__(self, root: Path, port: int, *, extra: str = "", env: dict[str, str] | None = None,
                 log_format: str = "json", keepalive_s: int = 2) -> None:
        self.root = root
        self.config = root / "cluster.yaml"
        self.log = root / "agent.log"
        self.status_file = root / "agent-status.json"   # run_dir's parent
        key = root / "key"
        key.write_bytes(os.urandom(32).hex().encode())
        key.chmod(0o600)
        self.config.write_text(
            f"cluster: c{os.getpid() % 100000}\nhost: h1\nhosts:\n  - {{name: h1, address: 127.0.0.1}}\n"
            f"key_file: {key}\nmqtt:\n  urls: ['mqtt://127.0.0.1:{port}']\n  keepalive_s: {keepalive_s}\n"
            f"vm_dir: {root / 'vms'}\nrun_dir: {root / 'run'}\nstate_dir: {root / 'state'}\n{extra}")
        self.env = {**os.environ, "HAGUARD_NO_SCOPE": "1", **(env or {})}
        self.log_format = log_format
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haguard", "run", "--config", str(self.config),
                 "--log-format", self.log_format], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO, env=self.env, start_new_session=True)

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); the exit code.  VMs are left alone, as the agent does."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=5)

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def vm_state(self, vm: str) -> str | None:
        data = self.status() or {}
        return next((v["state"] for v in data.get("vms", []) if v["name"] == vm), None)

    def me(self) -> dict[str, Any]:
        data = self.status() or {}
        return next((h for h in data.get("hosts", []) if h.get("self")), {})

    def events(self, event: str, **match: object) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if (isinstance(rec, dict) and rec.get("event") == event
                        and all(rec.get(k) == v for k, v in match.items())):
                    out.append(rec)
        return out

    def wait_for(self, what: str, predicate: Any, timeout_s: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if predicate():
                return time.monotonic() - start
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:]) if self.log.exists() else ""
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; status {self.status()}; "
                             f"agent exit {None if self.proc is None else self.proc.poll()}; log:\n{tail}")
