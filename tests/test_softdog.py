"""The FUSE watchdog stand-in (haguard/lab/softdog.py) against the Linux watchdog protocol:
open arms, writes pet, 'V' then close disarms, a close without it leaves the timer running,
WDIOC_SETTIMEOUT/GETTIMEOUT round-trip through fcntl.ioctl, from this process, from another
and from another network namespace; and the faults a test can inject."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from haguard.adapters.watchdog import Watchdog
from haguard.lab.softdog import (
    WDIOC_GETSUPPORT,
    WDIOC_GETTIMEOUT,
    WDIOC_KEEPALIVE,
    WDIOC_SETTIMEOUT,
    Faults,
    SoftdogFarm,
    _mounted,
)

Factory = Callable[..., SoftdogFarm]


class Expiries:
    """An on_expire callback that remembers when it was called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.called = threading.Event()

    def __call__(self, name: str) -> None:
        self.calls.append((name, time.monotonic()))
        self.called.set()


@pytest.fixture
def make_farm(tmp_path: Path) -> Iterator[Factory]:
    farms: list[SoftdogFarm] = []

    def make(names: tuple[str, ...] = ("wd",), **kwargs: Any) -> SoftdogFarm:
        farm = SoftdogFarm(tmp_path / f"dogs{len(farms)}", names, **kwargs)
        farms.append(farm)
        farm.start()
        return farm

    try:
        yield make
    finally:
        for farm in farms:
            farm.close(raise_callback_errors=False)
        for farm in farms:
            assert not _mounted(farm.mountpoint), farm.mountpoint


