"""The host's watchdog device (/dev/watchdog): self-fencing when the agent loses quorum.

Linux watchdog API: opening the device arms it; every write pets it; if nothing is written
for its timeout, the hardware resets the host.  Writing 'V' right before close (the "magic
close") disarms it, if the driver allows; otherwise closing leaves it armed.

- `pet()`: one write; after `stop_petting()` it resumes (the core asks again only when this
  host holds quorum again before its deadline, and the coordinator never counts a deadline
  as a fence for a host it has heard from since declaring it dead: the simulator checks
  exactly this model, docs/cluster-design.md).
- `stop_petting()`: just stop.  The device stays open and armed, so the reset comes unless
  petting resumes in time: that is the point of self-fencing.  Never the magic close here.
- `disarm()`: graceful shutdown only: write 'V', then close.
- `open()` sets the device's timeout to the configured one (WDIOC_SETTIMEOUT) and reads it
  back (WDIOC_GETTIMEOUT), as sbd does: `confirmed_timeout_s` is what the device will really
  wait, None when it does not answer these ioctls.  A device never set keeps its driver's
  default (softdog: 60 s), which the cluster must not mistake for the configured value.
- `timeout_s`: asked from the device (WDIOC_GETTIMEOUT); a device that does not answer the
  ioctl gets the configured value (for log lines only: decisions use `confirmed_timeout_s`).

Any path works: tests use haguard/lab/softdog.py, a FUSE stand-in that answers the ioctls as
softdog does, or a regular file (which confirms nothing).
"""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

import structlog

from haguard.errors import HaguardError

log = structlog.get_logger("haguard.watchdog")

DEFAULT_WATCHDOG = Path("/dev/watchdog")
WDIOC_SETTIMEOUT = 0xC0045706   # _IOWR('W', 6, int), from <linux/watchdog.h>
WDIOC_GETTIMEOUT = 0x80045707   # _IOR('W', 7, int)
PET_BYTE = b"\0"                # any byte but 'V' pets; 'V' would arm the magic close
MAGIC_CLOSE = b"V"


class WatchdogError(HaguardError):
    """The watchdog device could not be opened or written."""


class Watchdog:
    def __init__(self, path: Path = DEFAULT_WATCHDOG, *, timeout_s: float = 60.0) -> None:
        self.path = path
        self.configured_timeout_s = timeout_s
        self.confirmed_timeout_s: float | None = None   # what the device said after being set
        self._fd: int | None = None
        self.petting = False
        self.pets = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        """Open (and so arm) the device.  WatchdogError with a one-line reason when it cannot."""
        if self._fd is not None:
            return
        try:
            # O_NONBLOCK only for the open: a FIFO without a reader would block it forever.
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise WatchdogError(f"cannot open watchdog {self.path}: {exc.strerror}") from None
        os.set_blocking(fd, True)
        self._fd = fd
        self.petting = True
        self.confirmed_timeout_s = self._set_timeout(fd)
        log.info("watchdog-open", path=str(self.path), configured_s=self.configured_timeout_s,
                 confirmed_s=self.confirmed_timeout_s)

    def _set_timeout(self, fd: int) -> float | None:
        """WDIOC_SETTIMEOUT to the configured value, then WDIOC_GETTIMEOUT: the device's answer
        (a driver may round or clamp it), None when it takes no such ioctl."""
        asked = array.array("i", [int(self.configured_timeout_s)])
        got = array.array("i", [0])
        try:
            fcntl.ioctl(fd, WDIOC_SETTIMEOUT, asked, True)
            fcntl.ioctl(fd, WDIOC_GETTIMEOUT, got, True)
        except OSError as exc:
            log.warning("watchdog-timeout-unconfirmed", path=str(self.path), error=exc.strerror)
            return None
        return float(got[0]) if got[0] > 0 else None

    @property
    def timeout_s(self) -> float:
        """The device's own timeout, or the configured one when it cannot say."""
        if self._fd is None:
            return self.configured_timeout_s
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self._fd, WDIOC_GETTIMEOUT, buf, True)
        except OSError:
            return self.configured_timeout_s   # ENOTTY: not a watchdog driver (a test stand-in)
        return float(buf[0]) if buf[0] > 0 else self.configured_timeout_s

    def pet(self) -> bool:
        """One keepalive write (resuming after `stop_petting()`, before the device expired)."""
        if self._fd is None:
            raise WatchdogError(f"watchdog {self.path} is not open")
        if not self.petting:
            log.warning("watchdog-petting-resumed", path=str(self.path))
            self.petting = True
        try:
            os.write(self._fd, PET_BYTE)
        except OSError as exc:
            raise WatchdogError(f"cannot pet watchdog {self.path}: {exc.strerror}") from None
        self.pets += 1
        return True

    def stop_petting(self, reason: str = "") -> None:
        """Stop and keep the device open: the hardware resets the host unless a pet comes in time."""
        if self.petting:
            log.critical("watchdog-stop-petting", path=str(self.path), reason=reason,
                         reset_within_s=self.timeout_s)
        self.petting = False

    def disarm(self) -> None:
        """Graceful shutdown only: the magic close, so the host is not reset."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self.petting = False
        self.confirmed_timeout_s = None
        try:
            os.write(fd, MAGIC_CLOSE)
        except OSError as exc:
            log.error("watchdog-disarm-failed", path=str(self.path), error=exc.strerror)
        finally:
            os.close(fd)
        log.info("watchdog-disarmed", path=str(self.path))
