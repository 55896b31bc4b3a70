"""Packaging: the .deb in a clean Debian 12 root, and the wheel in a venv without systemd-python.

test_deb_installs_into_clean_debian_root builds the package as `make deb` does
(packaging/build-deb.sh), unpacks a pristine debootstrap minbase root cached in
build/debootstrap/ (packaging/bootstrap-root.sh makes it on the first run, about 1.5 min),
installs the package there with apt, so its Depends must bring everything haguard needs
(downloaded .debs are cached in build/debootstrap/archives), and runs haguard inside with
chroot.  Debian's python3-pydantic 1.x is installed next to it on purpose: haguard must
still use its bundled pydantic 2.  First run about 5 min, later runs about 2 min.

test_wheel_in_fresh_venv_without_systemd_python: `pip install haguard` from a freshly
built wheel into a new venv, without the systemd extra; the CLI works and the notify and
journal protocols are spoken directly (to a socket and a real private journald).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from haguard import __version__
from tests.helpers.journald import journald

# The slowest scenarios: a .deb into a Debian root, a wheel into a fresh venv.
# `pytest -m "not slow"` runs the rest.
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "debootstrap"
ROOT_TAR = CACHE / "bookworm-minbase.tar"
ARCHIVES = CACHE / "archives"
SHIPPED_CONFIGS = {  # /etc/haguard file -> (cluster, hosts)
    "cluster.example.yaml": ("prod1", 3),
    "cluster.reference.yaml": ("prod1", 3),
    "examples/two-host-lab.yaml": ("lab", 2),
    "examples/fenced-ipmi.yaml": ("prod2", 3),
}
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive"}


def run(argv: Sequence[str | Path], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload,no-any-return]


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, \
        f"{proc.args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ---- a clean Debian root ----------------------------------------------------------------

def _mounts_below(root: Path) -> list[str]:
    prefix = str(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 for spaces
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _kill_inside(root: Path) -> None:
    """Processes whose root is the chroot (a daemon a maintainer script started) die with it."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/root") == str(root):
                os.kill(int(pid), 9)


