"""A real mosquitto 2.0 broker for tests, with a private config in its own temp dir.

    with Mosquitto() as broker:                            # anonymous, plain TCP on 127.0.0.1
        cfg = broker.mqtt_config()                         # haguard's MqttConfig for it
    with Mosquitto(tls=True, users={"h1": "pw1"}, acl=HOSTS_ACL) as broker:
        cfg = broker.mqtt_config(username="h1")            # mqtts://, CA file, password file
    broker.kill(); ...; broker.start()                     # an outage, then back on the same port
    broker.freeze(); ...; broker.thaw()                    # a hung broker (SIGSTOP / SIGCONT)

`start()` returns once the broker accepts connections; `stop()` (also on leaving the
`with`) kills it and removes every file it made.  With `tls=True` a throwaway CA signs
a server certificate for 127.0.0.1/localhost and one client certificate (`client_cert`,
`client_key`), made with the `openssl` command.  `users` go into a password file
(`mosquitto_passwd -b`); `acl` is the text of an ACL file.  The broker logs to
`log_file`; `log_text()` reads it for assertion messages.  `netns` runs the broker
inside an existing network namespace (give `bind` an address there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from haguard.config.cluster import MqttConfig, TlsConfig

# The ACL haguard documents (docs/mqtt-topics.md), with the default topic prefix.
HOSTS_ACL = """\
pattern read haguard/#
pattern write haguard/+/hosts/%u/#
pattern write haguard/+/inbox/+/%u
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")


def make_certs(directory: Path, *, names: tuple[str, ...] = ("127.0.0.1", "localhost"),
               client_cn: str = "haguard-test-client") -> dict[str, Path]:
    """A CA, a server certificate for `names` and a client certificate, all EC P-256, valid 2 days.

    Returns the paths: ca, ca_key, server_cert, server_key, client_cert, client_key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    p = {n: directory / f"{n}.pem" for n in
         ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run("openssl", "req", "-x509", *ec, "-keyout", str(p["ca_key"]), "-out", str(p["ca"]),
         "-days", "2", "-subj", "/CN=haguard test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names)
    for who, cn, ext in (("server", names[0], f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
                         ("client", client_cn, "extendedKeyUsage=clientAuth\n")):
        csr = directory / f"{who}.csr"
        extfile = directory / f"{who}.ext"
        extfile.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                           "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + ext)
        _run("openssl", "req", "-new", *ec, "-keyout", str(p[f"{who}_key"]), "-out", str(csr),
             "-subj", f"/CN={cn}")
        _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
             "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(p[f"{who}_cert"]))
        csr.unlink()
        extfile.unlink()
    return p


class Mosquitto:
    def __init__(self, *, tls: bool = False, users: Mapping[str, str] | None = None, acl: str | None = None,
                 allow_anonymous: bool | None = None, require_certificate: bool = False,
                 port: int | None = None, bind: str = "127.0.0.1", netns: str | None = None,
                 extra_config: str = "") -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed: run `make setup`")
        self.tls = tls
        self.users = dict(users or {})
        self.bind = bind
        self.netns = netns
        self.port = port if port is not None else (1883 if netns else free_port(bind))
        self.workdir = Path(tempfile.mkdtemp(prefix="hg-mosq-"))
        self.log_file = self.workdir / "mosquitto.log"
        self.conf_file = self.workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._secrets = 0
        anonymous = allow_anonymous if allow_anonymous is not None else not users
        try:
            self.certs: dict[str, Path] = make_certs(self.workdir / "pki") if tls else {}
            self._write_config(anonymous, acl, require_certificate, extra_config)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _write_config(self, anonymous: bool, acl: str | None, require_certificate: bool,
                      extra_config: str) -> None:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            "persistence false",
            f"log_dest file {self.log_file}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")       # stay root: the files live in a private 0700 dir
        if self.users:
            pw = self.workdir / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                _run("mosquitto_passwd", *(("-c",) if i == 0 else ()), "-b", str(pw), user, password)
            lines.append(f"password_file {pw}")
        if acl is not None:
            (self.workdir / "acl").write_text(acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        lines += [f"listener {self.port} {self.bind}", "set_tcp_nodelay true"]
        if self.tls:
            lines += [f"cafile {self.certs['ca']}", f"certfile {self.certs['server_cert']}",
                      f"keyfile {self.certs['server_key']}", "tls_version tlsv1.2",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        if extra_config:
            lines.append(extra_config)
        self.conf_file.write_text("\n".join(lines) + "\n")

    # ---- where clients go ----------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.certs["ca"]

    @property
    def client_cert(self) -> Path:
        return self.certs["client_cert"]

    @property
    def client_key(self) -> Path:
        return self.certs["client_key"]

    def secret_file(self, name: str, text: str) -> Path:
        """A 0600 file in the broker's temp dir (a password for MqttConfig.password_file)."""
        path = self.workdir / "secrets" / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
        return path

    def mqtt_config(self, *, username: str | None = None, password: str | None = None,
                    client_cert: bool = False, keepalive_s: int = 2, urls: tuple[str, ...] | None = None,
                    **kw: Any) -> MqttConfig:
        """An MqttConfig for this broker: with `username`, its password (from `users`, or
        `password`) goes into a file; with TLS, the CA (and the client certificate)."""
        password_file = None
        if username is not None:
            secret = password if password is not None else self.users.get(username, "")
            self._secrets += 1
            password_file = self.secret_file(f"{username}-{self._secrets}", secret)
        tls = None
        if self.tls:
            tls = TlsConfig(ca_file=self.ca_file, cert_file=self.client_cert if client_cert else None,
                            key_file=self.client_key if client_cert else None)
        return MqttConfig(urls=urls or (self.url,), username=username, password_file=password_file,
                          tls=tls, keepalive_s=keepalive_s, **kw)

    # ---- life cycle ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> None:
        """Start (or start again, on the same port) and wait until it accepts connections."""
        if self.running:
            return
        argv = ["mosquitto", "-c", str(self.conf_file)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        mark = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err.strip()} {self.log_text()[mark:]}")
            if self._ready(mark):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.bind}:{self.port} within {timeout_s} s: "
                           f"{self.log_text()[mark:]}")

    def _ready(self, log_mark: int) -> bool:
        if self.netns:
            # Not reachable from here: trust the broker's own "running" line, logged after it listens.
            return " running" in self.log_text()[log_mark:]
        with contextlib.suppress(OSError), socket.create_connection((self.bind, self.port), timeout=0.2):
            return True
        return False

    def kill(self) -> None:
        """SIGKILL the broker (an outage): clients lose their connections; files stay for `start()`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()

    def freeze(self) -> None:
        """SIGSTOP: the broker hangs with its sockets open (clients notice only by keepalive)."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def restart(self, timeout_s: float = 5.0) -> None:
        self.kill()
        self.start(timeout_s)

    def stop(self) -> None:
        """Kill the broker and remove every file it made."""
        self.thaw()
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
