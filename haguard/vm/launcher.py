"""Start, stop and inspect QEMU instances on this host.

QEMU runs daemonized in its own session (and, under systemd, in its own scope), so
stopping, restarting or killing haguard never stops a VM.  Each instance lives in
its own directory, RUN_DIR/NAME@ID, which no other instance ever reuses (QEMU
unlinks its sockets and pidfile by path when it exits).  The symlink RUN_DIR/NAME
points at the instance that owns the VM on this host; a migration's destination
gets its own directory and takes the link over only once it runs the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from haguard.errors import HaguardError, VmError
from haguard.vm.cmdline import SANDBOX, InstancePaths, LaunchOptions, qemu_argv, qemu_binary
from haguard.vm.definition import VmDefinition
from haguard.vm.monitor import monitor_command

DEFAULT_RUN_DIR = Path("/run/haguard/vms")
log = logging.getLogger(__name__)


@functools.cache
def sandbox_supported(binary: str) -> bool:
    """Whether `binary` takes haguard's `-sandbox` (QEMU built with seccomp): asked of QEMU
    itself once, with no machine, not inferred from its version."""
    probe = [binary, "-sandbox", SANDBOX, "-machine", "none", "-nodefaults", "-display", "none",
             "-no-user-config", "-S", "-qmp", "stdio"]
    quit_ = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    try:
        done = subprocess.run(probe, input=quit_, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: cannot ask QEMU about -sandbox (%s): VMs start without it", binary, exc)
        return False
    if done.returncode != 0:
        log.warning("%s refuses -sandbox %s (%s): VMs start without it", binary, SANDBOX,
                    done.stderr.decode(errors="replace").strip()[-200:])
    return done.returncode == 0


def run_dir(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if env := os.environ.get("HAGUARD_RUN_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return DEFAULT_RUN_DIR
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/haguard-{os.geteuid()}"
    return Path(base) / "haguard" / "vms"


def current_paths(name: str, base: Path) -> InstancePaths:
    """The instance the VM's link points at (which may have stopped)."""
    link = base / name
    try:
        return InstancePaths(base / os.readlink(link))
    except OSError:
        return InstancePaths(link)  # no link: a path that holds no live QEMU


def new_instance_paths(name: str, base: Path) -> InstancePaths:
    return InstancePaths(base / f"{name}@{time.strftime('%Y%m%d%H%M%S')}-{os.urandom(3).hex()}")


def promote(name: str, base: Path, paths: InstancePaths) -> None:
    """Point the VM's link at `paths` atomically."""
    tmp = base / f".{name}.link{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(paths.dir.name)
    tmp.replace(base / name)


def read_pid(paths: InstancePaths) -> int | None:
    """The QEMU pid if the pidfile names a live QEMU process, else None."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        # A dead QEMU nobody reaped yet (a zombie) keeps its comm: it is not running.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return pid if comm.startswith("qemu") and state not in ("Z", "X") else None


@dataclass(frozen=True)
class Instance:
    name: str
    paths: InstancePaths
    pid: int


def _systemd_scope_prefix(paths: InstancePaths) -> list[str]:
    """Under systemd, put each QEMU in its own scope so the agent's cgroup never holds it."""
    if not Path("/run/systemd/system").is_dir() or os.environ.get("HAGUARD_NO_SCOPE"):
        return []
    unit = "haguard-vm-" + paths.dir.name.replace("@", "-")
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}",
            "--slice=machine.slice"]


def start(vm: VmDefinition, base: Path, *, incoming: bool = False,
          disk_paths: dict[int, Path] | None = None, netns: str | None = None,
          timeout_s: float = 30.0) -> Instance:
    """Start QEMU for `vm`; returns once QEMU has daemonized (monitor sockets listening).

    A normal start takes the VM's link; an incoming one (a migration destination)
    does not.  `netns` runs QEMU inside a network namespace (a host in tests and demos).
    """
    if not incoming and (pid := read_pid(current_paths(vm.name, base))):
        raise VmError(f"VM {vm.name} already runs here (pid {pid})")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = new_instance_paths(vm.name, base)
    paths.dir.mkdir(mode=0o700)
    for i, disk in enumerate(vm.disks):
        path = (disk_paths or {}).get(i, disk.path)
        if not path.exists():
            raise VmError(f"VM {vm.name}: disk {path} does not exist")
    prefix = ["ip", "netns", "exec", netns] if netns else []
    argv = prefix + _systemd_scope_prefix(paths) + qemu_argv(
        vm, LaunchOptions(paths=paths, incoming=incoming, disk_paths=disk_paths or {},
                          sandbox=sandbox_supported(qemu_binary())))
    with open(paths.log, "ab") as log:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  start_new_session=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise VmError(f"VM {vm.name}: QEMU did not start within {timeout_s:.0f} s "
                          f"(see {paths.log})") from None
        except FileNotFoundError as exc:
            raise VmError(f"VM {vm.name}: cannot run {argv[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        err = _last_error(paths.log)
        _remove_dir(paths)
        raise VmError(f"VM {vm.name}: QEMU failed to start: {err}")
    pid = read_pid(paths)
    if pid is None:
        err = _last_error(paths.log)
        _remove_dir(paths)
        raise VmError(f"VM {vm.name}: QEMU exited right after starting: {err}")
    if not incoming:
        promote(vm.name, base, paths)
    return Instance(vm.name, paths, pid)


def _last_error(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and "warning:" not in ln]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else f"see {log}"


async def query_status(paths: InstancePaths, timeout_s: float = 2.0) -> str:
    """The VM's run state from its operator monitor ('running', 'paused', 'inmigrate', ...)."""
    reply = await monitor_command(paths.ops, "query-status", timeout_s=timeout_s)
    return str(reply["status"])


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie child of ours still answers kill(0).
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


async def stop(paths: InstancePaths, *, graceful_timeout_s: float = 0.0) -> bool:
    """Stop one instance: ACPI power-off first if a grace period is given, then `quit`,
    then SIGKILL.  Returns True if a process was stopped.  Removes the instance dir."""
    pid = read_pid(paths)
    if pid is None:
        _remove_dir(paths)
        return False
    if graceful_timeout_s > 0:
        with contextlib.suppress(HaguardError, OSError):
            await monitor_command(paths.qmp, "system_powerdown", timeout_s=2.0)
        if await asyncio.to_thread(_wait_gone, pid, graceful_timeout_s):
            _remove_dir(paths)
            return True
    with contextlib.suppress(HaguardError, OSError):
        await monitor_command(paths.qmp, "quit", timeout_s=2.0)
    if not await asyncio.to_thread(_wait_gone, pid, 5.0):
        # A QEMU in postcopy-paused may ignore polite requests.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(_wait_gone, pid, 5.0)
    _remove_dir(paths)
    return True


def kill(paths: InstancePaths) -> None:
    """SIGKILL an instance, as a power cut would (tests and VM-level fencing)."""
    if pid := read_pid(paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)


def _remove_dir(paths: InstancePaths) -> None:
    """Remove a stopped instance's directory, and the VM's link if it points there."""
    link = paths.dir.parent / paths.dir.name.split("@", 1)[0]
    with contextlib.suppress(OSError):
        if link.is_symlink() and os.readlink(link) == paths.dir.name:
            link.unlink()
    for f in (paths.qmp, paths.watch, paths.ops, paths.pidfile, paths.serial, paths.log):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        for leftover in paths.dir.iterdir():
            leftover.unlink()
        paths.dir.rmdir()
