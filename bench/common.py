"""Helpers shared by the benchmarks: `--quick`, logging, medians, the JSON result line,
and cleanup of every process and temp dir a benchmark made, also on failure or Ctrl-C.

A benchmark prints its figures, then exactly one JSON object as the last line of stdout.
Progress goes to stderr so that stdout stays a table plus that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_T0 = time.monotonic()


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true",
                    help="a short version (under 2 minutes) that reports the same keys")
    return ap


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def median(values: list[float] | list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def emit_result(result: dict[str, Any]) -> None:
    """The benchmark's last line: one JSON object with every figure."""
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")), flush=True)


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (a benchmark's private directory)."""
    me = os.getpid()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def kill_all_mentioning(marker: str, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process started with `marker` on its command line; wait until gone."""
    pids = set(pids_mentioning(marker))
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process dies only once continued
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap our own children
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "X"
            if state in ("Z", "X"):
                pids.discard(pid)
        time.sleep(0.05)
    return sorted(pids)


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A private directory under /tmp (short: unix socket paths are limited to 108 bytes).

    On the way out, whatever happened, every process whose command line names the
    directory (QEMU daemonizes in its own session, so Ctrl-C never reaches it) is
    killed and the directory removed.
    """
    root = Path(f"/tmp/hgb-{name}-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700)
    try:
        yield root
    finally:
        left = kill_all_mentioning(str(root))
        if left:
            print(f"warning: processes {left} would not die", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run, with SIGTERM cancelling the main task as Ctrl-C does (finally blocks run)."""
    async def wrapper() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    return asyncio.run(wrapper())
