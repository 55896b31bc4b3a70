"""Options of one migration (what the operator or the coordinator asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from haguard.core.strategy import ConvergencePolicy
from haguard.migration.uri import MigrationUri


@dataclass(frozen=True, kw_only=True)
class MigrationOptions:
    uri: MigrationUri
    policy: ConvergencePolicy = field(default_factory=ConvergencePolicy)
    multifd: Literal["auto", "on", "off"] = "auto"
    multifd_channels: int = 2
    compression: Literal["none", "zstd", "zlib"] = "none"
    xbzrle: bool = False
    extra_capabilities: tuple[str, ...] = ()
    local_disks: tuple[str, ...] = ()          # block node names to copy to the destination
    nbd_uri: MigrationUri | None = None        # where the destination exports them
    quit_source: bool = True
    poll_interval_s: float = 0.1
    vm_name: str = ""
    # TLS (migration/tls.py): the source's credentials directory, and the name the
    # destination's certificate must carry (its address).  None: clear TCP.
    tls_dir: Path | None = None
    tls_hostname: str | None = None
