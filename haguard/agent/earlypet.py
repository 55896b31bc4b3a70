"""The watchdog left armed by an agent that died, petted before anything else starts.

An agent killed (kill -9, a crash, the OOM killer) leaves its watchdog armed, without the
magic close: the device resets the host one timeout after the last pet unless the next
agent pets it first.  systemd starts that agent after `RestartSec`, and on a loaded host
importing the agent alone took most of a 10 s timeout: the host was reset with its VMs,
although only the agent had died (tests/test_routine_ops.py, a coordinator's kill -9 on
12 busy hosts).

So the agent marks an open device (`watchdog-armed` beside its control socket, under
`/run`: a reboot clears it) and removes the mark at the magic close; `haguard run`, before
it imports anything else (haguard/entry.py; with the standard library and PyYAML only),
opens a marked device, writes one keepalive and closes it.  A close without the magic
character leaves it running, and the kernel's watchdog core pings it once at release: a
full timeout from then for the agent to open it again.  Anything that goes wrong here is
left to the agent proper.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

MARKER = "watchdog-armed"
DEFAULT_RUN_DIR = Path("/run/haguard/vms")      # config/cluster.py's run_dir default
DEFAULT_CONFIG = Path("/etc/haguard/cluster.yaml")   # and its DEFAULT_CLUSTER_CONFIG
PET = b"\0"                                      # never "V": that allows the magic close


def marker_path(run_dir: Path) -> Path:
    return run_dir.parent / MARKER


def mark(run_dir: Path, device: Path) -> None:
    path = marker_path(run_dir)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{device}\n")
        tmp.replace(path)


def unmark(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        marker_path(run_dir).unlink()


def pet_left_armed(config_path: Path) -> str | None:
    """Pet the device the previous agent left armed; its path, or None (nothing marked, or
    it could not be done)."""
    try:
        data = yaml.safe_load(config_path.read_text())
        run_dir = Path(data.get("run_dir") or DEFAULT_RUN_DIR) if isinstance(data, dict) else DEFAULT_RUN_DIR
        device = marker_path(run_dir).read_text().strip()
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    try:
        os.write(fd, PET)
    except OSError:
        return None
    finally:
        os.close(fd)
    return device


def config_in(argv: list[str]) -> Path:
    """The --config of `haguard run`'s arguments (argparse reads them properly later)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.removeprefix("--config="))
    return DEFAULT_CONFIG
