"""Migration URIs: tcp:HOST:PORT, unix:PATH, rdma:HOST:PORT (passed through)."""

from __future__ import annotations

from dataclasses import dataclass

from haguard.errors import MigrationError


@dataclass(frozen=True)
class MigrationUri:
    scheme: str         # tcp | unix | rdma
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"

    @property
    def where(self) -> str:
        return self.path if self.scheme == "unix" else f"{self.host}:{self.port}"

    def with_port(self, port: int) -> MigrationUri:
        return MigrationUri(self.scheme, self.host, port, self.path)

    def with_path(self, path: str) -> MigrationUri:
        return MigrationUri(self.scheme, self.host, self.port, path)


def parse_uri(text: str) -> MigrationUri:
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("tcp", "unix", "rdma"):
        raise MigrationError(f"migration URI {text!r}: use tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise MigrationError(f"migration URI {text!r}: a unix socket path must be absolute")
        return MigrationUri("unix", path=rest)
    host, _, port_s = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise MigrationError(f"migration URI {text!r}: expected {scheme}:HOST:PORT")
    return MigrationUri(scheme, host=host, port=int(port_s))
