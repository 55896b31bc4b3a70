"""What a migration reports when it ends, and what it reports while it runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Progress:
    status: str
    elapsed_ms: int
    passes: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_rate_bps: int = 0
    throughput_bps: int = 0
    downtime_limit_ms: int = 0
    step: str = ""

    @property
    def percent(self) -> float:
        if self.status == "completed":
            return 100.0
        if not self.total_bytes:
            return 0.0
        done = max(0, self.total_bytes - self.remaining_bytes)
        return min(100.0, 100.0 * done / self.total_bytes)

    @property
    def eta_s(self) -> float | None:
        if self.throughput_bps <= 0:
            return None
        return self.remaining_bytes / self.throughput_bps


@dataclass
class MigrationResult:
    status: str                      # completed | failed | cancelled | aborted | postcopy-paused
    vm: str = ""
    uri: str = ""
    error: str | None = None
    total_time_ms: int = 0
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    transferred_bytes: int = 0
    passes: int = 0
    postcopy: bool = False
    postcopy_recoveries: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
