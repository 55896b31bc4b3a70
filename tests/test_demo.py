"""`haguard demo` as `make demo` runs it without a terminal: both acts to the end, exit 0,
the key lines printed, and nothing left behind (processes, namespaces, files); and a
SIGTERM in the middle of the cluster act cleans up everything too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haguard.lab.fence import qemus_naming

# The slowest scenarios: the whole demo.
# `pytest -m "not slow"` runs the rest.
pytestmark = pytest.mark.slow



class DemoRun:
    """One demo process with its own TMPDIR (every file it makes lands there)."""

    def __init__(self, *args: str) -> None:
        self.tmp = Path(f"/tmp/hgdt{os.getpid() % 100000}")    # short: unix socket paths
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.out = self.tmp.with_suffix(".out")
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haguard", "demo", *args], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(self.tmp)},
                start_new_session=True)
        self.netns_prefix = f"hgd{self.proc.pid % 100000}"

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.netns_prefix)]

    def leftovers(self) -> dict[str, object]:
        return {"files": sorted(p.name for p in self.tmp.iterdir()) if self.tmp.exists() else [],
                "qemus": qemus_naming(str(self.tmp)), "namespaces": self.namespaces(),
                "agents": _processes_naming(str(self.tmp), "haguard"),
                "brokers": _processes_naming(str(self.tmp), "mosquitto")}

    def close(self) -> None:
        """A demo that got stuck or failed: kill it, then whatever it left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in (qemus_naming(str(self.tmp)) + _processes_naming(str(self.tmp), "haguard")
                    + _processes_naming(str(self.tmp), "mosquitto")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.out.unlink(missing_ok=True)


def _processes_naming(marker: str, program: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if program in cmd and marker in cmd and int(proc.name) != os.getpid():
                    pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def demo(*args: str) -> Iterator[DemoRun]:
    run = DemoRun(*args)
    try:
        yield run
    finally:
        run.close()


def _nothing_left(run: DemoRun) -> None:
    left = run.leftovers()
    assert not any(left.values()), f"the demo left {left}"


@pytest.mark.timeout(300)
def test_demo_runs_both_acts_to_the_end_without_a_terminal() -> None:
    with demo() as run:
        start = time.monotonic()
        rc = run.proc.wait(timeout=270)
        took = time.monotonic() - start
        text = run.text()
        print(text[-3000:], f"\ndemo took {took:.0f} s")
        assert rc == 0, text[-4000:]
        for line in ("✔ postcopy used", "✔ cluster formed, every VM placed and running once",
                     "drained (in maintenance, no VM left)", "✔ every VM running once, none on",
                     "✔ no fence for a drain", "fenced (fence device: off", "Recovery: ",
                     "✔ no VM ever ran on two hosts", "demo passed"):
            assert line in text, f"{line!r} missing:\n{text[-4000:]}"
        assert "✘" not in text, text[-4000:]
        _nothing_left(run)


@pytest.mark.timeout(120)
def test_sigterm_mid_cluster_act_cleans_up_everything() -> None:
    with demo("--cluster") as run:
        deadline = time.monotonic() + 90
        while "$ haguard drain" not in run.text():
            assert run.proc.poll() is None, run.text()
            assert time.monotonic() < deadline, run.text()
            time.sleep(0.1)
        assert run.namespaces(), "the demo runs its hosts in namespaces as root"
        assert qemus_naming(str(run.tmp)), "VMs run during the drain"
        run.proc.send_signal(signal.SIGTERM)
        rc = run.proc.wait(timeout=30)
        assert rc == 130, run.text()[-2000:]
        assert "interrupted: everything the demo started is gone" in run.text()
        _nothing_left(run)
