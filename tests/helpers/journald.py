"""A real systemd-journald for tests, private to the test and gone afterwards.

journald runs without a PID-1 systemd.  It is started as a journal *namespace* instance
(`systemd-journald NAME`: no /dev/kmsg, no audit, own sockets and files) inside a new
mount namespace (`unshare --mount`) where:

    /run                tmpfs (nothing of the host's /run is touched)
    /run/systemd        bind of TMP/run-systemd: sockets and our journald@NAME.conf
    /run/log/journal    bind of TMP/journal: the journal files (Storage=volatile)
    /var/log/journal    bind of TMP/journal as well, should anything go persistent

So the sockets appear on the host at TMP/run-systemd/journal.NAME/{socket,stdout} and the
files at TMP/journal/MACHINE_ID.NAME/, read with `journalctl --directory`.  Inside the
namespace /run/systemd/journal is a symlink to journal.NAME, so a program entered with
`run_inside()` (nsenter) reaches this journald at the default path, as libsystemd does.
Any journald already running on the machine is not disturbed.  journald gets SIGTERM when
the test process dies (setpriv --pdeathsig), and the mount namespace goes with it.

    with journald() as jd:
        send to jd.socket ...
        entries = jd.wait_for(lambda e: e.get("HAGUARD_EVENT") == "x")
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNALD = "/lib/systemd/systemd-journald"
_counter = itertools.count()

CONFIG = """[Journal]
Storage=volatile
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RateLimitBurst=0
"""

Entry = dict[str, Any]


def _text(value: Any) -> Any:
    """journalctl's JSON gives non-printable values (and repeated fields) as lists."""
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


@dataclass
class Journald:
    root: Path
    namespace: str
    proc: subprocess.Popen[bytes]

    @property
    def run_systemd(self) -> Path:
        return self.root / "run-systemd"

    @property
    def socket(self) -> Path:
        """The native protocol socket (what /run/systemd/journal/socket is normally)."""
        return self.run_systemd / f"journal.{self.namespace}" / "socket"

    @property
    def stdout_socket(self) -> Path:
        return self.run_systemd / f"journal.{self.namespace}" / "stdout"

    @property
    def journal_dir(self) -> Path:
        machine_id = Path("/etc/machine-id").read_text().strip()
        return self.root / "journal" / f"{machine_id}.{self.namespace}"

    @property
    def log(self) -> Path:
        return self.root / "journald.log"

    def entries(self, *matches: str) -> list[Entry]:
        """Every entry (optionally FIELD=value matches), as dicts of str values."""
        if not self.journal_dir.is_dir():
            return []
        out = subprocess.run(
            ["journalctl", f"--directory={self.journal_dir}", "-o", "json", "--all", "--no-pager",
             *matches], capture_output=True, text=True, timeout=15, check=False)
        return [{k: _text(v) for k, v in json.loads(line).items()}
                for line in out.stdout.splitlines() if line.startswith("{")]

    def wait_for(self, predicate: Callable[[Entry], bool], count: int = 1,
                 timeout_s: float = 5.0) -> list[Entry]:
        """Entries matching `predicate` once at least `count` are there (or on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.entries() if predicate(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def run_inside(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a program in journald's mount namespace (default socket paths reach it)."""
        kw.setdefault("timeout", 30)
        return subprocess.run(["nsenter", f"--target={self.proc.pid}", "--mount", "--", *argv],
                              capture_output=True, text=True, check=False, **kw)

    @contextlib.contextmanager
    def stream(self, identifier: str = "haguard-test", priority: int = 6) -> Iterator[socket.socket]:
        """A stream connected like a service's stdout/stderr under systemd.

        $JOURNAL_STREAM for a child is f"{st.st_dev}:{st.st_ino}" of os.fstat(sock.fileno()).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.stdout_socket))
            # identifier, unit id, priority, level prefix, to syslog, to kmsg, to console
            sock.sendall(f"{identifier}\n\n{priority}\n0\n0\n0\n0\n".encode())
            sock.shutdown(socket.SHUT_RD)
            yield sock
        finally:
            sock.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def journald(start_timeout_s: float = 10.0) -> Iterator[Journald]:
    """Start a private journald; stop it and remove everything it made on exit."""
    namespace = f"hgtest{os.getpid()}x{next(_counter)}"
    root = Path(tempfile.mkdtemp(prefix="haguard-journald-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        run_systemd, journal = root / "run-systemd", root / "journal"
        run_systemd.mkdir()
        journal.mkdir()
        (run_systemd / f"journald@{namespace}.conf").write_text(CONFIG)
        (run_systemd / "journal").symlink_to(f"journal.{namespace}")
        script = (
            "set -e; mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p /run/systemd /run/log/journal; "
            f"mount --bind {run_systemd} /run/systemd; mount --bind {journal} /run/log/journal; "
            f"if [ -d /var/log/journal ]; then mount --bind {journal} /var/log/journal; fi; "
            f"exec {JOURNALD} {namespace}")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "SYSTEMD_LOG_TARGET": "console"}  # its own messages: to our log, never to kmsg
        with open(root / "journald.log", "wb") as log:
            proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        jd = Journald(root=root, namespace=namespace, proc=proc)
        deadline = time.monotonic() + start_timeout_s
        while not (jd.socket.exists() and jd.stdout_socket.exists() and jd.journal_dir.is_dir()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"journald did not start: {jd.log.read_text(errors='replace')}")
            time.sleep(0.02)
        yield jd
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
