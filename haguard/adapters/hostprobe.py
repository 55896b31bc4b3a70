"""Run the host probes of the cluster configuration on their intervals.

A command probe passes when it exits 0 within its timeout; past the timeout its
whole process group is killed (a probe's children die with it).  A file probe
reads a number (the first word: /proc/loadavg works as is) and passes while it is
at most `max_value`; a missing or unreadable file, or no number, is a failure.
File reads run in a thread under the same timeout: a hung mount must not stall
the agent.  Results are core inputs (haguard/core/probes.py) handed to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from haguard.config.cluster import HostProbe
from haguard.core.probes import ProbeFailed, ProbeInput, ProbePassed, ProbeTimedOut

Clock = Callable[[], int]
OUTPUT_LIMIT = 4096  # bytes of a command's output kept for the failure reason


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


async def run_probe(probe: HostProbe, *, clock: Clock = _monotonic_ms) -> ProbeInput:
    """Run one probe once; never raises for the probe's own failures."""
    if probe.command is not None:
        return await _run_command(probe, probe.command, clock)
    assert probe.file is not None and probe.max_value is not None  # the config guarantees one source
    return await _read_file(probe, probe.file, probe.max_value, clock)


async def _run_command(probe: HostProbe, argv: Sequence[str], clock: Clock) -> ProbeInput:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return ProbeFailed(probe=probe.name, now_ms=clock(),
                           reason=f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(probe.timeout_s):
            output = await _read_limited(proc)
            code = await proc.wait()
    except TimeoutError:
        return ProbeTimedOut(probe=probe.name, now_ms=clock(), timeout_ms=round(probe.timeout_s * 1000))
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await proc.wait()
    if code == 0:
        return ProbePassed(probe=probe.name, now_ms=clock())
    why = f"exit {code}" if code > 0 else f"killed by signal {-code}"
    last = _last_line(output)
    return ProbeFailed(probe=probe.name, now_ms=clock(), reason=f"{why}: {last}" if last else why)


async def _read_limited(proc: asyncio.subprocess.Process) -> bytes:
    """The tail of the command's output; reads until EOF without keeping it all."""
    assert proc.stdout is not None
    tail = b""
    while chunk := await proc.stdout.read(65536):
        tail = (tail + chunk)[-OUTPUT_LIMIT:]
    return tail


def _kill_group(pid: int) -> None:
    # start_new_session made the probe a group leader: its pgid is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _last_line(output: bytes) -> str:
    lines = [ln.strip() for ln in output.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


async def _read_file(probe: HostProbe, path: Path, max_value: float, clock: Clock) -> ProbeInput:
    try:
        async with asyncio.timeout(probe.timeout_s):
            text = await asyncio.to_thread(_read_head, path)
    except TimeoutError:
        return ProbeTimedOut(probe=probe.name, now_ms=clock(), timeout_ms=round(probe.timeout_s * 1000))
    except OSError as exc:
        return ProbeFailed(probe=probe.name, now_ms=clock(),
                           reason=f"cannot read {path}: {exc.strerror or exc}")
    words = text.split()
    try:
        value = float(words[0])
    except (IndexError, ValueError):
        shown = words[0][:40] if words else ""
        return ProbeFailed(probe=probe.name, now_ms=clock(),
                           reason=f"{path} does not start with a number ({shown!r})")
    if value > max_value:
        return ProbeFailed(probe=probe.name, now_ms=clock(),
                           reason=f"{path}: {value:g} is above the limit {max_value:g}")
    return ProbePassed(probe=probe.name, now_ms=clock(), detail=f"{value:g}")


def _read_head(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(4096).decode(errors="replace")


class HostProber:
    """Runs every probe on its own interval until cancelled; results go to `on_result`."""

    def __init__(self, probes: Sequence[HostProbe], on_result: Callable[[ProbeInput], None], *,
                 clock: Clock | None = None) -> None:
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError("host probe names must be unique")
        self.probes = tuple(probes)
        self.on_result = on_result
        self.clock = clock

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for p in self.probes:
                tg.create_task(self._loop(p), name=f"hostprobe-{p.name}")

    async def _loop(self, probe: HostProbe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            result = await run_probe(probe, clock=self.clock or _monotonic_ms)
            self.on_result(result)
            await asyncio.sleep(max(0.0, probe.interval_s - (loop.time() - started)))
