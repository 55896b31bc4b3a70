"""The lab cluster: one `haguard run` per host with `ha.enabled`, a shared VM inventory,
a fence stand-in per host, and everything made under one private directory.

    lab = Lab(root, vms); lab.start()       # network, broker, configs, agents
    lab.status(host)                        # that agent's status file (dict) or None
    lab.haguard(host, "drain", host)        # a haguard command inside the host
    lab.power_off(host)                     # link cut, QEMUs and agent SIGKILLed
    lab.close()                             # every process, namespace and file gone
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from haguard.lab.broker import Broker
from haguard.lab.fence import qemus_naming
from haguard.lab.net import LabNet
from haguard.vm.definition import VmDefinition

HOSTS = ("alpha", "beta", "gamma")
# Fast timers for a demo on one machine: dead after 1.5 s of silence and no ping reply.
TIMING = {"heartbeat_interval_ms": 200, "suspect_timeout_ms": 800, "dead_timeout_ms": 1500,
          "ping_interval_ms": 200, "ping_timeout_ms": 150, "isolation_timeout_ms": 5000}
HAGUARD = [sys.executable, "-m", "haguard"]


class Lab:
    def __init__(self, root: Path, vms: tuple[VmDefinition, ...], *, hosts: tuple[str, ...] = HOSTS,
                 namespaces: bool | None = None) -> None:
        self.root = root
        self.vms = vms
        self.hosts = hosts
        self.net = LabNet(hosts) if namespaces is None else LabNet(hosts, namespaces=namespaces)
        self.broker: Broker | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.fence_dir = root / "fence"
        self.cluster = f"demo{os.getpid() % 100000}"
        # QEMUs stay plain processes (no systemd scope): the lab reaps them itself.
        self.env = {**os.environ, "HAGUARD_NO_SCOPE": "1"}

    # ---- paths ---------------------------------------------------------------------------

    def config_path(self, host: str) -> Path:
        return self.root / f"{host}.yaml"

    def run_dir(self, host: str) -> Path:
        return self.root / host / "run" / "vms"

    def status_file(self, host: str) -> Path:
        return self.root / host / "run" / "agent-status.json"

    def log_file(self, host: str) -> Path:
        return self.root / f"{host}.log"

    # ---- set-up ----------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.net.up()
        self.broker = Broker(self.root, self.net.broker_addr, self.net.prefix(None))
        self.broker.start()
        key = self.root / "key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        self.fence_dir.mkdir()
        for h in self.hosts:
            self.config_path(h).write_text(self.config_text(h))
            vm_dir = self.root / h / "vms"
            vm_dir.mkdir(parents=True)
            for vm in self.vms:
                (vm_dir / f"{vm.name}.yaml").write_text(
                    yaml.safe_dump(vm.model_dump(mode="json", exclude_defaults=True)))
        for h in self.hosts:
            self.start_agent(h)

    def config_text(self, host: str) -> str:
        assert self.broker is not None
        fence = f"{sys.executable} -m haguard.lab.fence"
        hosts = "".join(
            f"  - {{name: {h}, address: {self.net.addr(h)}, fence: {{kind: command, agent: '{fence}', "
            f"timeout_s: 10, options: {{plug: {h}, state_dir: '{self.fence_dir}', "
            f"run_dir: '{self.run_dir(h)}'}}}}}}\n" for h in self.hosts)
        d = self.root / host
        return (f"cluster: {self.cluster}\nhost: {host}\nhosts:\n{hosts}"
                f"key_file: {self.root / 'key'}\n"
                f"mqtt:\n  urls: ['{self.broker.url}']\n  keepalive_s: 2\n"
                "timing:\n" + "".join(f"  {k}: {v}\n" for k, v in TIMING.items()) +
                f"vm_dir: {d / 'vms'}\nrun_dir: {self.run_dir(host)}\nstate_dir: {d / 'state'}\n"
                "metrics: {enabled: false}\nha:\n  enabled: true\n")

    def start_agent(self, host: str) -> None:
        with open(self.log_file(host), "ab") as log:
            self.agents[host] = subprocess.Popen(
                [*self.net.prefix(host), *HAGUARD, "run", "--config", str(self.config_path(host)),
                 "--log-format", "json"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    # ---- observing ---------------------------------------------------------------------------

    def status(self, host: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.status_file(host).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def agent_alive(self, host: str) -> bool:
        proc = self.agents.get(host)
        return proc is not None and proc.poll() is None

    def fence_calls(self) -> list[str]:
        path = self.fence_dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def log_tail(self, host: str, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file(host).read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ---- acting -----------------------------------------------------------------------------

    def haguard(self, host: str, *args: str, capture: bool = True,
                timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        """`haguard ARGS --config HOST.yaml` inside `host` (its namespace, its agent)."""
        return subprocess.run([*self.net.prefix(host), *HAGUARD, *args, "--config",
                               str(self.config_path(host))], capture_output=capture, text=True,
                              timeout=timeout_s, env=self.env, check=False)

    def power_off(self, host: str) -> None:
        """A power cut: the link goes first (when it can), then the agent and every QEMU die."""
        if self.net.can_cut:
            self.net.cut(host)
        proc = self.agents.pop(host, None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in qemus_naming(str(self.run_dir(host))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # ---- tear-down ----------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:             # once reaped, its pid may be someone else's
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.agents.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.agents.clear()
        _kill_and_reap(qemus_naming(str(self.root)))    # agents never stop VMs: the lab does
        if self.broker is not None:
            self.broker.stop()
        self.net.down()
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_and_reap(pids: list[int], timeout_s: float = 5) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _running(p)]
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Not gone and not a zombie (a daemonized QEMU's reaper may be slow or absent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
