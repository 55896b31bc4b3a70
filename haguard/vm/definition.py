"""VM definitions: what an operator writes in YAML, validated.

Integers are taken as written (`true`, `512.0` and "512" are refused, not read as 1 and 512).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from haguard.names import NAME_RE

# A versioned machine type ("pc-q35-7.2", "pc-i440fx-8.2"): an alias such as "q35"
# resolves to the newest type of each QEMU, which breaks migration between versions.
VERSIONED_MACHINE_RE = re.compile(r"^[a-z0-9_-]+-\d+\.\d+$")
MAC_RE = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CpuSpec(_Strict):
    model: str = "qemu64"
    # host-passthrough exposes the host CPU as is: fastest, but a guest moved to a
    # host with another CPU can crash on a missing instruction.
    passthrough: bool = False

    @model_validator(mode="after")
    def _model_vs_passthrough(self) -> CpuSpec:
        if self.model == "host" and not self.passthrough:
            raise ValueError("cpu model 'host' is host-passthrough: set passthrough: true to accept "
                             "that the VM can only move between identical CPUs")
        return self

    @property
    def qemu_model(self) -> str:
        return "host" if self.passthrough else self.model


class DiskSpec(_Strict):
    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"
    # shared: the same file is reachable from every host (NFS, cluster FS, SAN);
    # local disks are copied to the destination during a migration.
    shared: bool = False
    bus: Literal["virtio", "ide"] = "virtio"
    readonly: bool = False


class NicSpec(_Strict):
    mac: str = Field(pattern=MAC_RE)
    type: Literal["user", "tap"] = "user"
    ifname: str | None = None
    model: str = "virtio-net-pci"

    @model_validator(mode="after")
    def _tap_needs_ifname(self) -> NicSpec:
        if self.type == "tap" and not self.ifname:
            raise ValueError("a tap NIC needs ifname")
        return self


class VmDefinition(_Strict):
    name: str = Field(pattern=NAME_RE)
    memory_mib: StrictInt = Field(ge=16, le=16 * 1024 * 1024)
    vcpus: StrictInt = Field(default=1, ge=1, le=1024)
    machine: str = "pc-i440fx-7.2"
    cpu: CpuSpec = CpuSpec()
    firmware: Literal["seabios", "qboot"] | Path = "seabios"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    extra_args: tuple[str, ...] = ()
    # Placement and recovery hints, used by the cluster (ignored on a single host).
    priority: StrictInt = Field(default=0, ge=0, le=1000)  # recovered and moved first when higher
    affinity: str | None = Field(default=None, pattern=NAME_RE)        # prefer hosts holding this group
    anti_affinity: str | None = Field(default=None, pattern=NAME_RE)   # never two of it on one host
    host_groups: tuple[str, ...] = ()                   # allowed host groups (hosts[].group); empty: any

    @field_validator("machine")
    @classmethod
    def _versioned(cls, v: str) -> str:
        if not VERSIONED_MACHINE_RE.match(v):
            raise ValueError(f"machine type {v!r} is not versioned: use one such as pc-q35-7.2 "
                             "so that every host runs the same device model")
        return v

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu_shorthand(cls, v: object) -> object:
        if isinstance(v, str):
            return {"model": "host", "passthrough": True} if v == "host-passthrough" else {"model": v}
        return v

    @model_validator(mode="after")
    def _initrd_append_need_kernel(self) -> VmDefinition:
        if (self.initrd or self.append) and not self.kernel:
            raise ValueError("initrd and append need kernel")
        return self

    @property
    def local_disks(self) -> tuple[DiskSpec, ...]:
        return tuple(d for d in self.disks if not d.shared)

    def warnings(self) -> list[str]:
        out = []
        if self.cpu.passthrough:
            out.append(f"VM {self.name}: host-passthrough CPU; a live migration to a host with a "
                       "different CPU can crash the guest")
        return out
