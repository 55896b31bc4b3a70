"""The systemd unit: it verifies, keeps VMs alive across agent restarts, and stays hardened.

`systemd-analyze verify` insists that ExecStart= names an existing executable, and
/usr/bin/haguard exists only once haguard is installed as a package: the test verifies a
copy whose ExecStart= runs this venv's python with `-m haguard` instead, everything else
unchanged.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNIT_DIR / "haguard.service"
EXEC_START = "/usr/bin/haguard run --config /etc/haguard/cluster.yaml"
# What `systemd-analyze security --offline=true` reports now (systemd 252); lower is better.
# What keeps it from going lower is listed in the unit's comments (root, network, devices).
MAX_EXPOSURE = 2.5


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> values in file order (units repeat keys such as DeviceAllow=)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verifiable_copy(tmp_path: Path, text: str | None = None) -> Path:
    text = SERVICE.read_text() if text is None else text
    assert EXEC_START in text
    copy = tmp_path / SERVICE.name
    copy.write_text(text.replace("/usr/bin/haguard", f"{sys.executable} -m haguard"))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.timeout(60)
def test_units_verify(tmp_path: Path) -> None:
    units = sorted(UNIT_DIR.glob("*.service")) + sorted(UNIT_DIR.glob("*.slice"))
    assert SERVICE in units
    copies = [verifiable_copy(tmp_path)] + [u for u in units if u != SERVICE]
    out = analyze("verify", *map(str, copies))
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is worth something: a misspelt key and a missing binary are reported."""
    broken = verifiable_copy(tmp_path, SERVICE.read_text().replace("KillMode=", "KilMode="))
    out = analyze("verify", str(broken))
    assert "Unknown key 'KilMode'" in out.stderr, out.stderr  # a warning only: exit code 0
    original = analyze("verify", str(SERVICE))
    assert original.returncode != 0 and "/usr/bin/haguard" in original.stderr


@pytest.mark.timeout(60)
def test_security_exposure() -> None:
    out = analyze("security", "--offline=true", "--no-pager", str(SERVICE))
    assert out.returncode == 0, out.stderr
    m = re.search(r"Overall exposure level for haguard\.service: (\d+\.\d+)", out.stdout)
    assert m, out.stdout
    exposure = float(m.group(1))
    print(f"systemd-analyze security --offline=true: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out.stdout


def test_agent_restart_never_stops_a_vm() -> None:
    s = unit_settings(SERVICE)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [EXEC_START]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["10"] and s["Restart"] == ["on-failure"]
    # Only the agent's own process is signalled; VM sockets in /run/haguard survive.
    assert s["KillMode"] == ["process"]
    assert s["RuntimeDirectory"] == ["haguard"] and s["RuntimeDirectoryPreserve"] == ["yes"]
    assert s["StateDirectory"] == ["haguard"]
    assert "mosquitto.service" in s["After"][0].split() and "network-online.target" in s["After"][0].split()
    assert s["Wants"] == ["network-online.target"]


def test_sandbox_leaves_qemu_what_it_needs() -> None:
    """QEMU is forked by the agent, so it inherits the mount namespace, filters and caps."""
    s = unit_settings(SERVICE)
    assert "PrivateDevices" not in s            # would hide /dev/kvm, /dev/net/tun, disks
    assert "MemoryDenyWriteExecute" not in s    # TCG without KVM needs W+X memory
    assert "PrivateNetwork" not in s
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"} <= caps  # ICMP, taps, userfaultfd
    assert s["ProtectSystem"] == ["strict"]
    assert any("userfaultfd" in d for d in s["DeviceAllow"])
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0]
