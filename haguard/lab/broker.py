"""A private mosquitto for the lab: anonymous, plain TCP, no persistence, logging to a file.

Started in the hub namespace (port 1883 there is ours alone) or, on loopback, on a free
port of 127.0.0.1.  `start()` returns once the broker listens; `stop()` kills it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from haguard.errors import HaguardError


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path, bind: str, prefix: list[str]) -> None:
        if shutil.which("mosquitto") is None:
            raise HaguardError("mosquitto is not installed: run `make setup` (Debian package mosquitto)")
        self.bind = bind
        self.prefix = prefix                      # `ip netns exec HUB` or nothing
        self.port = 1883 if prefix else free_port(bind)
        self.log_file = workdir / "mosquitto.log"
        self.conf_file = workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = ["per_listener_settings false", "allow_anonymous true", "persistence false",
                 f"log_dest file {self.log_file}", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", f"listener {self.port} {bind}",
                 "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            lines.append("user root")             # its files live in the lab's private directory
        self.conf_file.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://{self.bind}:{self.port}"

    def start(self, timeout_s: float = 5.0) -> None:
        self.proc = subprocess.Popen([*self.prefix, "mosquitto", "-c", str(self.conf_file)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise HaguardError(f"mosquitto exited at start: {err.strip() or self.log_text()}")
            # Its "running" line is logged once it listens (it may be in another namespace).
            if " running" in self.log_text():
                return
            time.sleep(0.02)
        raise HaguardError(f"mosquitto did not start within {timeout_s} s: {self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
