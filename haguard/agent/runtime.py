"""The agent: `haguard run`.  One task owns the core; adapters only enqueue facts.

    adapters (gossip, pings, probes, VM watchers, command results, timers)
        -> one bounded queue -> the core task: HostCore.step/tick -> execute outputs

The core task is the only one touching the `HostCore` (haguard/core/host.py).  Timers
(tick every 100 ms, a report every heartbeat interval) are queue items too, so the core
sees one ordered stream.  The adapters' loops run supervised (crash -> log, restart with
backoff) and beat the progress watchdog: systemd gets WATCHDOG=1 only while they all move.
The core task is not restarted: an exception escaping the core is a bug, and the core
may be half-updated, so the agent logs it with the input that caused it and exits
non-zero (crash-only); systemd starts it again from the persisted state, and the VMs,
which never depend on the agent, run on.

Signals: SIGHUP reloads the configuration (a bad file is logged and the old one
kept); SIGTERM/SIGINT publish "offline" and exit 0.  Stopping never touches a VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.adapters import metrics as metrics_mod
from haguard.adapters.alerts import AlertNotifier
from haguard.adapters.cluster_metrics import ClusterCollector
from haguard.adapters.directbeat import DirectBeats
from haguard.adapters.hostprobe import HostProber
from haguard.adapters.icmp import PeerPinger
from haguard.adapters.metrics import AgentMetrics
from haguard.adapters.mqtt import GossipTransport
from haguard.adapters.scheduling import raise_priority
from haguard.adapters.systemd import Notifier, ProgressWatchdog, summary
from haguard.adapters.vmwatch import VmWatcher, health_policy, live_pid, restart_in_place
from haguard.agent import supervise
from haguard.agent.control import ControlServer, control_path
from haguard.agent.derive import host_config, host_keys
from haguard.agent.durable import write_durably
from haguard.agent.executor import STATE_FILE, ClusterExecutor, load_persisted
from haguard.agent.reload import reloaded
from haguard.agent.status import status_path, write_status
from haguard.config.cluster import ClusterConfig, load_cluster_config
from haguard.config.yamlsrc import line_of
from haguard.core.alerts import Alert, BrokerLinksWatch, BrokerWatch, alerts_for
from haguard.core.cluster import paused
from haguard.core.cluster.campaign import HANDOVER_WAIT_MS
from haguard.core.cluster.selffence import DISARM_WAIT_MS
from haguard.core.cluster.types import AdminRequested, PersistState, StopRequested
from haguard.core.detector import BrokerConnectionChanged, IsolationChanged, PeerState, PeerStateChanged
from haguard.core.host import HostCore
from haguard.core.host_types import (
    EnvelopeReceived,
    HandoverEnded,
    HostInput,
    HostOutput,
    MessageRejected,
    ShutdownDrainEnded,
    ShutdownDrainProgress,
    ShutdownDrainRequested,
    WatchdogDisarmAllowed,
    WatchdogDisarming,
)
from haguard.core.hostkeys import key_id, parse_private, public_text, signer_of
from haguard.core.probes import HostHealthChanged
from haguard.core.vmhealth import (
    ReportVmForRelocation,
    RestartVmInPlace,
    VmExpected,
    VmRestartFailed,
    VmState,
    VmStateChanged,
)
from haguard.core.wire import Envelope
from haguard.errors import ConfigError
from haguard.logs import configure_logging
from haguard.migration import tls as migration_tls
from haguard.vm import launcher
from haguard.vm.definition import VmDefinition
from haguard.vm.inventory import load_inventory

log = structlog.get_logger("haguard.agent")

QUEUE_SIZE = 4096
TICK_S = 0.1
STATE_EVERY_S = 5.0           # the retained "state" is information: refresh it now and then
# Beyond a full mesh every host's state reaches every host: at 1,000 hosts a refresh every
# 60 s is 17 messages a second each, every 5 s would be 200.
STATE_EVERY_BOUNDED_S = 60.0
STATUS_EVERY_S = 1.0          # the status file, when nothing changed
SYSTEMD_STATUS_EVERY_S = 3.0
VM_RESCAN_S = 3.0
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_CORE_BUG = 70                         # EX_SOFTWARE: an exception escaped the core
UNDRAIN_AT_START = "undrain-at-start"      # left by a drain before stop


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def system_shutting_down() -> bool:
    """True while systemd takes the machine down (poweroff, reboot), not for a service restart."""
    try:
        out = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "stopping"


def vm_poll_interval_s(hung_timeout_ms: int) -> float:
    """How often a VM's watch monitor is asked: half the hung timeout, so a healthy VM
    answers at least twice per timeout, within 0.2..2 s (each poll costs the agent CPU)."""
    return min(2.0, max(0.2, hung_timeout_ms / 2000))


# ---- configuration and secrets ----------------------------------------------------------

def check_secret(path: Path, what: str, config_path: Path) -> bytes:
    """Read a secret file, refusing one that every user can read."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", file=str(config_path),
                          line=line_of(config_path, tuple(what.split("."))), field=what) from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(f"{path} is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}): "
                          f"chmod o-r {path}", file=str(path), field=what)
    return data


