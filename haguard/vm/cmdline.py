"""The one function that turns a VM definition into a QEMU command line.

Source and destination of a migration are both started from `qemu_argv`, so their
device models cannot drift apart; only the per-instance paths and `-incoming`
differ.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from haguard.vm.definition import VmDefinition

QBOOT = Path("/usr/share/qemu/qboot.rom")
# QEMU's seccomp filter (as libvirt sets it), less what `-daemonize` needs: `spawn=deny`
# forbids its fork and `elevateprivileges=deny` its setsid.  What stays denied: obsolete
# system calls and changes to scheduling, priorities and CPU affinity.
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class InstancePaths:
    """Files of one running QEMU instance, all inside its own directory."""

    dir: Path

    @property
    def qmp(self) -> Path:       # control monitor: migrations, stop
        return self.dir / "qmp.sock"

    @property
    def watch(self) -> Path:     # second monitor: the agent's heartbeats, held for as long as it runs
        return self.dir / "watch.sock"

    @property
    def ops(self) -> Path:       # third monitor: short operator sessions (status, cancel)
        return self.dir / "ops.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"


@dataclass(frozen=True)
class LaunchOptions:
    paths: InstancePaths
    incoming: bool = False
    # For a migration with local disks: the destination's own copies, by disk index.
    disk_paths: dict[int, Path] = field(default_factory=dict)
    qemu_binary: str | None = None
    sandbox: bool = False                   # the binary has seccomp (launcher.sandbox_supported)


def qemu_binary() -> str:
    return os.environ.get("HAGUARD_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def resolve_accel(vm: VmDefinition) -> str:
    if vm.accel != "auto":
        return vm.accel
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def qemu_argv(vm: VmDefinition, opts: LaunchOptions) -> list[str]:
    p = opts.paths
    argv = [
        opts.qemu_binary or qemu_binary(),
        "-name", f"guest={vm.name},debug-threads=on",
        "-machine", f"{vm.machine},accel={resolve_accel(vm)}",
        "-cpu", vm.cpu.qemu_model,
        "-m", f"{vm.memory_mib}M",
        "-smp", str(vm.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"socket,id=qmp,path={p.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=watch,path={p.watch},server=on,wait=off",
        "-mon", "chardev=watch,mode=control",
        "-chardev", f"socket,id=ops,path={p.ops},server=on,wait=off",
        "-mon", "chardev=ops,mode=control",
        "-chardev", f"file,id=serial0,path={p.serial}",
        "-serial", "chardev:serial0",
        "-pidfile", str(p.pidfile),
        "-daemonize",
    ]
    if opts.sandbox:
        argv += ["-sandbox", SANDBOX]
    if vm.firmware == "qboot":
        argv += ["-bios", str(QBOOT)]
    elif isinstance(vm.firmware, Path):
        argv += ["-bios", str(vm.firmware)]
    if vm.kernel:
        argv += ["-kernel", str(vm.kernel)]
    if vm.initrd:
        argv += ["-initrd", str(vm.initrd)]
    if vm.append:
        argv += ["-append", vm.append]
    for i, disk in enumerate(vm.disks):
        path = opts.disk_paths.get(i, disk.path)
        node = {
            "driver": disk.format, "node-name": f"disk{i}", "read-only": disk.readonly,
            "file": {"driver": "file", "filename": str(path)},
        }
        argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        dev = "virtio-blk-pci" if disk.bus == "virtio" else "ide-hd"
        argv += ["-device", f"{dev},drive=disk{i},id=disk{i}-dev"]
    for i, nic in enumerate(vm.nics):
        if nic.type == "user":
            argv += ["-netdev", f"user,id=net{i}"]
        else:
            argv += ["-netdev", f"tap,id=net{i},ifname={nic.ifname},script=no,downscript=no"]
        argv += ["-device", f"{nic.model},netdev=net{i},mac={nic.mac},id=net{i}-dev"]
    argv += list(vm.extra_args)
    if opts.incoming:
        argv += ["-incoming", "defer"]
    return argv
