"""Files that must survive a power cut the moment they are written (votes, incarnations)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, on stable storage when this returns: write a
    temporary file, fsync it, rename it over `path`, fsync the directory (the rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
