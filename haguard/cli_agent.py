"""The agent's subcommands: `haguard run`, `haguard status`, `haguard check-config`,
`haguard drain|undrain`, `haguard maintenance`, `haguard fence`, `haguard confirm-off`,
`haguard keygen`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haguard.config.cluster import DEFAULT_CLUSTER_CONFIG
from haguard.errors import ConfigError, HaguardError
from haguard.logs import LOG_FORMATS, LOG_LEVELS

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_CLUSTER_CONFIG, metavar="PATH",
                   help=f"cluster configuration (default {DEFAULT_CLUSTER_CONFIG})")


def add_subcommands(sub: Any) -> None:
    """Add run, status and check-config to the `haguard` parser's subparsers."""
    p = sub.add_parser("run", help="run the agent (under systemd: haguard.service)")
    _config_arg(p)
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p = sub.add_parser("status", help="the cluster as this host's agent sees it")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the status file's JSON")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="S",
                   help="redraw every S seconds (default 1) until interrupted")
    p.add_argument("--check", action="store_true",
                   help="one line and a monitoring exit code: 0 OK, 1 warning, 2 critical, "
                        "3 unknown (no status, or a stale one)")
    p = sub.add_parser("check-config", help="validate the cluster configuration and VM inventory")
    _config_arg(p)
    _json_arg(p)
    p = sub.add_parser("keygen", help="write this host's Ed25519 key (host_key_file); print its public key")
    p.add_argument("path", type=Path, metavar="PATH", help="the private key file to create (mode 0600)")
    _json_arg(p)
    p = _host_request(sub, "fence", "power HOST off now with its fence device, through the coordinator; "
                      "its VMs are recovered elsewhere", 120.0, "how long to wait for the fence")
    p.add_argument("--yes", action="store_true", required=True,
                   help="required: HOST is powered off, whatever it runs")
    p = _host_request(sub, "confirm-off", "declare HOST powered off (its fence device is broken): its VMs "
                      "are then recovered elsewhere", 60.0, "how long to wait for the cluster to take it")
    p.add_argument("--yes-i-checked", metavar="HOST", required=True,
                   help="HOST again: you made sure it is off (a VM of a host that still runs would "
                        "then run twice)")
    p = sub.add_parser("maintenance", help="cluster-wide maintenance (for broker or switch work): while on, "
                       "nothing is started, stopped, moved or fenced, and armed watchdogs are petted "
                       "whatever the quorum")
    _config_arg(p)
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for the cluster to commit it (default 30)")
    _json_arg(p)
    for action, text in (("drain", "put HOST in maintenance: its VMs move away live"),
                         ("undrain", "take HOST out of maintenance")):
        p = _host_request(sub, action, text, 1800.0, "give up waiting after S seconds (the drain goes on)")
        p.add_argument("--no-wait", action="store_true", help="return once the request is accepted")


