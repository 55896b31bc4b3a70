"""Fence devices: power a host off (or on, or ask its power state) through a fence agent.

The standard fence-agent interface (fence-agents: fence_ipmilan, fence_redfish, fence_dummy, ...):
the agent reads `key=value` lines on stdin (`action=off`, then the device's options, then
`password=...`), and its exit code is the answer: 0 = done.  For `status`, 0 = power on,
2 = power off, anything else = unknown.  Nothing secret ever goes on the command line (any
user can read /proc/<pid>/cmdline) nor into a log record or a result's detail.

`kind: command` runs any program with the same protocol; its `agent` field may hold
arguments (split like a shell would), since it holds no secrets either.

`fence()` never raises for an agent's failure: a timeout, a missing program, an unreadable
password file or a non-zero exit all come back as `FenceResult(ok=False, detail=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from haguard.config.cluster import FenceDevice

log = structlog.get_logger("haguard.fence")

FenceAction = Literal["off", "reboot", "status", "on"]
PowerState = Literal["on", "off"]

# fence-agents' convention for `status`
STATUS_ON_EXIT = 0
STATUS_OFF_EXIT = 2

# Fence agents live in sbin, which a service's PATH may lack.
AGENT_DIRS = ("/usr/sbin", "/sbin")
DETAIL_MAX_CHARS = 200
REDACTED = "***"
# Option names whose values are secret: any name containing one of these.
SECRET_MARKERS = ("passw", "secret", "token", "community")


@dataclass(frozen=True, kw_only=True)
class FenceResult:
    ok: bool
    action: FenceAction
    host: str
    detail: str                     # one line, secrets redacted
    duration_s: float
    power: PowerState | None = None   # `status` (or a confirmed `off`): what the agent reported
    exit_code: int | None = None      # None: the agent did not exit by itself (or never started)


def is_secret_option(key: str) -> bool:
    name = key.lower()
    return any(marker in name for marker in SECRET_MARKERS)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= DETAIL_MAX_CHARS else flat[: DETAIL_MAX_CHARS - 1] + "…"


def _last_line(*outputs: str) -> str:
    for output in outputs:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def _read_password(path: Path) -> str:
    """The password file's content without its trailing newline; OSError/ValueError when unusable."""
    text = path.read_text(encoding="utf-8")
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if "\n" in password or "\r" in password:
        raise ValueError(f"password file {path} holds more than one line")
    if not password:
        raise ValueError(f"password file {path} is empty")
    return password


def stdin_lines(device: FenceDevice, action: FenceAction, password: str | None) -> bytes:
    """The agent's stdin: action first, the options, the password last.  ValueError on a value
    that would break the line protocol (a newline would smuggle in another option)."""
    lines = [f"action={action}"]
    for key, value in device.options.items():
        if key == "action":
            continue  # the action is ours to choose, never the config's
        if not key or "=" in key or any(c in key + value for c in "\r\n\0"):
            raise ValueError(f"fence option {key!r} has an '=' in its name or a line break")
        lines.append(f"{key}={value}")
    if password is not None:
        lines.append(f"password={password}")
    return ("\n".join(lines) + "\n").encode()


def agent_argv(device: FenceDevice) -> list[str]:
    """The program to run, resolved; ValueError when it cannot be found."""
    argv = shlex.split(device.agent) if device.kind == "command" else [device.agent]
    if not argv:
        raise ValueError("fence device has an empty agent")
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program) or shutil.which(program, path=os.pathsep.join(AGENT_DIRS))
        if found is None:
            raise ValueError(f"fence agent {program!r} not found in PATH or {', '.join(AGENT_DIRS)}")
        argv[0] = found
    elif not os.access(program, os.X_OK):
        raise ValueError(f"fence agent {program} is missing or not executable")
    return argv


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The agent runs in its own session: kill helpers it spawned too (ipmitool, curl, ssh).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _run(argv: list[str], stdin: bytes, timeout_s: float) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return None, "", ""
    except BaseException:
        _kill_group(proc)   # cancelled: never leave an agent running unobserved
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    # The agent is done; helpers left in its group would act on the device unobserved.
    _kill_group(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def fence(device: FenceDevice, action: FenceAction, *, host: str,
                confirm_off: bool = False) -> FenceResult:
    """Run one fence action against `host`'s device.

    `off` is ok only when the agent exits 0; with `confirm_off`, a follow-up `status` must
    also report the power off.  `status` is ok when the agent answered on (0) or off (2).
    """
    started = time.monotonic()
    secrets = [v for k, v in device.options.items() if is_secret_option(k)]
    try:
        password = _read_password(device.password_file) if device.password_file is not None else None
        if password is not None:
            secrets.append(password)
        argv = agent_argv(device)
        payload = stdin_lines(device, action, password)
    except (OSError, ValueError) as exc:
        detail = _one_line(redact(str(exc), secrets))
        return _finish(FenceResult(ok=False, action=action, host=host, detail=detail,
                                   duration_s=time.monotonic() - started), device)

    result = await _attempt(argv, payload, device, action, host, secrets, started)
    if result.ok and action == "off" and confirm_off:
        check = await _attempt(argv, stdin_lines(device, "status", password), device, "status",
                               host, secrets, time.monotonic())
        if check.power != "off":
            why = "still on" if check.power == "on" else check.detail
            result = FenceResult(ok=False, action=action, host=host, exit_code=result.exit_code,
                                 detail=_one_line(f"off not confirmed by status: {why}"),
                                 duration_s=time.monotonic() - started, power=check.power)
        else:
            result = FenceResult(ok=True, action=action, host=host, exit_code=result.exit_code,
                                 detail=result.detail, duration_s=time.monotonic() - started,
                                 power="off")
    return _finish(result, device)


async def _attempt(argv: list[str], payload: bytes, device: FenceDevice, action: FenceAction,
                   host: str, secrets: list[str], started: float) -> FenceResult:
    try:
        code, out, err = await _run(argv, payload, device.timeout_s)
    except OSError as exc:  # exec failed: permission, bad interpreter
        return FenceResult(ok=False, action=action, host=host, duration_s=time.monotonic() - started,
                           detail=_one_line(redact(f"cannot run fence agent {argv[0]}: {exc}", secrets)))
    elapsed = time.monotonic() - started
    if code is None:
        return FenceResult(ok=False, action=action, host=host, duration_s=elapsed,
                           detail=f"fence agent {Path(argv[0]).name} timed out after {device.timeout_s:g} s")
    said = redact(_last_line(err, out) if code != 0 else _last_line(out, err), secrets)
    power: PowerState | None = None
    if action == "status":
        power = "on" if code == STATUS_ON_EXIT else "off" if code == STATUS_OFF_EXIT else None
        ok = power is not None
    else:
        ok = code == 0
    detail = said or (f"power {power}" if power else f"exit code {code}")
    if not ok:
        detail = f"exit code {code}: {detail}" if said else detail
    return FenceResult(ok=ok, action=action, host=host, detail=_one_line(detail), duration_s=elapsed,
                       power=power, exit_code=code)


def _finish(result: FenceResult, device: FenceDevice) -> FenceResult:
    # Option names only, never values: a value may be a credential the marker list does not know.
    level = log.info if result.ok else log.error
    level("fence", host=result.host, action=result.action, ok=result.ok, detail=result.detail,
          power=result.power, exit_code=result.exit_code, duration_s=round(result.duration_s, 3),
          agent=Path(device.agent.split()[0] if device.agent.split() else "?").name,
          options=sorted(device.options))
    return result
