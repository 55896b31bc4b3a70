"""Fence first, then restart by priority.

`Fencing` tracks the coordinator's fence of each host declared dead: a fence device
`off` with retries and backoff (an alert on every failure, a command without result
within the host's fence timeout counts as failed), or, for a host whose watchdog is
armed (every host without a device; with `arm: always` also the others, whose device
may fail), the watchdog deadline: the timeout that host's own device confirmed (committed in the
cluster state, never the configuration file's value) plus its self-fence grace plus
`watchdog_margin_ms` after the declaration (by then the host, which lost quorum before
others could declare it dead, has waited out its grace, stopped petting and been reset).
A host with neither a device nor a confirmed watchdog cannot be fenced: its VMs stay
down, and an alert says so once, until an operator confirms it is off
(`confirm_by_operator`: a fence like a device's).  `plan_recovery` places a fenced host's VMs, highest
priority first.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from haguard.core.cluster.placement import (
    HostCandidate,
    Placement,
    PlacementLimits,
    VmSpec,
    choose,
    place,
    refusal,
)


@dataclass(frozen=True, kw_only=True)
class FenceCommand:
    id: str
    host: str


@dataclass(frozen=True, kw_only=True)
class FenceAlert:
    host: str
    reason: str


@dataclass
class _Fence:
    declared_ms: int
    device: bool
    watchdog_ms: int = 0            # the host's confirmed watchdog timeout (no device); 0: none
    said_unfenceable: bool = False
    attempts: int = 0
    command_id: str | None = None
    sent_ms: int = 0
    next_try_ms: int = 0
    confirmed: bool = False
    manual: bool = False            # an operator's `haguard fence`: of a host that may be alive


class Fencing:
    def __init__(self, *, watchdog_margin_ms: int, fence_timeout_ms: int, backoff_ms: tuple[int, ...],
                 host_timeouts_ms: Mapping[str, int] | None = None, self_fence_grace_ms: int = 0) -> None:
        # A host keeps petting this long after losing quorum (selffence.py): part of the wait.
        self.watchdog_margin_ms = watchdog_margin_ms + self_fence_grace_ms
        self.fence_timeout_ms = fence_timeout_ms             # for hosts not in host_timeouts_ms
        self.host_timeouts_ms = dict(host_timeouts_ms or {})  # a device's own timeout plus a margin
        self.backoff_ms = backoff_ms or (1000,)
        self._fences: dict[str, _Fence] = {}

    def declare(self, host: str, *, device: bool, now_ms: int, watchdog_ms: int = 0) -> None:
        self._fences.setdefault(host, _Fence(declared_ms=now_ms, device=device, next_try_ms=now_ms,
                                             watchdog_ms=watchdog_ms))

    def fence_now(self, host: str, now_ms: int) -> None:
        """An operator's `haguard fence HOST`: its device's "off" now, dead or not (only the
        device's answer fences it, never a watchdog deadline)."""
        fence = self._fences.get(host)
        if fence is None:
            self._fences[host] = _Fence(declared_ms=now_ms, device=True, next_try_ms=now_ms, manual=True)
        else:
            fence.manual = True

    def manual(self, host: str) -> bool:
        fence = self._fences.get(host)
        return fence is not None and fence.manual

    def lapse(self, host: str) -> None:
        """The operator's request is gone (done, or it lapsed): an ordinary fence from now on,
        cancelled when the host is heard."""
        fence = self._fences.get(host)
        if fence is not None:
            fence.manual = False

    def cancel(self, host: str) -> None:
        """The host was heard again before it was fenced: nothing of it may move (an
        operator's fence goes on: it is asked of a host that may well be heard)."""
        fence = self._fences.get(host)
        if fence is not None and not fence.confirmed and not fence.manual:
            del self._fences[host]

    def confirm_by_operator(self, host: str, asked_ms: int) -> bool:
        """An operator declared `host` off (`haguard confirm-off`): a fence, as a device's "off"
        is.  Only when asked after the host was declared dead (the operator checked this
        failure, not an earlier state) and not fenced yet (False otherwise)."""
        fence = self._fences.get(host)
        if fence is None or fence.confirmed or asked_ms <= fence.declared_ms:
            return False
        fence.confirmed, fence.command_id = True, None
        return True

    def timeout_ms(self, host: str) -> int:
        return self.host_timeouts_ms.get(host, self.fence_timeout_ms)

    def forget(self, host: str) -> None:
        self._fences.pop(host, None)

    def pending(self) -> list[str]:
        return sorted(self._fences)

    def confirmed(self, host: str, now_ms: int) -> bool:
        fence = self._fences.get(host)
        if fence is None:
            return False
        # A confirmed watchdog is a fence for a host with a device too (`arm: always`): one
        # whose device fails is still recovered once its deadline has passed.
        deadline = fence.declared_ms + fence.watchdog_ms + self.watchdog_margin_ms
        if fence.watchdog_ms > 0 and now_ms >= deadline:
            fence.confirmed = True
        return fence.confirmed

    def poll(self, now_ms: int, new_id: Callable[[], str]) -> tuple[list[FenceCommand], list[FenceAlert]]:
        """Fence commands due now, and alerts for attempts that timed out."""
        commands: list[FenceCommand] = []
        alerts: list[FenceAlert] = []
        for host, fence in sorted(self._fences.items()):
            if not fence.device and not fence.watchdog_ms and not fence.said_unfenceable:
                fence.said_unfenceable = True
                alerts.append(FenceAlert(host=host, reason=(
                    f"cannot fence {host}: no fence device and no confirmed watchdog; its VMs stay "
                    "down until it is back or an operator confirms it is off")))
            if not fence.device or fence.confirmed:
                continue
            timeout = self.timeout_ms(host)
            if fence.command_id is not None and now_ms - fence.sent_ms >= timeout:
                why = f"no answer within {timeout} ms"
                alerts.append(self._failed(fence, host, why, now_ms))
            if fence.command_id is None and now_ms >= fence.next_try_ms:
                fence.command_id, fence.sent_ms = new_id(), now_ms
                fence.attempts += 1
                commands.append(FenceCommand(id=fence.command_id, host=host))
        return commands, alerts

    def result(self, command_id: str, ok: bool, reason: str, now_ms: int) -> FenceAlert | None:
        for host, fence in self._fences.items():
            if fence.command_id == command_id:
                if ok:
                    fence.confirmed, fence.command_id = True, None
                    return None
                return self._failed(fence, host, reason or "fence device failed", now_ms)
        return None         # an answer to a cancelled or timed-out attempt

    def _failed(self, fence: _Fence, host: str, reason: str, now_ms: int) -> FenceAlert:
        delay = self.backoff_ms[min(fence.attempts - 1, len(self.backoff_ms) - 1)]
        fence.command_id, fence.next_try_ms = None, now_ms + delay
        return FenceAlert(host=host, reason=f"fencing {host} failed (attempt {fence.attempts}): {reason}; "
                                            f"its VMs stay down until it is fenced; retry in {delay} ms")


def by_priority(vms: Mapping[str, VmSpec], names: list[str]) -> list[str]:
    """Highest priority first, ties by name."""
    return sorted(names, key=lambda vm: (-vms[vm].priority, vm))


def plan_recovery(vms: Mapping[str, VmSpec], names: list[str], hosts: list[HostCandidate],
                  limits: PlacementLimits,
                  excluded: Mapping[str, frozenset[str]] | None = None) -> list[Placement]:
    """Place `names` one after another, highest priority first, each seeing the ones before.

    A placed VM's reasons name only the chosen host (every host's reason costs a string per
    host and VM: 20,000 at 1,000 hosts); an unplaced VM's give every host's."""
    excluded = excluded or {}
    current = {h.name: h for h in hosts}
    # Hosts that may take some VM, best first for a VM without affinity (whose rank is group
    # priority, then free memory, ties by name): such a VM takes the first that accepts it.
    order = sorted(_order_key(h, limits) for h in hosts
                   if h.alive and not (h.fenced or h.maintenance or h.degraded))
    placements: list[Placement] = []
    for vm in by_priority(vms, names):
        spec = vms[vm]
        skip = excluded.get(vm, frozenset())
        best: HostCandidate | None = None
        if spec.affinity is None:
            for key in order:
                host = current[key[2]]
                if key[2] not in skip and refusal(spec, host, limits, migration=False) is None:
                    best = host
                    break
        else:
            best = choose(spec, [h for n, h in sorted(current.items()) if n not in skip], limits)
        if best is None:
            placements.append(place(spec, [h for n, h in sorted(current.items()) if n not in skip], limits))
            continue
        placements.append(Placement(vm=vm, host=best.name, reasons={best.name: "chosen"}))
        updated = current[best.name] = with_vm(best, spec)
        if best.alive and not (best.fenced or best.maintenance or best.degraded):
            del order[bisect.bisect_left(order, _order_key(best, limits))]
            bisect.insort(order, _order_key(updated, limits))
    return placements


def _order_key(host: HostCandidate, limits: PlacementLimits) -> tuple[int, int, str]:
    free = int(host.memory_mib * limits.memory_overcommit) - host.used_memory_mib
    return (-host.group_priority, -free, host.name)


def with_vm(host: HostCandidate, vm: VmSpec) -> HostCandidate:
    """`host` after taking `vm`."""
    return replace(host, used_memory_mib=host.used_memory_mib + vm.memory_mib,
                   used_vcpus=host.used_vcpus + vm.vcpus,
                   affinity_groups=host.affinity_groups | ({vm.affinity} if vm.affinity else set()),
                   anti_affinity_groups=host.anti_affinity_groups
                   | ({vm.anti_affinity} if vm.anti_affinity else set()))
