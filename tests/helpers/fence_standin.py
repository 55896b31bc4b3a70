#!/usr/bin/env python3
"""A fence device stand-in speaking the fence-agent protocol (key=value lines on stdin).

Options: `action` (off, on, reboot, status, monitor), `plug` (the host), `state_dir`
(where it keeps its power states and its log).  `STATE_DIR/mode` decides the outcome:
"ok" (default) or "fail" (exit 1, as a device that does not answer).  Every call is
appended to `STATE_DIR/calls` as "<time> <action> <plug> <result>".  `off` also SIGKILLs
the host's QEMUs (`kill_pattern` option), as cutting its power would.

Exit codes as fence agents: 0 success / power on, 1 failure, 2 power off (status).
"""

import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    opts = {}
    for line in sys.stdin:
        key, sep, value = line.strip().partition("=")
        if sep:
            opts[key.strip()] = value.strip()
    action, plug = opts.get("action", "off"), opts.get("plug", "?")
    state = Path(opts.get("state_dir", "/nonexistent"))
    mode_file = state / "mode"
    mode = mode_file.read_text().strip() if mode_file.exists() else "ok"
    power = state / f"power-{plug}"
    if mode == "fail":
        result = 1
    elif action in ("off", "reboot"):
        if opts.get("kill_pattern"):
            subprocess.run(["pkill", "-KILL", "-f", opts["kill_pattern"]], check=False)
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
    if result == 1:
        print(f"Failed: device for {plug} does not answer", file=sys.stderr)
    return result


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
