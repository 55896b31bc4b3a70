"""Heartbeat timing as the broker hands it out: a subscriber in the broker's namespace
stamps every cluster heartbeat on arrival, and `BeatWatch` turns the stamps into the gaps
between one host's consecutive heartbeats (what its peers wait between two of them).

Run as a module, it is the subscriber: `python -m tests.helpers.beats HOST PORT TOPIC`
prints `<monotonic s> <sender> <seq>` per heartbeat (one line per heartbeat number: the
copies sent to several neighbours share it)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]


async def _subscribe(host: str, port: int, topic: str) -> None:
    import aiomqtt

    seen: set[tuple[str, int]] = set()
    async with aiomqtt.Client(host, port, identifier=f"beat-watch-{time.monotonic_ns()}") as client:
        await client.subscribe(topic)
        print("subscribed", flush=True)
        async for message in client.messages:
            at = time.monotonic()
            try:
                payload = message.payload
                env = json.loads(payload if isinstance(payload, bytes | str) else b"{}")
                msg = env["body"]["msg"]
            except (ValueError, KeyError, TypeError):
                continue
            if msg.get("type") != "Heartbeat" or not isinstance(msg.get("seq"), int):
                continue
            key = (str(msg["sender"]), int(msg["seq"]))
            if key not in seen:
                seen.add(key)
                print(f"{at:.4f} {key[0]} {key[1]}", flush=True)


class BeatWatch:
    """Cluster heartbeats of every host, stamped at the broker (run in `netns`)."""

    def __init__(self, netns: str, host: str, port: int, topic: str) -> None:
        self.argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.helpers.beats",
                     host, str(port), topic]
        self.arrivals: dict[str, list[float]] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    def __enter__(self) -> BeatWatch:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, cwd=REPO, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="beat-watch", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout=20):
            self.__exit__(None, None, None)
            raise RuntimeError("the heartbeat subscriber did not connect")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("subscribed"):
                self._ready.set()
                continue
            at, sender, _seq = line.split()
            self.arrivals.setdefault(sender, []).append(float(at))

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def reset(self) -> None:
        self.arrivals = {}

    def gaps_ms(self) -> list[float]:
        """Every gap between two consecutive heartbeats of one host, in ms."""
        return [(b - a) * 1000 for times in list(self.arrivals.values())
                for a, b in itertools.pairwise(times)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


if __name__ == "__main__":
    asyncio.run(_subscribe(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