def _teardown(root: Path) -> None:
    _kill_inside(root)
    for point in sorted(_mounts_below(root), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    left = _mounts_below(root)
    # Never delete through a bind mount (/dev, the archive cache): leave the tree instead.
    assert not left, f"still mounted, {root} left in place: {left}"
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def debian_root(parent: Path) -> Iterator[Path]:
    """A fresh Debian 12 minbase root with /proc, /dev and apt's archive cache mounted."""
    ok(run(["bash", REPO / "packaging" / "bootstrap-root.sh", ROOT_TAR], timeout=600))
    root = parent / "root"
    root.mkdir()
    try:
        ok(run(["tar", "-C", root, "--numeric-owner", "-xf", ROOT_TAR], timeout=120))
        ARCHIVES.mkdir(parents=True, exist_ok=True)
        ok(run(["mount", "-t", "proc", "proc", root / "proc"], timeout=10))
        ok(run(["mount", "--bind", "/dev", root / "dev"], timeout=10))
        ok(run(["mount", "--bind", ARCHIVES, root / "var/cache/apt/archives"], timeout=10))
        resolv = root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())
        # A throwaway root: dpkg need not fsync every file (minutes saved on QEMU's libraries).
        (root / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
        policy = root / "usr/sbin/policy-rc.d"  # no daemons started inside
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        yield root
    finally:
        _teardown(root)


def chroot(root: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(["nice", "-n", "10", "chroot", root, *argv], timeout=timeout, env=CHROOT_ENV)


def check_config(root: Path, config: str) -> subprocess.CompletedProcess[str]:
    """`haguard check-config` inside the root, on a host named hv1 (its own UTS namespace)."""
    return run(["unshare", "--uts", "sh", "-c", 'hostname hv1 && exec chroot "$0" haguard check-config '
                '--config "$1"', root, config], timeout=60, env=CHROOT_ENV)


def secret(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    ok(run(["bash", REPO / "packaging" / "build-deb.sh", out], timeout=400))
    (found,) = out.glob("haguard_*.deb")
    return found


@pytest.mark.timeout(900)
def test_deb_installs_into_clean_debian_root(deb: Path, tmp_path: Path) -> None:
    fields = ok(run(["dpkg-deb", "-f", deb, "Depends", "Recommends"], timeout=10)).stdout
    for needed in ("python3 (>= 3.11)", "python3-yaml", "python3-cryptography", "qemu-system-x86",
                   "qemu-utils", "iproute2",
                   "Recommends: mosquitto, fence-agents"):
        assert needed in fields, fields

    with debian_root(tmp_path) as root:
        shutil.copy(deb, root / "tmp/haguard.deb")
        ok(chroot(root, "apt-get", "update", "-qq", timeout=300))
        ok(chroot(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                  "/tmp/haguard.deb", "python3-pydantic", timeout=600))
        status = ok(chroot(root, "dpkg-query", "-W", "-f", "${Status} ${Version}", "haguard")).stdout
        assert status == f"install ok installed {__version__}-1"

        assert ok(chroot(root, "haguard", "--version")).stdout.strip() == f"haguard {__version__}"
        # The system's pydantic is 1.x; haguard's own, in /usr/lib/haguard, is 2.x; YAML is Debian's.
        system = ok(chroot(root, "python3", "-c", "import pydantic; print(pydantic.VERSION)")).stdout
        assert system.startswith("1."), system
        probe = ("import sys; sys.path.insert(0, '/usr/lib/haguard'); import pydantic, yaml; "
                 "print(pydantic.VERSION, yaml.__file__)")
        versions = ok(chroot(root, "python3", "-I", "-c", probe)).stdout.split()
        assert versions[0].startswith("2.") and versions[1].startswith("/usr/lib/python3/dist-packages/")

        conffiles = ok(chroot(root, "dpkg-query", "--control-show", "haguard", "conffiles")).stdout.split()
        assert {f"/etc/haguard/{name}" for name in SHIPPED_CONFIGS} <= set(conffiles)
        assert "/etc/haguard/examples/vms/example.yaml" in conffiles
        assert (root / "lib/systemd/system/haguard.service").read_text() == \
            (REPO / "systemd/haguard.service").read_text()
        assert (root / "etc/haguard/vms").is_dir() and not any((root / "etc/haguard/vms").iterdir())
        # What monitoring needs, and the operations docs (compressed when large, as Debian does).
        for path in ("prometheus/haguard-alerts.yml", "prometheus/haguard-alerts.test.yml",
                     "grafana/haguard-dashboard.json"):
            shipped = (root / "usr/share/haguard" / path).read_bytes()
            assert shipped == (REPO / "packaging" / path).read_bytes(), path
        for doc in ("operations.md", "security.md", "failure-modes.md"):
            assert any((root / "usr/share/doc/haguard" / f"{doc}{gz}").is_file() for gz in ("", ".gz")), doc

        # Before the site's secrets exist: one clear line, exit 2.
        missing = check_config(root, "/etc/haguard/cluster.reference.yaml")
        assert missing.returncode == 2 and "key_file" in missing.stderr, missing
        assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr

        etc = root / "etc/haguard"
        secret(etc / "cluster.key", os.urandom(32).hex().encode())
        secret(etc / "mqtt.password", b"secret\n")
        shutil.copy(etc / "examples/vms/example.yaml", etc / "vms/web1.yaml")
        for name, (cluster, hosts) in SHIPPED_CONFIGS.items():
            out = check_config(root, f"/etc/haguard/{name}")
            assert out.returncode == 0, (name, out.stderr)
            assert out.stdout.strip() == f"ok: cluster {cluster}, {hosts} hosts, 1 VMs", (name, out.stdout)

        secret(etc / "mqtt.password", b"secret\n", 0o644)
        loose = check_config(root, "/etc/haguard/cluster.example.yaml")
        assert loose.returncode == 2 and "chmod o-r" in loose.stderr, loose

        # The tmpfiles snippet makes the runtime and state directories, root-only.
        ok(run(["systemd-tmpfiles", f"--root={root}", "--create", "haguard.conf"], timeout=30))
        for d in ("run/haguard", "run/haguard/vms", "var/lib/haguard"):
            st = (root / d).stat()
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0, d

        # Remove keeps the configuration, purge takes the conffiles, never the site's own files.
        ok(chroot(root, "apt-get", "remove", "-y", "-qq", "haguard", timeout=120))
        assert not (root / "usr/bin/haguard").exists() and not (root / "usr/lib/haguard").exists()
        assert (etc / "cluster.reference.yaml").exists()
        ok(chroot(root, "dpkg", "--purge", "haguard", timeout=120))
        assert not (etc / "cluster.reference.yaml").exists()
        assert (etc / "cluster.key").exists() and (etc / "vms/web1.yaml").exists()


# ---- pip install haguard ----------------------------------------------------------------

@pytest.mark.timeout(300)
def test_wheel_in_fresh_venv_without_systemd_python(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "haguard", src / "haguard",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.elf"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ok(run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", src],
           timeout=180))
    (wheel,) = (tmp_path / "dist").glob("haguard-*.whl")

    venv = tmp_path / "venv"
    py, haguard = venv / "bin/python", venv / "bin/haguard"

    def venv_run(*argv: str | Path, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
        # From tmp_path: in the repository, its own systemd/ directory imports as a package.
        return run(argv, timeout=timeout, cwd=tmp_path, **kw)

    ok(venv_run(sys.executable, "-m", "venv", venv, timeout=60))
    ok(venv_run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, timeout=240))
    assert venv_run(py, "-m", "pip", "show", "--quiet", "systemd-python").returncode != 0
    no_lib = venv_run(py, "-c", "import systemd.daemon")
    assert no_lib.returncode != 0 and "ModuleNotFoundError" in no_lib.stderr

    assert ok(venv_run(haguard, "--version")).stdout.strip() == f"haguard {__version__}"

    cfg = yaml.safe_load((REPO / "config/cluster.example.yaml").read_text())
    vms = tmp_path / "vms"
    vms.mkdir()
    shutil.copy(REPO / "config/vms/example.yaml", vms / "web1.yaml")
    secret(tmp_path / "cluster.key", b"0123456789abcdef0123456789abcdef\n")
    secret(tmp_path / "mqtt.password", b"secret\n")
    cfg.update(host="hv2", key_file=str(tmp_path / "cluster.key"), vm_dir=str(vms),
               run_dir=str(tmp_path / "run/vms"), state_dir=str(tmp_path / "state"))
    cfg["mqtt"]["password_file"] = str(tmp_path / "mqtt.password")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    checked = ok(venv_run(haguard, "check-config", "--config", tmp_path / "cluster.yaml"))
    assert checked.stdout.strip() == "ok: cluster prod1, 3 hosts, 1 VMs"

    # sd_notify without the library: the datagram is sent by haguard itself.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(10)
        code = ("from haguard.adapters import systemd as s; assert s._sd_daemon is None; "
                "print(s.Notifier().ready('package check'))")
        sent = ok(venv_run(py, "-c", code, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}))
        assert sent.stdout.strip() == "True"
        assert manager.recv(4096).decode().splitlines() == ["READY=1", "STATUS=package check"]

    # Journal entries without the library: the native protocol to the default socket path,
    # which inside the private journald's mount namespace is that journald.
    code = textwrap.dedent("""
        import structlog
        from haguard.adapters import journal
        from haguard.logs import configure_logging
        assert journal._sd_journal is None
        configure_logging("journal", "info", "wheelhost")
        print(type(journal.default_sender()).__name__)
        structlog.get_logger().warning("vm-lost", vm="web1")
    """)
    with journald() as jd:
        out = ok(jd.run_inside([str(py), "-c", code], timeout=30, cwd=tmp_path))
        assert out.stdout.strip() == "NativeJournal"
        (entry,) = jd.wait_for(lambda e: e.get("HAGUARD_HOST") == "wheelhost")
    assert entry["HAGUARD_EVENT"] == "vm-lost" and entry["HAGUARD_VM"] == "web1" and entry["PRIORITY"] == "4"
