"""Configuration, messages, inputs and outputs of the cluster core.

Inputs are past-tense facts, outputs are commands; all frozen and keyword-only.
Every output has an `id`; the result of a command comes back as `CommandFinished`
with that id.  Messages travel through the broker: `to=None` is a broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from haguard.core.alerts import RaiseAlert
from haguard.core.cluster.placement import PlacementLimits, VmSpec
from haguard.core.cluster.state import (
    ClusterRecord,
    ClusterState,
    HostRecord,
    MigrationRecord,
    StateKey,
    VmRecord,
)
from haguard.core.detector import BrokerConnectionChanged, DetectorOutput, DetectorTiming, PingObserved
from haguard.core.hostkeys import HostKeys, Signer

IsolationPolicy = Literal["keep", "shutdown", "self-fence"]
# Where the watchdog is armed: auto (where it is the host's fence), always, never (none configured).
WatchdogArm = Literal["auto", "always", "never"]
# QEMU states a host reports for its local VMs.  Only `running` executes the guest.
QemuState = Literal["running", "inmigrate", "postmigrate"]


# ---- configuration ---------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class HostSpec:
    name: str
    weight: int = 1
    priority: int = 0               # coordinator preference
    witness: bool = False           # votes, runs no VMs
    fence_device: bool = False      # without one, recovery waits for the watchdog deadline
    # A fence command without result by then counts as failed (the device's own timeout plus a
    # margin); None: ClusterTiming.fence_timeout_ms.
    fence_timeout_ms: int | None = None
    memory_mib: int = 0
    vcpus: int = 0
    groups: frozenset[str] = frozenset()
    group_priority: int = 0         # placement preference


@dataclass(frozen=True, kw_only=True)
class ClusterTiming:
    tick_ms: int = 100
    heartbeat_ms: int = 200
    quorum_timeout_ms: int = 800    # a peer counts towards quorum this long after mutual contact
    lease_ms: int = 1500            # a coordinator is followed this long after its last message
    election_timeout_ms: int = 1000
    watchdog_timeout_ms: int = 2000
    watchdog_margin_ms: int = 1500  # covers quorum_timeout, heartbeat and message delay
    # An armed host with VMs stops petting only after quorum has been lost this long (a
    # coordinator's handover or death, a broker blip); the coordinator waits it too.
    self_fence_grace_ms: int = 4300     # lease + 2 elections (one may fail) + quorum timeout
    fence_timeout_ms: int = 3000    # default for hosts whose HostSpec gives none
    fence_backoff_ms: tuple[int, ...] = (500, 1000, 2000, 4000)
    max_local_restarts: int = 3
    # The typical one-way delay of a message through the broker.  A relayed heartbeat is dated
    # from its digest's ages, which cannot count the time on the wire: each hop is taken as this
    # long.  0 (conservative: relayed news looks fresher than it is, a dead host is declared a
    # hop later than in a full mesh).
    relay_transit_ms: int = 0


@dataclass(frozen=True, kw_only=True)
class CoreConfig:
    me: str
    hosts: Mapping[str, HostSpec]
    vms: Mapping[str, VmSpec]
    timing: ClusterTiming = field(default_factory=ClusterTiming)
    detector: DetectorTiming = field(default_factory=DetectorTiming)
    limits: PlacementLimits = field(default_factory=PlacementLimits)
    isolation: IsolationPolicy = "keep"
    watchdog_arm: WatchdogArm = "auto"
    # Ring neighbours each host sends its heartbeat to (and pings), besides the coordinator;
    # rounded up to an even number.  A cluster of at most fanout + 1 hosts is a full mesh.
    gossip_fanout: int = 4
    # A larger cluster relays the heartbeats to the coordinator in digests: each aggregator
    # takes the digests of at most this many hosts (relay.py).
    relay_fanin: int = 4
    # Signed direct beats go to every host in a cluster of at most this many hosts (else to
    # the watched ones only): a host then shows a majority without the broker (quorate.py).
    direct_mesh: int = 64
    # Host keys (core/hostkeys.py): this host signs its heartbeats with `signer`; a relayed
    # heartbeat of a host in `host_keys` is taken only with its valid proof (proof.py).
    signer: Signer | None = field(default=None, compare=False)
    host_keys: HostKeys = field(default_factory=dict, compare=False)
    require_host_keys: bool = True          # off while a cluster switches over to host keys


# ---- messages --------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MigrationReport:
    vm: str
    generation: int
    target: str
    ok: bool


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """A follower's report, to its ring neighbours and its coordinator (one Send each); the
    coordinator's is broadcast and is also its lease renewal and membership summary."""

    sender: str
    incarnation: int
    term: int                                   # highest term the sender has seen
    hears: frozenset[str]
    reaches: frozenset[str]
    accepted: StateKey
    quorate: bool                               # holds a majority through the broker
    vms: Mapping[str, QemuState]                # local QEMU processes
    failed_vms: frozenset[str] = frozenset()    # gave up restarting in place: QEMU gone
    migrations: tuple[MigrationReport, ...] = ()
    requests: frozenset[tuple[str, str]] = frozenset()   # (drain, host), (maintenance-on, "*"): pending
    moves: frozenset[tuple[str, str]] = frozenset()      # (vm, target) asked by an operator, pending
    degraded: bool = False                      # a health probe fails: gets no VM, is evacuated
    to: str | None = None
    committed: StateKey = (0, 0)
    coordinator: bool = False                   # the sender coordinates `term`: renews its lease
    # Set by a coordinator: it hears (mutually) every configured host but these; `hears` then
    # lists only its ring neighbours.
    unheard: frozenset[str] | None = None
    # A coordinator's confirmation of the acks it received since its previous heartbeat:
    # host -> (incarnation, sequence) (a read index, see ClusterMember).
    confirmed: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # The timeout its watchdog device confirmed, in ms (0: none, or not confirmed).
    watchdog_ms: int = 0
    definition: str = ""                        # the sender's cluster definition (definition.py)
    # Numbers the sender's heartbeats within its incarnation: a heartbeat relayed by several
    # paths is one heartbeat.  Not part of its content (equal heartbeats say the same).
    seq: int = field(default=0, compare=False)
    # The sender's host-key signature of this heartbeat (proof.py), so that a relayed copy
    # can be checked by whoever gets it; "" without host keys.
    proof: str = field(default="", compare=False)


