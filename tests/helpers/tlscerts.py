"""QEMU migration credentials for test hosts: one CA, one certificate per host naming its
address (server and client use), laid out as QEMU's `tls-creds-x509` reads a directory
(haguard/migration/tls.py).  Made with the `openssl` command, as docs/migration.md shows."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.mosquitto import _run

EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str = "haguard migration test CA") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ca, key = directory / "ca-cert.pem", directory / "ca-key.pem"
    _run("openssl", "req", "-x509", *EC, "-keyout", str(key), "-out", str(ca), "-days", "2",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca, key


def host_credentials(directory: Path, host: str, address: str, ca: tuple[Path, Path]) -> Path:
    """`directory/host`: the five files QEMU reads, the certificate naming `address`."""
    out = directory / host
    out.mkdir(parents=True, exist_ok=True)
    ext = out / "host.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"subjectAltName=IP:{address}\nextendedKeyUsage=serverAuth,clientAuth\n")
    key, csr, cert = out / "server-key.pem", out / "host.csr", out / "server-cert.pem"
    _run("openssl", "req", "-new", *EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    csr.unlink()
    ext.unlink()
    shutil.copy(ca[0], out / "ca-cert.pem")
    shutil.copy(cert, out / "client-cert.pem")
    shutil.copy(key, out / "client-key.pem")
    for name in ("server-key.pem", "client-key.pem"):
        (out / name).chmod(0o600)
    return out
