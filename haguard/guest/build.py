"""Build the memory-dirtying test guest from its C source (never shipped as a binary)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from haguard.errors import HaguardError

HERE = Path(__file__).parent
SOURCE = HERE / "dirtyguest.c"
LINKER_SCRIPT = HERE / "guest.ld"
STATUS_ADDR = 0x7000
STATUS_MAGIC = 0x44474148


def cache_dir() -> Path:
    if env := os.environ.get("HAGUARD_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "haguard"


def build_guest(out_dir: Path | None = None) -> Path:
    """Compile the guest if its source changed; returns the path of the ELF."""
    src = SOURCE.read_bytes() + LINKER_SCRIPT.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:12]
    out = (out_dir or cache_dir()) / f"dirtyguest-{digest}.elf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = ["gcc", "-m32", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-no-pie",
           "-fno-stack-protector", "-O2", "-static", "-T", str(LINKER_SCRIPT),
           "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HaguardError(f"building the test guest failed: {proc.stderr.strip().splitlines()[-1:]}")
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class GuestStatus:
    """The guest's status block (see dirtyguest.c: struct status)."""

    magic: int
    ms: int
    loops: int
    pages: int
    errors: int
    passes: int

    @property
    def alive(self) -> bool:
        return self.magic == STATUS_MAGIC


_WORD = re.compile(r"0x([0-9a-f]{8})")


def parse_status(xp_output: str) -> GuestStatus:
    """Parse `xp /12wx 0x7000` output (32-bit little-endian words)."""
    if not isinstance(xp_output, str):
        raise HaguardError(f"unexpected guest status dump: a {type(xp_output).__name__}, not text")
    words = [int(w, 16) for line in xp_output.splitlines() for w in _WORD.findall(line.split(":", 1)[-1])]
    if len(words) < 12:
        shown = repr(xp_output)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise HaguardError(f"unexpected guest status dump: {shown}")

    def u64(i: int) -> int:
        return words[i] | (words[i + 1] << 32)

    return GuestStatus(magic=words[0], ms=u64(2), loops=u64(4), pages=u64(6), errors=u64(8),
                       passes=u64(10))


XP_COMMAND = f"xp /12wx {STATUS_ADDR:#x}"