@dataclass(frozen=True, kw_only=True)
class VoteRequest:
    sender: str
    term: int
    accepted: StateKey
    to: None = None
    # The coordinator the sender followed handed over to it (a clean stop): voters grant
    # although that coordinator's lease still holds.
    handover: bool = False
    definition: str = ""                        # the sender's cluster definition (definition.py)


@dataclass(frozen=True, kw_only=True)
class Handover:
    """A coordinator that stops cleanly names its successor, which stands at once."""

    sender: str
    term: int
    to: str


@dataclass(frozen=True, kw_only=True)
class VoteGranted:
    sender: str
    term: int
    to: str                                     # the candidate


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """The coordinator's state broadcast, also its lease renewal."""

    sender: str
    term: int
    state: ClusterState                         # newest, maybe not yet committed
    committed: ClusterState
    # host -> (incarnation, sequence) of the newest ack received from it in this term
    confirmed: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    to: str | None = None                       # None: to all; a host: a catch-up for it alone


# The base of a whole state sent in parts (a catch-up): applied to an empty state.
WHOLE: StateKey = (-1, -1)


@dataclass(frozen=True, kw_only=True)
class StatePart:
    """One part of a state too large for one `Proposal` (parts.py): the records that change
    from the state keyed `base` (WHOLE: from nothing) to the state keyed `key`.  A record
    set to None is removed."""

    sender: str
    term: int
    key: StateKey
    base: StateKey
    part: int                                   # 0 .. parts - 1
    parts: int
    committed: StateKey                         # the coordinator's committed key
    vms: Mapping[str, VmRecord | None] = field(default_factory=dict)
    hosts: Mapping[str, HostRecord] = field(default_factory=dict)
    migrations: Mapping[str, MigrationRecord | None] = field(default_factory=dict)
    kills: Mapping[str, str | None] = field(default_factory=dict)
    confirmed: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    to: str | None = None
    cluster: ClusterRecord | None = None        # in the first part; None: the base's


@dataclass(frozen=True, kw_only=True)
class Ack:
    sender: str
    term: int
    accepted: StateKey
    to: str                                     # the coordinator
    incarnation: int = 0
    seq: int = 0                                # numbers this agent's acks


@dataclass(frozen=True, kw_only=True)
class RelayEntry:
    """What a reporter (a host at an even ring position) knows of one host it hears.

    The heartbeat itself travels only when its content changed since the last one sent on
    that hop, or once every RELAY_REFRESH_MS; otherwise `beat` is None and the receiver
    takes the content it got before for (host, reporter), if it is the one `since` names."""

    host: str
    reporter: str
    incarnation: int
    seq: int                                    # the heartbeat's number
    since: int                                  # the number of the first heartbeat with this content
    heard_age_ms: int                           # the reporter got it this long before building the entry
    relay_age_ms: int                           # the entry was built this long before this digest
    beat: Heartbeat | None = None


