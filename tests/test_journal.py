"""Structured logging against a real, private systemd-journald (tests/helpers/journald.py)."""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from haguard.adapters import journal as journal_adapter
from haguard.adapters.journal import NativeJournal, encode_entry, message_id
from haguard.logs import configure_logging
from tests.helpers.journald import Entry, Journald, journald

# MESSAGE_IDs are API (journalctl MESSAGE_ID=..., catalogs, alert rules): pinned here.
HOST_DEAD_ID = "d78d457dd4c357748474e6fb1758f22c"
VM_LOST_ID = "2b05ecc5f8d559d8b7eda279592f10f9"


@pytest.fixture
def jd() -> Iterator[Journald]:
    with journald() as j:
        yield j


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        structlog.configure(**config)


def by_event(entries: list[Entry], kind: str) -> Entry:
    found = [e for e in entries if e.get("HAGUARD_EVENT") == kind]
    assert len(found) == 1, f"{kind}: {found}"
    return found[0]


def run_py(code: str, env: dict[str, str] | None = None, stderr: object = subprocess.PIPE
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=30, check=False,  # type: ignore[call-overload]
                          env={**os.environ, **(env or {})})


@pytest.mark.timeout(30)
def test_events_reach_journald_with_fields(jd: Journald, restore_logging: None) -> None:
    assert configure_logging("journal", "debug", "h1", journal_socket=str(jd.socket)) == "journal"
    log = structlog.get_logger()
    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    log.info("host-dead", host="h2", reason="no ICMP reply for 6 s", vm="web1", missed=3)
    log.warning("vm-lost", vm="web2", **{"odd-key.x": "v", "nested": {"a": [1, 2]}})
    log.debug("probe-sent", host="h3")
    log.error("fence-failed", host="h2")
    log.critical("quorum-lost", peers=1)
    logging.getLogger("haguard.migration").warning("migration step: %s", "pause")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("loop-crashed", loop="gossip")

    entries = jd.wait_for(lambda e: e.get("HAGUARD_HOST") == "h1", count=7)
    assert len(entries) == 7, jd.entries()

    dead = by_event(entries, "host-dead")
    assert dead["MESSAGE_ID"] == HOST_DEAD_ID == message_id("host-dead")
    assert re.fullmatch(r"[0-9a-f]{32}", dead["MESSAGE_ID"])
    assert dead["PRIORITY"] == "6"
    assert dead["SYSLOG_IDENTIFIER"] == "haguard"
    assert dead["HAGUARD_HOST"] == "h1"            # this agent's host
    assert dead["HAGUARD_SUBJECT_HOST"] == "h2"    # the host the event is about
    assert dead["HAGUARD_VM"] == "web1"
    assert dead["HAGUARD_REASON"] == "no ICMP reply for 6 s"
    assert dead["HAGUARD_MISSED"] == "3"
    assert dead["MESSAGE"] == 'host-dead host=h2 reason="no ICMP reply for 6 s" vm=web1 missed=3'
    assert dead["CODE_FILE"] == __file__
    assert dead["CODE_LINE"] == str(line)
    assert dead["CODE_FUNC"] == "test_events_reach_journald_with_fields"
    assert dead["_TRANSPORT"] == "journal"

    lost = by_event(entries, "vm-lost")
    assert lost["MESSAGE_ID"] == VM_LOST_ID != HOST_DEAD_ID
    assert lost["PRIORITY"] == "4"
    assert lost["HAGUARD_ODD_KEY_X"] == "v"         # sanitized, not silently dropped
    assert json.loads(lost["HAGUARD_NESTED"]) == {"a": [1, 2]}

    assert by_event(entries, "probe-sent")["PRIORITY"] == "7"
    assert by_event(entries, "fence-failed")["PRIORITY"] == "3"
    assert by_event(entries, "quorum-lost")["PRIORITY"] == "2"

    crashed = by_event(entries, "loop-crashed")
    assert crashed["PRIORITY"] == "3"
    assert crashed["MESSAGE"].startswith("loop-crashed loop=gossip\nTraceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in crashed["MESSAGE"]

    stdlib = [e for e in entries if e.get("HAGUARD_LOGGER") == "haguard.migration"]
    assert len(stdlib) == 1
    assert stdlib[0]["MESSAGE"] == "migration step: pause"
    assert stdlib[0]["PRIORITY"] == "4"
    assert stdlib[0]["CODE_FUNC"] == "test_events_reach_journald_with_fields"
    assert "HAGUARD_EVENT" not in stdlib[0] and "MESSAGE_ID" not in stdlib[0]  # free text, no kind


@pytest.mark.timeout(30)
def test_message_id_stable_across_processes_and_senders(jd: Journald) -> None:
    """Two separate processes over the native protocol, one through libsystemd: same IDs."""
    code = """
        import structlog
        from haguard.adapters import journal
        from haguard.logs import configure_logging
        configure_logging("journal", "info", "{host}")
        print(journal.default_sender().__class__.__name__, journal.default_sender())
        log = structlog.get_logger()
        log.info("host-dead", host="h9")
        log.warning("vm-lost", vm="db")
    """
    for host in ("run1", "run2"):
        out = run_py(code.format(host=host), env={"HAGUARD_JOURNAL_SOCKET": str(jd.socket)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("NativeJournal"), out.stdout
    # Inside journald's mount namespace the default socket path is this journald: libsystemd.
    inside = jd.run_inside([sys.executable, "-c", textwrap.dedent(code.format(host="run3"))])
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.startswith("function <function library_send"), inside.stdout

    entries = jd.wait_for(lambda e: e.get("HAGUARD_HOST", "").startswith("run"), count=6)
    ids = {(e["HAGUARD_HOST"], e["HAGUARD_EVENT"]): e["MESSAGE_ID"] for e in entries}
    assert len(ids) == 6, entries
    for host in ("run1", "run2", "run3"):
        assert ids[(host, "host-dead")] == HOST_DEAD_ID
        assert ids[(host, "vm-lost")] == VM_LOST_ID
    lib = [e for e in entries if e["HAGUARD_HOST"] == "run3"]
    assert all(e["CODE_FUNC"] == "<module>" and e["CODE_LINE"] for e in lib), lib
    assert {e["HAGUARD_SUBJECT_HOST"] for e in lib if "HAGUARD_SUBJECT_HOST" in e} == {"h9"}


@pytest.mark.timeout(30)
def test_auto_picks_journal_only_when_stderr_is_the_journal_stream(jd: Journald) -> None:
    code = """
        import sys, structlog
        from haguard.logs import configure_logging
        print(configure_logging("auto", "info", "auto-host"), flush=True)
        structlog.get_logger().warning("vm-lost", vm="{vm}")
    """
    with jd.stream("haguard") as sock:
        st = os.fstat(sock.fileno())
        env = {"HAGUARD_JOURNAL_SOCKET": str(jd.socket), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        native = run_py(code.format(vm="native"), env=env, stderr=sock)
        # Same stream, but $JOURNAL_STREAM names another file: plain lines on stderr.
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        plain = run_py(code.format(vm="plain"), env=env, stderr=sock)
    assert (native.returncode, native.stdout.strip()) == (0, "journal")
    assert (plain.returncode, plain.stdout.strip()) == (0, "kv")

    got = jd.wait_for(lambda e: "vm-lost" in str(e.get("MESSAGE")), count=2)
    assert len(got) == 2, jd.entries()
    structured = [e for e in got if e.get("HAGUARD_VM") == "native"]
    assert len(structured) == 1 and structured[0]["_TRANSPORT"] == "journal"
    assert structured[0]["MESSAGE_ID"] == VM_LOST_ID
    line = [e for e in got if e.get("_TRANSPORT") == "stdout"]
    assert len(line) == 1 and "HAGUARD_VM" not in line[0]
    assert re.search(r"level=warning event=vm-lost .*vm=plain", line[0]["MESSAGE"]), line[0]


@pytest.mark.timeout(30)
def test_entry_too_big_for_a_datagram_goes_by_memfd(jd: Journald) -> None:
    sender = NativeJournal(str(jd.socket), sndbuf_bytes=64 * 1024)
    big = "x" * (512 * 1024)
    multi = "line one\nline two\n\0binary"
    try:
        sender({"MESSAGE": "big entry", "HAGUARD_EVENT": "big", "HAGUARD_BLOB": big, "HAGUARD_MULTI": multi})
    finally:
        sender.close()
    [entry] = jd.wait_for(lambda e: e.get("HAGUARD_EVENT") == "big")
    assert len(encode_entry({"HAGUARD_BLOB": big})) > 64 * 1024
    assert entry["HAGUARD_BLOB"] == big
    assert entry["HAGUARD_MULTI"] == multi


@pytest.mark.timeout(10)
def test_unreachable_journal_falls_back_to_a_line(tmp_path: Path, restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("journal", "info", "h1", stream=out, journal_socket=str(tmp_path / "nothing"))
    structlog.get_logger().error("fence-failed", host="h2")
    assert out.getvalue().startswith("haguard: journal unreachable (")
    assert out.getvalue().rstrip().endswith("fence-failed host=h2")


@pytest.mark.timeout(10)
def test_json_lines_for_shippers(restore_logging: None) -> None:
    out = io.StringIO()
    assert configure_logging("json", "info", "h1", stream=out) == "json"
    structlog.get_logger().info("host-dead", host="h2", vm="web1")
    logging.getLogger("paho.mqtt.client").warning("connection lost: %s", "eof")
    structlog.get_logger().debug("below-level")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(x) for x in lines)
    assert first["event"] == "host-dead" and first["host"] == "h2" and first["haguard_host"] == "h1"
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert second["event"] == "connection lost: eof" and second["logger"] == "paho.mqtt.client"
    assert second["level"] == "warning"


@pytest.mark.timeout(10)
def test_bad_format_or_level_is_a_one_line_error(restore_logging: None) -> None:
    from haguard.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown log format 'xml'"):
        configure_logging("xml", "info", "h1")
    with pytest.raises(ConfigError, match="unknown log level 'loud'"):
        configure_logging("kv", "loud", "h1")


def test_field_names_are_sanitized() -> None:
    assert journal_adapter.field_name("odd-key.x") == "HAGUARD_ODD_KEY_X"
    assert journal_adapter.field_name("ünï") == "HAGUARD__N_"
    assert len(journal_adapter.field_name("k" * 100)) == 64