def validate_agent_config(cfg: ClusterConfig, path: Path) -> str:
    """What the schema cannot check: this host is known, addresses are IPs; returns our name."""
    try:
        me = cfg.this_host().name
    except ValueError as exc:
        raise ConfigError(str(exc), file=str(path), line=line_of(path, ("host",)), field="host") from None
    for i, h in enumerate(cfg.hosts):
        try:
            ipaddress.ip_address(h.address)
        except ValueError:
            raise ConfigError(f"{h.address!r} is not an IP address", file=str(path),
                              line=line_of(path, ("hosts", i, "address")),
                              field=f"hosts[{i}].address") from None
    return me


def read_key(cfg: ClusterConfig, path: Path) -> bytes:
    key = check_secret(cfg.key_file, "key_file", path).strip()
    if cfg.mqtt.password_file is not None:
        check_secret(cfg.mqtt.password_file, "mqtt.password_file", path)
    read_host_key(cfg, path)
    tls_dir = cfg.ha.migration_tls_dir
    if tls_dir is not None and (problems := migration_tls.problems(tls_dir)):
        raise ConfigError(f"{problems[0]} (ha.migration_tls_dir)", file=str(path),
                          line=line_of(path, ("ha", "migration_tls_dir")), field="ha.migration_tls_dir")
    return key


def read_host_key(cfg: ClusterConfig, path: Path) -> Ed25519PrivateKey | None:
    """This host's own signing key (None without `host_key_file`), checked against its
    `public_keys`: a key the others do not know would get every message refused."""
    me = cfg.this_host()
    if cfg.host_key_file is None:
        if me.public_keys and cfg.require_host_keys:
            i = cfg.hosts.index(me)
            raise ConfigError("this host has public_keys but no host_key_file: every other host would refuse "
                              "its messages", file=str(path), line=line_of(path, ("hosts", i)),
                              field=f"hosts[{i}].public_keys")
        return None
    try:
        key = parse_private(check_secret(cfg.host_key_file, "host_key_file", path).decode("ascii", "replace"))
    except ValueError as exc:
        raise ConfigError(f"{cfg.host_key_file}: {exc} (write one with `haguard keygen`)", file=str(path),
                          line=line_of(path, ("host_key_file",)), field="host_key_file") from None
    if public_text(key) not in me.public_keys:
        i = cfg.hosts.index(me)
        raise ConfigError(f"the public key of {cfg.host_key_file} ({public_text(key)}) is not among "
                          f"this host's public_keys", file=str(path),
                          line=line_of(path, ("hosts", i)), field=f"hosts[{i}].public_keys")
    return key


