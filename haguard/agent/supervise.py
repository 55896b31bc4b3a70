"""Keep the agent's loops running: a crashed loop is logged and restarted with backoff.

A loop that returns normally is done (nothing to watch, say) and is not restarted;
only cancellation ends a supervised loop for good.  The backoff starts again small
after a run that lasted a while, so a rare crash costs little and a crash loop
cannot spin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("haguard.agent")

LoopFactory = Callable[[], Coroutine[Any, Any, None]]


async def supervise(name: str, factory: LoopFactory, *, backoff_s: float = 0.2,
                    max_backoff_s: float = 5.0, stable_after_s: float = 30.0) -> None:
    delay = backoff_s
    while True:
        started = time.monotonic()
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task-crashed", task=name, error=f"{type(exc).__name__}: {exc}",
                          restart_in_s=round(delay, 2))
        else:
            log.debug("task-finished", task=name)
            return
        if time.monotonic() - started >= stable_after_s:
            delay = backoff_s
        await asyncio.sleep(delay)
        delay = min(max_backoff_s, delay * 2)


def start(name: str, factory: LoopFactory, **kw: Any) -> asyncio.Task[None]:
    """A supervised loop as a named task."""
    return asyncio.create_task(supervise(name, factory, **kw), name=name)
