"""The `haguard` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haguard import __version__, cli_agent
from haguard.core.strategy import ConvergencePolicy
from haguard.errors import ConfigError, HaguardError
from haguard.migration.engine import run_migration
from haguard.migration.options import MigrationOptions
from haguard.migration.result import MigrationResult
from haguard.migration.uri import MigrationUri, parse_uri

if TYPE_CHECKING:
    from haguard.vm.definition import VmDefinition

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_POSTCOPY_PAUSED = 0, 1, 2, 3
DOWNTIME_STEPS_MS = ConvergencePolicy().downtime_steps_ms


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def conv(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return v
    return conv


def _dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vm-dir", help="VM definition directory (default /etc/haguard/vms, "
                                    "or $HAGUARD_VM_DIR)")
    p.add_argument("--run-dir", help="runtime directory for QEMU sockets (default "
                                     "/run/haguard/vms, or $HAGUARD_RUN_DIR)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haguard", description="High-availability watchdog for "
                                 "QEMU/KVM hosts.")
    ap.add_argument("--version", action="version", version=f"haguard {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    vm = sub.add_parser("vm", help="start, stop and inspect VMs on this host")
    vmsub = vm.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    p = vmsub.add_parser("start", help="start a defined VM here")
    p.add_argument("name")
    _dirs(p)
    p = vmsub.add_parser("stop", help="stop a VM (ACPI power-off, then quit after --timeout)")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the guest "
                   "to power off before QEMU is quit (0: quit at once)")
    _dirs(p)
    p = vmsub.add_parser("status", help="state of one or all defined VMs on this host")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    _dirs(p)

    m = sub.add_parser("migrate", help="move a running VM live",
                       description="Move a defined VM (NAME --to HOST), or attach to QEMUs "
                                   "someone else started (--source-qmp/--dest-qmp/--uri).")
    m.add_argument("name", nargs="?", help="a VM from the inventory")
    m.add_argument("--to", metavar="HOST", help="destination host: this one ('local'), or in cluster "
                   "mode another host of the cluster (the coordinator moves it)")
    m.add_argument("--config", type=Path, default=None, metavar="PATH",
                   help="cluster configuration for a move to another host (default "
                        "/etc/haguard/cluster.yaml)")
    m.add_argument("--source-qmp", metavar="PATH", help="attach mode: source QMP socket")
    m.add_argument("--dest-qmp", metavar="PATH", help="attach mode: destination QMP socket")
    m.add_argument("--uri", help="attach mode: tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT")
    m.add_argument("--transport", choices=["unix", "tcp"], default="unix",
                   help="same-host moves of defined VMs (default unix)")
    m.add_argument("--dest-disk-dir", metavar="DIR", type=Path,
                   help="copy local disks into DIR (a destination without the VM's disks)")
    m.add_argument("--max-bandwidth", type=_positive(float), metavar="MiB/s",
                   help="bandwidth cap (default: none)")
    m.add_argument("--downtime-limit", type=_positive(int), metavar="ms", default=500,
                   help="largest pause the guest may see at switchover; the limit is raised "
                        "towards it in steps from 30 ms (default 500)")
    m.add_argument("--postcopy", choices=["never", "auto", "always"], default="auto")
    m.add_argument("--timeout", type=_positive(float), metavar="s",
                   help="completion deadline (default: 150 s per GiB of RAM, at least 10 s)")
    m.add_argument("--progress-timeout", type=_positive(float), metavar="s", default=150.0,
                   help="abort a pre-copy that moves no bytes for this long (default 150)")
    m.add_argument("--postcopy-stall", type=_positive(float), metavar="s", default=5.0,
                   help="pause a postcopy that moves no bytes for this long (default 5)")
    m.add_argument("--recovery-timeout", type=_positive(float), metavar="s", default=600.0,
                   help="keep trying to recover a paused postcopy this long (default 600)")
    m.add_argument("--no-auto-converge", action="store_true",
                   help="never throttle the guest's vCPUs")
    m.add_argument("--multifd", choices=["auto", "on", "off"], default="auto")
    m.add_argument("--multifd-channels", type=_positive(int), default=2)
    m.add_argument("--compression", choices=["none", "zstd", "zlib"], default="none",
                   help="multifd compression (needs multifd)")
    m.add_argument("--xbzrle", action="store_true", help="XBZRLE page delta compression")
    m.add_argument("--tls-dir", type=Path, metavar="DIR",
                   help="attach mode: move over TLS with the x509 credentials in DIR, both ends "
                        "checking the other's certificate (docs/migration.md, TLS)")
    m.add_argument("--tls-hostname", metavar="NAME",
                   help="the name the destination's certificate must carry (default: the --uri host)")
    m.add_argument("--cap", action="append", default=[], metavar="CAPABILITY",
                   help="enable another migration capability on both sides (repeatable)")
    m.add_argument("--cancel", action="store_true",
                   help="cancel the migration in flight for NAME (or --source-qmp: any "
                        "monitor of the source other than the one the migration holds)")
    m.add_argument("--json", action="store_true", help="print one JSON object with the result")
    _dirs(m)

    g = sub.add_parser("guest-build", help="build the memory-dirtying test guest")
    g.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="run the demonstration")
    d.add_argument("--keep-going", action="store_true",
                   help="run the cluster act even when the migration act failed")
    act = d.add_mutually_exclusive_group()
    act.add_argument("--migration", action="store_true",
                     help="only the migration act (one VM moved live between two local QEMUs)")
    act.add_argument("--cluster", action="store_true",
                     help="only the cluster act (3 hosts: drain, power-off, fenced recovery)")
    d.add_argument("--loopback", action="store_true",
                   help="cluster hosts on 127.0.0.{1,2,3}, no namespaces (the default without root)")
    cli_agent.add_subcommands(sub)
    return ap


# ---- vm ------------------------------------------------------------------------------

def _inventory_vm(args: argparse.Namespace) -> VmDefinition:
    from haguard.vm.inventory import find_vm, vm_dir
    vm = find_vm(args.name, vm_dir(args.vm_dir))
    for w in vm.warnings():
        print(f"haguard: warning: {w}", file=sys.stderr)
    return vm


def cmd_vm(args: argparse.Namespace) -> int:
    from haguard.vm import launcher
    from haguard.vm.inventory import load_inventory, vm_dir
    base = launcher.run_dir(args.run_dir)
    if args.vm_command == "start":
        inst = launcher.start(_inventory_vm(args), base)
        print(f"VM {inst.name} started (pid {inst.pid}, monitor {inst.paths.qmp})")
        return EXIT_OK
    if args.vm_command == "stop":
        paths = launcher.current_paths(args.name, base)
        if launcher.read_pid(paths) is None:
            print(f"VM {args.name} is not running here")
            return EXIT_OK
        asyncio.run(launcher.stop(paths, graceful_timeout_s=args.timeout))
        print(f"VM {args.name} stopped")
        return EXIT_OK
    names = [args.name] if args.name else sorted(load_inventory(vm_dir(args.vm_dir)))
    rows = [asyncio.run(_vm_state(n, base)) for n in names]
    if args.json:
        print(json.dumps(rows if not args.name else rows[0]))
    else:
        for r in rows:
            print(f"{r['name']:<20} {r['state']:<12} {r.get('pid') or ''}")
    return EXIT_OK if not args.name or rows[0]["state"] != "unknown" else EXIT_FAILED


async def _vm_state(name: str, base: Path) -> dict[str, Any]:
    from haguard.vm import launcher
    paths = launcher.current_paths(name, base)
    pid = launcher.read_pid(paths)
    if pid is None:
        return {"name": name, "state": "stopped", "pid": None}
    try:
        state = await launcher.query_status(paths, timeout_s=2.0)
    except HaguardError as exc:
        return {"name": name, "state": "hung", "pid": pid, "error": str(exc)}
    return {"name": name, "state": state, "pid": pid, "qmp": str(paths.qmp)}


# ---- migrate -------------------------------------------------------------------------

def policy_from_args(args: argparse.Namespace) -> ConvergencePolicy:
    steps = tuple(s for s in DOWNTIME_STEPS_MS if s < args.downtime_limit)
    steps = (*steps, args.downtime_limit)
    return ConvergencePolicy(
        postcopy=args.postcopy,
        max_bandwidth_bps=int(args.max_bandwidth * 2**20) if args.max_bandwidth else 0,
        downtime_steps_ms=steps,
        auto_converge=not args.no_auto_converge,
        completion_timeout_ms=int(args.timeout * 1000) if args.timeout else None,
        progress_timeout_ms=int(args.progress_timeout * 1000),
        postcopy_stall_timeout_ms=int(args.postcopy_stall * 1000),
        postcopy_recovery_timeout_ms=int(args.recovery_timeout * 1000),
    )


def _cluster_move(args: argparse.Namespace) -> int:
    """A move to another host: asked of the local agent, decided and run by the cluster."""
    from haguard.agent.control import ask_agent
    from haguard.config.cluster import DEFAULT_CLUSTER_CONFIG, load_cluster_config
    from haguard.ui.drain import follow_move
    cfg = load_cluster_config(args.config or DEFAULT_CLUSTER_CONFIG)
    if not cfg.ha.enabled:
        raise HaguardError(f"host {args.to!r}: moves to other hosts need cluster mode (ha.enabled in "
                           f"{args.config or DEFAULT_CLUSTER_CONFIG}); this command moves to this host only")
    ask_agent(cfg, {"action": "migrate", "vm": args.name, "host": args.to}, host_field="--to")
    return 0 if follow_move(cfg, args.name, args.to, timeout_s=args.timeout or 600.0) else 1


def _is_this_host(name: str) -> bool:
    return name in ("local", "localhost", socket.gethostname(), socket.getfqdn())


def _print_result(res: MigrationResult, as_json: bool) -> int:
    if as_json:
        print(json.dumps(res.to_json()))
    elif res.ok:
        pc = ", postcopy" if res.postcopy else ""
        print(f"migrated {res.vm or 'VM'} in {res.total_time_ms / 1000:.1f} s (downtime "
              f"{res.downtime_ms} ms, {res.transferred_bytes >> 20} MiB, {res.passes} passes{pc})")
    if not res.ok:
        print(f"haguard: migration {res.status}: {res.error}", file=sys.stderr)
    if res.ok:
        return EXIT_OK
    return EXIT_POSTCOPY_PAUSED if res.status == "postcopy-paused" else EXIT_FAILED


async def _cancel(args: argparse.Namespace) -> int:
    from haguard.adapters.qmp import Qmp
    from haguard.vm import launcher
    if args.source_qmp:
        path = Path(args.source_qmp)
    elif args.name:
        path = launcher.current_paths(args.name, launcher.run_dir(args.run_dir)).ops
    else:
        raise HaguardError("--cancel needs NAME or --source-qmp")
    async with Qmp.session(path, timeout_s=5.0) as qmp:
        status = (await qmp.cmd("query-migrate")).get("status", "none")
        if status.startswith("postcopy"):
            raise HaguardError("cannot cancel: postcopy has started, the guest lives on both "
                               "sides until it completes")
        if status in ("none", "completed", "failed", "cancelled"):
            raise HaguardError(f"no migration in flight (last status: {status})")
        await qmp.cmd("migrate_cancel")
    print("cancel requested")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.cancel:
        return asyncio.run(_cancel(args))
    attach = args.source_qmp is not None
    if attach and args.name:
        raise HaguardError("give either a VM NAME or --source-qmp, not both")
    if attach and not args.uri:
        raise HaguardError("attach mode needs --uri (where the destination listens)")
    if not attach and not args.name:
        raise HaguardError("name a VM (haguard migrate NAME --to HOST) or attach with "
                           "--source-qmp/--dest-qmp/--uri")
    if not attach and not args.to:
        raise HaguardError("--to HOST is required")
    if args.tls_dir is not None:
        _check_tls_args(args, attach)
    if not attach and not _is_this_host(args.to):
        return _cluster_move(args)
    policy = policy_from_args(args)
    return asyncio.run(_migrate(args, policy, attach))


def _check_tls_args(args: argparse.Namespace, attach: bool) -> None:
    from haguard.migration import tls
    if not attach:
        raise HaguardError("--tls-dir is for attach mode: a move by name uses the agents' "
                           "ha.migration_tls_dir")
    if (problems := tls.problems(args.tls_dir)):
        raise HaguardError(f"--tls-dir: {problems[0]}")
    if args.tls_hostname is None and not parse_uri(args.uri).host:
        raise HaguardError("--tls-dir with a URI that names no host needs --tls-hostname")


async def _tls_destination(args: argparse.Namespace) -> None:
    """The destination's side of an attach-mode move over TLS (the engine sets the source's)."""
    from haguard.adapters.qmp import Qmp
    from haguard.errors import QmpCommandError
    from haguard.migration import tls
    async with Qmp.session(args.dest_qmp) as qmp:
        try:
            await tls.enable(qmp, args.tls_dir, "server")
        except QmpCommandError as exc:      # never a silent fall-back to clear text
            raise HaguardError(f"destination refused the TLS credentials in {args.tls_dir}: "
                               f"{exc.desc}") from None


async def _migrate(args: argparse.Namespace, policy: ConvergencePolicy, attach: bool) -> int:
    from haguard.migration.managed import migrate_vm
    from haguard.ui.progress import MigrationDisplay
    from haguard.vm import launcher
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel.set)
    label = args.name or Path(args.source_qmp).name
    with MigrationDisplay(label, enabled=not args.json) as display:
        common: dict[str, Any] = {"on_progress": display.update, "on_alert": display.alert,
                                  "cancel": cancel}
        if attach:
            uri = parse_uri(args.uri)
            opts = _options(args, policy, uri)
            if args.tls_dir is not None:
                await _tls_destination(args)
                opts = replace(opts, tls_dir=args.tls_dir, tls_hostname=args.tls_hostname or uri.host)
            res = await run_migration(args.source_qmp, args.dest_qmp, opts, **common)
        else:
            if not _is_this_host(args.to):
                raise HaguardError(f"host {args.to!r}: moves to other hosts go through the agent "
                                   "(haguard run); this command moves to this host only")
            vm = _inventory_vm(args)
            placeholder = parse_uri("unix:/placeholder")
            res = await migrate_vm(vm, launcher.run_dir(args.run_dir),
                                   _options(args, policy, placeholder), transport=args.transport,
                                   dest_disk_dir=args.dest_disk_dir, **common)
    return _print_result(res, args.json)


def _options(args: argparse.Namespace, policy: ConvergencePolicy, uri: MigrationUri) -> MigrationOptions:
    return MigrationOptions(uri=uri, policy=policy, multifd=args.multifd,
                            multifd_channels=args.multifd_channels, compression=args.compression,
                            xbzrle=args.xbzrle, extra_capabilities=tuple(args.cap))


# ---- main ----------------------------------------------------------------------------

def cmd_guest_build(args: argparse.Namespace) -> int:
    from haguard.guest.build import build_guest
    path = build_guest()
    if not args.quiet:
        print(path)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from haguard.demo import run_demo
    return run_demo(keep_going=args.keep_going, migration=not args.cluster, cluster=not args.migration,
                    loopback=args.loopback)


COMMANDS = {"vm": cmd_vm, "migrate": cmd_migrate, "guest-build": cmd_guest_build,
            "demo": cmd_demo, **cli_agent.COMMANDS}


def _error(args: argparse.Namespace, exc: HaguardError) -> None:
    """One line on stderr; with --json also one object on stdout, for scripts."""
    print(f"haguard: error: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        where = ({"file": exc.file, "line": exc.line, "field": exc.field}
                 if isinstance(exc, ConfigError) else {})
        print(json.dumps({"ok": False, "error": str(exc), **where}))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _error(args, exc)
        return EXIT_USAGE
    except HaguardError as exc:
        _error(args, exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("haguard: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the operator, the traceback on request
        if os.environ.get("HAGUARD_DEBUG"):
            raise
        print(f"haguard: internal error: {type(exc).__name__}: {exc} "
              "(set HAGUARD_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED
