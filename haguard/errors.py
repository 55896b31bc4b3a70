"""The error tree.  Every error haguard raises on purpose derives from HaguardError.

    HaguardError           haguard/core/errors.py (in the core, so that core errors derive from it)
     +-- ConfigError        bad YAML or a value that fails validation (names file, line, field)
     +-- VmError            launching, stopping or finding a VM failed
     +-- QmpError           talking to a QEMU monitor failed
     |    +-- QmpTimeout      no answer within the deadline
     |    +-- QmpCommandError QEMU refused a command (keeps the command and QEMU's error class)
     |    +-- MalformedReply  a reply of the wrong shape: names the command and the field
     |                        (migration/replies.py)
     +-- MigrationError     a migration could not be started or did not complete
     |    +-- PreflightError  a check before the move failed; the message says how to fix it
     +-- RpcError           the other agent did not answer a migration call, or refused
     |                      (agent/migrate_rpc.py)
     +-- WatchdogError      the watchdog device could not be opened or written (adapters/watchdog.py)
     +-- CodecError         a cluster message that does not match its declared types
     |                      (core/cluster/codec.py; also a ValueError)
     +-- MessageTooLarge    an envelope over the wire's size limit (core/wire.py; also a
     |                      ValueError): the sender drops and counts it
     +-- Violation          the simulator saw an invariant of docs/cluster-design.md broken
     |                      (sim/checkers.py)
     +-- SoftdogError       the watchdog stand-in could not start or was misused (lab/softdog.py)
     +-- _AttemptFailed     private to adapters/mqtt.py: a broker connection attempt failed; retried
     +-- _Retryable         private to adapters/alerts.py: a webhook POST that may work later
     +-- _Refused           private to adapters/alerts.py: a webhook POST rejected for good

Not an error, so that no `except HaguardError` or `except Exception` swallows it (it
derives from BaseException, as KeyboardInterrupt does):

    Interrupted            Ctrl-C or SIGTERM during `haguard demo` (demo.py): clean up and stop

Messages are one line, meant for operators; CLI commands print them without a traceback.
tests/test_walls.py checks that every exception class in haguard is drawn here, under the
class it derives from.
"""

from __future__ import annotations

from haguard.core.errors import HaguardError

__all__ = ["ConfigError", "HaguardError", "MigrationError", "PreflightError", "QmpCommandError",
           "QmpError", "QmpTimeout", "VmError"]


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
