"""What the agent derives from its configuration and from this machine, for its cores."""

from __future__ import annotations

import contextlib
from pathlib import Path

from haguard.config.cluster import TimingConfig
from haguard.core.detector import DetectorTiming


def host_memory_mib() -> int:
    """This machine's memory (MemTotal), 0 when /proc/meminfo cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def detector_timing(t: TimingConfig) -> DetectorTiming:
    return DetectorTiming(suspect_timeout_ms=t.suspect_timeout_ms, dead_timeout_ms=t.dead_timeout_ms,
                          isolation_timeout_ms=t.isolation_timeout_ms)