@contextlib.contextmanager
def device(path: Path) -> Iterator[int]:
    """The device opened as the agent opens it; closed without the magic close."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def ioctl_int(fd: int, cmd: int, value: int = 0) -> int:
    buf = array.array("i", [value])
    fcntl.ioctl(fd, cmd, buf, True)
    return buf[0]


@pytest.mark.timeout(20)
def test_open_arms_and_expiry_calls_back_after_the_timeout(make_farm: Factory) -> None:
    expiries = Expiries()
    farm = make_farm(timeout_s=1, on_expire=expiries)
    assert not farm.armed("wd")
    with device(farm.path("wd")) as fd:
        assert farm.armed("wd")
        assert ioctl_int(fd, WDIOC_GETTIMEOUT) == 1
        assert expiries.called.wait(5)
        st = farm.status("wd")
        assert st.expired and not st.armed and st.open
        os.write(fd, b"\0")                          # the dead host's last gasp: not a pet
        assert farm.pets("wd") == 0
    opened = farm.events("wd", "open")[0].t
    expired = farm.events("wd", "expire")[0].t
    assert 1.0 <= expired - opened < 1.5, expired - opened
    assert expiries.calls[0][0] == "wd" and expiries.calls[0][1] - expired < 0.5
    assert [e.detail["op"] for e in farm.events("wd", "ignored")] == ["write"]

    with pytest.raises(OSError) as exc:              # expired until the host "reboots"
        os.open(farm.path("wd"), os.O_WRONLY)
    assert exc.value.errno == errno.EIO
    farm.reset("wd")
    with device(farm.path("wd")) as fd:
        assert farm.armed("wd")
        os.write(fd, b"V")
    assert farm.events("wd")[-1].kind == "magic_close"


@pytest.mark.timeout(20)
def test_writes_keep_it_alive_and_it_expires_a_timeout_after_the_last(make_farm: Factory) -> None:
    farm = make_farm(timeout_s=1)
    with device(farm.path("wd")) as fd:
        for _ in range(12):                          # 2.4 s: more than twice the timeout
            os.write(fd, b"\0")
            time.sleep(0.2)
        assert farm.armed("wd") and farm.pets("wd") == 12
        os.write(fd, b"alive")                       # any bytes pet
        assert farm.wait_expired("wd", 5)
        last_pet = farm.events("wd", "pet")[-1].t
        expired = farm.events("wd", "expire")[0].t
        assert 1.0 <= expired - last_pet < 1.5, expired - last_pet
        assert farm.pets("wd") == 13


@pytest.mark.timeout(20)
def test_set_and_get_timeout_round_trip_and_out_of_range_is_refused(make_farm: Factory) -> None:
    farm = make_farm(timeout_s=60, max_timeout_s=100)
    with device(farm.path("wd")) as fd:
        assert ioctl_int(fd, WDIOC_GETTIMEOUT) == 60
        assert ioctl_int(fd, WDIOC_SETTIMEOUT, 7) == 7
        assert ioctl_int(fd, WDIOC_GETTIMEOUT) == 7
        assert farm.effective_timeout_s("wd") == 7
        for bad in (0, -5, 101):                     # the core's check: EINVAL, nothing changes
            with pytest.raises(OSError) as exc:
                ioctl_int(fd, WDIOC_SETTIMEOUT, bad)
            assert exc.value.errno == errno.EINVAL
        assert ioctl_int(fd, WDIOC_GETTIMEOUT) == 7
        assert ioctl_int(fd, WDIOC_KEEPALIVE) == 0
        info = bytearray(40)
        fcntl.ioctl(fd, WDIOC_GETSUPPORT, info, True)
        assert info[8:].rstrip(b"\0") == b"Software Watchdog"
        assert int.from_bytes(info[:4], sys.byteorder) == 0x8180   # SETTIMEOUT|MAGICCLOSE|KEEPALIVEPING
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(fd, 0x80045703, array.array("i", [0]), True)   # WDIOC_GETTEMP: not softdog's
        assert exc.value.errno == errno.ENOTTY
        os.write(fd, b"V")
    sets = [(e.detail["asked"], e.detail["effective"]) for e in farm.events("wd", "set_timeout")]
    assert sets == [(7, 7), (0, None), (-5, None), (101, None)]
    assert farm.pets("wd") == 2                      # the write and WDIOC_KEEPALIVE


CHILD = """
import array, fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CLOEXEC)
out = {"pid": os.getpid()}
buf = array.array("i", [int(sys.argv[2])])
fcntl.ioctl(fd, 0xC0045706, buf, True)
out["set"] = buf[0]
buf = array.array("i", [0])
fcntl.ioctl(fd, 0x80045707, buf, True)
out["get"] = buf[0]
os.write(fd, b"\\0")
os.write(fd, b"V")
os.close(fd)
print(json.dumps(out))
"""


def _check_child(farm: SoftdogFarm, out: str, asked: int) -> None:
    result = json.loads(out)
    assert result["set"] == asked and result["get"] == asked
    opened = farm.events("wd", "open")[-1]
    assert opened.detail["pid"] == result["pid"]      # the request came from that process
    kinds = [e.kind for e in farm.events("wd") if e.t >= opened.t]
    assert kinds == ["open", "set_timeout", "get_timeout", "pet", "pet", "magic_close"]
    st = farm.status("wd")
    assert not st.armed and not st.open and st.timeout_s == asked


@pytest.mark.timeout(20)
def test_ioctl_round_trip_from_another_process(make_farm: Factory) -> None:
    farm = make_farm()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(farm.path("wd")), "10"],
                          capture_output=True, text=True, timeout=15, check=True)
    _check_child(farm, proc.stdout, 10)


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_ioctl_round_trip_from_another_network_namespace(make_farm: Factory) -> None:
    """As an agent run by `ip netns exec NS python -m haguard run ...` sees its watchdog."""
    farm = make_farm()
    ns = f"hgsoftdog{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=15)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD,
                               str(farm.path("wd")), "13"],
                              capture_output=True, text=True, timeout=15, check=True)
        _check_child(farm, proc.stdout, 13)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15, check=False)


@pytest.mark.timeout(20)
def test_magic_close_disarms_and_a_later_write_without_v_cancels_it(make_farm: Factory) -> None:
    expiries = Expiries()
    farm = make_farm(("a", "b"), timeout_s=1, on_expire=expiries)
    with device(farm.path("a")) as fd:
        os.write(fd, b"V")
        assert farm.status("a").expect_close
    with device(farm.path("b")) as fd:
        os.write(fd, b"V")
        os.write(fd, b"\0")                          # the core clears it before scanning
        assert not farm.status("b").expect_close
    assert not farm.armed("a") and farm.events("a")[-1].kind == "magic_close"
    assert farm.armed("b") and farm.events("b")[-1].kind == "release_armed"
    assert farm.wait_expired("b", 5)
    time.sleep(0.3)
    assert [name for name, _ in expiries.calls] == ["b"]
    assert not farm.status("a").expired


@pytest.mark.timeout(20)
def test_close_without_v_stays_armed_and_expires_a_timeout_after_the_close(make_farm: Factory) -> None:
    farm = make_farm(timeout_s=1)
    with device(farm.path("wd")) as fd:
        assert ioctl_int(fd, WDIOC_SETTIMEOUT, 2) == 2
        os.write(fd, b"\0")
        time.sleep(0.5)
    # The release reaches the filesystem asynchronously: wait for it.
    deadline = time.monotonic() + 2
    while farm.status("wd").open and time.monotonic() < deadline:
        time.sleep(0.01)
    st = farm.status("wd")
    assert st.armed and not st.open
    assert farm.wait_expired("wd", 5)
    released = farm.events("wd", "release_armed")[0]
    expired = farm.events("wd", "expire")[0]
    assert released.detail["timeout_s"] == 2
    assert 2.0 <= expired.t - released.t < 2.5, expired.t - released.t   # the release pinged
    farm.close()
    assert "wd: watchdog did not stop!" in farm.daemon_log


@pytest.mark.timeout(20)
def test_a_second_open_is_busy(make_farm: Factory) -> None:
    farm = make_farm()
    with device(farm.path("wd")) as fd:
        with pytest.raises(OSError) as exc:
            os.open(farm.path("wd"), os.O_WRONLY)
        assert exc.value.errno == errno.EBUSY
        os.write(fd, b"V")
    with device(farm.path("wd")) as fd:              # closed with 'V': free again
        os.write(fd, b"V")
    assert [e.kind for e in farm.events("wd")] == [
        "open", "open_refused", "pet", "magic_close", "open", "pet", "magic_close"]


@pytest.mark.timeout(20)
def test_clamp_keeps_its_own_timeout_and_says_so(make_farm: Factory) -> None:
    farm = make_farm(("a", "b"), faults={"a": Faults(clamp_s=60)})
    with device(farm.path("a")) as fd:
        assert ioctl_int(fd, WDIOC_SETTIMEOUT, 10) == 60
        assert ioctl_int(fd, WDIOC_GETTIMEOUT) == 60
        os.write(fd, b"V")
    assert farm.events("a", "set_timeout")[0].detail == {"asked": 10, "effective": 60}
    farm.set_faults("b", clamp_s=5)                  # at run time, through the Python API
    with device(farm.path("b")) as fd:
        assert ioctl_int(fd, WDIOC_SETTIMEOUT, 30) == 5
        farm.set_faults("b")
        assert ioctl_int(fd, WDIOC_SETTIMEOUT, 30) == 30
        os.write(fd, b"V")


@pytest.mark.timeout(20)
def test_no_ioctl_and_fail_open(make_farm: Factory) -> None:
    farm = make_farm(("a", "b"))
    farm.set_faults("a", no_ioctl=True)
    with device(farm.path("a")) as fd:
        for cmd in (WDIOC_GETTIMEOUT, WDIOC_SETTIMEOUT, WDIOC_KEEPALIVE):
            with pytest.raises(OSError) as exc:
                ioctl_int(fd, cmd, 5)
            assert exc.value.errno == errno.ENOTTY == 25
        os.write(fd, b"V")
    # The control file, as a shell would use it.
    subprocess.run(["sh", "-c", f"echo 'faults b fail_open' > {farm.control_path}"], check=True, timeout=10)
    with pytest.raises(OSError) as exc:
        os.open(farm.path("b"), os.O_WRONLY)
    assert exc.value.errno == errno.ENODEV
    farm.set_faults("b")
    with pytest.raises(OSError) as exc:              # a command it does not know
        farm.control_path.write_text("faults b sometimes\n")
    assert exc.value.errno == errno.EINVAL
    assert not farm.status("b").faults.fail_open


@pytest.mark.timeout(20)
def test_the_agents_watchdog_adapter_against_it(make_farm: Factory) -> None:
    """haguard's own Watchdog: its timeout is the device's; disarm is the magic close;
    stop_petting leaves it armed, and it expires."""
    expiries = Expiries()
    farm = make_farm(("a", "b"), timeout_s=1, on_expire=expiries)
    farm.set_faults("b", no_ioctl=True)
    good = Watchdog(farm.path("a"), timeout_s=2)
    old = Watchdog(farm.path("b"), timeout_s=7)
    good.open()
    old.open()
    try:
        assert good.timeout_s == farm.effective_timeout_s("a")   # asked from the device
        assert old.timeout_s == 7.0                  # ENOTTY: the configured value
        assert good.pet() and old.pet()
        good.disarm()
        old.stop_petting("test")
        assert expiries.called.wait(5)
        assert [name for name, _ in expiries.calls] == ["b"]
        assert farm.events("a")[-1].kind == "magic_close"
    finally:
        good.disarm()
        old.disarm()


@pytest.mark.timeout(20)
def test_the_mount_goes_even_when_the_test_fails(tmp_path: Path) -> None:
    mount = tmp_path / "dogs"
    with pytest.raises(RuntimeError, match="boom"), SoftdogFarm(mount, ["wd"]) as farm:
        fd = os.open(farm.path("wd"), os.O_WRONLY)
        assert _mounted(mount)
        raise RuntimeError("boom")
    with contextlib.suppress(OSError):
        os.close(fd)
    assert not _mounted(mount) and not mount.exists()
