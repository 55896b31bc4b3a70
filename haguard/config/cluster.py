"""The cluster configuration: who the hosts are, how they talk, how fast they judge.

One YAML file (default /etc/haguard/cluster.yaml), validated on load; an error names
the file, line and field.  Secrets (the cluster key, the MQTT password) live in
their own files, referenced by path, so the main file can be world-readable.

Numbers are taken as written: an integer field refuses `true`, `2.0` and "2" (pydantic's lax
mode would read them as 1 and 2), a float field refuses booleans and strings, and no field
takes .inf or .nan.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from haguard.config.yamlsrc import error_at, load_model
from haguard.core.hostkeys import parse_public
from haguard.names import NAME_RE

DEFAULT_CLUSTER_CONFIG = Path("/etc/haguard/cluster.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FenceDevice(_Strict):
    """How to power a host off.  `agent`: a standard fence agent (fence_ipmilan, fence_redfish,
    ...) given its options as key=value lines on stdin; `command`: any program, same protocol."""

    kind: Literal["agent", "command"] = "agent"
    agent: str                              # program name or path
    options: dict[str, str] = {}            # e.g. ip, username, lanplus
    password_file: Path | None = None       # read at fence time, passed on stdin only
    timeout_s: StrictFloat = Field(default=60.0, gt=0)


def _fence_form(value: object) -> str:
    return "Levels" if isinstance(value, list | tuple) else "Device"


# One device or a list, told apart by the YAML's shape, so an error names the right one (the
# tags are upper case: left out of the field path, config/yamlsrc.py).
FenceLevels = Annotated[
    Annotated[FenceDevice, Tag("Device")] | Annotated[tuple[FenceDevice, ...], Tag("Levels")],
    Discriminator(_fence_form)]


class HostConfig(_Strict):
    name: str = Field(pattern=NAME_RE)
    address: str                            # for ping and migration traffic
    # One device, or several tried in order until one powers the host off (fencing levels,
    # as Pacemaker's fencing topology: e.g. the BMC, then a switched PDU).
    fence: FenceLevels | None = None
    memory_mib: StrictInt | None = Field(default=None, gt=0)   # capacity override
    vcpus: StrictInt | None = Field(default=None, gt=0)
    group: str | None = None
    priority: StrictInt = 0                 # placement and coordinator preference
    weight: StrictInt = Field(default=1, ge=0, le=100)    # votes towards quorum
    witness: bool = False                   # votes, runs no VMs (a two-host cluster's tie-breaker)
    # Its Ed25519 public keys (base64, `haguard keygen`): its messages must be signed with one
    # (core/hostkeys.py).  Several while its key is rotated.
    public_keys: tuple[str, ...] = ()

    @field_validator("fence")
    @classmethod
    def _fence_levels(cls, v: FenceLevels | None) -> FenceLevels | None:
        if isinstance(v, tuple) and not v:
            raise ValueError("an empty list of fence devices: leave `fence` out instead")
        return v

    @property
    def fence_devices(self) -> tuple[FenceDevice, ...]:
        """The host's fence devices, in the order they are tried."""
        if self.fence is None:
            return ()
        return self.fence if isinstance(self.fence, tuple) else (self.fence,)

    @field_validator("public_keys")
    @classmethod
    def _public_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, text in enumerate(v):
            try:
                parse_public(text)
            except ValueError as exc:
                raise ValueError(f"public key {i + 1}: {exc}") from None
        return v


class TlsConfig(_Strict):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False


