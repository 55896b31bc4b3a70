"""A host that starts without its saved votes (no `cluster-state.json`: a new host, or a
lost `state_dir`) cannot know in which terms it already voted.

Granting again in such a term could give two candidates a majority each, so the host
abstains: for `window_ms` (lease + two election timeouts: long enough for a campaign under
way when the votes were lost to end, and for the cluster's current term to be heard) it
neither grants a vote nor stands, and it counts as having voted for itself in every term
it hears meanwhile (a plain `voted_for`, persisted like any vote): afterwards it grants
only in later terms.  It also refuses candidates older than the newest state a peer
reported during the window (its own state was lost with the file).

The window ends at once when every configured host has been heard at term 0: then no
host has ever stood, so no vote can have been cast.  That is a new cluster's first
start, which is not delayed.

What this cannot cover: a vote given in a term whose every holder stays out of this
host's hearing for the whole window.  Raft has the same limit (a member that lost its
disk must rejoin as a new member); the window makes it need that exact partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from haguard.core.cluster.election import Election
from haguard.core.cluster.state import StateKey
from haguard.core.cluster.types import Heartbeat


class LostVotes:
    def __init__(self, *, lost: bool, now_ms: int, window_ms: int) -> None:
        self.until_ms: int | None = now_ms + window_ms if lost else None
        self.floor_key: StateKey = (0, 0)     # candidates older than this are refused

    def abstaining(self) -> bool:
        return self.until_ms is not None

    def update(self, now_ms: int, election: Election, peers: Iterable[str],
               beats: Mapping[str, tuple[int, Heartbeat]]) -> bool:
        """End the window when it is due; True at the moment it ends."""
        if self.until_ms is None:
            return False
        peers = list(peers)
        new_cluster = (election.term == 0 and all(p in beats for p in peers)
                       and all(beats[p][1].term == 0 for p in peers))
        # Meanwhile every term heard counts as voted in (for itself): persisted like any vote,
        # so an agent restarted inside the window still refuses those terms.
        if election.term > 0 and election.voted_for is None:
            election.voted_for = election.me
        if now_ms < self.until_ms and not new_cluster:
            return False
        self.until_ms = None
        self.floor_key = max((hb.accepted for _, hb in beats.values()), default=(0, 0))
        return True
