"""Fence devices: the real fence_dummy from Debian's fence-agents, and a fence-agent-style
stand-in that records what it was given, to prove options travel on stdin only, secrets
reach neither the process list nor the logs, and timeouts and failures come back as results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from haguard.adapters.fence import FenceResult, fence, redact
from haguard.config.cluster import FenceDevice

FENCE_DUMMY = "/usr/sbin/fence_dummy"
PASSWORD = "s3cr3t-Pa55-for-bmc"
COMMUNITY = "snmp-community-xyz"

# A fence-agent-style stand-in: reads key=value lines, writes its pid, records them,
# optionally spawns a helper, sleeps, prints a message and exits with the code it is told.
STAND_IN = f"""#!{sys.executable}
import os, subprocess, sys, time
opts = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
rec = opts["record"]
with open(rec + ".args", "w") as f:
    f.write("\\n".join(sys.argv))
with open(rec + ".stdin", "w") as f:
    f.write("\\n".join(f"{{k}}={{v}}" for k, v in opts.items()))
if opts.get("helper"):
    child = subprocess.Popen(["sleep", "30"])
    open(rec + ".helper", "w").write(str(child.pid))
open(rec + ".pid", "w").write(str(os.getpid()))
time.sleep(float(opts.get("sleep", "0")))
print("debug: password was " + opts.get("password", ""), file=sys.stderr)
print(opts.get("message", "Success"), file=sys.stderr if opts.get("exit", "0") != "0" else sys.stdout)
sys.exit(int(opts.get("exit", "0")))
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        for pidfile in (*tmp_path.glob("*.pid"), *tmp_path.glob("*.helper")):
            _kill(int(pidfile.read_text()))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def stand_in(workdir: Path) -> Path:
    path = workdir / "fence_standin"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return path


@pytest.fixture
def password_file(workdir: Path) -> Path:
    path = workdir / "bmc.pass"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def _dummy(workdir: Path, status: str, **extra: str) -> FenceDevice:
    status_file = workdir / "power"
    status_file.write_text(status)        # fence_dummy wants the bare word, no newline
    return FenceDevice(kind="agent", agent="fence_dummy", timeout_s=20,
                       options={"type": "file", "status_file": str(status_file), **extra})


@pytest.mark.timeout(30)
async def test_fence_dummy_off_status_on(workdir: Path) -> None:
    device = _dummy(workdir, "on")
    status = await fence(device, "status", host="h1")
    assert (status.ok, status.power, status.exit_code) == (True, "on", 0)

    off = await fence(device, "off", host="h1", confirm_off=True)
    assert isinstance(off, FenceResult)
    assert (off.ok, off.action, off.host, off.power) == (True, "off", "h1", "off"), off
    assert (workdir / "power").read_text() == "off"
    assert 0 < off.duration_s < 20

    status = await fence(device, "status", host="h1")
    assert (status.ok, status.power, status.exit_code) == (True, "off", 2)
    assert "OFF" in status.detail

    on = await fence(device, "on", host="h1")
    assert on.ok and (workdir / "power").read_text() == "on"


@pytest.mark.timeout(30)
async def test_fence_dummy_failure_is_a_result_with_its_message(workdir: Path, password_file: Path) -> None:
    # A status fence_dummy cannot parse: it fails at once, with fence-agents' own message.
    device = _dummy(workdir, "jammed").model_copy(update={"password_file": password_file})
    result = await fence(device, "off", host="h2")
    assert not result.ok
    assert result.exit_code == 1
    assert "Unable to obtain correct plug status" in result.detail
    assert "\n" not in result.detail
    # fence_dummy echoes unknown options, the password among them, on stderr: never passed on.
    assert PASSWORD not in result.detail
    status = await fence(device, "status", host="h2")
    assert not status.ok and status.power is None


