"""What the agent derives from its configuration and from this machine, for its core."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from haguard.config.cluster import ClusterConfig, TimingConfig
from haguard.core.cluster.placement import PlacementLimits, VmSpec
from haguard.core.cluster.selffence import arms_watchdog
from haguard.core.cluster.types import ClusterTiming, CoreConfig, HostSpec
from haguard.core.detector import DetectorTiming
from haguard.core.host_types import HostConfig
from haguard.core.hostkeys import Signer, parse_public
from haguard.core.peers import VmSize
from haguard.core.vmhealth import VmHealthPolicy
from haguard.vm.definition import VmDefinition


def host_memory_mib() -> int:
    """This machine's memory (MemTotal), 0 when /proc/meminfo cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def detector_timing(t: TimingConfig) -> DetectorTiming:
    return DetectorTiming(suspect_timeout_ms=t.suspect_timeout_ms, dead_timeout_ms=t.dead_timeout_ms,
                          isolation_timeout_ms=t.isolation_timeout_ms)


def core_config(cfg: ClusterConfig, vms: dict[str, VmDefinition], signer: Signer | None = None) -> CoreConfig:
    """The core's view of the configuration; every agent computes the same one (but for
    `signer`, this host's own key)."""
    t, ha = cfg.timing, cfg.ha
    # A host without a configured size is taken to be like this one (a uniform cluster).
    default_memory, default_vcpus = host_memory_mib(), os.cpu_count() or 1
    hosts = {}
    for h in cfg.hosts:
        hosts[h.name] = HostSpec(
            name=h.name, weight=h.weight, priority=h.priority, witness=h.witness,
            fence_device=bool(h.fence_devices), memory_mib=h.memory_mib or default_memory,
            vcpus=h.vcpus or default_vcpus, groups=frozenset({h.group} if h.group else ()),
            group_priority=h.priority,
            # The device's own timeout, plus the time to start the agent program and read it.
            # Every level may be tried in turn: their timeouts add up.
            fence_timeout_ms=(int(sum(d.timeout_s for d in h.fence_devices) * 1000) + 2000
                              if h.fence_devices else None))
    specs = {name: VmSpec(name=name, memory_mib=v.memory_mib, vcpus=v.vcpus, priority=v.priority,
                          affinity=v.affinity, anti_affinity=v.anti_affinity,
                          allowed_groups=frozenset(v.host_groups))
             for name, v in vms.items()}
    watchdog_ms = int(ha.watchdog.timeout_s * 1000) if ha.watchdog else 10_000
    election_ms = max(t.heartbeat_interval_ms * 3, t.dead_timeout_ms * 2 // 3)
    timing = ClusterTiming(
        tick_ms=100, heartbeat_ms=t.heartbeat_interval_ms, quorum_timeout_ms=t.suspect_timeout_ms,
        lease_ms=t.dead_timeout_ms, election_timeout_ms=election_ms,
        watchdog_timeout_ms=watchdog_ms,
        watchdog_margin_ms=t.suspect_timeout_ms + 2 * t.heartbeat_interval_ms + 1000,
        # Long enough for a lapsed lease, an election that fails and one that wins, and the
        # new coordinator's first mutual contact (docs/cluster-design.md, "Watchdog self-fencing").
        self_fence_grace_ms=t.dead_timeout_ms + 2 * election_ms + t.suspect_timeout_ms,
        relay_transit_ms=ha.relay_transit_ms)
    return CoreConfig(
        me=cfg.this_host().name, hosts=hosts, vms=specs, timing=timing,
        detector=detector_timing(t),
        limits=PlacementLimits(memory_overcommit=ha.memory_overcommit, vcpu_overcommit=ha.vcpu_overcommit,
                               max_migrations_per_host=ha.max_migrations_per_host,
                               max_migrations_cluster=ha.max_migrations),
        isolation=ha.isolation, watchdog_arm=ha.watchdog.arm if ha.watchdog is not None else "never",
        direct_mesh=ha.direct_mesh, signer=signer,
        host_keys=host_keys(cfg), require_host_keys=cfg.require_host_keys)


def watchdog_armed_here(cfg: ClusterConfig) -> bool:
    """Whether this host opens (arms) its watchdog (the core's rule: selffence.py)."""
    return cfg.ha.watchdog is not None and arms_watchdog(core_config(cfg, {}), cfg.this_host().name)


def host_keys(cfg: ClusterConfig) -> dict[str, tuple[Ed25519PublicKey, ...]]:
    """Whose messages must carry their host's signature: every host with a public key."""
    return {h.name: tuple(parse_public(k) for k in h.public_keys) for h in cfg.hosts if h.public_keys}


def host_config(cfg: ClusterConfig, vms: dict[str, VmDefinition], *,
                health_policy: VmHealthPolicy, signer: Signer | None = None) -> HostConfig:
    """The host core's view of the configuration (the cluster's part in cluster mode)."""
    me = cfg.this_host()
    memory = me.memory_mib if me.memory_mib is not None else host_memory_mib()
    return HostConfig(
        me=me.name, peers=tuple(h.name for h in cfg.hosts), timing=detector_timing(cfg.timing),
        vm_policy=health_policy, memory_mib=memory, vcpus=me.vcpus or os.cpu_count() or 1,
        vm_sizes={n: VmSize(memory_mib=v.memory_mib, vcpus=v.vcpus) for n, v in vms.items()},
        cluster=core_config(cfg, vms, signer) if cfg.ha.enabled else None)