def _host_request(sub: Any, name: str, text: str, timeout_s: float, waits: str) -> argparse.ArgumentParser:
    """A command asking the cluster something about HOST, then waiting for it."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=text)
    _config_arg(p)
    p.add_argument("host", metavar="HOST")
    p.add_argument("--timeout", type=float, default=timeout_s, metavar="S",
                   help=f"{waits} (default {timeout_s:.0f})")
    _json_arg(p)
    return p


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result (errors too, with file, line and field)")


def _done(args: argparse.Namespace, ok: bool, text: str, **fields: Any) -> int:
    """A command's result: `text` for people, or one JSON object with --json."""
    if args.json:
        print(json.dumps({"ok": ok, **fields}))
    elif ok:
        print(text)
    else:
        print(f"haguard: error: {text}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    import faulthandler

    from haguard.agent.runtime import run_agent
    # systemd's watchdog kills a wedged agent with SIGABRT: leave the stacks in the journal.
    faulthandler.enable()
    return asyncio.run(run_agent(args.config, args.log_format, args.log_level))


def cmd_check_config(args: argparse.Namespace) -> int:
    from haguard.agent.runtime import read_key, validate_agent_config
    from haguard.config.cluster import load_cluster_config
    from haguard.host_checks import check_fence_devices, check_tls_files, check_watchdog_device
    from haguard.vm.inventory import load_inventory
    try:
        cfg = load_cluster_config(args.config)
        validate_agent_config(cfg, args.config)
        read_key(cfg, args.config)
        vms = load_inventory(cfg.vm_dir)
        warnings = (check_fence_devices(cfg, args.config) + check_tls_files(cfg, args.config)
                    + check_watchdog_device(cfg, args.config))
    except ConfigError as exc:
        print(f"haguard: error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "file": exc.file, "line": exc.line,
                              "field": exc.field}))
        return EXIT_CONFIG
    for warning in warnings:
        print(f"haguard: warning: {warning}", file=sys.stderr)
    return _done(args, True, f"ok: cluster {cfg.cluster}, {len(cfg.hosts)} hosts, {len(vms)} VMs",
                 cluster=cfg.cluster, hosts=len(cfg.hosts), vms=len(vms),
                 warnings=[{"warning": str(w), "file": w.file, "line": w.line, "field": w.field}
                           for w in warnings])


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from haguard.agent.status import read_status, render, status_path
    from haguard.config.cluster import load_cluster_config
    if args.check:
        return _check_status(args)
    cfg = load_cluster_config(args.config)
    if args.watch is not None:
        return _watch(status_path(cfg.run_dir), max(0.2, args.watch))
    data = read_status(status_path(cfg.run_dir))
    if args.json:
        print(json.dumps(data))
    else:
        render(data, Console())
    return EXIT_OK


def _watch(path: Path, every_s: float) -> int:
    """`status --watch`: the view redrawn in place; a missing or stale status is shown as
    such (the agent restarting), never an exit."""
    import time

    from rich.console import Console

    from haguard.agent.status import read_status, render
    console = Console()
    try:
        while True:
            with console.capture() as frame:
                try:
                    render(read_status(path), console)
                except HaguardError as exc:
                    console.print(f"[red]{exc}[/]")
            console.clear()
            console.file.write(frame.get())
            console.file.flush()
            time.sleep(every_s)
    except KeyboardInterrupt:
        return EXIT_OK


def _check_status(args: argparse.Namespace) -> int:
    """`status --check`: never a traceback nor a usage error, one line and its code."""
    import time

    from haguard.agent.check import UNKNOWN, check
    from haguard.agent.status import read_status, status_path
    from haguard.config.cluster import load_cluster_config
    try:
        cfg = load_cluster_config(args.config)
    except HaguardError as exc:
        print(f"HAGUARD UNKNOWN - {exc}")
        return UNKNOWN
    try:
        found: dict[str, Any] | None = read_status(status_path(cfg.run_dir))
    except HaguardError:
        found = None
    code, line = check(found, time.time())
    print(line)
    return code


def cmd_admin(args: argparse.Namespace) -> int:
    """`haguard drain|undrain HOST`: ask the local agent, then follow the cluster state."""
    from haguard.agent.control import ask_agent
    from haguard.config.cluster import load_cluster_config
    cfg = load_cluster_config(args.config)
    ask_agent(cfg, {"action": args.command, "host": args.host}, host_field="HOST")
    if args.no_wait:
        return _done(args, True, f"{args.command} {args.host}: requested", action=args.command,
                     host=args.host, done=False)
    from haguard.ui.drain import follow
    done = follow(cfg, args.host, drain=args.command == "drain", timeout_s=args.timeout)
    if args.json:
        return _done(args, done, "", action=args.command, host=args.host, done=done)
    return EXIT_OK if done else EXIT_FAILED


