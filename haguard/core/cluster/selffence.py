"""Where the watchdog is armed, and when an armed host stops petting it.

Armed (opened and petted) only where it is needed: the host has no fence device (the
watchdog is its fence), its isolation policy is self-fence, or `arm: always`.  A host
others can power off is never reset by its own watchdog: the majority fences it before
anything of it runs elsewhere, and a reset would only take down VMs that a switch reboot
or a coordinator's restart would have left running (docs/failure-modes.md).

An armed host with VMs stops petting only once connected quorum has been lost for
`self_fence_grace_ms`: a coordinator's handover or death, a broker blip or a saturated
scheduler is shorter, and costs nothing.  It pets again as soon as quorum is back
before its device expires.  The coordinator adds the same grace to its watchdog wait
(recovery.py), so a host that lost quorum is reset before anything of it runs elsewhere.
Isolation with the self-fence policy stops petting at once (its own timeout has passed).
A newly started agent pets only once it has held quorum.  While the cluster is in
maintenance (paused.py) an armed host pets whatever its quorum.
"""

from __future__ import annotations

from haguard.core.cluster.types import CoreConfig

# A clean stop waits this long for the committed state to stop counting this host's
# watchdog as its fence before the magic close (without it, a host with VMs stays armed).
DISARM_WAIT_MS = 10_000


def arms_watchdog(config: CoreConfig, host: str) -> bool:
    """Whether `host` opens and pets its watchdog device."""
    if config.watchdog_arm == "never":
        return False
    spec = config.hosts[host]
    return config.watchdog_arm == "always" or not spec.fence_device or config.isolation == "self-fence"


class SelfFence:
    def __init__(self, config: CoreConfig) -> None:
        self.armed = arms_watchdog(config, config.me)
        self.grace_ms = config.timing.self_fence_grace_ms
        self.lost_since: int | None = None      # connected quorum lost since (None: held)
        # A new agent pets only once it has held quorum (its first scan may not show its VMs yet):
        # its host may have lost quorum, stopped petting and been declared dead before the
        # agent restarted, and a pet then would push the reset past the deadline the
        # coordinator waits for (a VM run twice, in the simulator).  The device its
        # predecessor armed gives it a timeout to join.
        self.held = False

    def observe(self, now_ms: int, quorate: bool) -> None:
        if quorate:
            self.lost_since, self.held = None, True
        elif self.lost_since is None:
            self.lost_since = now_ms

    def lost_for(self, now_ms: int) -> int:
        """How long connected quorum has been lost (0 while held)."""
        return 0 if self.lost_since is None else now_ms - self.lost_since

    def lost(self, now_ms: int) -> bool:
        """Quorum lost for longer than a blip."""
        return self.lost_since is not None and self.lost_for(now_ms) >= self.grace_ms

    def pet(self, now_ms: int, *, has_vms: bool, self_fenced: bool, paused: bool = False) -> bool:
        """Whether the armed device is petted now: whatever the quorum while the cluster is in
        maintenance (paused.py: nobody recovers this host's VMs meanwhile, nor by its deadline
        until it has reported the end of maintenance)."""
        return self.armed and (paused or (self.held and not self_fenced
                                          and (not has_vms or not self.lost(now_ms))))
