"""Fault schedules: what goes wrong and when, generated from a seed.

A schedule is a list of `Fault`s (time, kind, arguments) plus the instant faults stop
(`heal_ms`).  At `heal_ms` the world heals everything: links, broker, fence devices,
migrations, message loss; hosts that are off are powered on.  Schedules encode to a
short string so a shrunk failing schedule can be replayed from the command line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = {
    # kind: number of arguments
    "cut": 2,            # messages and pings from a to b are lost (one way)
    "cut2": 2,           # both ways
    "heal": 2,           # both ways restored
    "isolate": 1,        # host cut from broker and every peer
    "rejoin": 1,
    "broker-down": 0,
    "broker-up": 0,
    "crash": 1,          # host loses power
    "boot": 1,           # host powered on
    "agent-restart": 1,  # agent process killed and started again, VMs keep running
    "agent-stop": 1,     # agent stopped cleanly (hands over, disarms) and started again
    "state-lost": 1,     # agent killed, its state_dir lost (votes and state), started again
    "fence": 2,          # fence device of a host: ok | fail | hang
    "qemu-crash": 1,     # a VM's QEMU dies on whichever host runs it
    "qemu-hang": 1,      # a VM's QEMU stops answering its monitor (the guest may still run)
    "migrations": 1,     # how migrations end: ok | fail | stall
    "loss": 1,           # percent of messages lost
    "dup": 1,            # percent of messages delivered twice
    "drain": 1,
    "undrain": 1,
    "confirm-off": 1,    # an operator confirms a host is off (only when it is: the operator checked)
    "pause": 0,          # `haguard maintenance on` (not in the default mix; heal turns it off)
    "resume": 0,         # `haguard maintenance off`
}


@dataclass(frozen=True, kw_only=True)
class Fault:
    at_ms: int
    kind: str
    args: tuple[str, ...] = ()

    def encode(self) -> str:
        return ":".join((str(self.at_ms), self.kind, *self.args))

    @classmethod
    def decode(cls, text: str) -> Fault:
        at, kind, *args = text.split(":")
        if kind not in KINDS or len(args) != KINDS[kind]:
            raise ValueError(f"bad fault {text!r}: expected {kind}:{KINDS.get(kind, '?')} arguments")
        return cls(at_ms=int(at), kind=kind, args=tuple(args))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    faults: tuple[Fault, ...] = ()
    heal_ms: int = 15_000

    def encode(self) -> str:
        return ",".join([f"heal={self.heal_ms}", *(f.encode() for f in self.faults)])

    @classmethod
    def decode(cls, text: str) -> Schedule:
        heal_ms, faults = 15_000, []
        for part in filter(None, text.split(",")):
            if part.startswith("heal="):
                heal_ms = int(part.removeprefix("heal="))
            else:
                faults.append(Fault.decode(part))
        return cls(faults=tuple(sorted(faults, key=lambda f: f.at_ms)), heal_ms=heal_ms)

    def without(self, index: int) -> Schedule:
        return Schedule(faults=self.faults[:index] + self.faults[index + 1:], heal_ms=self.heal_ms)


@dataclass(frozen=True, kw_only=True)
class FaultMix:
    """Relative weights of the fault kinds a random schedule draws from."""

    weights: dict[str, int] = field(default_factory=lambda: {
        "cut": 3, "cut2": 3, "heal": 3, "isolate": 2, "rejoin": 2, "broker-down": 1, "broker-up": 1,
        "crash": 3, "boot": 2, "agent-restart": 2, "agent-stop": 2, "state-lost": 1, "fence": 2,
        "qemu-crash": 2, "qemu-hang": 1, "migrations": 1, "loss": 1, "dup": 1, "drain": 1, "undrain": 1})


def random_schedule(seed: int, hosts: list[str], vms: list[str], *, heal_ms: int = 15_000,
                    max_faults: int = 12, mix: FaultMix | None = None) -> Schedule:
    rng = random.Random(f"faults/{seed}")
    weights = (mix or FaultMix()).weights
    kinds = sorted(weights)
    faults = []
    for _ in range(rng.randint(2, max_faults)):
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        at = rng.randrange(1_000, heal_ms)
        a, b = rng.sample(hosts, 2)
        match KINDS[kind], kind:
            case _, "fence":
                args: tuple[str, ...] = (a, rng.choice(["ok", "fail", "hang"]))
            case _, "qemu-crash" | "qemu-hang":
                args = (rng.choice(vms),)
            case _, "drain" | "undrain":
                args = (hosts[-1],)       # one host at most: the others keep room for every VM
            case _, "migrations":
                args = (rng.choice(["ok", "fail", "stall"]),)
            case _, "loss" | "dup":
                args = (str(rng.choice([0, 5, 20, 50])),)
            case 0, _:
                args = ()
            case 1, _:
                args = (a,)
            case _:
                args = (a, b)
        faults.append(Fault(at_ms=at, kind=kind, args=args))
    return Schedule(faults=tuple(sorted(faults, key=lambda f: f.at_ms)), heal_ms=heal_ms)
