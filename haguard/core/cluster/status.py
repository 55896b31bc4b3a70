"""What `haguard status` shows of this host's cluster membership, as JSON data."""

from __future__ import annotations

from typing import Any

from haguard.core.cluster.member import ClusterMember


def membership_status(member: ClusterMember, now_ms: int) -> dict[str, Any]:
    state = member.committed
    me = member.me
    return {
        "role": str(member.role), "term": member.term, "coordinator": member.election.following(now_ms),
        "quorate": member.broker_quorate(now_ms), "state_version": list(state.key),
        # Connected quorum lost this long (0: held); past the self-fence grace an armed
        # watchdog is no longer petted.
        "quorum_lost_ms": member.self_fence.lost_for(now_ms),
        # Started without its saved votes: grants none until the cluster's term is known.
        "votes_abstaining": member.lost_votes.abstaining(),
        # This host's cluster definition, and the peers heard with another (config-mismatch).
        "definition": member.definition.mine,
        "definition_differs": sorted(member.definition.differing),
        "vms": {vm: {"owner": rec.owner, "generation": rec.generation, "desired": rec.desired}
                for vm, rec in sorted(state.vms.items())},
        # `haguard maintenance on`: nothing started, stopped, moved or fenced (paused.py).
        "maintenance": state.cluster.paused,
        "hosts": {h: {"maintenance": state.host(h).maintenance, "fenced": state.host(h).fenced,
                      "watchdog_ms": state.host(h).watchdog_ms, "paused": state.host(h).paused}
                  for h in sorted(member.config.hosts)},
        "migrations": [{"vm": vm, "source": mig.source, "target": mig.target}
                       for vm, mig in sorted(state.migrations.items())],
        "peers": {h: str(member.detector.state(h)) for h in sorted(member.config.hosts) if h != me},
        "watchdog": "petting" if member.petting else ("stopped" if member.self_fence.armed else "none"),
        "proposal_in_flight": (list(member.proposer.proposal.key)
                               if member.proposer is not None and member.proposer.in_flight else None),
    }
