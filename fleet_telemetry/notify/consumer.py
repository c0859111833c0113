"""``fleet notify``'s consumer: the events topic in a group of its own, each event
delivered (:class:`~fleet_telemetry.notify.delivery.Delivery`) before its offset is
committed.

Order: a vehicle's events are delivered in their topic order, one at a time, so a
receiver never sees ``alert.resolved`` before its ``alert.raised``. Partitions are
delivered side by side, each by a task of its own; an event being retried holds its
partition until it is delivered or dead-lettered after ``FLEET_NOTIFY_MAX_ATTEMPTS``
(order is kept at the price of latency while a receiver is down), while the others go on
until :data:`MAX_WAITING` events wait, when fetching pauses. Offsets are committed as
events are done, so a long retry never stalls the group membership or the commits.

SIGTERM: the requests under way finish (each within the timeout), nothing more is sent,
what was done is committed and the consumer leaves the group; an event waiting to be
retried is left for the next run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from pydantic import SecretStr

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

MAX_WAITING = 200
"""Events fetched and not yet done, at most; past it the loop pauses fetching."""


class NotifyStrategy:
    """Delivers the fetched events (the Kafka loop's
    :class:`~fleet_telemetry.consumers.kafka_loop.Strategy`): one task per partition takes
    its events in order, one at a time, and makes each one's offset committable once it is
    done, so the loop keeps fetching, heartbeating and committing while a slow receiver
    holds one partition. At most ``max_waiting`` events wait; then fetching pauses."""

    def __init__(self, delivery: Delivery, stopping: asyncio.Event, *, max_waiting: int = MAX_WAITING) -> None:
        self.offsets = Committable()
        self._delivery = delivery
        self._stopping = stopping
        self._max = max_waiting
        self._waiting: dict[TopicPartition, deque[Any]] = {}
        self._tasks: dict[TopicPartition, asyncio.Task[None]] = {}

    @property
    def in_flight(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def backpressure(self) -> bool:
        return self.in_flight >= self._max

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def room(self) -> int:
        return max(1, self._max - self.in_flight)

    async def submit(self, records: Records) -> None:
        self._check()
        for tp, fetched in records.items():
            if not fetched:
                continue
            self._waiting.setdefault(tp, deque()).extend(fetched)
            if tp not in self._tasks:
                self._tasks[tp] = asyncio.create_task(self._deliver(tp), name=f"fleet-notify-{tp.partition}")

    async def _deliver(self, tp: TopicPartition) -> None:
        waiting = self._waiting[tp]
        while waiting and not self._stopping.is_set():
            record = waiting[0]
            done = await self._delivery.deliver(Source(tp.topic, tp.partition, record.offset, record.key,
                                                       record.value or b""))
            if done is None:
                return  # stopping: left for the next run
            waiting.popleft()
            self.offsets.mark({tp: record.offset + 1})

    def _check(self) -> None:
        """Forgets the partition tasks that ended; raises what ended one (Abandoned, a bug)."""
        for tp, task in list(self._tasks.items()):
            if task.done():
                del self._tasks[tp]
                task.result()

    async def poll(self) -> None:
        self._check()

    async def handover(self) -> None:
        """Blocks until every fetched event is done (or, once stopping, until the tasks gave up)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))
            self._check()
        if self._stopping.is_set():
            self._waiting.clear()  # not done: redelivered to the next run

    def abandon(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        self._check()


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
