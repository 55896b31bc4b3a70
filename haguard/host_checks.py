"""What `haguard check-config` verifies on this machine, beyond the configuration's schema:
the files and devices the agent will open (fence programs and their password files, the
MQTT TLS files, the watchdog device).  Each problem is one ConfigError naming the file, line
and field; a problem that cannot matter yet is returned as a warning instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from haguard.config.cluster import ClusterConfig, FenceDevice
from haguard.config.yamlsrc import line_of
from haguard.errors import ConfigError


def check_fence_devices(cfg: ClusterConfig, path: Path) -> list[ConfigError]:
    """Every host entry's fence program and password file, checked on this machine: the
    coordinator runs the fence agent and any host may coordinate, so each host needs them
    all.  Refused in cluster mode; without it nothing is ever fenced, so only warnings."""
    warnings = []
    for i, host in enumerate(cfg.hosts):
        levelled = isinstance(host.fence, tuple)           # fencing levels: `fence` is a list
        for j, device in enumerate(host.fence_devices):
            where: tuple[str | int, ...] = ("hosts", i, "fence", j) if levelled else ("hosts", i, "fence")
            field = f"hosts[{i}].fence[{j}]" if levelled else f"hosts[{i}].fence"
            insecure = str(device.options.get("ssl_insecure", "")).lower() in ("1", "on", "true", "yes")
            if insecure:
                # A fence that does not check the BMC's certificate believes whoever answers:
                # a faked "off" lets the coordinator start the host's VMs while they still run.
                warnings.append(ConfigError(
                    "ssl_insecure skips the BMC's certificate check, so a forged 'off' could make a VM "
                    "run twice: use ssl_secure with the BMC's CA trusted on every host",
                    file=str(path), line=line_of(path, (*where, "options", "ssl_insecure")),
                    field=f"{field}.options.ssl_insecure"))
            problem = _fence_problem(device)
            if problem is None:
                continue
            name, message = problem
            error = ConfigError(message, file=str(path), line=line_of(path, (*where, name)),
                                field=f"{field}.{name}")
            if cfg.ha.enabled:
                raise error
            warnings.append(ConfigError(f"{message} (unused while ha.enabled is false)", file=error.file,
                                        line=error.line, field=error.field))
    return warnings


def _fence_problem(device: FenceDevice) -> tuple[str, str] | None:
    """(the fence device's field, what is wrong) or None: the program as `fence()` resolves it,
    and the password file as it reads it (one line, not empty), refused if every user can read it."""
    from haguard.adapters.fence import agent_argv
    try:
        program = agent_argv(device)[0]
    except ValueError as exc:
        return "agent", f"{exc}: every host needs it (the coordinator runs it)"
    if not Path(program).is_file():
        return "agent", f"fence agent {program} is not a file: every host needs it (the coordinator runs it)"
    secret = device.password_file
    if secret is None:
        return None
    try:
        st = secret.stat()
        text = secret.read_text(encoding="utf-8")
    except OSError as exc:
        return "password_file", f"cannot read {secret}: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return "password_file", f"{secret} is not UTF-8 text"
    if st.st_mode & stat.S_IROTH:
        return "password_file", (f"{secret} is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}): "
                                 f"chmod o-r {secret}")
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        return "password_file", f"{secret} is empty"
    if "\n" in password or "\r" in password:
        return "password_file", f"{secret} holds more than one line (the password alone)"
    return None


def check_tls_files(cfg: ClusterConfig, path: Path) -> list[ConfigError]:
    """mqtt.tls's files, which the agent opens at each broker connection: warnings only (a
    host may be checked before its certificates are installed)."""
    tls = cfg.mqtt.tls
    if tls is None:
        return []
    warnings = []
    for name in ("ca_file", "cert_file", "key_file"):
        file = getattr(tls, name)
        if file is None:
            continue
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            line = line_of(path, ("mqtt", "tls", name))
            warnings.append(ConfigError(f"cannot read {file}: {exc.strerror or exc} (the agent cannot reach "
                                        "the broker without it)", file=str(path), line=line,
                                        field=f"mqtt.tls.{name}"))
    return warnings


def check_watchdog_device(cfg: ClusterConfig, path: Path) -> list[ConfigError]:
    """ha.watchdog's device exists and can be written.  It is not opened: opening arms it."""
    wd = cfg.ha.watchdog if cfg.ha.enabled else None
    if wd is None:
        return []
    line = line_of(path, ("ha", "watchdog", "device"))
    try:
        st = wd.device.stat()
    except OSError as exc:
        raise ConfigError(f"{wd.device}: {exc.strerror} (load a watchdog driver, e.g. softdog)",
                          file=str(path), line=line, field="ha.watchdog.device") from None
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISREG(st.st_mode)) or not os.access(wd.device, os.W_OK):
        raise ConfigError(f"{wd.device} is not a writable watchdog device", file=str(path), line=line,
                          field="ha.watchdog.device")
    if not stat.S_ISCHR(st.st_mode):
        return [ConfigError(f"{wd.device} is not a character device (a test stand-in?)", file=str(path),
                            line=line, field="ha.watchdog.device")]
    return []
