"""Moves over TLS: QEMU's own `tls-creds-x509`, both ends checking the other's certificate.

Without it a move is clear TCP: anyone on the migration network can read the guest's
memory, or connect to the destination's port before the source does.  With
`ha.migration_tls_dir` set on a host, its agent adds the credentials object to its QEMUs
and sets `tls-creds` itself: as the source (endpoint `client`, with `tls-hostname` = the
destination's address, which its certificate must name) and as the destination (endpoint
`server`; never from the source's request: migrate_rpc.py refuses that parameter).
`verify-peer` is on at both ends, so a stranger's connection fails its handshake and the
move fails cleanly, with the source still running; it never falls back to clear text.

The directory holds what QEMU's x509 credentials read (docs/migration.md, "TLS" says how
to make them): `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
`client-key.pem`; one certificate per host may serve as both.
"""

from __future__ import annotations

import stat
from pathlib import Path

from haguard.adapters.qmp import Qmp
from haguard.errors import QmpCommandError

OBJECT_ID = "haguard-migration-tls"
FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
KEYS = ("server-key.pem", "client-key.pem")


def problems(directory: Path) -> list[str]:
    """What is wrong with a credentials directory (empty: nothing)."""
    out = [f"{directory / name}: missing" for name in FILES if not (directory / name).is_file()]
    for name in KEYS:
        path = directory / name
        if path.is_file() and path.stat().st_mode & stat.S_IROTH:
            out.append(f"{path} is readable by every user: chmod o-r {path}")
    return out


async def enable(qmp: Qmp, directory: Path, endpoint: str, hostname: str | None = None) -> None:
    """Add the credentials object to this QEMU (once) and make its moves use it.  Raises
    QmpCommandError when QEMU refuses (bad files, a QEMU without gnutls)."""
    objects = await qmp.cmd("qom-list", {"path": "/objects"})
    if not any(isinstance(o, dict) and o.get("name") == OBJECT_ID for o in objects or []):
        await qmp.cmd("object-add", {"qom-type": "tls-creds-x509", "id": OBJECT_ID, "dir": str(directory),
                                     "endpoint": endpoint, "verify-peer": True})
    params: dict[str, object] = {"tls-creds": OBJECT_ID}
    if hostname is not None:
        params["tls-hostname"] = hostname
    await qmp.cmd("migrate-set-parameters", params)


async def in_use(qmp: Qmp) -> bool:
    """Whether this QEMU's moves go over TLS (read back from QEMU)."""
    try:
        params = await qmp.cmd("query-migrate-parameters")
    except QmpCommandError:
        return False
    return isinstance(params, dict) and params.get("tls-creds") == OBJECT_ID
