"""Logging for the agent: structlog for haguard's events, stdlib records routed through it.

Call `configure_logging` once at start-up, before anything logs.  Callers name the kind
of event and give its facts as keys:

    log = structlog.get_logger()
    log.info("host-dead", host="h2", reason="no ICMP reply for 6 s")

Formats:
    journal   native journald entries with fields (see haguard.adapters.journal)
    json      one JSON object per line, for log shippers
    console   readable, coloured lines for a terminal
    kv        plain logfmt lines (timestamp level event key=value ...)
    auto      journal when stderr is connected to the journal ($JOURNAL_STREAM names
              stderr's device:inode), console on a terminal, kv otherwise

Every output is a handler on the root logger with structlog's ProcessorFormatter, so
records of stdlib loggers (qemu.qmp, paho, asyncio, haguard.migration) come out in the
same format with the same fields.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor

from haguard.adapters.journal import Fields, JournalRenderer, Sender, default_sender
from haguard.errors import ConfigError

LogFormat = Literal["auto", "console", "json", "journal", "kv"]
LOG_FORMATS: tuple[str, ...] = ("auto", "console", "json", "journal", "kv")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

_CALLSITE = structlog.processors.CallsiteParameterAdder(
    {structlog.processors.CallsiteParameter.PATHNAME,
     structlog.processors.CallsiteParameter.LINENO,
     structlog.processors.CallsiteParameter.FUNC_NAME})
_CALLSITE_KEYS = ("pathname", "lineno", "func_name")


def stream_is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journal stream systemd connected ($JOURNAL_STREAM=dev:ino)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def resolve_format(fmt: str, stream: TextIO, env: Mapping[str, str] | None = None) -> str:
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"unknown log format {fmt!r} (choose from {', '.join(LOG_FORMATS)})",
                          field="log-format")
    if fmt != "auto":
        return fmt
    if stream_is_journal(stream, env):
        return "journal"
    try:
        return "console" if stream.isatty() else "kv"
    except (AttributeError, ValueError):
        return "kv"


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if level.lower() not in LOG_LEVELS or not isinstance(value, int):
        raise ConfigError(f"unknown log level {level!r} (choose from {', '.join(LOG_LEVELS)})",
                          field="log-level")
    return value


# Rich tracebacks without local variables: locals can hold secrets and swamp the terminal.
_TRACEBACKS = structlog.dev.RichTracebackFormatter(show_locals=False)
_JSON_FIRST = ("timestamp", "level", "event", "haguard_host", "logger")


def _json_order(_: Any, __: str, ed: EventDict) -> EventDict:
    """The keys a reader scans for first, first."""
    return {**{k: ed[k] for k in _JSON_FIRST if k in ed}, **ed}


def _drop_callsite(_: Any, __: str, ed: EventDict) -> EventDict:
    for key in _CALLSITE_KEYS:
        ed.pop(key, None)
    return ed


def _add(key: str, value: str) -> Processor:
    def add(_: Any, __: str, ed: EventDict) -> EventDict:
        ed.setdefault(key, value)
        return ed
    return add


def _final_processors(fmt: str, host: str, stream: TextIO, sender: Sender) -> list[Processor]:
    meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    iso = structlog.processors.TimeStamper(fmt="iso", utc=True)
    if fmt == "journal":
        # The renderer reads _from_structlog itself (stdlib records get no MESSAGE_ID).
        return [structlog.processors.format_exc_info,
                JournalRenderer(host, sender, fallback=stream)]
    if fmt == "json":
        return [meta, iso, _add("haguard_host", host), structlog.processors.format_exc_info, _json_order,
                structlog.processors.JSONRenderer(sort_keys=False)]
    if fmt == "console":
        tty = _isatty(stream)
        return [meta, structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False), _drop_callsite,
                structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=_TRACEBACKS if tty
                                              else structlog.dev.plain_traceback)]
    return [meta, iso, _drop_callsite, structlog.processors.format_exc_info,
            structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event", "logger"],
                                                drop_missing=True)]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _DiscardHandler(logging.Handler):
    """Runs the formatter for its side effect (the journal renderer sends the entry)."""

    def __init__(self, sender: object) -> None:
        super().__init__()
        self._sender = sender

    def close(self) -> None:
        if callable(close := getattr(self._sender, "close", None)):
            close()
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.format(record)
        except Exception:
            self.handleError(record)


_HANDLER_MARK = "_haguard_handler"


def _no_sender(_: Fields) -> None:
    return None


def configure_logging(fmt: str = "auto", level: str | int = "info", host: str = "", *,
                      stream: TextIO | None = None, journal_socket: str | None = None) -> str:
    """Configure structlog and the root logger; returns the format chosen.

    `host` is the cluster name of this agent's host (default: the hostname).
    `journal_socket` (or $HAGUARD_JOURNAL_SOCKET) sends journal output to another socket.
    Calling it again replaces the previous configuration.
    """
    out = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, out)
    numeric = parse_level(level)
    host = host or socket.gethostname()
    sender = default_sender(journal_socket) if chosen == "journal" else _no_sender

    # The same chain for every format, so loggers cached before a reconfiguration stay valid;
    # the call site is taken here, in the caller's frame.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            _CALLSITE,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.ExtraAdder(),
            _CALLSITE,
        ],
        processors=_final_processors(chosen, host, out, sender),
    )
    handler: logging.Handler = _DiscardHandler(sender) if chosen == "journal" else logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    return chosen