@dataclass(frozen=True, kw_only=True)
class Digest:
    """Relayed heartbeats, up the tiers to the coordinator (a large cluster, relay.py)."""

    sender: str
    term: int
    entries: tuple[RelayEntry, ...]
    to: str
    part: int = 0               # a digest over the wire's limit goes as several, each kept apart


Message = Heartbeat | VoteRequest | VoteGranted | Proposal | StatePart | Ack | Digest | Handover


# ---- inputs ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MessageReceived:
    message: Message
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class LocalVmsObserved:
    vms: Mapping[str, QemuState]
    now_ms: int
    crashed: frozenset[str] = frozenset()       # QEMUs that exited unasked since the last report


@dataclass(frozen=True, kw_only=True)
class CommandFinished:
    id: str
    ok: bool
    now_ms: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class AdminRequested:
    # confirm-off: an operator declares a host powered off (its fence device broken); taken
    # only while the coordinator holds that host dead, and only for CONFIRM_OFF_MS.
    # fence: an operator has the coordinator run the host's fence device now.
    # maintenance-on|off: the whole cluster's (paused.py), with host "*".
    action: Literal["drain", "undrain", "migrate", "confirm-off", "fence",
                    "maintenance-on", "maintenance-off"]
    host: str                                   # the host to drain/undrain/confirm, or the move's target
    now_ms: int
    vm: str = ""                                # for "migrate"


@dataclass(frozen=True, kw_only=True)
class WatchdogConfirmed:
    """What this host's watchdog device does: the timeout it confirmed after being set
    (WDIOC_SETTIMEOUT, read back with WDIOC_GETTIMEOUT), in ms; 0 when it cannot be opened,
    does not say, or failed."""

    timeout_ms: int
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class LocalHealthObserved:
    """This host's health probes: a degraded host gets no new VM and is evacuated live."""

    degraded: bool
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class StopRequested:
    """The agent stops cleanly: a coordinator hands over to a successor first."""

    now_ms: int


ClusterInput = (MessageReceived | LocalVmsObserved | CommandFinished | AdminRequested
                | LocalHealthObserved | WatchdogConfirmed | PingObserved | BrokerConnectionChanged
                | StopRequested)


# ---- outputs ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PersistState:
    """Must be on stable storage before any later output of the same batch is executed."""

    id: str
    term: int
    voted_for: str | None
    accepted: ClusterState
    committed: ClusterState


@dataclass(frozen=True, kw_only=True)
class Send:
    id: str
    message: Message


@dataclass(frozen=True, kw_only=True)
class StartVm:
    id: str
    vm: str
    generation: int
    term: int


# Why a local copy goes: the runtime checks the QEMU's state again for these two, because
# the core decided on the state last reported and a move may have just switched over.
MOVED_AWAY = "moved away"                           # StopVm of a source left in postmigrate
INCOMING_UNWANTED = "incoming move no longer wanted"  # KillVm of an incoming QEMU


@dataclass(frozen=True, kw_only=True)
class StopVm:
    id: str
    vm: str
    term: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class KillVm:
    id: str
    vm: str
    term: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class MigrateVm:
    id: str
    vm: str
    target: str
    generation: int
    term: int


@dataclass(frozen=True, kw_only=True)
class FenceHost:
    id: str
    host: str
    term: int


@dataclass(frozen=True, kw_only=True)
class PetWatchdog:
    id: str


@dataclass(frozen=True, kw_only=True)
class StopPettingWatchdog:
    id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class PlacementDecided:
    """The coordinator chose a host for a VM (or found none): why this one, why not the others."""

    id: str
    vm: str
    host: str | None
    kind: Literal["place", "drain", "move"]     # placed anew, moved off a host, moved on request
    reasons: str


ClusterOutput = (PersistState | Send | StartVm | StopVm | KillVm | MigrateVm | FenceHost
                 | PetWatchdog | StopPettingWatchdog | RaiseAlert | PlacementDecided | DetectorOutput)


@dataclass(frozen=True, kw_only=True)
class PersistedState:
    """What an agent reads back from `state_dir` when it starts."""

    term: int = 0
    voted_for: str | None = None
    accepted: ClusterState | None = None
    committed: ClusterState | None = None
