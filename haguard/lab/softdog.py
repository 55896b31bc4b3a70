"""A watchdog device stand-in served through FUSE, modelled on Linux's softdog.

Why: the machines haguard is tested on have no watchdog device (no /dev/watchdog, no softdog
module, no CUSE), yet the agent's watchdog code (adapters/watchdog.py: open, write to pet,
WDIOC_GETTIMEOUT, the magic close) must be tested against something that speaks the real
protocol, ioctls included, and that *expires*.  FUSE is the one kernel interface left: a
regular file on a FUSE mount can receive ioctls.  The kernel forwards them to the filesystem
in "restricted" mode: it sizes the argument from the command's encoding (_IOC_SIZE) and copies
it in for _IOW, out for _IOR, both ways for _IOWR.  So WDIOC_SETTIMEOUT (_IOWR) and
WDIOC_GETTIMEOUT (_IOR) work as on a real device, from any process, in any network namespace
(the mount is in the mount namespace; `ip netns exec` copies it).

Layout: `MOUNT/NAME` for each device, each with its own state; `MOUNT/.control` (read: the
status of every device as JSON; write: commands, one a line, applied before write() returns:
`faults NAME [clamp=N] [no_ioctl] [fail_open]` replaces the device's faults, `reset NAME`
"reboots" it); `MOUNT/.events` (read: every event so far, one JSON object a line).

What it models, after drivers/watchdog/watchdog_dev.c (the watchdog core) and softdog.c:
- open arms the device and starts its timer; one opener at a time (EBUSY, as _WDOG_DEV_OPEN);
- write pets; the core scans the bytes: the magic close is allowed if any byte is 'V' and
  forgotten otherwise (each write clears it first); a zero-length write does nothing;
- release: with the magic close, the timer stops; without it, "watchdog did not stop!" is
  logged and the core pings once, so the reset comes one timeout after the close;
- ioctls as the core handles them for softdog: GETSUPPORT (identity "Software Watchdog",
  options SETTIMEOUT|MAGICCLOSE|KEEPALIVEPING), GETSTATUS (MAGICCLOSE while the magic close is
  allowed, KEEPALIVEPING once after a ping), GETBOOTSTATUS (0), KEEPALIVE, SETTIMEOUT (the
  core's check: below 1 or above max_timeout is EINVAL, not clamped; else set, ping, and the
  effective value written back), GETTIMEOUT, GETPRETIMEOUT (0), SETPRETIMEOUT and GETTIMELEFT
  (EOPNOTSUPP: softdog has neither), anything else ENOTTY;
- the default timeout is softdog's 60 s (soft_margin), its range 1..65535 s.

What it does not model: the reboot (expiry calls the caller's `on_expire(name)`, like softdog
with soft_noboot plus a hook: the test kills the "host"; the device then stays expired, pets
ignored and open refused with EIO, until `reset(name)`); pretimeouts; nowayout; the single
/dev/watchdog alias.  Two things FUSE cannot carry: WDIOC_SETOPTIONS is _IOR although the core
reads its argument, so the value never reaches the filesystem (answered EOPNOTSUPP); and every
_IOR command gets its buffer written back, so WDIOC_KEEPALIVE leaves 0 in its argument where
the kernel leaves it untouched.  Release reaches the filesystem asynchronously (close() returns
before it is handled; a following open is queued after it, so reopening works).

Faults, per device, at start (`faults=`), from the test (`set_faults`) or the control file:
`clamp=N` (the device runs N s whatever is asked, and says so: as a driver whose hardware
rounds), `no_ioctl` (ENOTTY for every ioctl: an old stand-in), `fail_open` (open: ENODEV).

Processes: `SoftdogFarm` runs the filesystem in a child process (`python -m
haguard.lab.softdog`), which streams its events as JSON lines on stdout; the farm's reader
thread calls `on_expire`.  Queries and commands go through the control file, so they are in
order with what the devices saw.  Event times are time.monotonic() of the child: the same
clock (CLOCK_MONOTONIC) in every process of the machine.  The child exits, unmounting, when
its stdin closes: when the farm closes or its process dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import logging
import os
import queue
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

from haguard.errors import HaguardError

log = logging.getLogger("haguard.softdog")

# <linux/watchdog.h>
WDIOC_GETSUPPORT = 0x80285700      # _IOR('W', 0, struct watchdog_info)
WDIOC_GETSTATUS = 0x80045701       # _IOR('W', 1, int)
WDIOC_GETBOOTSTATUS = 0x80045702   # _IOR('W', 2, int)
WDIOC_SETOPTIONS = 0x80045704      # _IOR('W', 4, int): sic, the core reads it
WDIOC_KEEPALIVE = 0x80045705       # _IOR('W', 5, int)
WDIOC_SETTIMEOUT = 0xC0045706      # _IOWR('W', 6, int)
WDIOC_GETTIMEOUT = 0x80045707      # _IOR('W', 7, int)
WDIOC_SETPRETIMEOUT = 0xC0045708   # _IOWR('W', 8, int)
WDIOC_GETPRETIMEOUT = 0x80045709   # _IOR('W', 9, int)
WDIOC_GETTIMELEFT = 0x8004570A     # _IOR('W', 10, int)
WDIOF_SETTIMEOUT = 0x0080
WDIOF_MAGICCLOSE = 0x0100
WDIOF_KEEPALIVEPING = 0x8000
SOFTDOG_OPTIONS = WDIOF_SETTIMEOUT | WDIOF_MAGICCLOSE | WDIOF_KEEPALIVEPING
SOFTDOG_IDENTITY = b"Software Watchdog"
SOFTDOG_TIMEOUT_S = 60             # softdog's soft_margin
SOFTDOG_MAX_TIMEOUT_S = 65535

CONTROL = ".control"
EVENTS = ".events"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAX_EVENTS = 50_000               # per device; `pets` keeps counting past it


class SoftdogError(HaguardError):
    """The stand-in could not be started, or was told something it does not understand."""


@dataclass(frozen=True)
class Faults:
    clamp_s: int | None = None     # the device runs this timeout whatever is asked
    no_ioctl: bool = False         # ENOTTY for every ioctl
    fail_open: bool = False        # open fails with ENODEV

    def words(self) -> list[str]:
        out = [f"clamp={self.clamp_s}"] if self.clamp_s is not None else []
        return out + ["no_ioctl"] * self.no_ioctl + ["fail_open"] * self.fail_open

    @classmethod
    def parse(cls, words: Iterable[str]) -> Faults:
        clamp: int | None = None
        no_ioctl = fail_open = False
        for word in words:
            key, sep, value = word.partition("=")
            if key == "clamp" and sep and value.isdigit() and int(value) > 0:
                clamp = int(value)
            elif word == "no_ioctl":
                no_ioctl = True
            elif word == "fail_open":
                fail_open = True
            else:
                raise SoftdogError(f"unknown fault {word!r} (clamp=N, no_ioctl, fail_open)")
        return cls(clamp, no_ioctl, fail_open)


@dataclass(frozen=True)
class Event:
    t: float                       # time.monotonic() in the serving process
    device: str
    kind: str                      # open, open_refused, pet, set_timeout, get_timeout, ioctl,
    #                                magic_close, release, release_armed, expire, ignored,
    #                                reset, faults
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "device": self.device, "kind": self.kind, "detail": dict(self.detail)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Event:
        return cls(float(obj["t"]), str(obj["device"]), str(obj["kind"]), dict(obj.get("detail", {})))


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    timeout_s: int                 # effective timeout
    armed: bool                    # the timer runs
    open: bool
    expired: bool
    expect_close: bool             # the magic close is allowed
    pets: int                      # writes and WDIOC_KEEPALIVEs that pinged, since start
    last_ping: float | None        # monotonic
    faults: Faults

    @classmethod
    def from_json(cls, name: str, obj: Mapping[str, Any]) -> DeviceStatus:
        f = obj["faults"]
        return cls(name, int(obj["timeout_s"]), bool(obj["armed"]), bool(obj["open"]),
                   bool(obj["expired"]), bool(obj["expect_close"]), int(obj["pets"]),
                   None if obj["last_ping"] is None else float(obj["last_ping"]),
                   Faults(f["clamp_s"], bool(f["no_ioctl"]), bool(f["fail_open"])))


# --------------------------------------------------------------------------- the device side


class _FileInfo(Protocol):
    """The fields of libfuse's struct fuse_file_info used here (mfusepy, raw_fi=True)."""
    fh: int
    flags: int
    direct_io: int
    nonseekable: int


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _Device:
    def __init__(self, name: str, timeout_s: int, faults: Faults) -> None:
        self.name = name
        self.default_timeout_s = timeout_s
        self.faults = faults
        self.timeout_s = faults.clamp_s or timeout_s
        self.armed = False
        self.expired = False
        self.open_fh: int | None = None
        self.expect_close = False
        self.keepalive_bit = False       # _WDOG_KEEPALIVE, read and cleared by GETSTATUS
        self.last_ping: float | None = None
        self.pets = 0
        self.events: deque[Event] = deque(maxlen=_MAX_EVENTS)

    def status(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "armed": self.armed, "open": self.open_fh is not None,
                "expired": self.expired, "expect_close": self.expect_close, "pets": self.pets,
                "last_ping": self.last_ping,
                "faults": {"clamp_s": self.faults.clamp_s, "no_ioctl": self.faults.no_ioctl,
                           "fail_open": self.faults.fail_open}}


class SoftdogFs:
    """The filesystem (mfusepy operations, raw_fi=True) and the devices' timers.

    libfuse runs it single-threaded, so requests are handled in the order the kernel queued
    them; a timer thread expires devices and a writer thread streams events to `out`.
    """

    use_ns = True                        # mfusepy: times in nanoseconds

    def __init__(self, names: Iterable[str], *, timeout_s: int = SOFTDOG_TIMEOUT_S,
                 max_timeout_s: int = SOFTDOG_MAX_TIMEOUT_S,
                 faults: Mapping[str, Faults] | None = None, out: IO[bytes] | None = None) -> None:
        faults = faults or {}
        if not 1 <= timeout_s <= max_timeout_s:
            raise SoftdogError(f"timeout {timeout_s} s is outside 1..{max_timeout_s}")
        self.max_timeout_s = max_timeout_s
        self.devices: dict[str, _Device] = {}
        for name in names:
            if not _NAME.fullmatch(name) or name in self.devices:
                raise SoftdogError(f"bad or repeated device name {name!r}")
            self.devices[name] = _Device(name, timeout_s, faults.get(name, Faults()))
        unknown = set(faults) - set(self.devices)
        if unknown:
            raise SoftdogError(f"faults for unknown devices: {sorted(unknown)}")
        self.caller_pid: Callable[[], int] = lambda: 0     # the pid behind the request (serve sets it)
        self._cv = threading.Condition()
        self._next_fh = 1
        self._snapshots: dict[int, bytes] = {}        # open .control/.events handles
        self._out = out
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = False
        self._started_ns = time.time_ns()
        self._threads = [threading.Thread(target=self._run_timer, name="softdog-timer", daemon=True),
                         threading.Thread(target=self._run_writer, name="softdog-out", daemon=True)]

    # --- lifecycle

    def start_threads(self) -> None:
        for t in self._threads:
            t.start()

    def stop_threads(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._queue.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)

    def init(self, path: str) -> None:
        """FUSE_INIT arrived: the mount is up."""
        self._emit({"t": time.monotonic(), "device": "", "kind": "ready", "detail": {"pid": os.getpid()}})

    # --- events and the timer

    def _emit(self, obj: Mapping[str, Any]) -> None:
        self._queue.put(json.dumps(obj).encode() + b"\n")

    def _record(self, dev: _Device, kind: str, **detail: Any) -> Event:
        ev = Event(time.monotonic(), dev.name, kind, detail)
        dev.events.append(ev)
        self._emit(ev.to_json())
        return ev

    def _ping(self, dev: _Device) -> None:
        """watchdog_ping: only a running timer is pinged."""
        if dev.armed:
            dev.last_ping = time.monotonic()
            dev.keepalive_bit = True
            self._cv.notify_all()

    def _run_timer(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        with self._cv:
            while not self._stopping:
                now = time.monotonic()
                wait = 1.0
                for dev in self.devices.values():
                    if not dev.armed or dev.last_ping is None:
                        continue
                    left = dev.last_ping + dev.timeout_s - now
                    if left <= 0:
                        dev.armed, dev.expired = False, True
                        self._record(dev, "expire", timeout_s=dev.timeout_s, late_s=round(-left, 6))
                        log.critical("%s: Initiating system reboot (handed to on_expire)", dev.name)
                    else:
                        wait = min(wait, left)
                self._cv.wait(wait)

    def _run_writer(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        while (line := self._queue.get()) is not None:
            if self._out is None:
                continue
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError):
                self._out = None             # the reader is gone; keep serving

    # --- files

    def _device(self, path: str) -> _Device:
        dev = self.devices.get(path.lstrip("/"))
        if dev is None:
            raise _oserror(errno.ENOENT)
        return dev

    def getattr(self, path: str, fh: object = None) -> dict[str, int]:
        times = {"st_atime": self._started_ns, "st_mtime": self._started_ns, "st_ctime": self._started_ns}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **times}
        if path.lstrip("/") in (CONTROL, EVENTS) or path.lstrip("/") in self.devices:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0, **times}
        raise _oserror(errno.ENOENT)

    def readdir(self, path: str, fh: object) -> list[str]:
        return [".", "..", *self.devices, CONTROL, EVENTS]

    def truncate(self, path: str, length: int, fh: object = None) -> int:
        return 0                             # O_TRUNC (`echo V > dev`): ignored, as by a device

    def open(self, path: str, fi: _FileInfo) -> int:
        fi.direct_io = 1                     # every write reaches us, in order
        fi.nonseekable = 1                   # stream_open
        with self._cv:
            fh = self._next_fh
            self._next_fh += 1
            name = path.lstrip("/")
            if name in (CONTROL, EVENTS):
                self._snapshots[fh] = self._control_text() if name == CONTROL else self._events_text()
                fi.fh = fh
                return 0
            dev = self._device(path)
            if dev.faults.fail_open:
                self._record(dev, "open_refused", errno="ENODEV", pid=self.caller_pid())
                raise _oserror(errno.ENODEV)
            if dev.expired:
                self._record(dev, "open_refused", errno="EIO", pid=self.caller_pid(), reason="expired")
                raise _oserror(errno.EIO)
            if dev.open_fh is not None:
                self._record(dev, "open_refused", errno="EBUSY", pid=self.caller_pid())
                raise _oserror(errno.EBUSY)
            dev.open_fh = fh
            fi.fh = fh
            if not dev.armed:                # watchdog_start
                dev.armed = True
                dev.last_ping = time.monotonic()
                dev.keepalive_bit = True
                self._cv.notify_all()
            self._record(dev, "open", fh=fh, pid=self.caller_pid(), timeout_s=dev.timeout_s)
            return 0

    def read(self, path: str, size: int, offset: int, fi: _FileInfo) -> bytes:
        with self._cv:
            snap = self._snapshots.get(fi.fh)
        if snap is None:
            raise _oserror(errno.EINVAL)     # watchdog_fops has no read
        return snap[offset:offset + size]

    def write(self, path: str, data: bytes, offset: int, fi: _FileInfo) -> int:
        with self._cv:
            if fi.fh in self._snapshots:
                self._command(data)
                return len(data)
            dev = self._device(path)
            if not data:
                return 0
            if dev.expired or dev.open_fh != fi.fh:
                self._record(dev, "ignored", op="write", fh=fi.fh, expired=dev.expired)
                return len(data)
            dev.expect_close = b"V" in data  # cleared, then set if any byte is 'V'
            if dev.armed:
                dev.pets += 1
                self._ping(dev)
            self._record(dev, "pet", via="write", size=len(data), magic=dev.expect_close)
            return len(data)

    def release(self, path: str, fi: _FileInfo) -> int:
        with self._cv:
            if self._snapshots.pop(fi.fh, None) is not None:
                return 0
            dev = self._device(path)
            if dev.open_fh != fi.fh:
                self._record(dev, "ignored", op="release", fh=fi.fh, expired=dev.expired)
                return 0
            dev.open_fh = None
            if not dev.armed:
                self._record(dev, "release", fh=fi.fh, expired=dev.expired)
            elif dev.expect_close:
                dev.armed = False
                self._record(dev, "magic_close", fh=fi.fh)
            else:
                log.critical("%s: watchdog did not stop!", dev.name)
                self._ping(dev)
                self._record(dev, "release_armed", fh=fi.fh, timeout_s=dev.timeout_s)
            dev.expect_close = False
            self._cv.notify_all()
            return 0

    def ioctl(self, path: str, cmd: int, arg: object, fi: _FileInfo, flags: int, data: int | None) -> int:
        with self._cv:
            if fi.fh in self._snapshots:
                raise _oserror(errno.ENOTTY)
            dev = self._device(path)
            if dev.faults.no_ioctl:
                self._record(dev, "ioctl", cmd=hex(cmd), errno="ENOTTY", fault="no_ioctl")
                raise _oserror(errno.ENOTTY)
            live = not dev.expired and dev.open_fh == fi.fh
            if cmd in (WDIOC_SETTIMEOUT, WDIOC_KEEPALIVE) and not live:
                self._record(dev, "ignored", op=hex(cmd), fh=fi.fh, expired=dev.expired)
                if data:
                    ctypes.c_int.from_address(data).value = dev.timeout_s if cmd == WDIOC_SETTIMEOUT else 0
                return 0
            return self._ioctl(dev, cmd, data)

    def _ioctl(self, dev: _Device, cmd: int, data: int | None) -> int:
        def put(value: int) -> None:
            if data:
                ctypes.c_int.from_address(data).value = value

        if cmd == WDIOC_SETTIMEOUT:
            asked = ctypes.c_int.from_address(data).value if data else 0
            if not 1 <= asked <= self.max_timeout_s:        # watchdog_timeout_invalid
                self._record(dev, "set_timeout", asked=asked, effective=None, errno="EINVAL")
                raise _oserror(errno.EINVAL)
            dev.timeout_s = dev.faults.clamp_s or asked
            self._ping(dev)
            put(dev.timeout_s)
            self._record(dev, "set_timeout", asked=asked, effective=dev.timeout_s)
        elif cmd == WDIOC_GETTIMEOUT:
            put(dev.timeout_s)
            self._record(dev, "get_timeout", timeout_s=dev.timeout_s)
        elif cmd == WDIOC_KEEPALIVE:
            put(0)                           # _IOR: FUSE copies the buffer back whatever we do
            if dev.armed:
                dev.pets += 1
                self._ping(dev)
            self._record(dev, "pet", via="ioctl")
        elif cmd == WDIOC_GETSUPPORT:
            if data:
                info = struct.pack("=II32s", SOFTDOG_OPTIONS, 0, SOFTDOG_IDENTITY)
                ctypes.memmove(data, info, len(info))
            self._record(dev, "ioctl", cmd="GETSUPPORT")
        elif cmd == WDIOC_GETSTATUS:
            put(WDIOF_MAGICCLOSE * dev.expect_close | WDIOF_KEEPALIVEPING * dev.keepalive_bit)
            dev.keepalive_bit = False
            self._record(dev, "ioctl", cmd="GETSTATUS")
        elif cmd in (WDIOC_GETBOOTSTATUS, WDIOC_GETPRETIMEOUT):
            put(0)
            self._record(dev, "ioctl", cmd=hex(cmd))
        elif cmd in (WDIOC_SETOPTIONS, WDIOC_SETPRETIMEOUT, WDIOC_GETTIMELEFT):
            self._record(dev, "ioctl", cmd=hex(cmd), errno="EOPNOTSUPP")
            raise _oserror(errno.EOPNOTSUPP)
        else:
            self._record(dev, "ioctl", cmd=hex(cmd), errno="ENOTTY")
            raise _oserror(errno.ENOTTY)
        return 0

    # --- control

    def _control_text(self) -> bytes:
        devices = {name: dev.status() for name, dev in self.devices.items()}
        return json.dumps({"t": time.monotonic(), "pid": os.getpid(), "max_timeout_s": self.max_timeout_s,
                           "devices": devices}, indent=1).encode() + b"\n"

    def _events_text(self) -> bytes:
        evs = sorted((ev for dev in self.devices.values() for ev in dev.events), key=lambda e: e.t)
        return b"".join(json.dumps(ev.to_json()).encode() + b"\n" for ev in evs)

    def _command(self, data: bytes) -> None:
        todo: list[tuple[_Device, Faults | None]] = []
        try:
            for line in data.decode().splitlines():
                words = line.split()
                if not words:
                    continue
                if words[0] not in ("faults", "reset") or len(words) < 2 or words[1] not in self.devices:
                    raise SoftdogError(f"bad command {line!r}")
                if words[0] == "reset" and len(words) != 2:
                    raise SoftdogError(f"bad command {line!r}")
                dev = self.devices[words[1]]
                todo.append((dev, Faults.parse(words[2:]) if words[0] == "faults" else None))
        except (SoftdogError, UnicodeDecodeError) as exc:
            log.error("control: %s", exc)
            raise _oserror(errno.EINVAL) from None
        for dev, faults in todo:
            if faults is not None:
                dev.faults = faults
                if faults.clamp_s is not None:
                    dev.timeout_s = faults.clamp_s
                self._record(dev, "faults", words=faults.words())
            else:
                self._reset(dev)
        self._cv.notify_all()

    def _reset(self, dev: _Device) -> None:
        """The machine came back: a fresh, unarmed device (its faults are hardware: they stay)."""
        dev.armed = dev.expired = dev.expect_close = dev.keepalive_bit = False
        dev.open_fh = None                   # an fd from before the reset is stale
        dev.last_ping = None
        dev.timeout_s = dev.faults.clamp_s or dev.default_timeout_s
        self._record(dev, "reset")


