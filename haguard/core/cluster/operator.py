"""Operators' fencing requests, as the coordinator takes them.

- `haguard fence HOST`: the host's fence device now, dead or alive; its VMs are released
  once the device says off (through `Fencing`, like any fence).  Refused for the
  coordinator itself (it would power itself off mid-plan) and for a host without a device.
- `haguard confirm-off HOST`: the operator's word that a host whose device is broken is
  off.  Taken as its fence only for a host declared dead before this coordinator first saw
  the request: a request made earlier (the host was still running, or another failure)
  is refused with an alert and never taken later.  A coordinator elected since sees every
  pending request first in its own first plan, so the operator asks again after checking.

Each command is its own request (`member.py` names it by when it was made) and lapses
after CONFIRM_OFF_MS; a refusal is said once per request.  While the cluster is in
maintenance (paused.py) every request is refused, and never taken later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from haguard.core.alerts import RaiseAlert
from haguard.core.cluster.recovery import Fencing
from haguard.core.cluster.types import HostSpec

Request = tuple[str, str]               # (the request's name, the host)


class OperatorFencing:
    def __init__(self, me: str, hosts: Mapping[str, HostSpec], fencing: Fencing,
                 new_id: Callable[[], str]) -> None:
        self.me, self.hosts, self.fencing, self.new_id = me, hosts, fencing, new_id
        self.confirm_offs: set[Request] = set()        # asked in this plan's reports
        self.fences: set[Request] = set()
        self._off_seen: dict[Request, int] = {}        # confirm-off -> first seen at
        self._fence_refused: set[Request] = set()
        self._all_refused: set[Request] = set()        # refused by refuse_all, said once

    def asked(self, confirm_offs: set[Request], fences: set[Request], now_ms: int) -> None:
        """The requests the hosts report in this plan."""
        self.confirm_offs, self.fences = confirm_offs, fences
        self._off_seen = {k: at for k, at in self._off_seen.items() if k in confirm_offs}
        for key in confirm_offs:
            self._off_seen.setdefault(key, now_ms)
        self._fence_refused &= fences
        self._all_refused &= fences | confirm_offs

    def refuse_all(self, why: str) -> list[RaiseAlert]:
        """Every request of this plan refused (the cluster is in maintenance), each said once."""
        out = []
        asked = self.fences | self.confirm_offs
        for key in sorted(asked - self._all_refused):
            kind = "fence-refused" if key[0].startswith("fence") else "confirm-off-refused"
            out.append(RaiseAlert(id=self.new_id(), kind=kind, host=key[1],
                                  reason=f"{key[0].split(':')[0]} of {key[1]} refused: {why}; nothing moved"))
        self._all_refused |= asked         # never taken later, when maintenance is off
        return out

    def fence_now(self, fenced: Callable[[str], bool], now_ms: int) -> list[RaiseAlert]:
        hosts_asked = {host for _, host in self.fences}
        for host in self.fencing.pending():
            if self.fencing.manual(host) and host not in hosts_asked:
                self.fencing.lapse(host)
        out = []
        for key in sorted(self.fences - self._all_refused):
            host = key[1]
            why = ("it is the coordinator: drain it or stop its agent first" if host == self.me
                   else None if self.hosts[host].fence_device else "it has no fence device")
            if why is None:
                if not fenced(host):
                    self.fencing.fence_now(host, now_ms)
            elif key not in self._fence_refused:
                self._fence_refused.add(key)
                out.append(RaiseAlert(id=self.new_id(), kind="fence-refused", host=host,
                                      reason=f"fence of {host} refused: {why}"))
        return out

    def confirmed(self, host: str) -> list[RaiseAlert]:
        """A confirm-off of `host`, declared dead and being fenced, taken if it may be."""
        out = []
        for key in sorted(k for k in self.confirm_offs - self._all_refused if k[1] == host):
            if self.fencing.confirm_by_operator(host, self._off_seen[key]):
                out.append(RaiseAlert(id=self.new_id(), kind="fence-confirmed-by-operator", host=host,
                                      reason=f"an operator confirmed {host} is off: its VMs are recovered"))
        return out

    def refusals(self, fenced: Callable[[str], bool], heard: Callable[[str], bool],
                 now_ms: int) -> list[RaiseAlert]:
        """Confirm-offs not taken in the plan that first saw them: refused, said once."""
        out = []
        for key in sorted(self.confirm_offs - self._all_refused):
            host = key[1]
            if self._off_seen[key] != now_ms or fenced(host):
                continue
            why = ("it is heard" if heard(host)
                   else "it was not declared dead before the request: check it, then ask again")
            out.append(RaiseAlert(id=self.new_id(), kind="confirm-off-refused", host=host,
                                  reason=f"confirm-off of {host} refused: {why}; nothing moved"))
        return out
