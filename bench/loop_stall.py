"""How long the agent's event loop stalls while its votes and cluster state are written.

The core task writes `cluster-state.json` (fsync, rename) before it sends anything that
follows a vote or an accepted state.  Written in the event loop, a slow fsync stops every
other task of the agent meanwhile: broker keepalives, the status file, probes, the VM
watchers.  Written in a thread that the core task awaits, only the core waits.  Both are
run here side by side, in alternating rounds, with the agent's own `save_persisted` and a
state of 1,000 VMs on 100 hosts, while a writer keeps the same filesystem busy (1 MiB
writes, an fsync every 16; /tmp is on the root disk here, as /var/lib/haguard is).  A task
that sleeps 5 ms measures the loop's lag.

Usage: .venv/bin/python bench/loop_stall.py [--quick] [--rounds N]
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import base_parser, emit_result, log, scratch_dir
from haguard.agent.executor import save_persisted
from haguard.core.cluster.state import initial_state
from haguard.core.cluster.types import PersistState

PERSISTS = 20
TICK_S = 0.005


def _state() -> PersistState:
    state = initial_state([f"vm{i}" for i in range(1000)], [f"h{i}" for i in range(100)])
    return PersistState(id="bench", term=7, voted_for="h1", accepted=state, committed=state)


def _disk_writer(path: Path, stop: threading.Event) -> None:
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        n = 0
        while not stop.is_set():
            os.write(fd, block)
            n += 1
            if n % 16 == 0:
                os.fsync(fd)
            if n % 256 == 0:
                os.lseek(fd, 0, os.SEEK_SET)
    finally:
        os.close(fd)


async def _round(path: Path, out: PersistState, threaded: bool) -> dict[str, float]:
    lags: list[float] = []
    done = asyncio.Event()

    async def monitor() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(TICK_S)
            lags.append((time.monotonic() - t0 - TICK_S) * 1000)

    watcher = asyncio.create_task(monitor())
    started = time.monotonic()
    for _ in range(PERSISTS):
        if threaded:
            await asyncio.to_thread(save_persisted, path, out)
        else:
            save_persisted(path, out)
        await asyncio.sleep(0.02)          # the core's other work between two persists
    took = (time.monotonic() - started - PERSISTS * 0.02) / PERSISTS * 1000
    done.set()
    await watcher
    lags.sort()
    return {"lag_max_ms": lags[-1], "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))], "persist_ms": took}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 1)


def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="rounds per way (default 5; quick 2)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    out = _state()
    results: dict[str, list[dict[str, float]]] = {"in_loop": [], "in_thread": []}
    with scratch_dir("stall") as root:
        stop = threading.Event()
        writer = threading.Thread(target=_disk_writer, args=(root / "busy", stop), daemon=True)
        writer.start()
        try:
            for r in range(rounds):
                for threaded in ((False, True) if r % 2 == 0 else (True, False)):
                    key = "in_thread" if threaded else "in_loop"
                    results[key].append(asyncio.run(_round(root / "cluster-state.json", out, threaded)))
                    log(f"round {r + 1} {key}: {results[key][-1]}")
            size_kib = round((root / "cluster-state.json").stat().st_size / 1024)
        finally:
            stop.set()
            writer.join(timeout=30)
    figures: dict[str, Any] = {"rounds": rounds, "persists_per_round": PERSISTS, "state_kib": size_kib}
    print(f"\nWriting {PERSISTS} times the state of 1,000 VMs / 100 hosts ({size_kib} KiB), disk busy; "
          f"medians of {rounds} rounds")
    print(f"  {'way':<12}{'persist ms':>11}{'loop lag p99 ms':>17}{'loop lag max ms':>17}")
    for key in ("in_loop", "in_thread"):
        row = {m: _median([r[m] for r in results[key]]) for m in ("persist_ms", "lag_p99_ms", "lag_max_ms")}
        figures[key] = row
        print(f"  {key:<12}{row['persist_ms']:>11}{row['lag_p99_ms']:>17}{row['lag_max_ms']:>17}")
    figures["targets"] = {"thread_keeps_loop_under_50ms": figures["in_thread"]["lag_max_ms"] <= 50}
    emit_result(figures)
    return 0 if all(figures["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
