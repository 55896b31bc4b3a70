"""The error tree.  Every error haguard raises on purpose derives from HaguardError.

    HaguardError
     +-- ConfigError        bad YAML or a value that fails validation (names file, line, field)
     +-- VmError            launching, stopping or finding a VM failed
     +-- QmpError           talking to a QEMU monitor failed
     |    +-- QmpTimeout      no answer within the deadline
     |    +-- QmpCommandError QEMU refused a command (keeps the command and QEMU's error class)
     +-- MigrationError     a migration could not be started or did not complete
          +-- PreflightError  a check before the move failed; the message says how to fix it

Messages are one line, meant for operators; CLI commands print them without a traceback.
"""

from __future__ import annotations


class HaguardError(Exception):
    """Root of every error haguard raises on purpose."""


class ConfigError(HaguardError):
    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")


class VmError(HaguardError):
    pass


class QmpError(HaguardError):
    pass


class QmpTimeout(QmpError):
    pass


class QmpCommandError(QmpError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command, self.error_class, self.desc = command, error_class, desc
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")


class MigrationError(HaguardError):
    pass


class PreflightError(MigrationError):
    pass
