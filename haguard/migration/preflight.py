"""Checks before a migration starts.  Each failure says what is wrong and how to fix it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from haguard.adapters.qmp import Qmp, QmpCommands
from haguard.errors import PreflightError, QmpCommandError
from haguard.migration import replies
from haguard.migration.features import QemuFeatures
from haguard.migration.uri import MigrationUri

ACTIVE_MIGRATION = frozenset({
    "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
    "postcopy-recover-setup", "pre-switchover", "device", "wait-unplug", "cancelling"})


async def vm_identity(qmp: QmpCommands) -> dict[str, str | int]:
    """RAM size, machine type and CPU model: what must match on both sides."""
    mem = await qmp.cmd("query-memory-size-summary")
    machine = await qmp.cmd("qom-get", {"path": "/machine", "property": "type"})
    cpus = await qmp.cmd("query-cpus-fast")
    with _readable():
        cpu_path = replies.first_cpu_path(cpus)
    cpu_type = ""
    if cpu_path is not None:
        cpu_type = await qmp.cmd("qom-get", {"path": cpu_path, "property": "type"})
    return identity_from_replies(mem, machine, cpu_type)


def identity_from_replies(mem: object, machine: object, cpu_type: object) -> dict[str, str | int]:
    """The identity from the three replies; "" for the CPU when QEMU listed no vCPU."""
    with _readable():
        return {
            "ram_bytes": replies.ram_size(mem),
            "machine": replies.type_name(machine, "qom-get /machine").removesuffix("-machine"),
            "cpu": "" if cpu_type == "" else replies.type_name(cpu_type, "qom-get cpu")
            .removesuffix("-x86_64-cpu").removesuffix("-i386-cpu"),
        }


@contextlib.contextmanager
def _readable() -> Iterator[None]:
    # A reply we cannot read stops the move before anything was touched.
    try:
        yield
    except replies.MalformedReply as exc:
        raise PreflightError(f"{exc}: cannot check this QEMU before migrating") from None


async def check_source(qmp: Qmp) -> str:
    return source_state(await qmp.cmd("query-status"), await qmp.cmd("query-migrate"))


def source_state(status_reply: object, migrate_reply: object) -> str:
    """The source's run state if it can be migrated now, else PreflightError."""
    with _readable():
        status = replies.run_state(status_reply)
        mig = replies.migration_sample(migrate_reply, now_ms=0).status
    if status not in ("running", "paused"):
        raise PreflightError(f"source VM is {status!r}, not running: nothing to migrate")
    if mig in ACTIVE_MIGRATION:
        raise PreflightError(f"source already has a migration in state {mig!r}: "
                             "wait for it or cancel it with `haguard migrate --cancel`")
    return status


async def check_destination(qmp: Qmp) -> None:
    with _readable():
        status = replies.run_state(await qmp.cmd("query-status"))
    if status != "inmigrate":
        raise PreflightError(f"destination QEMU is {status!r}, not waiting for a migration: "
                             "start it with `-incoming defer` (haguard does this for defined VMs)")


def compare_identity(src: dict[str, str | int], dst: dict[str, str | int]) -> None:
    if src["ram_bytes"] != dst["ram_bytes"]:
        raise PreflightError(
            f"RAM differs: source {int(src['ram_bytes']) >> 20} MiB, destination "
            f"{int(dst['ram_bytes']) >> 20} MiB: start the destination from the same VM definition")
    if src["machine"] != dst["machine"]:
        raise PreflightError(
            f"machine type differs: source {src['machine']}, destination {dst['machine']}: "
            "use the same versioned machine type on both")
    if src["cpu"] != dst["cpu"]:
        raise PreflightError(f"CPU model differs: source {src['cpu']}, destination {dst['cpu']}")


def check_capabilities(wanted: set[str], src: QemuFeatures, dst: QemuFeatures | None) -> None:
    for side, feats in (("source", src), ("destination", dst)):
        if feats is None:
            continue
        missing = sorted(wanted - feats.capabilities)
        if missing:
            raise PreflightError(
                f"migration capability {', '.join(missing)} is not supported by the {side} QEMU "
                f"({feats.version}): drop that option or upgrade QEMU on the {side}")


def check_compression(method: str, src: QemuFeatures, dst: QemuFeatures | None) -> None:
    if method == "none":
        return
    for side, feats in (("source", src), ("destination", dst)):
        if feats is None:
            continue
        if method not in feats.multifd_compressions:
            have = ", ".join(sorted(feats.multifd_compressions - {"none"})) or "none"
            raise PreflightError(f"the {side} QEMU ({feats.version}) cannot compress with "
                                 f"{method} (it offers: {have}): pick another --compression")


def tcp_probe(host: str, port: int, timeout_s: float) -> str:
    """'refused', 'open' or 'unreachable: ...' for a TCP connect to host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "unreachable: no answer"
    except OSError as exc:
        return f"unreachable: {exc.strerror or exc}"


async def probe_path_before_listen(uri: MigrationUri, timeout_s: float = 3.0) -> None:
    """Before the destination listens: the port must answer 'refused' (host reachable, port free).

    Probing after it listens would hand QEMU a connection that closes at once and
    fail the incoming migration, so this runs only before `migrate-incoming`.
    """
    if uri.scheme == "unix":
        parent = Path(uri.path).parent
        if not parent.is_dir():
            raise PreflightError(f"migration socket directory {parent} does not exist")
        return
    if uri.scheme != "tcp":
        return  # rdma: passed through unchecked
    result = await asyncio.to_thread(tcp_probe, uri.host, uri.port, timeout_s)
    if result == "open":
        raise PreflightError(f"{uri.where} is already in use on the destination: pick another port")
    if result.startswith("unreachable"):
        raise PreflightError(f"destination {uri.host} is not reachable on port {uri.port} "
                             f"({result.partition(': ')[2]}): check the network path and firewall")


async def diagnose_connect_failure(uri: MigrationUri) -> str | None:
    """After a migration failed before moving any byte: say why, in the operator's terms."""
    if uri.scheme == "unix":
        if not Path(uri.path).exists():
            return f"nothing listens on {uri.path}: the destination is not waiting for a migration"
        return None
    if uri.scheme != "tcp":
        return None
    result = await asyncio.to_thread(tcp_probe, uri.host, uri.port, 3.0)
    if result == "refused":
        return (f"connection refused by {uri.where}: the destination is not listening "
                "(start it with -incoming, or check the port)")
    if result.startswith("unreachable"):
        return f"destination {uri.where} unreachable ({result.partition(': ')[2]})"
    return None


async def check_postcopy_recovery_possible(dst: Qmp) -> bool:
    """migrate-recover needs the destination monitor to take out-of-band commands."""
    with contextlib.suppress(QmpCommandError):
        return dst.has_oob
    return False
