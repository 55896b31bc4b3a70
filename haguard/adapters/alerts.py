"""Alert delivery: journald (via structlog), the MQTT alert topic, Alertmanager webhooks.

    core task --raise_alert(alert)--> AlertTracker (dedup) --> log "alert" (PRIORITY by severity,
                                                           |    HAGUARD_ALERT=kind)
                                                           +--> transport.publish("alert", ...)
                                                           +--> one bounded queue per webhook
    one worker per webhook: POST the JSON list (Alertmanager /api/v2/alerts format), retried
    with exponential backoff and jitter, bounded in attempts and time; a repeat loop
    re-sends still-firing alerts every repeat interval so Alertmanager keeps them open.

`raise_alert` never blocks and never raises on delivery problems: a full queue drops the
batch (counted in `dropped`, logged).  HTTP is urllib in a worker thread (one POST at a
time per webhook, each bounded by `timeout_s`); environment proxies are ignored, so
alerts go straight to the configured address.  2xx is success; 429, 5xx and network
errors are retried; any other status is a refusal and is not retried.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from haguard.adapters.metrics import AgentMetrics
from haguard.config.cluster import AlertsConfig
from haguard.core.alerts import (
    Alert,
    AlertTracker,
    Notice,
    Severity,
    alertmanager_payload,
    mqtt_body,
)
from haguard.errors import HaguardError

log = structlog.get_logger("haguard.alerts")

QUEUE_SIZE = 256                 # batches per webhook waiting to be sent
MAX_REPLY_BYTES = 64 * 1024
EXPIRE_FACTOR = 4                # a firing alert expires in Alertmanager after 4 missed re-sends
_LEVEL = {Severity.CRITICAL: "critical", Severity.WARNING: "warning", Severity.INFO: "info"}
# No proxies from the environment: an alert must not take a detour through one.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Retryable(HaguardError):
    """A POST that may work later: network error, timeout, 429 or 5xx."""


class _Refused(HaguardError):
    """A POST the receiver rejected for good (4xx other than 429)."""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def post_json(url: str, data: bytes, timeout_s: float) -> int:
    """POST `data` as JSON; the HTTP status.  Raises _Retryable or _Refused.  Blocking."""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "haguard"})
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            resp.read(MAX_REPLY_BYTES)
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _Retryable(f"{type(exc).__name__}: {reason}") from None
    if 200 <= status < 300:
        return status
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}")
    raise _Refused(f"HTTP {status}")


class AlertNotifier:
    """Announces alerts once (see module docstring).  Call `raise_alert` from the event loop;
    run `run()` as a supervised task when webhooks are configured."""

    def __init__(self, cfg: AlertsConfig, *, cluster: str, host: str,
                 publish: Callable[[str, dict[str, Any]], bool],
                 metrics: AgentMetrics | None = None, clock_ms: Callable[[], int] = wall_ms,
                 retry_initial_s: float = 0.5, retry_cap_s: float = 10.0) -> None:
        self.cfg = cfg
        self.cluster, self.host = cluster, host
        self.tracker = AlertTracker(int(cfg.repeat_interval_s * 1000))
        self._publish = publish
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._retry_initial_s, self._retry_cap_s = retry_initial_s, retry_cap_s
        self._queues: dict[str, asyncio.Queue[list[Notice]]] = {
            url: asyncio.Queue(maxsize=QUEUE_SIZE) for url in cfg.webhooks}
        self.dropped = 0
        self.delivered = 0           # batches accepted by a webhook
        self.failed = 0              # batches given up on

    # ---- from the core task: never blocks ----------------------------------------------

    def raise_alert(self, alert: Alert) -> Notice | None:
        """Announce `alert` unless it is a duplicate; the notice sent, or None."""
        now = self._clock_ms()
        notice = self.tracker.offer(alert, now)
        if notice is None:
            return None
        level = "info" if alert.resolved else _LEVEL[alert.severity]
        getattr(log, level)("alert", alert=str(alert.kind), severity=str(alert.severity),
                            status="resolved" if alert.resolved else "firing", host=alert.host,
                            vm=alert.vm or None, summary=alert.summary, reason=alert.description)
        try:
            self._publish("alert", mqtt_body(notice, now_ms=now))
        except ValueError as exc:        # a body that is not JSON data: a bug, not a network fault
            log.error("alert-publish-failed", alert=str(alert.kind), error=str(exc))
        if self._metrics is not None:
            self._metrics.record_alert(str(alert.kind), str(alert.severity), alert.resolved)
        self._enqueue([notice])
        return notice

    def _enqueue(self, notices: list[Notice]) -> None:
        for url, queue in self._queues.items():
            try:
                queue.put_nowait(notices)
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning("alert-queue-full", webhook=url, dropped=self.dropped)

    # ---- delivery ---------------------------------------------------------------------

    async def run(self) -> None:
        if not self._queues:
            return
        async with asyncio.TaskGroup() as tg:
            for url, queue in self._queues.items():
                tg.create_task(self._worker(url, queue), name=f"alert-webhook-{url}")
            tg.create_task(self._repeat_loop(), name="alert-repeat")

    async def _repeat_loop(self) -> None:
        interval_ms = self.tracker.repeat_interval_ms
        while True:
            now = self._clock_ms()
            due = self.tracker.next_due_ms()
            wait_ms = interval_ms if due is None else max(50, min(interval_ms, due - now))
            await asyncio.sleep(wait_ms / 1000)
            notices = self.tracker.due(self._clock_ms())
            if notices:
                self._enqueue(notices)

    async def _worker(self, url: str, queue: asyncio.Queue[list[Notice]]) -> None:
        while True:
            batch = await queue.get()
            while not queue.empty() and len(batch) < 64:      # catch up in one POST
                batch = batch + queue.get_nowait()
            await self.deliver(url, batch)

    async def deliver(self, url: str, notices: list[Notice]) -> bool:
        """POST `notices` to `url` with retries; True when accepted.  Never raises but
        CancelledError."""
        expire_ms = EXPIRE_FACTOR * self.tracker.repeat_interval_ms
        data = json.dumps(alertmanager_payload(notices, cluster=self.cluster, now_ms=self._clock_ms(),
                                               expire_after_ms=expire_ms)).encode()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait_exponential_jitter(multiplier=self._retry_initial_s, max=self._retry_cap_s,
                                         jitter=self._retry_initial_s),
            stop=stop_after_attempt(self.cfg.retry_attempts) | stop_after_delay(self.cfg.retry_max_s),
            before_sleep=lambda state: self._retrying(url, state.outcome),
            reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await asyncio.to_thread(post_json, url, data, self.cfg.timeout_s)
        except (_Retryable, _Refused) as exc:
            self.failed += 1
            self._count("failed")
            log.error("alert-webhook-failed", webhook=url, alerts=len(notices), error=str(exc))
            return False
        self.delivered += 1
        self._count("ok")
        return True

    def _retrying(self, url: str, outcome: Any) -> None:
        self._count("retried")
        error = outcome.exception() if outcome is not None else None
        log.info("alert-webhook-retry", webhook=url, error=str(error))

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_posts.labels(result=result).inc()
