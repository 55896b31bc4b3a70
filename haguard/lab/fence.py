"""A fence device stand-in speaking the fence-agent protocol: `python -m haguard.lab.fence`.

It reads `key=value` lines on stdin as fence agents do (fence_ipmilan, fence_redfish, ...).
Options: `action` (off, on, reboot, status, monitor), `plug` (the host), `state_dir` (its
power states and its call log), `run_dir` (the host's VM runtime directory: `off` and
`reboot` SIGKILL every QEMU whose command line names it and the host's agent, as cutting
the power would).
Every call is appended to `STATE_DIR/calls` as "<unix time> <action> <plug> <exit code>".
`STATE_DIR/mode` containing "fail" makes every call fail (a device that does not answer).
Exit codes as fence agents: 0 success (or power on), 1 failure, 2 power off (`status`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def qemus_naming(marker: str) -> list[int]:
    """Pids of the QEMUs whose command line contains `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "qemu-system" in cmd and marker in cmd:
                pids.append(int(proc.name))
    return pids


def power_off(run_dir: str) -> None:
    """What cutting the power does to the host: its QEMUs die, and so does its agent (named
    by the status file next to the run directory), which must not restart them."""
    pids = qemus_naming(run_dir)
    with contextlib.suppress(OSError, ValueError):
        agent = int(json.loads((Path(run_dir).parent / "agent-status.json").read_text())["pid"])
        if b"haguard" in Path(f"/proc/{agent}/cmdline").read_bytes():
            pids.insert(0, agent)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    opts = {}
    for line in sys.stdin:
        key, sep, value = line.strip().partition("=")
        if sep:
            opts[key.strip()] = value.strip()
    action, plug = opts.get("action", "off"), opts.get("plug", "?")
    state = Path(opts.get("state_dir", "."))
    power = state / f"power-{plug}"
    mode = state / "mode"
    if mode.exists() and mode.read_text().strip() == "fail":
        print(f"Failed: the device of {plug} does not answer", file=sys.stderr)
        result = 1
    elif action in ("off", "reboot"):
        if opts.get("run_dir"):
            power_off(opts["run_dir"])
        power.write_text("off" if action == "off" else "on")
        result = 0
    elif action in ("status", "monitor"):
        result = 2 if power.exists() and power.read_text() == "off" else 0
    elif action == "on":
        power.write_text("on")
        result = 0
    else:
        print(f"unknown action {action}", file=sys.stderr)
        result = 1
    with open(state / "calls", "a") as f:
        f.write(f"{time.time():.3f} {action} {plug} {result}\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