class MqttConfig(_Strict):
    # Several URLs: brokers of their own, all used at once (adapters/mqtt.py); not bridged.
    urls: tuple[str, ...] = Field(min_length=1)
    topic_prefix: str = "haguard"
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive_s: StrictInt = Field(default=5, ge=1, le=600)

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("mqtt", "mqtts") or not rest:
                raise ValueError(f"{url!r}: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        return v


class TimingConfig(_Strict):
    heartbeat_interval_ms: StrictInt = Field(default=300, ge=50)
    suspect_timeout_ms: StrictInt = Field(default=900, ge=100)
    dead_timeout_ms: StrictInt = Field(default=1500, ge=100)
    ping_interval_ms: StrictInt = Field(default=250, ge=50)
    ping_timeout_ms: StrictInt = Field(default=200, ge=10)
    isolation_timeout_ms: StrictInt = Field(default=5000, ge=100)

    @model_validator(mode="after")
    def _ordered(self) -> TimingConfig:
        if not self.heartbeat_interval_ms < self.suspect_timeout_ms <= self.dead_timeout_ms:
            raise ValueError("need heartbeat_interval_ms < suspect_timeout_ms <= dead_timeout_ms")
        return self


class HostProbe(_Strict):
    """A local health probe: a command's exit code, or a number read from a file."""

    name: str
    command: tuple[str, ...] | None = None
    file: Path | None = None
    max_value: StrictFloat | None = None    # for `file`: degraded above this
    interval_s: StrictFloat = Field(default=10.0, gt=0)
    timeout_s: StrictFloat = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> HostProbe:
        if (self.command is None) == (self.file is None):
            raise ValueError("a probe needs exactly one of command or file")
        if self.file is not None and self.max_value is None:
            raise ValueError("a file probe needs max_value")
        return self


class VmRestartPolicy(_Strict):
    max_restarts: StrictInt = Field(default=3, ge=0)
    window_s: StrictFloat = Field(default=600.0, gt=0)
    hung_timeout_ms: StrictInt = Field(default=3000, ge=100)


class AlertsConfig(_Strict):
    """Where alerts go besides journald and MQTT: Alertmanager-style webhooks."""

    # e.g. http://alertmanager:9093/api/v2/alerts; each gets the same JSON list of alerts.
    webhooks: tuple[str, ...] = ()
    timeout_s: StrictFloat = Field(default=5.0, gt=0, le=120)         # one POST
    retry_attempts: StrictInt = Field(default=5, ge=1, le=100)        # per batch and webhook
    retry_max_s: StrictFloat = Field(default=60.0, gt=0, le=3600)     # give up a batch after this
    repeat_interval_s: StrictFloat = Field(default=300.0, ge=1)       # re-send of a still-firing alert
    broker_unreachable_after_s: StrictFloat = Field(default=30.0, ge=0)

    @field_validator("webhooks")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("http", "https") or not rest:
                raise ValueError(f"{url!r}: use http://HOST[:PORT]/PATH or https://...")
        return v


class SchedulingConfig(_Strict):
    """The agent's CPU priority (adapters/scheduling.py): SCHED_RR at this priority, never
    inherited by QEMU or other children; 0 leaves it at the normal policy."""

    realtime_priority: StrictInt = Field(default=10, ge=0, le=99)


class MetricsConfig(_Strict):
    """The Prometheus endpoint (GET /metrics).  Loopback by default: it tells what runs where."""

    enabled: bool = True
    listen: str = "127.0.0.1:9464"                                # HOST:PORT, [IPv6]:PORT

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        listen_address(v)
        return v

    @property
    def address(self) -> tuple[str, int]:
        return listen_address(self.listen)


def listen_address(text: str) -> tuple[str, int]:
    """"HOST:PORT" (or "[V6]:PORT") -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


class WatchdogConfig(_Strict):
    """Self-fencing: the agent pets this device only while it holds quorum (or runs no VM)."""

    device: Path = Path("/dev/watchdog")
    # What the agent sets the device to (WDIOC_SETTIMEOUT takes whole seconds) and reads back.
    timeout_s: StrictInt = Field(default=10, ge=1, le=600)
    # auto: armed only where it is the fence (a host without a fence device) or the isolation
    # policy is self-fence; a host others can power off is never reset by its own watchdog.
    arm: Literal["auto", "always"] = "auto"


class HaConfig(_Strict):
    """Cluster mode: the coordinator places the VMs of `vm_dir` (the same on every host)."""

    enabled: bool = False
    # A host cut off from the broker and every peer for timing.isolation_timeout_ms:
    isolation: Literal["keep", "shutdown", "self-fence"] = "keep"
    # ACPI power-off first, then quit: a guest gets this long to shut down (isolation, `stopped`).
    shutdown_grace_s: StrictFloat = Field(default=30.0, ge=0, le=3600)
    watchdog: WatchdogConfig | None = None
    max_migrations_per_host: StrictInt = Field(default=1, ge=1, le=64)
    max_migrations: StrictInt = Field(default=2, ge=1, le=1024)
    memory_overcommit: StrictFloat = Field(default=1.0, gt=0, le=10)
    vcpu_overcommit: StrictFloat = Field(default=4.0, gt=0, le=64)
    # Stopping the agent drains the host first (its VMs move away live), holding the stop:
    # "system-shutdown" only while the machine shuts down or reboots (a restart of the service
    # leaves the VMs alone), "always" at every stop, "never" (the default).
    migrate_on_shutdown: Literal["never", "system-shutdown", "always"] = "never"
    shutdown_timeout_s: StrictFloat = Field(default=600.0, gt=0)   # then the agent stops anyway
    # The broker's typical one-way delay: relayed heartbeats (more than 5 hosts) are dated with it.
    relay_transit_ms: StrictInt = Field(default=0, ge=0, le=1000)
    # UDP port of the signed beats between hosts (adapters/directbeat.py), on each host's
    # address; read at start.
    direct_port: StrictInt = Field(default=7405, ge=1, le=65535)
    # Up to this many hosts every host beats every other directly, so a host reaching a
    # majority shows it without any broker (a broker outage resets nobody); beyond, beats go
    # to the ring neighbours and the coordinator only.  Each beat is one small datagram.
    direct_mesh: StrictInt = Field(default=64, ge=0, le=1024)
    # Moves over TLS (haguard/migration/tls.py): this host's QEMU x509 credentials directory
    # (ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem; its certificate names
    # its address).  Set it on every host: a move between a TLS host and a clear one fails.
    migration_tls_dir: Path | None = None


class ClusterConfig(_Strict):
    cluster: str = Field(pattern=NAME_RE)
    host: str | None = None                 # this host's name; default: the hostname
    hosts: tuple[HostConfig, ...] = Field(min_length=1)
    key_file: Path                          # per-cluster HMAC key for every message
    # This host's own Ed25519 private key (`haguard keygen`, mode 0600): every message it sends
    # is signed with it.  Its public key must be among its `public_keys`.
    host_key_file: Path | None = None
    # Refuse a message without its host's signature from a host with `public_keys` (else only
    # a wrong signature is refused): off while the hosts switch over, then on (docs/security.md).
    require_host_keys: bool = True
    mqtt: MqttConfig
    timing: TimingConfig = TimingConfig()
    vm_dir: Path = Path("/etc/haguard/vms")
    run_dir: Path = Path("/run/haguard/vms")
    state_dir: Path = Path("/var/lib/haguard")
    probes: tuple[HostProbe, ...] = ()
    vm_restart: VmRestartPolicy = VmRestartPolicy()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    ha: HaConfig = HaConfig()

    @model_validator(mode="after")
    def _unique_hosts(self) -> ClusterConfig:
        names: dict[str, int] = {}
        addresses: dict[str, int] = {}
        for i, h in enumerate(self.hosts):
            if h.name in names:
                raise error_at(("hosts", i, "name"),
                               f"host {h.name!r} is listed twice (also hosts[{names[h.name]}])")
            names[h.name] = i
            address = _address_key(h.address)
            if address in addresses and not _is_loopback(h.address):
                first = addresses[address]
                raise error_at(("hosts", i, "address"),
                               f"{h.address!r} is also hosts[{first}]'s address: each host needs its own")
            addresses.setdefault(address, i)
        if self.host is not None and self.host not in names:
            raise error_at(("host",), f"host {self.host!r} is not in hosts")
        if self.ha.enabled:
            try:
                check_tie_breaker(self.hosts)
            except ValueError as exc:
                raise error_at(("hosts",), str(exc)) from None
            unfenced = [i for i, h in enumerate(self.hosts) if h.fence is None and not h.witness]
            if unfenced and self.ha.watchdog is None:
                i = unfenced[0]
                raise error_at(("hosts", i),
                               f"host {self.hosts[i].name} has no fence device and ha.watchdog is not set: "
                               "a dead host must be fenced before its VMs restart elsewhere; give it "
                               "`fence:` or configure ha.watchdog (self-fencing)")
        return self

    def this_host(self) -> HostConfig:
        name = self.host or socket.gethostname()
        for h in self.hosts:
            if h.name == name:
                return h
        raise ValueError(f"this host ({name}) is not in the cluster's hosts: set `host:`")

    def peer(self, name: str) -> HostConfig | None:
        return next((h for h in self.hosts if h.name == name), None)


def _address_key(address: str) -> str:
    """An address as compared for duplicates: IPs in canonical form (2001:DB8:0::1 is 2001:db8::1)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.strip().lower()


def _is_loopback(address: str) -> bool:
    """Loopback addresses may repeat: every host there is this machine (a test, a demo)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_tie_breaker(hosts: tuple[HostConfig, ...]) -> None:
    """Refuse a cluster where losing one host always loses quorum although another could
    decide: two equal voters and nothing else ("both decide" is never an option)."""
    total = sum(h.weight for h in hosts)
    if total <= 0:
        raise ValueError("hosts: no host has a vote (weight)")
    voters = [h for h in hosts if h.weight > 0]
    if len(voters) == 2 and voters[0].weight == voters[1].weight:
        raise ValueError("two hosts with equal votes cannot tell a dead peer from a cut link: add a "
                         "witness host (witness: true) or give the preferred host weight: 2")


def load_cluster_config(path: Path) -> ClusterConfig:
    return load_model(ClusterConfig, path)
