"""What one signed direct beat costs (adapters/directbeat.py), with the cluster key alone and
with a host key (core/hostkeys.py), and what a full direct mesh of N hosts costs each host.

A beat is the envelope `DirectBeats.round` sends: signed with `wire.encode`, checked with
`wire.decode`, the same calls the adapter makes.  Both variants are timed in one run,
alternating rounds, median of the rounds; the mesh figure is (sign + check) x (N - 1) x
beats per second (every 250 ms, the shipped ping interval).

Usage: .venv/bin/python bench/beat_cost.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import base_parser, emit_result
from haguard.core import wire
from haguard.core.hostkeys import signer_of

KEY = b"k" * 32
BEATS_PER_S = 4                     # ping_interval_ms 250
MESH_SIZES = (12, 64, 128)


def _round(n: int, keyed: bool, own: Ed25519PrivateKey) -> tuple[float, float, int]:
    signer = signer_of(own) if keyed else None
    keys = {"hv001": (own.public_key(),)} if keyed else None
    env = wire.Envelope(cluster="prod", host="hv001", incarnation=1_733_000_000_000, seq=1, kind="beat",
                        body={"to": "hv002", "hears": True}, sent_ms=1_733_000_000_000)
    data = wire.encode(env, KEY, signer=signer)
    t0 = time.perf_counter()
    for _ in range(n):
        wire.encode(env, KEY, signer=signer)
    t1 = time.perf_counter()
    for _ in range(n):
        wire.decode(data, KEY, "prod", host_keys=keys)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, len(data)


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    n, rounds = (2000, 5) if args.quick else (20_000, 9)
    own = Ed25519PrivateKey.generate()
    got: dict[str, list[tuple[float, float, int]]] = {"cluster_key": [], "host_key": []}
    for _ in range(rounds):
        for name in got:
            got[name].append(_round(n, name == "host_key", own))
    result: dict[str, object] = {"benchmark": "beat_cost", "quick": args.quick, "beats_per_round": n,
                                 "rounds": rounds}
    print(f"{'':>12} {'sign us':>8} {'check us':>9} {'bytes':>6}  " +
          "  ".join(f"{f'mesh {m} % core':>15}" for m in MESH_SIZES))
    for name, runs in got.items():
        sign = statistics.median(r[0] for r in runs)
        check = statistics.median(r[1] for r in runs)
        mesh = {m: round((sign + check) * (m - 1) * BEATS_PER_S / 1e4, 2) for m in MESH_SIZES}
        print(f"{name:>12} {sign:>8.1f} {check:>9.1f} {runs[0][2]:>6}  " +
              "  ".join(f"{mesh[m]:>15}" for m in MESH_SIZES))
        result[name] = {"sign_us": round(sign, 1), "check_us": round(check, 1), "bytes": runs[0][2],
                        "mesh_pct_of_core": {str(m): v for m, v in mesh.items()}}
    emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
