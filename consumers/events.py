"""Publishing the outbound events: from the ``fleet_events`` outbox to ``FLEET_EVENTS_TOPIC``.

Whatever writes a fact records its event in the outbox in the same transaction (the
triggers of migration 0041 for alerts and geofence transitions,
:func:`~fleet_telemetry.core.events.record_events` for the rest).
:class:`OutboxPublisher` sends the unpublished rows, in the order they were recorded,
waits for the broker's acknowledgement of every one (acks=all) and only then marks them
published, in the same transaction that locked them. A failure anywhere rolls the marks
back and the rows are sent again: at least once, with ids that do not change.

:class:`EventsStep` runs it for each batch before the batch's offsets become committable,
so a batch's events are on the topic before its readings can never be redelivered. The
pipeline's drain timer runs it every ``FLEET_EVENTS_DRAIN_SECONDS`` for the rows nobody
else will publish (command-line writers, the clock's alerts, a worker that died after
committing its transaction).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from fleet_telemetry.consumers.chain import Retrier, Step
from fleet_telemetry.consumers.stages import Stored
from fleet_telemetry.core.events import FleetEvent
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.retry import CONNECT_TIMEOUT_SECONDS

log = structlog.get_logger("fleet.events")

_ANY_PENDING = "SELECT EXISTS (SELECT 1 FROM fleet_events WHERE published_at IS NULL)"
# FOR UPDATE, not SKIP LOCKED: a publisher that meets rows another one is sending waits
# for it and then skips them (published), so a vehicle's events never overtake each other.
# Every publisher locks in the same order, so two never deadlock.
# Facts of one instant in one transaction (a trip ending where a stop starts) go out with
# the ending first, so a subscriber never sees a vehicle in two states at once.
_CLAIM = """
SELECT id, type, vehicle_id, driver_id, time, data FROM fleet_events
WHERE published_at IS NULL
ORDER BY created_at, time,
         CASE WHEN type IN ('alert.resolved', 'geofence.exited', 'trip.ended', 'stop.ended') THEN 0 ELSE 1 END, id
LIMIT $1
FOR UPDATE
"""
_MARK = "UPDATE fleet_events SET published_at = now() WHERE id = ANY($1::uuid[])"
_BACKLOG = "SELECT count(*) FROM fleet_events WHERE published_at IS NULL"


def reduced_value(event: FleetEvent, size: int) -> bytes:
    """The event with only the small scalar fields of its ``data`` (numbers, booleans, text
    of at most 200 characters) and ``data_omitted`` giving the size of the whole: same id,
    type, vehicle, driver and time, so subscribers still see the fact once."""
    small = {k: v for k, v in event.data.items()
             if v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 200)}
    small["data_omitted"] = f"the event was {size} bytes, more than the broker accepts"
    return FleetEvent(event.id, event.type, event.vehicle_id, event.time, small, event.driver_id).to_json()


def event_of(row: Any) -> FleetEvent:
    """The event of an outbox row."""
    return FleetEvent(row["id"], row["type"], row["vehicle_id"], row["time"], row["data"], row["driver_id"])


class OutboxPublisher:
    """Sends the outbox's unpublished events to ``topic`` and marks them published.

    With ``probe_url``, the question asked for every batch ("is anything unpublished?")
    goes over a connection of its own, held open: a third of the CPU of asking through the
    pool, whose release resets the connection with one more round trip. :meth:`close`
    closes it."""

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, topic: str, metrics: PipelineMetrics,
                 *, batch: int = 500, probe_url: str | None = None) -> None:
        self._pool = pool
        self._producer = producer
        self.topic = topic
        self._metrics = metrics
        self._batch = batch
        self._probe_url = probe_url
        self._probe: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            try:
                await probe.close(timeout=5)
            except Exception:  # a connection already broken: nothing left to close cleanly
                probe.terminate()

    async def any_pending(self) -> bool:
        """Whether any event is unpublished: one indexed ``EXISTS``."""
        if self._probe_url is None:
            return bool(await self._pool.fetchval(_ANY_PENDING))
        async with self._probe_lock:
            probe = self._probe
            if probe is None or probe.is_closed():
                probe = self._probe = await asyncpg.connect(self._probe_url, timeout=CONNECT_TIMEOUT_SECONDS,
                                                            command_timeout=60)
            try:
                return bool(await probe.fetchval(_ANY_PENDING))
            except BaseException:
                self._probe = None  # connect afresh next time
                probe.terminate()
                raise

    async def publish_pending(self) -> int:
        """Publishes every event recorded (committed) before the call, and whatever comes
        in meanwhile, in rounds of ``batch``; returns how many this call sent. One query
        when there is nothing to publish. Raises what PostgreSQL or the producer raise
        (the round that failed is left unpublished, to be sent again)."""
        if not await self.any_pending():
            return 0
        async with self._pool.acquire() as conn:
            sent = 0
            while True:
                n = await self._publish_round(conn)
                sent += n
                if n < self._batch:
                    return sent

    async def _publish_round(self, conn: asyncpg.Connection) -> int:
        started = time.perf_counter()
        async with conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch)
            if not rows:
                return 0
            events = [event_of(row) for row in rows]
            futures = [await self._send(e) for e in events]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            for e, outcome in zip(events, outcomes):
                if isinstance(outcome, MessageSizeTooLargeError):  # the broker's own limit is lower
                    await (await self._send(e, reduced=True))
                elif isinstance(outcome, BaseException):
                    raise outcome
            await conn.execute(_MARK, [e.id for e in events])
        m = self._metrics
        m.events_publish_duration.observe(time.perf_counter() - started)
        for e in events:
            m.events_published.labels(type=e.type).inc()
        return len(events)

    async def _send(self, event: FleetEvent, *, reduced: bool = False) -> asyncio.Future[Any]:
        """Queues one event; returns the future of its acknowledgement. An event larger than
        the producer may send goes out reduced (:func:`reduced_value`) instead of blocking
        every event behind it."""
        value = event.to_json()
        if not reduced:
            try:
                return await self._producer.send(self.topic, value=value, key=event.key())
            except MessageSizeTooLargeError:
                pass
        log.warning("event too large for the broker, published without its large fields", event_id=str(event.id),
                    type=event.type, size=len(value))
        return await self._producer.send(self.topic, value=reduced_value(event, len(value)), key=event.key())

    async def count_backlog(self) -> int:
        """Counts the unpublished events into the backlog gauge; returns the count."""
        async with self._pool.acquire() as conn:
            n = int(await conn.fetchval(_BACKLOG))
        self._metrics.events_backlog.set(n)
        return n


class EventsStep:
    """The last step before the commit: the batch's events (and any others waiting) are
    published and acknowledged before its offsets become committable.

    A batch with no reading in PostgreSQL made no fact and costs nothing; any other costs
    one indexed ``EXISTS`` when no event is waiting. Transient failures are retried by
    ``retrier`` (dependency ``events``) until they succeed or the work is abandoned.
    """

    def __init__(self, next_step: Step[Stored], publisher: OutboxPublisher, retrier: Retrier) -> None:
        self.next_step = next_step
        self.publisher = publisher
        self._retry = retrier

    async def submit(self, item: Stored) -> None:
        if item.live:
            await self._retry("events", self.publisher.publish_pending)
        await self.next_step.submit(item)
