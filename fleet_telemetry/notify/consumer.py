"""``fleet notify``'s consumer: the events topic in a group of its own, each event
delivered (:class:`~fleet_telemetry.notify.delivery.Delivery`) before its offset is
committed.

Order: a vehicle's events are delivered in their topic order, one at a time, so a
receiver never sees ``alert.resolved`` before its ``alert.raised``. The partitions of one
fetch are delivered side by side; an event being retried holds its partition (and the
next fetch) until it is delivered or dead-lettered after ``FLEET_NOTIFY_MAX_ATTEMPTS``:
order is kept at the price of latency while a receiver is down.

SIGTERM: the requests under way finish (each within the timeout), nothing more is sent,
what was done is committed and the consumer leaves the group; an event waiting to be
retried is left for the next run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.chain import Abandoned, Retrier
from fleet_telemetry.consumers.deadletter import request_size
from fleet_telemetry.consumers.kafka_loop import Committable, KafkaLoop, LoopMetrics, LoopOptions, Records, start_with_retry
from fleet_telemetry.core.metrics import NotifyMetrics
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.retry import Backoff
from fleet_telemetry.core.settings import Settings, mask_url
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.ingest.topics import ensure_topics_if_allowed
from fleet_telemetry.notify.delivery import DeliveredIds, Delivery, NotifyDeadLetters, Source, TypeFilter
from fleet_telemetry.notify.webhook import Webhook

log = structlog.get_logger("fleet.notify")

FETCH_RECORDS = 200
"""Events fetched at most at once."""


class NotifyStrategy:
    """Delivers each fetch, partitions side by side, each partition in order (the Kafka
    loop's :class:`~fleet_telemetry.consumers.kafka_loop.Strategy`); every event done
    makes its offset committable."""

    backpressure = False
    in_flight = 0

    def __init__(self, delivery: Delivery, stopping: asyncio.Event) -> None:
        self.offsets = Committable()
        self._delivery = delivery
        self._stopping = stopping

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def room(self) -> int:
        return FETCH_RECORDS

    async def submit(self, records: Records) -> None:
        await asyncio.gather(*(self._partition(tp, fetched) for tp, fetched in records.items()))

    async def _partition(self, tp: TopicPartition, fetched: Sequence[Any]) -> None:
        for record in fetched:
            if self._stopping.is_set():
                return
            done = await self._delivery.deliver(Source(tp.topic, tp.partition, record.offset, record.key,
                                                       record.value or b""))
            if done is None:
                return
            self.offsets.mark({tp: record.offset + 1})

    async def poll(self) -> None:
        pass

    async def handover(self) -> None:
        pass  # every fetched event was done (or left for the next run) before the next fetch

    def abandon(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        pass


class NotifyConsumer:
    """Consumes ``FLEET_EVENTS_TOPIC`` in group ``FLEET_NOTIFY_GROUP`` and delivers to one
    webhook. ``run`` returns the exit status: 0 after a clean stop, 1 when a broker or
    Redis failure was still being retried when asked to stop."""

    def __init__(self, settings: Settings, url: str, *, types: Sequence[str] = (), secret: SecretStr | None = None,
                 stop_when_idle: float | None = None, metrics: NotifyMetrics | None = None) -> None:
        self.settings = settings
        self.url = url
        self.types = TypeFilter(types)
        self._secret = secret
        self.stop_when_idle = stop_when_idle
        self.metrics = metrics or NotifyMetrics()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the requests under way, commit and leave (signal-safe)."""
        self._stopping.set()

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)

    async def run(self) -> int:
        s = self.settings
        if self._secret is None:
            log.warning("webhook requests are not signed (no --secret-env)", url=mask_url(self.url))
        redis = connect_redis(s.redis_url)
        producer: AIOKafkaProducer | None = None
        try:
            producer = await start_with_retry(
                lambda: start_producer(s, max_request_size=request_size(s.dlq_max_message_bytes)),
                bootstrap=s.kafka_bootstrap, retries=self.metrics.retries, backoff=self._backoff(),
                give_up=self._stopping, within=self.stop_when_idle)
            await ensure_topics_if_allowed(s, [s.events_topic], partitions=s.events_topic_partitions)
            await ensure_topics_if_allowed(s, [s.notify_dlq_topic], partitions=1)
            async with Webhook(self.url, self._secret, s.notify_timeout_seconds) as webhook:
                delivery = Delivery(
                    webhook, types=self.types,
                    delivered=DeliveredIds(redis, s.redis_keys, s.notify_group, s.notify_remember_seconds),
                    dead_letters=NotifyDeadLetters(producer, s.notify_dlq_topic, s.dlq_max_message_bytes),
                    metrics=self.metrics, retrier=Retrier(self.metrics.retries, self._backoff, give_up=self._stopping),
                    max_attempts=s.notify_max_attempts, backoff=self._backoff, stopping=self._stopping)
                options = LoopOptions.from_settings(
                    s, topics=[s.events_topic], group=s.notify_group, stop_when_idle=self.stop_when_idle,
                    what="events", started_event="notify consumer started",
                    log_fields={"url": mask_url(self.url), "types": list(self.types.patterns) or "all"})
                return await KafkaLoop(NotifyStrategy(delivery, self._stopping), options,
                                       LoopMetrics(self.metrics.retries), stopping=self._stopping).run()
        except Abandoned as exc:
            log.error("stopped while a dependency was failing; the events not committed will be delivered"
                      " by the next run", detail=str(exc))
            return 1
        finally:
            if producer is not None:
                await producer.stop()
            await redis.aclose()
