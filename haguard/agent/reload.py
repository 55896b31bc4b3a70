"""What a reload (SIGHUP) may change in a running agent, and what waits for a restart.

Most settings apply at once.  The connections (`mqtt`, the cluster key, the directories)
and, in cluster mode, the membership and timings the cluster core was built with keep
their running values until a restart: a half-applied change would mislead both the
operator and the next reload, so the running value is what the next reload compares with.

Host keys are the exception inside `hosts`: a rotation (core/hostkeys.py) adds a public
key everywhere, switches the host's own key, then removes the old one, each step by a
reload, so `hosts[].public_keys` and `host_key_file` apply at once as long as the rest of
`hosts` is unchanged.  A new own key is taken only when the applied configuration lists
its public key for this host (a key the others do not know would get every message refused).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.config.cluster import ClusterConfig, HostConfig
from haguard.core.hostkeys import public_text

RESTART_FIELDS = ("cluster", "mqtt", "key_file", "require_host_keys", "run_dir", "state_dir",
                  "alerts", "metrics", "scheduling", "ha")
CLUSTER_RESTART_FIELDS = ("hosts", "timing")


@dataclass(frozen=True)
class Reloaded:
    cfg: ClusterConfig              # the configuration to run: the file's, restart fields kept
    own_key: Ed25519PrivateKey | None
    needs_restart: list[str]        # fields changed in the file that keep their running values


def _membership(hosts: tuple[HostConfig, ...]) -> list[HostConfig]:
    return [h.model_copy(update={"public_keys": ()}) for h in hosts]


def _differs(new: ClusterConfig, old: ClusterConfig, name: str) -> bool:
    if name == "hosts":
        return _membership(new.hosts) != _membership(old.hosts)
    return bool(getattr(new, name) != getattr(old, name))


def reloaded(new: ClusterConfig, old: ClusterConfig, *, cluster_mode: bool,
             own_new: Ed25519PrivateKey | None, own_old: Ed25519PrivateKey | None) -> Reloaded:
    fields = RESTART_FIELDS + (CLUSTER_RESTART_FIELDS if cluster_mode else ())
    needs_restart = [f for f in fields if _differs(new, old, f)]
    cfg = new.model_copy(update={f: getattr(old, f) for f in needs_restart})
    own = own_new
    if own is not None and public_text(own) not in cfg.this_host().public_keys:
        own = own_old                   # the membership change holds the keys back too
        needs_restart.append("host_key_file")
    cfg = cfg.model_copy(update={"host_key_file": new.host_key_file if own is own_new else old.host_key_file})
    return Reloaded(cfg=cfg, own_key=own, needs_restart=needs_restart)