def serve(mountpoint: str, names: list[str], *, timeout_s: int, max_timeout_s: int,
          faults: Mapping[str, Faults], exit_on_stdin_eof: bool) -> int:
    """Mount and serve until SIGTERM/SIGINT (or stdin's end, if asked); unmounts on the way out."""
    import mfusepy

    fs = SoftdogFs(names, timeout_s=timeout_s, max_timeout_s=max_timeout_s, faults=faults,
                   out=sys.stdout.buffer)
    fs.caller_pid = lambda: int(mfusepy.fuse_get_context()[2])
    fs.start_threads()
    if exit_on_stdin_eof:
        main = threading.main_thread().ident
        assert main is not None

        def watch_stdin() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass
            log.info("stdin closed: unmounting")
            signal.pthread_kill(main, signal.SIGTERM)   # libfuse's handler ends the loop

        threading.Thread(target=watch_stdin, name="softdog-stdin", daemon=True).start()
    try:
        # Single-threaded: requests in the kernel's order (a close's release before the next open).
        mfusepy.FUSE(fs, mountpoint, raw_fi=True, foreground=True, nothreads=True,
                     allow_other=True, fsname="softdog", subtype="softdog")
    except RuntimeError as exc:
        if exc.args != (8,):                 # fuse_main's 8: its loop was ended by a signal (ours)
            raise
        log.info("unmounted %s", mountpoint)
    finally:
        fs.stop_threads()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haguard.lab.softdog",
                                     description="A watchdog device stand-in served through FUSE.")
    parser.add_argument("mountpoint")
    parser.add_argument("names", nargs="+", help="one watchdog device per name")
    parser.add_argument("--timeout", type=int, default=SOFTDOG_TIMEOUT_S, help="default timeout, s")
    parser.add_argument("--max-timeout", type=int, default=SOFTDOG_MAX_TIMEOUT_S)
    parser.add_argument("--fault", action="append", default=[], metavar="NAME:clamp=N,no_ioctl,fail_open")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s softdog[%(process)d] %(levelname)s %(message)s")
    faults: dict[str, Faults] = {}
    try:
        for spec in args.fault:
            name, _, words = spec.partition(":")
            faults[name] = Faults.parse(w for w in words.split(",") if w)
        return serve(args.mountpoint, args.names, timeout_s=args.timeout, max_timeout_s=args.max_timeout,
                     faults=faults, exit_on_stdin_eof=args.exit_on_stdin_eof)
    except SoftdogError as exc:
        print(f"softdog: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- the test side


def _mounted(path: Path) -> bool:
    """Whether something is mounted on `path` (also a dead FUSE mount, which stat cannot see)."""
    target = os.path.realpath(path)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            if point == target:
                return True
    return False


def _unmount(path: Path) -> None:
    """fusermount3 -u, then a lazy umount: whatever is left on `path` goes."""
    for cmd in (["fusermount3", "-u", str(path)], ["umount", "-l", str(path)]):
        if not _mounted(path):
            return
        if shutil.which(cmd[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    if _mounted(path):
        log.error("softdog: could not unmount %s", path)


class SoftdogFarm:
    """Watchdog devices `MOUNTPOINT/NAME`, served by a child process while the farm is open.

        with SoftdogFarm(tmp_path / "dogs", ["hostA", "hostB"], on_expire=kill_host) as farm:
            start_agent(watchdog=farm.path("hostA"))     # any process, any network namespace
            ...
            assert farm.wait_expired("hostA", 10)
            farm.reset("hostA")                          # the host "rebooted"

    `on_expire(name)` runs in the farm's reader thread; an exception it raises is kept in
    `callback_errors` and raised again by `close()`.
    """

    def __init__(self, mountpoint: Path | str, names: Iterable[str], *, timeout_s: int = SOFTDOG_TIMEOUT_S,
                 max_timeout_s: int = SOFTDOG_MAX_TIMEOUT_S, on_expire: Callable[[str], object] | None = None,
                 faults: Mapping[str, Faults] | None = None, ready_timeout_s: float = 15.0) -> None:
        self.mountpoint = Path(mountpoint).absolute()
        self.names = list(names)
        self.timeout_s = timeout_s
        self.max_timeout_s = max_timeout_s
        self.on_expire = on_expire
        self.faults = dict(faults or {})
        self.ready_timeout_s = ready_timeout_s
        self.callback_errors: list[BaseException] = []
        self.expirations: list[tuple[str, float]] = []   # (name, monotonic), as the reader saw them
        self.daemon_log = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._cv = threading.Condition()
        self._log: IO[bytes] | None = None   # the child's stderr: unlinked, so never left behind
        self._made_mountpoint = False

    # --- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(raise_callback_errors=exc is None)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close(raise_callback_errors=False)
            raise

    def _start(self) -> None:
        if not self.mountpoint.exists():
            self.mountpoint.mkdir(parents=True)
            self._made_mountpoint = True
        if _mounted(self.mountpoint):
            raise SoftdogError(f"{self.mountpoint} is already a mount point")
        self._log = tempfile.TemporaryFile(prefix="softdog-")  # noqa: SIM115 (closed by close())
        cmd = [sys.executable, "-m", "haguard.lab.softdog", "--exit-on-stdin-eof",
               "--timeout", str(self.timeout_s), "--max-timeout", str(self.max_timeout_s)]
        for name, f in self.faults.items():
            cmd += ["--fault", f"{name}:{','.join(f.words())}"]
        cmd += [str(self.mountpoint), *self.names]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])       # haguard importable from the child
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read_events, name="softdog-reader", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise SoftdogError(f"softdog did not mount {self.mountpoint}: {self._log_tail()}")
        while not (_mounted(self.mountpoint) and (self.mountpoint / CONTROL).exists()):
            if time.monotonic() > deadline:
                raise SoftdogError(f"softdog mount {self.mountpoint} not ready: {self._log_tail()}")
            time.sleep(0.01)

    def close(self, *, raise_callback_errors: bool = True) -> None:
        """Stop the child (it unmounts), unmount whatever is left, remove what the farm made."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()           # the child's cue to unmount and exit
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        _unmount(self.mountpoint)
        if self._log is not None:
            self.daemon_log = self._log_tail(limit=None)
            self._log.close()
            self._log = None
        if self._made_mountpoint and not _mounted(self.mountpoint):
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()
            self._made_mountpoint = False
        if raise_callback_errors and self.callback_errors:
            raise self.callback_errors[0]

    def log_text(self) -> str:
        """What the serving process logged so far (after `close()`: all it logged)."""
        return self._log_tail(limit=None)

    def _log_tail(self, limit: int | None = 2000) -> str:
        if self._log is None:
            text = self.daemon_log
        else:
            try:
                text = os.pread(self._log.fileno(), 1 << 24, 0).decode(errors="replace")
            except OSError:
                return ""
        return text[-limit:] if limit else text

    def _read_events(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("kind") == "ready":
                self._ready.set()
            elif obj.get("kind") == "expire":
                name = str(obj["device"])
                with self._cv:
                    self.expirations.append((name, float(obj["t"])))
                    self._cv.notify_all()
                if self.on_expire is not None:
                    try:
                        self.on_expire(name)
                    except Exception as exc:
                        log.exception("softdog on_expire(%s) failed", name)
                        self.callback_errors.append(exc)

    # --- the devices

    def path(self, name: str) -> Path:
        if name not in self.names:
            raise KeyError(name)
        return self.mountpoint / name

    @property
    def control_path(self) -> Path:
        return self.mountpoint / CONTROL

    def statuses(self) -> dict[str, DeviceStatus]:
        obj = json.loads(self.control_path.read_bytes())
        return {name: DeviceStatus.from_json(name, st) for name, st in obj["devices"].items()}

    def status(self, name: str) -> DeviceStatus:
        return self.statuses()[name]

    def events(self, name: str | None = None, kind: str | None = None) -> list[Event]:
        out = []
        for line in (self.mountpoint / EVENTS).read_bytes().splitlines():
            ev = Event.from_json(json.loads(line))
            if (name is None or ev.device == name) and (kind is None or ev.kind == kind):
                out.append(ev)
        return out

    def pets(self, name: str) -> int:
        return self.status(name).pets

    def armed(self, name: str) -> bool:
        return self.status(name).armed

    def effective_timeout_s(self, name: str) -> int:
        return self.status(name).timeout_s

    def set_faults(self, name: str, *, clamp_s: int | None = None, no_ioctl: bool = False,
                   fail_open: bool = False) -> None:
        """Replace the device's faults (no argument: none)."""
        self.path(name)
        self._control(f"faults {name} {' '.join(Faults(clamp_s, no_ioctl, fail_open).words())}")

    def reset(self, name: str) -> None:
        """The host "rebooted": the device is fresh and unarmed, its timeout the default again."""
        self.path(name)
        self._control(f"reset {name}")

    def _control(self, line: str) -> None:
        fd = os.open(self.control_path, os.O_WRONLY)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def wait_expired(self, name: str, timeout_s: float, *, count: int = 1) -> bool:
        """Whether `name` has expired `count` times (in this farm's life) within `timeout_s`."""
        with self._cv:
            return self._cv.wait_for(
                lambda: sum(n == name for n, _ in self.expirations) >= count, timeout=timeout_s)


if __name__ == "__main__":
    sys.exit(main())
