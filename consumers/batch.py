"""Batches: decoded readings and rejections, with the offsets they make committable.

A :class:`Batch` carries, per partition, the next offset to commit once the batch is
durable; offsets travel with the data. :class:`BatchProcessor` takes a batch through
the sink, the dead-letter topic and Redis, retrying transient failures, and is driven
by the worker (or by a test) without knowing about the Kafka consumer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

import redis.exceptions
import structlog
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.deadletter import DeadLetters, refused, unknown_vehicle
from fleet_telemetry.core.metrics import PipelineMetrics, observe_many
from fleet_telemetry.core.retry import Backoff, is_transient
from fleet_telemetry.consumers.sink import TelemetrySink, WriteOutcome
from fleet_telemetry.consumers.status import StatusWriter, newest_per_vehicle
from fleet_telemetry.core.reading import Reading, Rejection

log = structlog.get_logger("fleet.consumer")
T = TypeVar("T")


class Abandoned(Exception):
    """Shutdown's deadline passed while a batch was still failing; nothing was committed."""


@dataclass
class Batch:
    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Per partition, the offset after the last record in this batch."""
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    messages: int = 0
    started: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.readings) + len(self.rejections)

    def age(self) -> float:
        return time.monotonic() - self.started

    def note_offset(self, tp: TopicPartition, offset: int) -> None:
        self.first_offsets.setdefault(tp, offset)
        self.offsets[tp] = offset + 1
        self.messages += 1


@dataclass
class BatchResult:
    stored: int
    duplicates: int
    dead_lettered: int


@dataclass
class Stored:
    """A batch that is durable in PostgreSQL, with its dead letters acknowledged."""

    written: WriteOutcome
    result: BatchResult


class BatchProcessor:
    """Writes one batch everywhere it must go; returns when the offsets may be committed.

    Two steps, so a worker can overlap one batch's second step with the next batch's
    first: :meth:`store` writes PostgreSQL (the readings, exactly once), then the
    dead-letter topic (every rejection acknowledged by the broker); :meth:`publish`
    writes what derives from them: Redis statuses (best effort: when Redis is down the
    skipped updates are counted and telemetry keeps flowing), last-known positions and
    the ``after_write`` hook (geofences and alerts). Transient
    PostgreSQL and Kafka failures are retried with backoff until they succeed or
    :meth:`abandon` is called; anything else is raised.
    """

    def __init__(
        self,
        sink: TelemetrySink,
        dead_letters: DeadLetters,
        status: StatusWriter | None,
        metrics: PipelineMetrics,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        positions_interval: float = 5.0,
        after_write: Callable[[list[Reading]], Awaitable[None]] | None = None,
    ) -> None:
        self._sink = sink
        self._dead_letters = dead_letters
        self._status = status
        self._metrics = metrics
        self._backoff = backoff
        self._abandoned = asyncio.Event()
        self._positions: dict = {}
        self._positions_interval = positions_interval
        self._positions_flushed = time.monotonic()
        self._after_write = after_write

    def abandon(self) -> None:
        """Stop retrying: the batch under retry raises :class:`Abandoned`."""
        self._abandoned.set()

    async def _retry(self, dependency: str, operation: Callable[[], Awaitable[T]]) -> T:
        backoff = self._backoff()
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._abandoned.is_set():
                    raise Abandoned(f"{dependency} still failing at shutdown: {type(exc).__name__}") from exc
                delay = backoff.next_delay()
                self._metrics.retries.labels(dependency=dependency).inc()
                log.warning("retrying after a transient failure", dependency=dependency,
                            error=type(exc).__name__, detail=str(exc)[:200], retry_in_s=round(delay, 2),
                            attempt=backoff.attempts)
                try:
                    await asyncio.wait_for(self._abandoned.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass

    async def store(self, batch: Batch) -> Stored:
        """PostgreSQL and the dead-letter topic: after this, no reading of the batch can be lost."""
        started = time.perf_counter()
        written: WriteOutcome = await self._retry("postgresql", lambda: self._sink.write(batch.readings))
        copy_seconds = time.perf_counter() - started
        committed_at = datetime.now(timezone.utc)
        rejections = batch.rejections + [unknown_vehicle(r) for r in written.unknown] + [
            refused(r, reason) for r, reason in written.refused]
        await self._retry("kafka", lambda: self._dead_letters.publish(rejections))

        m = self._metrics
        if written.stored:
            m.copy_duration.observe(copy_seconds)
            m.batch_size.observe(len(written.stored))
            observe_many(m.ingest_latency, [(committed_at - r.time).total_seconds() for r in written.stored])
        m.readings.labels(outcome="stored").inc(len(written.stored))
        m.readings.labels(outcome="duplicate").inc(len(written.duplicates))
        m.readings.labels(outcome="dead_lettered").inc(len(rejections))
        for rejection in rejections:
            m.dead_letters.labels(reason=rejection.reason).inc()
        return Stored(written, BatchResult(len(written.stored), len(written.duplicates), len(rejections)))

    async def publish(self, stored: Stored) -> None:
        """What is derived from the stored readings: statuses, positions, geofences and alerts."""
        written = stored.written
        live = written.stored + written.duplicates
        if live:
            newest = newest_per_vehicle(live)
            await self._update_status(newest)
            await self._update_positions(newest)
            after_write = self._after_write
            if after_write is not None:
                # The hook re-reads what it needs after a failure, so a retry is safe.
                await self._retry("postgresql", lambda: after_write(written.stored))

    async def _update_status(self, newest: dict) -> None:
        if self._status is None:
            return
        started = time.perf_counter()
        try:
            await self._status.update(newest)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._metrics.status_updates_skipped.inc(len(newest))
            dependency = "redis" if isinstance(exc, redis.exceptions.RedisError) else "postgresql"
            log.warning("status updates skipped; statuses catch up with the next readings",
                        vehicles=len(newest), dependency=dependency, error=type(exc).__name__)
            return
        self._metrics.status_duration.observe(time.perf_counter() - started)

    async def _update_positions(self, newest: dict) -> None:
        """Last-known positions in PostgreSQL, flushed every few seconds (derived data)."""
        for vehicle_id, reading in newest.items():
            current = self._positions.get(vehicle_id)
            if current is None or reading.time > current.time:
                self._positions[vehicle_id] = reading
        if time.monotonic() - self._positions_flushed < self._positions_interval:
            return
        await self.flush_positions()

    async def flush_positions(self) -> None:
        pending, self._positions = self._positions, {}
        self._positions_flushed = time.monotonic()
        try:
            await self._sink.update_positions(pending)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("vehicle positions not updated, will retry", error=type(exc).__name__)
            for vehicle_id, reading in pending.items():  # keep them for the next flush
                current = self._positions.get(vehicle_id)
                if current is None or reading.time > current.time:
                    self._positions[vehicle_id] = reading
