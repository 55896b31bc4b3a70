"""The watchdog adapter against stand-in devices the test reads: a FIFO (each write arrives
as it happens, and closing is seen as end of file) and a regular file.  No real watchdog:
arming one here would reset the machine."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from haguard.adapters.watchdog import MAGIC_CLOSE, Watchdog, WatchdogError


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO and a non-blocking read end, opened first so the adapter's open finds a reader."""
    path = tmp_path / "watchdog"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield path, reader
    finally:
        os.close(reader)


def _drain(reader: int) -> bytes | None:
    """What was written since the last call; None when the writer has closed (end of file)."""
    try:
        data = os.read(reader, 4096)
    except BlockingIOError:
        return b""
    return data if data else None


@pytest.mark.timeout(10)
def test_pets_stop_when_asked_and_the_device_stays_armed(fifo: tuple[Path, int]) -> None:
    path, reader = fifo
    dog = Watchdog(path, timeout_s=7)
    try:
        dog.open()
        assert dog.timeout_s == 7           # a FIFO does not answer WDIOC_GETTIMEOUT
        for _ in range(3):
            assert dog.pet()
        pets = _drain(reader)
        assert pets is not None and len(pets) == 3 and MAGIC_CLOSE not in pets

        dog.stop_petting("lost quorum")
        assert _drain(reader) == b""        # nothing written, and not closed: still armed
        assert dog.is_open and dog.pets == 3 and not dog.petting
        assert dog.pet(), "quorum back before the deadline: petting resumes"
        assert _drain(reader) == b"\0" and dog.petting
    finally:
        dog.disarm()


@pytest.mark.timeout(10)
def test_disarm_writes_the_magic_close_then_closes(fifo: tuple[Path, int]) -> None:
    path, reader = fifo
    dog = Watchdog(path)
    dog.open()
    dog.pet()
    dog.stop_petting("shutting down")    # a graceful stop may follow a stop: still disarms
    assert _drain(reader) == b"\0"
    dog.disarm()
    assert _drain(reader) == MAGIC_CLOSE
    assert _drain(reader) is None           # closed right after the 'V'
    assert not dog.is_open
    dog.disarm()                            # twice is harmless
    with pytest.raises(WatchdogError, match="not open"):
        dog.pet()


@pytest.mark.timeout(10)
def test_regular_file_stand_in(tmp_path: Path) -> None:
    path = tmp_path / "watchdog"
    path.touch()
    dog = Watchdog(path, timeout_s=12.5)
    try:
        dog.open()
        assert dog.timeout_s == 12.5
        dog.pet()
        dog.pet()
        assert path.read_bytes() == b"\0\0"
    finally:
        dog.disarm()
    assert path.read_bytes() == b"\0\0V"


@pytest.mark.timeout(10)
def test_an_exit_without_disarm_never_writes_the_magic_close(tmp_path: Path) -> None:
    # An agent that stops petting and exits (or crashes) must leave the device armed.
    path = tmp_path / "watchdog"
    path.touch()
    script = ("from pathlib import Path; from haguard.adapters.watchdog import Watchdog\n"
              f"d = Watchdog(Path({str(path)!r})); d.open(); d.pet(); d.stop_petting('test')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=8, check=False)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == b"\0"


@pytest.mark.timeout(10)
def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError, match=r"cannot open watchdog .*No such file"):
        Watchdog(tmp_path / "missing").open()
    # A FIFO nobody reads: refused at once (ENXIO), never a hang.
    lonely = tmp_path / "lonely"
    os.mkfifo(lonely)
    dog = Watchdog(lonely)
    with pytest.raises(WatchdogError, match=os.strerror(errno.ENXIO)):
        dog.open()
    assert not dog.is_open
    dog.disarm()                            # nothing to disarm: a no-op
