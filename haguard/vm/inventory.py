"""The VM inventory: one YAML file per VM in a directory (or several VMs under `vms:`)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from haguard.config.yamlsrc import line_of, parse_yaml, read_text, validate
from haguard.errors import ConfigError
from haguard.vm.definition import VmDefinition

DEFAULT_VM_DIR = Path("/etc/haguard/vms")


class _VmList(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    vms: list[VmDefinition]


def vm_dir(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("HAGUARD_VM_DIR", DEFAULT_VM_DIR))


def load_file(path: Path) -> list[VmDefinition]:
    data, node = parse_yaml(read_text(path), str(path))
    if data is None:
        raise ConfigError("file is empty", file=str(path))
    if isinstance(data, dict) and "vms" in data:
        return validate(_VmList, data, node, str(path)).vms
    return [validate(VmDefinition, data, node, str(path))]


def load_inventory(directory: Path) -> dict[str, VmDefinition]:
    if not directory.is_dir():
        raise ConfigError("VM definition directory does not exist", file=str(directory))
    vms: dict[str, VmDefinition] = {}
    where: dict[str, Path] = {}
    for path in sorted(directory.glob("*.y*ml")):
        for i, vm in enumerate(load_file(path)):
            if vm.name in vms:
                loc = _name_loc(path, i)
                field = "name" if len(loc) == 1 else f"vms[{i}].name"
                raise ConfigError(f"VM {vm.name!r} is also defined in {where[vm.name]}", file=str(path),
                                  line=line_of(path, loc), field=field)
            vms[vm.name] = vm
            where[vm.name] = path
    return vms


def _name_loc(path: Path, index: int) -> tuple[int | str, ...]:
    """Where the `index`th VM of a file (one loaded already) names itself."""
    data, _ = parse_yaml(read_text(path), str(path))
    return ("vms", index, "name") if isinstance(data, dict) and "vms" in data else ("name",)


def find_vm(name: str, directory: Path) -> VmDefinition:
    vms = load_inventory(directory)
    if name not in vms:
        known = ", ".join(sorted(vms)) or "none"
        raise ConfigError(f"unknown VM {name!r} (defined: {known})", file=str(directory))
    return vms[name]