def cmd_maintenance(args: argparse.Namespace) -> int:
    """`haguard maintenance on|off`: through the local agent to the coordinator; waits until
    this host holds the committed state that says it."""
    import time

    from haguard.agent.control import ask_agent
    from haguard.agent.status import read_status, status_path
    from haguard.config.cluster import load_cluster_config
    cfg = load_cluster_config(args.config)
    on = args.state == "on"
    ask_agent(cfg, {"action": f"maintenance-{args.state}"}, host_field=None)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(HaguardError):
            cluster = read_status(status_path(cfg.run_dir)).get("cluster") or {}
            if bool(cluster.get("maintenance")) == on:
                text = ("cluster maintenance on: nothing is started, stopped, moved or fenced until "
                        "`haguard maintenance off`" if on else "cluster maintenance off")
                return _done(args, True, text, action="maintenance", maintenance=on)
        time.sleep(0.3)
    why = f"the cluster did not commit it within {args.timeout:.0f} s (no quorum, or no coordinator?)"
    return _done(args, False, why, action="maintenance", maintenance=not on, error=why)


def cmd_fencing(args: argparse.Namespace) -> int:
    """`haguard fence HOST --yes` and `haguard confirm-off HOST --yes-i-checked HOST`: through
    the local agent to the coordinator; waits until HOST is fenced in the cluster state."""
    import time

    from haguard.agent.control import ask_agent
    from haguard.agent.status import read_status, status_path
    from haguard.config.cluster import load_cluster_config
    confirm = args.command == "confirm-off"
    if confirm and args.yes_i_checked != args.host:
        raise ConfigError(f"--yes-i-checked names {args.yes_i_checked!r}, not {args.host!r}: type the host "
                          "you checked is off", field="--yes-i-checked")
    cfg = load_cluster_config(args.config)

    def view() -> dict[str, Any]:
        return dict(read_status(status_path(cfg.run_dir)).get("cluster") or {})

    def owned(cluster: dict[str, Any]) -> set[str]:
        return {vm for vm, rec in (cluster.get("vms") or {}).items() if rec.get("owner") == args.host}

    before: set[str] = set()
    with contextlib.suppress(HaguardError):
        before = owned(view())
    ask_agent(cfg, {"action": args.command, "host": args.host}, host_field="HOST")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(HaguardError):
            cluster = view()
            # Fenced, or its VMs released (a host powered on again at once is soon unfenced).
            if ((cluster.get("hosts") or {}).get(args.host) or {}).get("fenced") or \
                    (before and not before & owned(cluster)):
                done = "confirmed off" if confirm else "fenced"
                return _done(args, True, f"{args.host}: {done}; its VMs are recovered elsewhere",
                             action=args.command, host=args.host, fenced=True)
        time.sleep(0.5)
    why = ("the coordinator takes it only for a host it holds dead (see the confirm-off-refused alert)"
           if confirm else "see the fence-refused and fencing-failed alerts")
    return _done(args, False, f"{args.host} was not fenced within {args.timeout:.0f} s: {why}",
                 action=args.command, host=args.host, fenced=False,
                 error=f"not fenced within {args.timeout:.0f} s: {why}")


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new private key in PATH (never over an existing file), its public key on stdout."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from haguard.core.hostkeys import key_id, private_text, public_text
    key = Ed25519PrivateKey.generate()
    try:
        fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"{args.path}: {exc.strerror}", field="PATH") from None
    with os.fdopen(fd, "w") as f:
        f.write(private_text(key) + "\n")
    return _done(args, True, f"public_keys: [\"{public_text(key)}\"]   # id {key_id(key)}",
                 path=str(args.path), public_key=public_text(key), key_id=key_id(key))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "status": cmd_status, "check-config": cmd_check_config,
    "drain": cmd_admin, "undrain": cmd_admin, "keygen": cmd_keygen,
    "confirm-off": cmd_fencing, "fence": cmd_fencing, "maintenance": cmd_maintenance}
