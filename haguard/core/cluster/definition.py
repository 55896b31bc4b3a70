"""One cluster definition: a fingerprint of what every agent must agree on, carried in
heartbeats and vote requests.

What it covers: the hosts with their weights, witness flags and fence devices (quorum,
and whether a host's watchdog is its fence, which decides when the coordinator may
restart its VMs), the cluster timing, the isolation and watchdog-arming rules and the
gossip layout.  What it leaves out is what may differ per host without harm: VMs (the
cluster keeps its own), priorities, capacities, placement groups and detector timing.

A voter grants only a candidate with its own fingerprint (or none: an agent of the
previous release), so a coordinator is always elected under one definition.  A host
hearing a neighbour or its coordinator with another fingerprint raises
`config-mismatch` naming them, and resolves it once they agree again.  Changing `hosts`
one host at a time keeps every old and new majority overlapping (Raft's single-server
change); docs/operations.md says how.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from haguard.core.alerts import RaiseAlert
from haguard.core.cluster.types import CoreConfig

FINGERPRINT_HEX = 16


def definition_fingerprint(config: CoreConfig) -> str:
    hosts = [[h.name, h.weight, h.witness, h.fence_device] for h in sorted(config.hosts.values(),
                                                                             key=lambda h: h.name)]
    timing = asdict(config.timing)
    data = {"hosts": hosts, "timing": {k: list(v) if isinstance(v, tuple) else v for k, v in timing.items()},
            "isolation": config.isolation, "watchdog_arm": config.watchdog_arm,
            "gossip_fanout": config.gossip_fanout, "relay_fanin": config.relay_fanin}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_HEX]


class DefinitionCheck:
    def __init__(self, config: CoreConfig) -> None:
        self.mine = definition_fingerprint(config)
        self.differing: dict[str, str] = {}       # peer -> its fingerprint
        self._alerted = False

    def agrees(self, theirs: str) -> bool:
        return theirs in ("", self.mine)

    def heard(self, peer: str, theirs: str) -> None:
        if self.agrees(theirs):
            self.differing.pop(peer, None)
        else:
            self.differing[peer] = theirs

    def alert(self, new_id: str) -> RaiseAlert | None:
        """`config-mismatch` when the first peer differs, resolved when the last agrees."""
        if bool(self.differing) == self._alerted:
            return None
        self._alerted = bool(self.differing)
        if self._alerted:
            peers = ", ".join(f"{p} ({f})" for p, f in sorted(self.differing.items()))
            reason = f"cluster definition {self.mine} here; differs on {peers}: compare their cluster files"
        else:
            reason = f"every peer heard has cluster definition {self.mine}"
        return RaiseAlert(id=new_id, kind="config-mismatch", reason=reason, resolved=not self._alerted)
