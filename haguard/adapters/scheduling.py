"""The agent's CPU scheduling: real-time round-robin, as corosync runs its heartbeat path.

On a hypervisor the VMs' vCPUs are expected to saturate the cores.  Under the normal
scheduler the agent then waits behind them, and heartbeat gaps of seconds were measured
with 3 vCPUs per core, enough to lose quorum with no fault at all.  At SCHED_RR the agent
runs as soon as it is runnable.  SCHED_RESET_ON_FORK makes every child (QEMU, fence
agents, probes) start at the normal policy, so no guest inherits the priority.  The
kernel's real-time throttling (95 % per period by default) bounds a runaway agent.

The unit sets the same policy (systemd's CPUSchedulingPolicy=, with RestrictRealtime=
keeping anything from raising it further); an agent started otherwise sets it itself,
and says so once when it may not.  Threads started later inherit it.
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger("haguard.scheduling")

REALTIME = (os.SCHED_RR, os.SCHED_FIFO)


def raise_priority(priority: int) -> str:
    """Run this thread (and later ones) at SCHED_RR `priority` unless it already runs real-time
    or `priority` is 0; returns what it runs at, for the log."""
    current = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if current in REALTIME:
        return f"real-time {os.sched_getparam(0).sched_priority} (set by the service)"
    if priority <= 0:
        return "normal (scheduling.realtime_priority: 0)"
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as exc:
        log.warning("scheduling-not-raised", priority=priority, error=exc.strerror or str(exc),
                    hint="heartbeats may stall on a saturated host; see docs/install.md")
        return "normal"
    return f"real-time {priority}"


def policy_of(pid: int) -> tuple[int, int]:
    """(policy without the reset-on-fork flag, priority) of a process."""
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(pid).sched_priority
