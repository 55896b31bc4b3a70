"""Migrate a VM from haguard's inventory: start the destination, move, clean up.

Until the agent exists the destination is this host: a same-host move, which is
also how a VM picks up a newer QEMU binary without a reboot.  Local disks are
copied when a destination disk directory is given (a host without the disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

from haguard.errors import MigrationError, VmError
from haguard.migration.engine import AlertFn, ProgressFn, run_migration
from haguard.migration.options import MigrationOptions
from haguard.migration.result import MigrationResult
from haguard.migration.uri import MigrationUri
from haguard.vm import launcher
from haguard.vm.definition import VmDefinition


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _virtual_size(path: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise VmError(f"cannot read disk {path}: {out.stderr.strip()}")
    return int(json.loads(out.stdout)["virtual-size"])


def prepare_destination_disks(vm: VmDefinition, dest_dir: Path) -> dict[int, Path]:
    """Empty copies of the VM's local disks in dest_dir, same format and virtual size."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[int, Path] = {}
    for i, disk in enumerate(vm.disks):
        if disk.shared:
            continue
        target = dest_dir / disk.path.name
        if target.resolve() == disk.path.resolve():
            raise MigrationError(f"destination disk {target} is the source disk itself")
        if target.exists():
            raise MigrationError(f"destination disk {target} already exists: remove it or pick "
                                 "another --dest-disk-dir")
        size = _virtual_size(disk.path)
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", disk.format, str(target),
                               str(size)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MigrationError(f"cannot create {target}: {proc.stderr.strip()}")
        paths[i] = target
    return paths


async def migrate_vm(vm: VmDefinition, base: Path, opts: MigrationOptions | None = None, *,
                     transport: str = "unix", dest_disk_dir: Path | None = None,
                     on_progress: ProgressFn | None = None, on_alert: AlertFn | None = None,
                     cancel: asyncio.Event | None = None) -> MigrationResult:
    src = launcher.current_paths(vm.name, base)
    if launcher.read_pid(src) is None:
        raise VmError(f"VM {vm.name} is not running on this host")
    disk_paths = prepare_destination_disks(vm, dest_disk_dir) if dest_disk_dir else {}
    dst = launcher.start(vm, base, incoming=True, disk_paths=disk_paths)
    if transport == "unix":
        uri = MigrationUri("unix", path=str(dst.paths.dir / "migrate.sock"))
        nbd = MigrationUri("unix", path=str(dst.paths.dir / "nbd.sock"))
    else:
        uri = MigrationUri("tcp", host="127.0.0.1", port=free_tcp_port())
        nbd = MigrationUri("tcp", host="127.0.0.1", port=free_tcp_port())
    local = tuple(f"disk{i}" for i in disk_paths)
    opts = replace(opts or MigrationOptions(uri=uri), uri=uri, vm_name=vm.name,
                   local_disks=local, nbd_uri=nbd if local else None)
    result: MigrationResult | None = None
    try:
        result = await run_migration(str(src.qmp), str(dst.paths.qmp), opts,
                                     on_progress=on_progress, on_alert=on_alert, cancel=cancel)
    finally:
        ok = result is not None and result.ok
        # Once postcopy started the guest's memory is split: never stop either side.
        kept_for_postcopy = (result is not None and result.postcopy and not ok
                             and launcher.read_pid(dst.paths) is not None)
        if ok:
            launcher.promote(vm.name, base, dst.paths)
            await launcher.stop(src)  # already quit by the engine: reaps and removes its dir
        elif not kept_for_postcopy:
            await launcher.stop(dst.paths)
            for path in disk_paths.values():
                with contextlib.suppress(OSError):
                    path.unlink()
    return result