@pytest.mark.timeout(30)
async def test_fence_dummy_password_never_logged(workdir: Path, password_file: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    device = _dummy(workdir, "jammed").model_copy(update={"password_file": password_file})
    with structlog.testing.capture_logs() as captured:
        result = await fence(device, "off", host="h2")
    assert not result.ok
    events = [e for e in captured if e["event"] == "fence"]
    assert len(events) == 1 and events[0]["ok"] is False and events[0]["host"] == "h2"
    text = repr(captured) + "".join(f"{r.getMessage()}{r.__dict__!r}" for r in caplog.records)
    assert PASSWORD not in text


@pytest.mark.timeout(30)
async def test_options_on_stdin_and_password_not_in_process_list(
        workdir: Path, stand_in: Path, password_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    record = workdir / "run"
    device = FenceDevice(kind="agent", agent=str(stand_in), password_file=password_file, timeout_s=10,
                         options={"ip": "198.18.0.5", "username": "admin", "lanplus": "1",
                                  "community": COMMUNITY, "record": str(record), "sleep": "1.5"})
    with structlog.testing.capture_logs() as captured:
        task = asyncio.create_task(fence(device, "off", host="h3"))
        pidfile = record.with_suffix(".pid")
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the stand-in never started"
            await asyncio.sleep(0.02)
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        result = await task

    assert str(stand_in) in cmdline            # the live agent's command line, read while it ran
    assert PASSWORD not in cmdline and PASSWORD not in environ
    assert COMMUNITY not in cmdline
    assert record.with_suffix(".args").read_text() == str(stand_in)   # no arguments at all
    lines = record.with_suffix(".stdin").read_text().splitlines()
    assert lines[0] == "action=off"
    assert lines[-1] == f"password={PASSWORD}"
    assert {"ip=198.18.0.5", "username=admin", "lanplus=1", f"community={COMMUNITY}"} <= set(lines)

    assert result.ok and result.exit_code == 0 and result.detail == "Success"
    assert 1.5 <= result.duration_s < 10
    text = repr(captured) + "".join(f"{r.getMessage()}{r.__dict__!r}" for r in caplog.records)
    assert "fence" in text
    assert PASSWORD not in text and COMMUNITY not in text


@pytest.mark.timeout(20)
async def test_timeout_kills_the_agent_and_its_helpers(workdir: Path, stand_in: Path) -> None:
    record = workdir / "slow"
    device = FenceDevice(kind="command", agent=f"{stand_in} --ignored-arg", timeout_s=1.0,
                         options={"record": str(record), "sleep": "30", "helper": "1"})
    started = time.monotonic()
    result = await fence(device, "off", host="h4")
    assert time.monotonic() - started < 5
    assert not result.ok and result.exit_code is None
    assert "timed out after 1 s" in result.detail
    pid = int(record.with_suffix(".pid").read_text())
    helper = int(record.with_suffix(".helper").read_text())
    deadline = time.monotonic() + 3
    while (_alive(pid) or _alive(helper)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _alive(pid) and not _alive(helper)
    assert record.with_suffix(".args").read_text().splitlines()[1:] == ["--ignored-arg"]


@pytest.mark.timeout(20)
async def test_failing_agent_gives_its_message_redacted(workdir: Path, stand_in: Path,
                                                        password_file: Path) -> None:
    device = FenceDevice(kind="agent", agent=str(stand_in), password_file=password_file, timeout_s=10,
                         options={"record": str(workdir / "fail"), "exit": "3",
                                  "message": f"Failed: BMC refused login with {PASSWORD}"})
    result = await fence(device, "off", host="h5")
    assert not result.ok and result.exit_code == 3
    assert result.detail == "exit code 3: Failed: BMC refused login with ***"

    # `status` with an exit code outside 0/2 is not an answer; 2 is "off".
    device = device.model_copy(update={"options": {**device.options, "exit": "2", "message": "Status: OFF"}})
    status = await fence(device, "status", host="h5")
    assert status.ok and status.power == "off"
    # ...but an `off` that exits 2 failed.
    off = await fence(device, "off", host="h5")
    assert not off.ok


@pytest.mark.timeout(20)
async def test_unconfirmed_off_is_not_ok(workdir: Path, stand_in: Path) -> None:
    # The agent says the off worked, but a status still answers "on" (exit 0).
    device = FenceDevice(kind="agent", agent=str(stand_in), timeout_s=10,
                         options={"record": str(workdir / "liar")})
    result = await fence(device, "off", host="h6", confirm_off=True)
    assert not result.ok and result.power == "on"
    assert "not confirmed" in result.detail


@pytest.mark.timeout(10)
async def test_bad_setups_are_results_not_exceptions(workdir: Path, stand_in: Path) -> None:
    missing = await fence(FenceDevice(agent="fence_no_such_agent"), "off", host="h7")
    assert not missing.ok and "not found" in missing.detail

    no_file = FenceDevice(agent=str(stand_in), password_file=workdir / "nope")
    unreadable = await fence(no_file, "off", host="h7")
    assert not unreadable.ok and "No such file" in unreadable.detail

    smuggled = FenceDevice(agent=str(stand_in), options={"ip": "198.18.0.9\npassword=x"})
    result = await fence(smuggled, "off", host="h7")
    assert not result.ok and "line break" in result.detail
    assert not list(workdir.glob("*.pid"))     # no agent was started for any of these


def test_redact_longest_first() -> None:
    assert redact("pw=abcdef and abc", ["abc", "abcdef"]) == "pw=*** and ***"
    assert redact("nothing", ["", "x"]) == "nothing"