def next_incarnation(state_dir: Path, wall_ms: int | None = None) -> int:
    """The previous incarnation + 1, persisted before use (a restart must never reuse one).

    Without a counter (a new host, or a lost state_dir) the count starts at the wall clock in
    milliseconds: peers remember this host's last incarnation and drop anything older as a
    replay, and a clock-based start is above any count a host reaches by restarting."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "incarnation"
    try:
        current = int(path.read_text().strip() or 0) + 1
    except FileNotFoundError:
        current = max(1, wall_ms if wall_ms is not None else time.time_ns() // 1_000_000)
        log.warning("incarnation-counter-missing", path=str(path), starting_at=current)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the incarnation counter: {exc}", file=str(path)) from None
    write_durably(path, f"{current}\n")
    return current


def load_vms(cfg: ClusterConfig) -> dict[str, VmDefinition]:
    if not cfg.vm_dir.is_dir():
        return {}
    return load_inventory(cfg.vm_dir)


# ---- queue items that are not core inputs ---------------------------------------------

@dataclass(frozen=True)
class _Tick:
    now_ms: int


@dataclass(frozen=True)
class _Heartbeat:
    pass


@dataclass(frozen=True)
class _Apply:
    cfg: ClusterConfig
    vms: dict[str, VmDefinition]
    own_key: Ed25519PrivateKey | None


@dataclass(frozen=True)
class _InjectedFault:
    """Tests only (HAGUARD_FAULT_INJECTION=1): the core task fails as on a bug in the core."""


_Item = HostInput | _Tick | _Heartbeat | _Apply | _InjectedFault
FAULT_INJECTION = "HAGUARD_FAULT_INJECTION"


class Agent:
    def __init__(self, config_path: Path, cfg: ClusterConfig, key: bytes, incarnation: int,
                 vms: dict[str, VmDefinition], notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.vms = vms
        self.me = cfg.this_host().name
        self.incarnation = incarnation
        self.notifier = notifier or Notifier()
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.started_ms = monotonic_ms()
        persisted = load_persisted(cfg.state_dir / STATE_FILE) if cfg.ha.enabled else None
        if cfg.ha.enabled and persisted is None:
            # A new host, or a lost state_dir: the core abstains from voting for a while.
            log.warning("cluster-state-missing", path=str(cfg.state_dir / STATE_FILE))
        self.own_key = read_host_key(cfg, config_path)
        self.signer = signer_of(self.own_key) if self.own_key is not None else None
        self.core = HostCore(host_config(cfg, vms, health_policy=health_policy(cfg.vm_restart),
                                         signer=self.signer),
                             incarnation=incarnation, now_ms=self.started_ms, persisted=persisted)
        self.status_file = status_path(cfg.run_dir)
        signer, verified = self.signer, host_keys(cfg)
        self.transport = GossipTransport(cfg.mqtt, cluster=cfg.cluster, host=self.me,
                                         incarnation=incarnation, key=key, signer=signer, host_keys=verified,
                                         require_host_keys=cfg.require_host_keys,
                                         on_envelope=self._on_envelope, on_reject=self._on_reject,
                                         on_connection=self._on_connection)
        self.pinger = PeerPinger.from_timing(self._peer_addresses(cfg), self._offer, cfg.timing)
        self._targets: tuple[frozenset[str] | None, frozenset[str] | None] = (None, None)
        # Cluster mode: signed beats straight between hosts are the evidence of reachability.
        self.beats: DirectBeats | None = None
        if cfg.ha.enabled:
            t = cfg.timing
            self.beats = DirectBeats(me=self.me, cluster=cfg.cluster, incarnation=incarnation, key=key,
                                     signer=signer, host_keys=verified,
                                     require_host_keys=cfg.require_host_keys,
                                     address=cfg.this_host().address, port=cfg.ha.direct_port,
                                     peers=self._peer_addresses(cfg), on_result=self._offer,
                                     interval_ms=t.ping_interval_ms,
                                     window_ms=2 * t.ping_interval_ms + t.ping_timeout_ms)
        self.metrics = AgentMetrics()
        for peer in self._peer_addresses(cfg):
            self.metrics.set_peer_state(peer, str(PeerState.UNKNOWN))
        self.alerts = AlertNotifier(cfg.alerts, cluster=cfg.cluster, host=self.me,
                                    publish=self.transport.publish, metrics=self.metrics)
        self.broker_watch = BrokerWatch(self.me, int(cfg.alerts.broker_unreachable_after_s * 1000),
                                        self.started_ms)
        self.broker_links = BrokerLinksWatch(self.me, int(cfg.alerts.broker_unreachable_after_s * 1000))
        # Cluster mode: the coordinator decides where the inventory's VMs run.
        self.cluster: ClusterExecutor | None = None
        if cfg.ha.enabled:
            self.cluster = ClusterExecutor(cfg, vms, publish=self.transport.publish, offer=self._offer,
                                           alert=self._raise_alert, clock=monotonic_ms, rescan=self._scan_vms,
                                           may_receive=self.core.may_receive,
                                           nothing_here=self._nothing_here)
        self.cluster_rejected = 0
        self.needs_restart: list[str] = []         # changed in the file, kept as running until a restart
        self.fault_injection = os.environ.get(FAULT_INJECTION) == "1"
        self.exit_code = EXIT_OK
        self._drained: asyncio.Future[ShutdownDrainEnded] | None = None
        self._drain_left: tuple[str, ...] = ()
        self._disarm_allowed = asyncio.Event()
        self._handed_over = asyncio.Event()
        self.control = ControlServer(control_path(cfg.run_dir), self._control)
        loops = ["core", "tick", "heartbeat"]
        stale_s = max(5.0, 3 * cfg.timing.dead_timeout_ms / 1000)
        self.watchdog = ProgressWatchdog(self.notifier, loops, stale_s)
        self.stopping = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.side_tasks: set[asyncio.Task[Any]] = set()
        self.ready = False
        self.dropped = 0
        self.rejected = 0
        self._last_state_s = 0.0
        self._last_status_s = 0.0
        self._status_changed = True
        self._status: dict[str, Any] | None = None  # what the status file last said
        self.metrics.registry.register(ClusterCollector(lambda: self._status))
        self._last_sd_status_s = 0.0

    @staticmethod
    def _peer_addresses(cfg: ClusterConfig) -> dict[str, str]:
        me = cfg.this_host().name
        return {h.name: h.address for h in cfg.hosts if h.name != me}

    # ---- adapters -> queue (never block, never touch the node) --------------------------

    def _offer(self, item: _Item) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("queue-full", dropped=self.dropped, item=type(item).__name__)

    def _on_envelope(self, env: Envelope) -> None:
        self.metrics.gossip_message("received")
        if env.kind == "direct" and env.body.get("rpc") in ("request", "reply"):
            if self.cluster is not None:        # migration requests bypass the queue (executor.py)
                self.cluster.on_rpc(env.host, dict(env.body))
            return
        self._offer(EnvelopeReceived(host=env.host, incarnation=env.incarnation, kind=env.kind,
                                     body=env.body, now_ms=monotonic_ms()))

    def _nothing_here(self) -> bool:
        member = self.core.member
        return member is None or not member.local.vms

    def _on_reject(self, topic: str, reason: str) -> None:
        self.rejected += 1        # the transport logs each one
        self.metrics.gossip_message("rejected")

    def _on_connection(self, connected: bool, detail: str) -> None:
        log.info("broker", connected=connected, detail=detail)
        self._offer(BrokerConnectionChanged(connected=connected, now_ms=monotonic_ms()))

    # ---- the core task -------------------------------------------------------------------

    async def _core(self) -> None:
        """The core task.  Not supervised: an exception escaping the core is a bug, and the
        core may be half-updated; the agent exits non-zero and systemd starts it afresh."""
        item: _Item | None = None
        try:
            while True:
                item = await self.queue.get()
                self.watchdog.beat("core")
                for out in self._take(item):
                    if isinstance(out, PersistState) and self.cluster is not None:
                        # In a thread: a slow fsync must not stall the loop's other work
                        # (broker keepalives, status, probes); what follows waits for it.
                        await self.cluster.persist(out)
                    else:
                        self._execute(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("core-crashed", error=f"{type(exc).__name__}: {exc}", input=repr(item)[:4000],
                         exc_info=True)
            self.exit_code = EXIT_CORE_BUG
            self.stopping.set()

    def _take(self, item: _Item) -> list[HostOutput]:
        """The core's outputs for one queued item, in the order they must be executed."""
        match item:
            case _Tick():
                outputs = self.core.tick(item.now_ms)
                self._retarget_pings()
                links = self.transport.links_up()
                for alert in self.broker_watch.tick(item.now_ms) + self.broker_links.tick(links, item.now_ms):
                    self.alerts.raise_alert(alert)
                for url, up in links.items():
                    self.metrics.broker_link_up.labels(url=url).set(1 if up else 0)
                if self.cluster is not None:
                    self.cluster.tick()
            case _Heartbeat():
                self._heartbeat()
                return []
            case _Apply():
                self._apply(item.cfg, item.vms, item.own_key)
                return []
            case _InjectedFault():
                raise RuntimeError("injected core fault (HAGUARD_FAULT_INJECTION)")
            case BrokerConnectionChanged():
                self.metrics.broker_connected.set(1 if item.connected else 0)
                for alert in self.broker_watch.observe(item.connected, item.now_ms):
                    self.alerts.raise_alert(alert)
                outputs = self.core.step(item)
            case _:
                outputs = self.core.step(item)
        return outputs

    def _execute(self, out: HostOutput) -> None:
        if isinstance(out, PeerStateChanged | IsolationChanged | VmStateChanged | HostHealthChanged):
            self._status_changed = True  # the status file shows it at the next heartbeat
        for alert in alerts_for(out, me=self.me):
            self.alerts.raise_alert(alert)
        match out:
            case PeerStateChanged():
                level = log.warning if out.new in (PeerState.DEAD, PeerState.AGENT_DOWN) else log.info
                level("peer-state", host=out.host, old=str(out.old), new=str(out.new), reason=out.reason)
                self.metrics.set_peer_state(out.host, str(out.new))
                if out.new is PeerState.DEAD:
                    self._record_detection(out.host, out.now_ms)
            case IsolationChanged():
                log.warning("isolation", isolated=out.isolated, reason=out.reason)
                self.metrics.isolated.set(1 if out.isolated else 0)
            case VmStateChanged():
                level = log.warning if out.new in (VmState.CRASHED, VmState.HUNG) else log.info
                level("vm-state", vm=out.vm, old=str(out.old), new=str(out.new), reason=out.reason)
                self.metrics.set_vm_state(out.vm, str(out.new))
            case HostHealthChanged():
                log.warning("host-health", health=out.new.summary())
            case RestartVmInPlace():
                self._spawn(self._restart(out), f"restart-{out.vm}")
            case ReportVmForRelocation():
                # The alert (journal, MQTT, webhooks) is raised above.
                log.error("vm-relocation-needed", vm=out.vm, reason=out.reason)
            case MessageRejected():
                self.cluster_rejected += 1
                log.warning("cluster-message-rejected", sender=out.sender, kind=out.kind, reason=out.reason)
            case ShutdownDrainProgress(left=left):
                self._drain_left = left
            case ShutdownDrainEnded():
                if self._drained is not None and not self._drained.done():
                    self._drained.set_result(out)
            case WatchdogDisarmAllowed():
                self._disarm_allowed.set()
            case HandoverEnded(successor=successor):
                log.info("handover-ended", successor=successor)
                self._handed_over.set()
            case _:
                if self.cluster is not None:
                    self.cluster.execute(out)

    def _raise_alert(self, alert: Alert) -> None:
        self.alerts.raise_alert(alert)

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """An operator's request on the control socket (`haguard drain|undrain HOST`,
        `haguard migrate VM --to HOST`, `haguard confirm-off HOST`, `haguard fence HOST`,
        `haguard maintenance on|off`)."""
        action, host, vm = request.get("action"), request.get("host"), request.get("vm", "")
        if action == "inject-core-fault" and self.fault_injection:
            log.warning("core-fault-injected")
            await self.queue.put(_InjectedFault())
            return {"ok": True}
        if action not in ("drain", "undrain", "migrate", "confirm-off", "fence", paused.ON, paused.OFF):
            return {"ok": False, "error": f"unknown action {str(action)[:40]!r}"}
        if self.cluster is None:
            return {"ok": False, "error": "this agent does not run in cluster mode (ha.enabled)"}
        if action in (paused.ON, paused.OFF):
            host = paused.CLUSTER                       # cluster-wide
        elif not isinstance(host, str) or self.cfg.peer(host) is None:
            return {"ok": False, "error": f"unknown host {str(host)[:60]!r}"}
        if action == "migrate" and (not isinstance(vm, str) or self.core.member is None
                                    or vm not in self.core.member.config.vms):
            return {"ok": False, "error": f"VM {str(vm)[:60]!r} is not in the cluster's inventory"}
        if action == "confirm-off" and host == self.me:
            return {"ok": False, "error": "a host cannot confirm itself off: run it on another host"}
        log.warning("admin-request", action=action, host=host, vm=vm or None)
        await self.queue.put(AdminRequested(action=action, host=host, vm=str(vm), now_ms=monotonic_ms()))
        return {"ok": True}

    def _record_detection(self, host: str, now_ms: int) -> None:
        # Only on a death (rare): the detector's views are built on demand.
        view = next((v for v in self.core.detector.views() if v.host == host), None)
        if view is not None and view.last_gossip_ms is not None:
            self.metrics.record_detection((now_ms - view.last_gossip_ms) / 1000)

    async def _restart(self, cmd: RestartVmInPlace) -> None:
        log.warning("vm-restart", vm=cmd.vm, attempt=cmd.attempt, reason=cmd.reason)
        vm = self.vms.get(cmd.vm)
        if vm is None:
            result: Any = VmRestartFailed(vm=cmd.vm, now_ms=monotonic_ms(),
                                          reason="not in the VM inventory")
        else:
            result = await restart_in_place(vm, self.cfg.run_dir, kill_existing=cmd.kill_existing,
                                            clock=monotonic_ms)
        if isinstance(result, VmRestartFailed):
            log.error("vm-restart-failed", vm=cmd.vm, reason=result.reason)
        await self.queue.put(result)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)

    def _retarget_pings(self, *, force: bool = False) -> None:
        """Ping the peers the core watches (O(N) pings in a large cluster, not O(N^2)) and
        send signed beats to the ones it asks for (every host up to `direct_mesh`)."""
        targets = self.core.targets()
        if targets == self._targets and not force:
            return
        self._targets = targets
        peers = self._peer_addresses(self.cfg)
        pinged, beaten = targets
        self.pinger.set_peers(peers if pinged is None else {h: a for h, a in peers.items() if h in pinged})
        if self.beats is not None:
            self.beats.set_targets(set(peers) if beaten is None else set(beaten))

    def _heartbeat(self) -> None:
        now = monotonic_ms()
        body = self.core.report(now)
        bounded = self.core.bounded()
        # Beyond a full mesh the node heartbeat (a report for the status view) would reach
        # every host: it goes only in the retained state, and more rarely.
        sent = self.transport.connected if bounded else self.transport.publish("heartbeat", body)
        if sent and not bounded:
            self.metrics.gossip_message("sent")
        wall = time.monotonic()
        every = STATE_EVERY_BOUNDED_S if bounded else STATE_EVERY_S
        if sent and wall - self._last_state_s >= every:
            self._last_state_s = wall
            if self.transport.publish("state", body):
                self.metrics.gossip_message("sent")
        # With many VMs the status file is a large part of the agent's work: write it when
        # a state changed, else once per STATUS_EVERY_S (its age is shown by `haguard status`).
        if self._status_changed or wall - self._last_status_s >= STATUS_EVERY_S:
            self._status_changed, self._last_status_s = False, wall
            self._status = data = self.core.status(now, body)
            if self.cluster is not None:
                self.cluster.status(data["cluster"])
                data["cluster"]["rejected"] = self.cluster_rejected
            data["pinged"] = sorted(self.pinger.peers)
            if self.beats is not None:
                data["cluster"]["beats_rejected"] = self.beats.rejected
            data["node_heartbeats"] = not bounded
            data["brokers"] = self.transport.links_up()
            data["gossip_duplicates"] = self.transport.duplicates
            data["host_key"] = key_id(self.own_key) if self.own_key is not None else None
            data.update(written_at=time.time(), incarnation=self.incarnation, pid=os.getpid(),
                        ready=self.ready, dropped=self.dropped, rejected=self.rejected,
                        config_needs_restart=self.needs_restart)
            try:
                write_status(self.status_file, data)
            except OSError as exc:
                log.warning("status-file-failed", path=str(self.status_file), error=str(exc))
        if not self.ready:
            waited = now - self.started_ms
            if sent:
                self._set_ready("joined")
            elif waited >= 2 * self.cfg.timing.dead_timeout_ms:
                self._set_ready("no broker yet")
        if wall - self._last_sd_status_s >= SYSTEMD_STATUS_EVERY_S:
            self._last_sd_status_s = wall
            self.notifier.status(self.summary(self._status or self.core.status(now, body)))

    def _set_ready(self, how: str) -> None:
        self.ready = True
        line = self.summary(self.core.status(monotonic_ms()))
        log.info("agent-ready", how=how, status=line)
        self.notifier.ready(f"{how}: {line}")

    def summary(self, data: dict[str, Any]) -> str:
        hosts = data["hosts"]
        alive = sum(1 for h in hosts if h["state"] == "alive")
        running = sum(1 for v in data["vms"] if v["host"] == self.me and v["state"] == "running")
        return summary(hosts=f"{alive}/{len(hosts)} alive", vms_running=running,
                       broker="up" if data["broker"] else "down",
                       isolated="yes" if data["isolated"] else None)

    # ---- timers and watchers ---------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.watchdog.beat("tick")
            self._offer(_Tick(monotonic_ms()))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.queue.put(_Heartbeat())
            self.watchdog.beat("heartbeat")
            await asyncio.sleep(self.cfg.timing.heartbeat_interval_ms / 1000)

    async def _vm_scan_loop(self) -> None:
        while True:
            self._scan_vms()
            await asyncio.sleep(VM_RESCAN_S)

    def _scan_vms(self) -> None:
        base = self.cfg.run_dir
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(base.iterdir()):
                name = entry.name
                if name.startswith(".") or not entry.is_symlink() or name in self.watchers:
                    continue
                if live_pid(launcher.current_paths(name, base)) is None:
                    continue
                log.info("vm-watch", vm=name, owned=name in self.vms)
                self._offer(VmExpected(vm=name, should_run=self._restart_locally(name, self.vms)))
                watcher = VmWatcher(name, base, self._offer, clock=monotonic_ms,
                                    interval_s=vm_poll_interval_s(self.cfg.vm_restart.hung_timeout_ms))
                self.watchers[name] = supervise.start(f"vmwatch-{name}", watcher.run)

    def _restart_locally(self, name: str, vms: dict[str, VmDefinition]) -> bool:
        # In cluster mode the cluster core restarts (or relocates) VMs: never both.
        return name in vms and self.cluster is None

    def _start_prober(self) -> None:
        old = self.tasks.pop("probes", None)
        if old is not None:
            old.cancel()
        if self.cfg.probes:
            prober = HostProber(self.cfg.probes, self._offer, clock=monotonic_ms)
            self.tasks["probes"] = supervise.start("probes", prober.run)

    # ---- reload ------------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._spawn(self._reload(), "reload")

    async def _reload(self) -> None:
        self.notifier.reloading()
        try:
            cfg = load_cluster_config(self.config_path)
            me = validate_agent_config(cfg, self.config_path)
            if me != self.me:
                raise ConfigError(f"this host's name changed ({self.me} -> {me}): restart the agent",
                                  file=str(self.config_path), field="host")
            read_key(cfg, self.config_path)
            own = read_host_key(cfg, self.config_path)
            vms = load_vms(cfg)
        except ConfigError as exc:
            log.error("config-reload-failed", error=str(exc), file=exc.file, line=exc.line,
                      field=exc.field)
            self.notifier.ready(f"reload failed, old configuration kept: {exc}")
            return
        await self.queue.put(_Apply(cfg, vms, own))

    def _apply(self, cfg: ClusterConfig, vms: dict[str, VmDefinition], own: Ed25519PrivateKey | None) -> None:
        # What must wait for a restart keeps its running value (agent/reload.py).
        change = reloaded(cfg, self.cfg, cluster_mode=self.cluster is not None, own_new=own,
                          own_old=self.own_key)
        cfg, needs_restart = change.cfg, change.needs_restart
        self._rekey(cfg, change.own_key)
        if self.cluster is not None and vms != self.vms:
            # Every agent must plan with the same VMs: the cluster keeps its own until a restart.
            needs_restart.append("vm_dir (the cluster's VMs)")
            vms = self.vms
        self.needs_restart = needs_restart
        self.core.reconfigure(host_config(cfg, vms, health_policy=health_policy(cfg.vm_restart),
                                          signer=self.signer),
                              monotonic_ms())
        self.pinger.set_peers(self._peer_addresses(cfg))
        for gone in set(self._peer_addresses(self.cfg)) - set(self._peer_addresses(cfg)):
            self.metrics.forget_peer(gone)
        for peer in set(self._peer_addresses(cfg)) - set(self._peer_addresses(self.cfg)):
            self.metrics.set_peer_state(peer, str(PeerState.UNKNOWN))
        self.pinger.interval_ms = cfg.timing.ping_interval_ms
        self.pinger.timeout_ms = cfg.timing.ping_timeout_ms
        probes_changed = cfg.probes != self.cfg.probes
        # Ownership follows the inventory for the VMs running here.
        for name in self.watchers:
            if (name in vms) != (name in self.vms):
                self._offer(VmExpected(vm=name, should_run=self._restart_locally(name, vms)))
        self.cfg, self.vms = cfg, vms
        self._retarget_pings(force=True)
        if probes_changed:
            self._start_prober()
        log.info("config-reloaded", peers=sorted(self._peer_addresses(cfg)),
                 timing=cfg.timing.model_dump(), probes=[p.name for p in cfg.probes])
        if needs_restart:
            log.warning("config-needs-restart", fields=needs_restart, kept="the running values")
        self.notifier.ready(self.summary(self.core.status(monotonic_ms())))

    def _rekey(self, cfg: ClusterConfig, own: Ed25519PrivateKey | None) -> None:
        """Sign with `own` and check peers against `cfg`'s public keys from now on (a rotation)."""
        def spelled(c: ClusterConfig, k: Ed25519PrivateKey | None) -> tuple[object, ...]:
            return (k and public_text(k), [(h.name, h.public_keys) for h in c.hosts])

        if spelled(cfg, own) == spelled(self.cfg, self.own_key):
            return
        verified = host_keys(cfg)
        self.own_key, self.signer = own, signer_of(own) if own is not None else None
        self.transport.rekey(self.signer, verified)
        if self.beats is not None:
            self.beats.rekey(self.signer, verified)
        log.info("host-keys-reloaded", own=key_id(own) if own is not None else None,
                 keys={h: [key_id(k) for k in ks] for h, ks in verified.items()})

    # ---- life cycle --------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info("agent-started", host=self.me, cluster=self.cfg.cluster, incarnation=self.incarnation,
                 peers=sorted(self._peer_addresses(self.cfg)), status_file=str(self.status_file))
        self._offer(BrokerConnectionChanged(connected=False, now_ms=monotonic_ms()))
        self.tasks["core"] = asyncio.create_task(self._core(), name="core")
        loops = [("tick", self._tick_loop), ("heartbeat", self._heartbeat_loop),
                 ("gossip", self.transport.run), ("ping", self.pinger.run), ("vm-scan", self._vm_scan_loop),
                 ("watchdog", self.watchdog.run), ("alerts", self.alerts.run)]
        if self.beats is not None:
            loops.append(("beats", self.beats.run))
        for name, factory in loops:
            self.tasks[name] = supervise.start(name, factory)
        self._serve_metrics()
        self._start_prober()
        await self.control.start()
        marker = self.cfg.state_dir / UNDRAIN_AT_START
        if self.cluster is not None and marker.exists():
            log.warning("undrain-after-restart", host=self.me)
            self._offer(AdminRequested(action="undrain", host=self.me, now_ms=monotonic_ms()))
            marker.unlink(missing_ok=True)
        try:
            await self.stopping.wait()
            if (self.cluster is not None and self.exit_code == EXIT_OK
                    and await asyncio.to_thread(self._drain_on_stop)):
                await self._drain_before_stop()
        finally:
            await self._shutdown()
        return self.exit_code

    def _drain_on_stop(self) -> bool:
        policy = self.cfg.ha.migrate_on_shutdown
        if policy == "always":
            return True
        return policy == "system-shutdown" and system_shutting_down()

    async def _drain_before_stop(self) -> None:
        """migrate-on-shutdown: the core puts this host in maintenance and says when no VM is
        left here (or that it cannot be done); systemd's stop timeout is extended meanwhile."""
        limit_s = self.cfg.ha.shutdown_timeout_s
        log.warning("drain-before-stop", host=self.me, timeout_s=limit_s)
        self._drained = asyncio.get_running_loop().create_future()
        await self.queue.put(ShutdownDrainRequested(timeout_ms=int(limit_s * 1000), now_ms=monotonic_ms()))
        while not self._drained.done():
            left = self._drain_left
            self.notifier.notify("EXTEND_TIMEOUT_USEC=15000000",
                                 f"STATUS=stopping: moving {len(left)} VMs away ({', '.join(left[:5])})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout=5)
            if self.tasks["core"].done():
                return                          # the core is gone: nothing will be drained
        ended = self._drained.result()
        if ended.drained:
            log.warning("drained-before-stop", host=self.me, took_s=round(ended.took_ms / 1000, 1))
            # The next start takes the host out of maintenance again (a reboot is not a retirement).
            with contextlib.suppress(OSError):
                (self.cfg.state_dir / UNDRAIN_AT_START).write_text(f"{self.me}\n")
        elif ended.reason == "no coordinator":
            log.error("drain-before-stop-impossible", host=self.me, reason="no coordinator",
                      left=list(ended.left))
        else:
            log.error("drain-before-stop-timeout", host=self.me, left=list(ended.left))

    def _serve_metrics(self) -> None:
        """The metrics endpoint; a failure to bind is logged, never fatal (the agent matters more)."""
        metrics_mod.install(self.metrics)
        if not self.cfg.metrics.enabled:
            return
        host, port = self.cfg.metrics.address
        try:
            self.metrics.serve(host, port)
        except OSError as exc:
            log.error("metrics-failed", listen=self.cfg.metrics.listen, error=exc.strerror or str(exc))
            return
        log.info("metrics-listening", listen=f"{host}:{self.metrics.port}")

    async def _may_disarm(self) -> bool:
        """A clean stop disarms the watchdog once the cluster knows it is no longer a fence for
        this host (else a VM could run here and on its new host at once).  Without an answer
        in time, a host with VMs keeps it armed: better reset than run a VM twice."""
        assert self.cluster is not None
        if not self.cluster.watchdog_open():
            return False
        if self.tasks.get("core") is None or self.tasks["core"].done():
            return self._nothing_here()
        await self.queue.put(WatchdogDisarming(now_ms=monotonic_ms()))
        try:
            await asyncio.wait_for(self._disarm_allowed.wait(), timeout=DISARM_WAIT_MS / 1000)
        except TimeoutError:
            return self._nothing_here()
        return True

    async def _hand_over(self) -> None:
        """A coordinator names its successor and waits until it leads (campaign.py), so that
        followers see a new coordinator within a round trip instead of after a lapsed lease."""
        if self.tasks.get("core") is None or self.tasks["core"].done():
            return
        await self.queue.put(StopRequested(now_ms=monotonic_ms()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._handed_over.wait(), timeout=HANDOVER_WAIT_MS / 1000 + 1)

    async def _shutdown(self) -> None:
        log.info("agent-stopping", host=self.me)
        await asyncio.to_thread(self.metrics.close)     # waits for its serving thread
        metrics_mod.install(None)
        self.notifier.stopping("stopping: VMs keep running")
        # Peers learn at once; VMs are left alone (watchers are only cancelled).
        await self.control.close()
        if self.cluster is not None:
            disarm = await self._may_disarm()
            await self._hand_over()
            await self.cluster.close(disarm=disarm)
        await self.transport.stop(timeout_s=3.0)
        tasks = [*self.tasks.values(), *self.watchers.values(), *self.side_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("agent-stopped", host=self.me)


async def run_agent(config_path: Path, log_format: str = "auto", log_level: str = "info") -> int:
    try:
        cfg = load_cluster_config(config_path)
        me = validate_agent_config(cfg, config_path)
        key = read_key(cfg, config_path)
        vms = load_vms(cfg)
        incarnation = next_incarnation(cfg.state_dir)
    except ConfigError as exc:
        print(f"haguard: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(log_format, log_level, host=me)
    # Before any thread starts: they inherit it (the heartbeat path must not wait behind vCPUs).
    log.info("scheduling", runs_at=raise_priority(cfg.scheduling.realtime_priority))
    try:
        agent = Agent(config_path, cfg, key, incarnation, vms)
    except (ConfigError, ValueError) as exc:
        print(f"haguard: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return await agent.run()
