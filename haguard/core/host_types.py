"""Configuration, inputs and outputs of the host core (host.py).

Inputs are past-tense facts, outputs are commands or news; all frozen and keyword-only.
The cluster membership's own facts and commands are in cluster/types.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from haguard.core.cluster.types import (
    AdminRequested,
    ClusterOutput,
    CommandFinished,
    CoreConfig,
    StopRequested,
    WatchdogConfirmed,
)
from haguard.core.detector import BrokerConnectionChanged, DetectorOutput, DetectorTiming, PingObserved
from haguard.core.peers import VmSize
from haguard.core.probes import HostHealthChanged, ProbeInput, ProbePolicy
from haguard.core.vmhealth import VmHealthPolicy, VmInput, VmOutput


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    me: str
    peers: tuple[str, ...]
    timing: DetectorTiming = field(default_factory=DetectorTiming)
    vm_policy: VmHealthPolicy = field(default_factory=VmHealthPolicy)
    probe_policy: ProbePolicy = field(default_factory=ProbePolicy)
    memory_mib: int = 0                     # this host's capacity for VMs
    vcpus: int = 0
    vm_sizes: Mapping[str, VmSize] = field(default_factory=dict)   # from the VM inventory
    cluster: CoreConfig | None = None       # cluster mode


# ---- inputs ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EnvelopeReceived:
    """A signed envelope from the broker, verified by the transport (signer = `host`)."""

    host: str
    incarnation: int
    kind: str
    body: Mapping[str, Any]
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class QemuStateObserved:
    """A local QEMU's run state learnt outside the VM watchers (a start, an incoming move, a
    status asked before a stop); None: the process is gone."""

    vm: str
    status: str | None
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class VmStopBegan:
    """The runtime is stopping or killing this QEMU on the core's order: its end is no crash."""

    vm: str
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class WatchdogDisarming:
    """The agent stops cleanly and will disarm its watchdog (the magic close) once the cluster
    knows: from then on a deadline is no fence for this host."""

    now_ms: int


@dataclass(frozen=True, kw_only=True)
class ShutdownDrainRequested:
    timeout_ms: int
    now_ms: int


HostInput = (EnvelopeReceived | BrokerConnectionChanged | PingObserved | ProbeInput | VmInput
             | QemuStateObserved | VmStopBegan | CommandFinished | AdminRequested | ShutdownDrainRequested
             | WatchdogConfirmed | WatchdogDisarming | StopRequested)


# ---- outputs --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MessageRejected:
    sender: str
    kind: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ShutdownDrainProgress:
    left: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class WatchdogDisarmAllowed:
    """The committed cluster state no longer counts this host's watchdog as a fence (or the
    host has a fence device): the magic close can no longer make a VM run twice."""


@dataclass(frozen=True, kw_only=True)
class ShutdownDrainEnded:
    drained: bool
    reason: str                             # "drained", "no coordinator", "timeout"
    left: tuple[str, ...]
    took_ms: int


@dataclass(frozen=True, kw_only=True)
class HandoverEnded:
    """After `StopRequested`: this host coordinates no more and a successor leads (or none
    came in time, or this host was no coordinator): the agent may disconnect."""

    successor: str | None


HostOutput = (DetectorOutput | VmOutput | HostHealthChanged | ClusterOutput | MessageRejected
              | ShutdownDrainProgress | ShutdownDrainEnded | WatchdogDisarmAllowed | HandoverEnded)
