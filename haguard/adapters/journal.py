"""Structured entries for journald: field mapping and the native journal protocol.

`JournalRenderer` is the last structlog processor of the journal output.  It maps an
event dict to journald fields and sends them, through systemd-python's
`systemd.journal.send` when installed, else over the native protocol spoken here (one
datagram per entry to /run/systemd/journal/socket; a sealed memfd for entries too big
for a datagram).  $HAGUARD_JOURNAL_SOCKET (or an explicit path) points the native
sender at another journald, e.g. one a test started.

Fields of an entry:
    MESSAGE            the kind and its keys (logfmt), plus any traceback
    PRIORITY           from the level (debug 7, info 6, warning 4, error 3, critical 2)
    SYSLOG_IDENTIFIER  haguard
    MESSAGE_ID         uuid5(MESSAGE_ID_NAMESPACE, kind), 32 hex: stable per kind
    HAGUARD_EVENT      the kind (the event name of `log.info("host-dead", ...)`)
    HAGUARD_HOST       the host this agent runs for
    HAGUARD_VM         the event's vm=
    HAGUARD_SUBJECT_HOST  the event's host= (the host the event is about)
    HAGUARD_<KEY>      every other key, upper-cased and cut to [A-Z0-9_]
    CODE_FILE/LINE/FUNC  where the call was made
Records from stdlib loggers (qemu.qmp, paho, asyncio, haguard.migration) carry free text,
not a kind: they get MESSAGE and HAGUARD_LOGGER but no HAGUARD_EVENT or MESSAGE_ID.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

try:  # optional extra: haguard[systemd]
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the installation
    _sd_journal = None

DEFAULT_SOCKET = "/run/systemd/journal/socket"
SOCKET_ENV = "HAGUARD_JOURNAL_SOCKET"
SYSLOG_IDENTIFIER = "haguard"
MESSAGE_ID_NAMESPACE = uuid.UUID("2097dd1f-ffb2-4999-a60c-9288a6944aed")  # never change: IDs are API
MAX_FIELD_NAME = 64  # journald's limit

PRIORITIES = {"critical": 2, "fatal": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
              "notice": 5, "info": 6, "debug": 7, "notset": 7}

# Keys with a field of their own; everything else becomes HAGUARD_<KEY>.
_RENAMED = {"vm": "HAGUARD_VM", "host": "HAGUARD_SUBJECT_HOST", "logger": "HAGUARD_LOGGER"}
_CONSUMED = {"event", "level", "timestamp", "pathname", "lineno", "func_name", "exception", "exc_info",
             "stack", "stack_info", "_record", "_from_structlog"}

Fields = dict[str, str | bytes]
Sender = Callable[[Fields], None]


def message_id(kind: str) -> str:
    """The MESSAGE_ID of an event kind: the same on every host and every release."""
    return uuid.uuid5(MESSAGE_ID_NAMESPACE, kind).hex


def field_name(key: str, prefix: str = "HAGUARD_") -> str:
    """A valid journal field name for `key` (journald drops invalid ones silently)."""
    name = prefix + re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return name[:MAX_FIELD_NAME]


def field_value(value: Any) -> str | bytes:
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """The native protocol: NAME=value lines; a value with a newline (or any binary) goes as
    NAME, newline, its length as little-endian uint64, the bytes, newline."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if b"\n" in data:
            out += name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeJournal:
    """Sends entries over journald's native socket without libsystemd."""

    def __init__(self, path: str = DEFAULT_SOCKET, *, sndbuf_bytes: int = 8 << 20) -> None:
        self.path = path
        self.sndbuf_bytes = sndbuf_bytes
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Like libsystemd: a large send buffer so big entries still fit one datagram.
            for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.sndbuf_bytes)
                    break
            sock.settimeout(1.0)  # a stuck journald must not hang the agent for long
            self._sock = sock
        return self._sock

    def __call__(self, fields: Fields) -> None:
        data = encode_entry(fields)
        try:
            self._socket().sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Too big for a datagram: hand journald a sealed memfd holding the entry."""
        fd = os.memfd_create("haguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._socket().sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def library_send(fields: Fields) -> None:
    """systemd-python's sender (libsystemd); it only knows the default socket."""
    assert _sd_journal is not None
    rest = dict(fields)
    message = rest.pop("MESSAGE")
    line = rest.pop("CODE_LINE", None)
    code_file, code_func = rest.pop("CODE_FILE", None), rest.pop("CODE_FUNC", None)
    _sd_journal.send(
        message if isinstance(message, str) else message.decode("utf-8", "replace"),
        MESSAGE_ID=rest.pop("MESSAGE_ID", None),
        CODE_FILE=code_file, CODE_LINE=int(line) if line is not None else None, CODE_FUNC=code_func,
        **rest)


def default_sender(socket_path: str | None = None) -> Sender:
    """The library when it can reach the target, else the native protocol."""
    path = socket_path or os.environ.get(SOCKET_ENV)
    if path is None and _sd_journal is not None:
        return library_send
    return NativeJournal(path or DEFAULT_SOCKET)


def _logfmt(items: Mapping[str, Any]) -> str:
    try:
        return structlog.processors.LogfmtRenderer()(None, "", dict(items))
    except ValueError:  # a key with whitespace: fall back to repr pairs
        return " ".join(f"{k}={v!r}" for k, v in items.items())


def journal_fields(event_dict: Mapping[str, Any], method: str, *, host: str) -> Fields:
    """Map one structlog event dict to journald fields."""
    ed = dict(event_dict)
    from_structlog = ed.get("_from_structlog", True)
    event = ed.get("event")
    text = "" if event is None else str(event)
    level = str(ed.get("level") or method).lower()
    user = {k: v for k, v in ed.items() if k not in _CONSUMED}

    if from_structlog:
        shown = {k: v for k, v in user.items() if k != "logger"}
        message = f"{text} {_logfmt(shown)}" if shown else text
    else:
        message = text
    for extra in ("stack", "exception"):
        if ed.get(extra):
            message += "\n" + str(ed[extra]).rstrip("\n")

    fields: Fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "HAGUARD_HOST": host,
    }
    if from_structlog and text:
        fields["HAGUARD_EVENT"] = text
        fields["MESSAGE_ID"] = message_id(text)
    if ed.get("pathname"):
        fields["CODE_FILE"] = str(ed["pathname"])
    if ed.get("lineno") is not None:
        fields["CODE_LINE"] = str(ed["lineno"])
    if ed.get("func_name"):
        fields["CODE_FUNC"] = str(ed["func_name"])
    for key, value in user.items():
        if value is None:
            continue
        name = _RENAMED.get(key) or field_name(key)
        fields.setdefault(name, field_value(value))  # never overwrite the fields above
    return fields


class JournalRenderer:
    """Final processor of the journal output: sends the entry, returns an empty line.

    A journald that cannot be reached must not stop the agent: the entry goes to
    `fallback` (stderr) as one plain line instead.
    """

    def __init__(self, host: str, sender: Sender | None = None, *, fallback: TextIO | None = None) -> None:
        self.host = host
        self.sender = sender or default_sender()
        self.fallback = fallback

    def __call__(self, _logger: Any, method: str, event_dict: structlog.typing.EventDict) -> str:
        fields = journal_fields(event_dict, method, host=self.host)
        try:
            self.sender(fields)
        except OSError as exc:
            out = self.fallback or sys.stderr
            msg = fields["MESSAGE"]
            text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
            out.write(f"haguard: journal unreachable ({exc.strerror or exc}): {text}\n")
            out.flush()
        return ""
