"""What a migration will ask of both QEMUs: capabilities and parameters, from the options
and what each side offers; and applying it.  Every capability haguard manages is set
explicitly, so a previous attempt's leftovers never apply."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from haguard.adapters.qmp import Qmp
from haguard.core.strategy import ConvergencePolicy
from haguard.errors import PreflightError, QmpCommandError
from haguard.migration import preflight, tls
from haguard.migration.features import QemuFeatures
from haguard.migration.options import MigrationOptions

log = logging.getLogger("haguard.migration")

UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU treats any huge value as no cap
MANAGED_CAPS = ("events", "postcopy-ram", "multifd", "xbzrle", "auto-converge", "return-path",
                "pause-before-switchover")


@dataclass
class Plan:
    source_caps: dict[str, bool] = field(default_factory=dict)
    dest_caps: dict[str, bool] = field(default_factory=dict)
    policy: ConvergencePolicy = field(default_factory=ConvergencePolicy)
    source_params: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> list[str]:
        return sorted(c for c, on in self.source_caps.items() if on)


def make_plan(o: MigrationOptions, src: QemuFeatures, dst: QemuFeatures | None) -> Plan:
    plan = Plan(policy=o.policy, source_params=src.parameters)
    both = src.capabilities & (dst.capabilities if dst else src.capabilities)
    wanted: set[str] = {"events", *o.extra_capabilities}
    if plan.policy.postcopy != "never":
        if "postcopy-ram" in both:
            wanted |= {"postcopy-ram", "return-path"}
        elif plan.policy.postcopy == "always":
            wanted.add("postcopy-ram")  # reported as unsupported below
        else:
            plan.notes.append("postcopy unsupported on one side: falling back to pre-copy only")
            plan.policy = replace(plan.policy, postcopy="never")
        if dst is not None and not dst.oob and plan.policy.postcopy != "never":
            plan.notes.append("destination monitor lacks out-of-band support: a paused "
                              "postcopy could not be recovered")
    if o.local_disks:
        wanted |= {"pause-before-switchover", "return-path"}
    if o.xbzrle:
        wanted.add("xbzrle")
    # multifd and postcopy together break QEMUs before 10.1 (some accept both and then
    # lose the destination at switchover), and no capability tells them apart: keep
    # them apart.
    postcopy_on = plan.policy.postcopy != "never"
    if o.compression != "none" or o.multifd == "on":
        if postcopy_on:
            what = ("compression needs multifd, which" if o.compression != "none"
                    else "multifd")
            raise PreflightError(f"{what} cannot be combined with postcopy: add --postcopy never")
        wanted.add("multifd")
    elif o.multifd == "auto" and not o.xbzrle and not postcopy_on and "multifd" in both:
        wanted.add("multifd")
    if plan.policy.postcopy == "never" and plan.policy.auto_converge and "auto-converge" in both:
        wanted.add("auto-converge")
    preflight.check_capabilities(wanted, src, dst)
    preflight.check_compression(o.compression, src, dst)
    dest_side = {"postcopy-ram", "multifd", *o.extra_capabilities}
    for cap in (*MANAGED_CAPS, *o.extra_capabilities):
        if cap in src.capabilities:
            plan.source_caps[cap] = cap in wanted
        if dst and cap in dst.capabilities and cap in dest_side:
            plan.dest_caps[cap] = cap in wanted
    return plan



async def _set_caps(qmp: Qmp, caps: dict[str, bool]) -> None:
    await qmp.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": s} for c, s in caps.items()]})



async def apply_plan(plan: Plan, o: MigrationOptions, source: Qmp, dest: Qmp | None) -> None:
    if o.tls_dir is not None:
        try:
            await tls.enable(source, o.tls_dir, "client", o.tls_hostname)
        except QmpCommandError as exc:      # never a silent fall-back to clear text
            raise PreflightError(f"source refused the TLS credentials in {o.tls_dir}: {exc.desc}") from None
    if dest and plan.dest_caps:
        try:
            await _set_caps(dest, plan.dest_caps)
        except QmpCommandError as exc:
            raise PreflightError(f"destination refused the migration capabilities: "
                                 f"{exc.desc}") from None
    try:
        await _set_caps(source, plan.source_caps)
    except QmpCommandError as exc:
        raise PreflightError(f"source refused the migration capabilities: {exc.desc}") from None
    multifd = plan.source_caps.get("multifd", False)
    bw = plan.policy.max_bandwidth_bps or UNLIMITED_BANDWIDTH
    src_params: dict[str, Any] = {"max-bandwidth": bw,
                                  "downtime-limit": plan.policy.initial_downtime_ms}
    if plan.source_caps.get("postcopy-ram") and "max-postcopy-bandwidth" in plan.source_params:
        # The cap is about the link, which postcopy shares: 0 means no cap for QEMU here.
        src_params["max-postcopy-bandwidth"] = plan.policy.max_bandwidth_bps
    if plan.source_caps.get("auto-converge"):
        # Armed but gentle: the strategy raises it when the ladder reaches throttling.
        src_params |= {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1,
                       "max-cpu-throttle": 1}
    common: dict[str, Any] = {}
    if multifd:
        common["multifd-channels"] = o.multifd_channels
        common["multifd-compression"] = o.compression
    await source.cmd("migrate-set-parameters", src_params | common)
    if dest and common:
        await dest.cmd("migrate-set-parameters", common)
    for note in plan.notes:
        log.warning("%s", note)

