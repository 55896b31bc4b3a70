from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.vms import VmLab


def pytest_sessionstart(session: pytest.Session) -> None:
    # A missing host dependency is a set-up bug, never a reason to skip.
    missing = [tool for tool in ("qemu-system-x86_64", "qemu-img", "mosquitto", "ip", "iptables", "ss")
               if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError(f"missing host tools: {', '.join(missing)}: run `make setup`")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[VmLab]:
    # Short paths: unix socket paths are limited to 108 bytes.
    root = Path(f"/tmp/hgt-{os.getpid()}-{tmp_path.name[-12:]}")
    shutil.rmtree(root, ignore_errors=True)
    lab = VmLab(root)
    try:
        yield lab
    finally:
        lab.cleanup()
        shutil.rmtree(root, ignore_errors=True)
