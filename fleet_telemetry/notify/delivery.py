"""Delivering one event record to the webhook: filtered, repeats dropped, retried with
backoff, or dead-lettered with the reason.

An event is done once it is delivered, filtered out, found delivered before, or
dead-lettered; only then may its offset be committed. Delivered ids are remembered in
Redis for ``FLEET_NOTIFY_REMEMBER_SECONDS`` under the consumer group's name, so a restart
(or a redelivery of the events topic) does not send an event twice to the same receiver.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

import orjson
import structlog
from aiokafka import AIOKafkaProducer

from fleet_telemetry.consumers.chain import Retrier
from fleet_telemetry.consumers.deadletter import (
    HEADER_DETAIL, HEADER_FAILED_AT, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC, fit,
)
from fleet_telemetry.core.events import EVENT_TYPES
from fleet_telemetry.core.metrics import NotifyMetrics
from fleet_telemetry.core.redis_client import RedisClient
from fleet_telemetry.core.redis_keys import RedisKeys
from fleet_telemetry.core.retry import Backoff
from fleet_telemetry.notify.webhook import Attempt, Webhook

log = structlog.get_logger("fleet.notify")

SENT: Final = "sent"
FILTERED: Final = "filtered"
DUPLICATE: Final = "duplicate"
DEAD_LETTERED: Final = "dead_lettered"

INVALID_EVENT: Final = "invalid_event"
"""Dead-letter reason: the record is not an event of the documented format."""
WEBHOOK_REJECTED: Final = "webhook_rejected"
"""Dead-letter reason: the receiver refused the event (a 4xx other than 408 and 429)."""
WEBHOOK_FAILED: Final = "webhook_failed"
"""Dead-letter reason: every attempt failed (5xx, 408, 429, timeouts, connection errors)."""
HEADER_EVENT_ID: Final = "fleet.event.id"
HEADER_ATTEMPTS: Final = "fleet.notify.attempts"


class TypeFilter:
    """Which event types to deliver: shell-style patterns (``alert.*``); none means all."""

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self.patterns = tuple(patterns)

    @staticmethod
    def unknown(patterns: Sequence[str]) -> list[str]:
        """The patterns that match no event type (a typo, most likely)."""
        return [p for p in patterns if not fnmatch.filter(EVENT_TYPES, p)]

    def __call__(self, event_type: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(event_type, p) for p in self.patterns)


class DeliveredIds:
    """The ids of the events delivered to this receiver (its consumer group), in Redis."""

    def __init__(self, redis: RedisClient, keys: RedisKeys, group: str, ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self._ttl = ttl_seconds

    async def seen(self, event_id: str) -> bool:
        return bool(await self._redis.exists(self._keys.notify_delivered(self._group, event_id)))

    async def remember(self, event_id: str) -> None:
        await self._redis.set(self._keys.notify_delivered(self._group, event_id), b"1", ex=self._ttl)


@dataclass(frozen=True)
class Source:
    """Where an event record came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class NotifyDeadLetters:
    """Publishes the events given up to the notify dead-letter topic: the original key and
    value, the contract's dead-letter headers, the event id and the attempts made."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_bytes: int) -> None:
        self._producer = producer
        self.topic = topic
        self._max_bytes = max_bytes

    async def publish(self, source: Source, reason: str, detail: str, event_id: str | None, attempts: int) -> None:
        headers = [
            (HEADER_REASON, reason.encode()), (HEADER_DETAIL, detail.encode()),
            (HEADER_TOPIC, source.topic.encode()), (HEADER_PARTITION, str(source.partition).encode()),
            (HEADER_OFFSET, str(source.offset).encode()),
            (HEADER_FAILED_AT, datetime.now(timezone.utc).isoformat().encode()),
            (HEADER_ATTEMPTS, str(attempts).encode()),
        ]
        if event_id is not None:
            headers.append((HEADER_EVENT_ID, event_id.encode()))
        key, value, fitted = fit(source.key, source.value, headers, self._max_bytes)
        await (await self._producer.send(self.topic, value=value, key=key, headers=fitted))


def _event_fields(value: bytes) -> tuple[str, str] | None:
    """The id and type of an event record, or None when it is not an event."""
    try:
        event: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        return None
    return event["id"], event["type"]


class Delivery:
    """Delivers event records one at a time (module docstring).

    :meth:`deliver` blocks until the event is done, or returns None once ``stopping`` is
    set while it waits to retry (the event is not done: it is redelivered after a
    restart). Redis and broker failures are retried by ``retrier`` (which raises
    :class:`~fleet_telemetry.consumers.chain.Abandoned` when asked to stop meanwhile).
    """

    def __init__(self, webhook: Webhook, *, types: TypeFilter, delivered: DeliveredIds,
                 dead_letters: NotifyDeadLetters, metrics: NotifyMetrics, retrier: Retrier,
                 max_attempts: int, backoff: Callable[[], Backoff], stopping: asyncio.Event) -> None:
        self._webhook = webhook
        self._types = types
        self._delivered = delivered
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._retry = retrier
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._stopping = stopping

    async def deliver(self, source: Source) -> str | None:
        """``sent``, ``filtered``, ``duplicate`` or ``dead_lettered``; None when stopped first."""
        fields = _event_fields(source.value)
        if fields is None:
            await self._dead_letter(source, INVALID_EVENT, "the record is not a JSON event with an id and a type",
                                    None, 0)
            return DEAD_LETTERED
        event_id, event_type = fields
        if not self._types(event_type):
            self._metrics.skipped.labels(why=FILTERED).inc()
            return FILTERED
        if await self._retry("redis", lambda: self._delivered.seen(event_id)):
            self._metrics.skipped.labels(why=DUPLICATE).inc()
            return DUPLICATE
        backoff = self._backoff()
        attempts = 0
        while True:
            attempts += 1
            started = time.perf_counter()
            attempt = await self._webhook.post(event_id, event_type, source.value)
            self._metrics.request_duration.observe(time.perf_counter() - started)
            if attempt.delivered:
                await self._retry("redis", lambda: self._delivered.remember(event_id))
                self._metrics.sent.labels(type=event_type).inc()
                return SENT
            self._metrics.failed.labels(reason=attempt.reason).inc()
            if not attempt.retry or attempts >= self._max_attempts:
                reason = WEBHOOK_FAILED if attempt.retry else WEBHOOK_REJECTED
                await self._dead_letter(source, reason, _detail(attempt, attempts), event_id, attempts)
                return DEAD_LETTERED
            delay = backoff.next_delay()
            log.warning("webhook attempt failed, retrying", event_id=event_id, reason=attempt.reason,
                        detail=attempt.detail, attempt=attempts, retry_in_s=round(delay, 2))
            if await _stopped_within(self._stopping, delay):
                return None
            self._metrics.retried.inc()

    async def _dead_letter(self, source: Source, reason: str, detail: str, event_id: str | None,
                           attempts: int) -> None:
        await self._retry("kafka", lambda: self._dead_letters.publish(source, reason, detail, event_id, attempts))
        self._metrics.dead_lettered.labels(reason=reason).inc()
        log.error("event dead-lettered", event_id=event_id, reason=reason, detail=detail, attempts=attempts,
                  topic=self._dead_letters.topic)


def _detail(attempt: Attempt, attempts: int) -> str:
    return f"{attempt.detail} (attempt {attempts})" if attempts > 1 else attempt.detail


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    """Waits ``seconds``; True as soon as ``stopping`` is set."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
