"""The telemetry pipeline's steps, in the order a reading goes through them.

``DecodeStep -> BatchingStep -> StoreStep -> StatusStep -> RulesStep -> TripsStep -> CommitStep``

Each is a small class with a named next step (:class:`~fleet_telemetry.consumers.chain.Step`),
so a test drives any one of them with a fake next step. The Kafka loop hands fetched
records to :class:`DecodeStep`; :class:`CommitStep` marks a batch's offsets committable
for the loop once PostgreSQL, the dead-letter topic, Redis and the rules have it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from uuid import UUID

import redis.exceptions
import structlog
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.batch import Batch
from fleet_telemetry.consumers.chain import Retrier, Step
from fleet_telemetry.consumers.deadletter import DeadLetters, refused, unknown_vehicle
from fleet_telemetry.consumers.decode import Decoded, Rules, decode_into
from fleet_telemetry.consumers.kafka_loop import Committable
from fleet_telemetry.consumers.sink import TelemetrySink, WriteOutcome
from fleet_telemetry.consumers.status import StatusWriter, newest_per_vehicle
from fleet_telemetry.core.metrics import PipelineMetrics, observe_many
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.retry import is_transient

log = structlog.get_logger("fleet.consumer")


@dataclass
class BatchResult:
    stored: int
    duplicates: int
    dead_lettered: int


@dataclass
class Stored:
    """A batch that is durable in PostgreSQL, with its dead letters acknowledged."""

    batch: Batch
    written: WriteOutcome
    result: BatchResult
    started: float
    """``time.perf_counter()`` when the batch's first write began."""

    @cached_property
    def live(self) -> list[Reading]:
        """The readings now in PostgreSQL: stored by this batch or before (duplicates)."""
        return self.written.stored + self.written.duplicates


class DecodeStep:
    """Kafka records to readings and rejections (:func:`~fleet_telemetry.consumers.decode.decode_message`),
    handed on as one :class:`Batch` per fetch with the offsets it covers."""

    def __init__(self, next_step: Step[Batch], metrics: PipelineMetrics, *,
                 max_future: timedelta, retention: timedelta) -> None:
        self.next_step = next_step
        self._metrics = metrics
        self._max_future = max_future
        self._retention = retention

    async def submit(self, item: Mapping[TopicPartition, Sequence[Any]]) -> None:
        time_rules = Rules(datetime.now(timezone.utc), self._max_future, self._retention)
        batch = Batch()
        out = Decoded(batch.readings, batch.rejections)
        for tp, messages in item.items():
            if not messages:
                continue
            topic, partition = tp.topic, tp.partition
            for msg in messages:
                decode_into(msg.value, msg.key, Source(topic, partition, msg.offset), time_rules, out)
            batch.note_range(tp, messages[0].offset, messages[-1].offset, len(messages))
            self._metrics.messages.inc(len(messages))
        await self.next_step.submit(batch)


class StoreStep:
    """PostgreSQL (the readings, exactly once), then the dead-letter topic (every rejection
    acknowledged by the broker): after this, no reading of the batch can be lost.

    Transient failures are retried by ``retrier`` until they succeed or are abandoned
    (:class:`~fleet_telemetry.consumers.chain.Abandoned`); anything else is raised.
    """

    def __init__(self, next_step: Step[Stored], sink: TelemetrySink, dead_letters: DeadLetters,
                 metrics: PipelineMetrics, retrier: Retrier) -> None:
        self.next_step = next_step
        self._sink = sink
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._retry = retrier

    async def submit(self, item: Batch) -> None:
        started = time.perf_counter()
        written: WriteOutcome = await self._retry("postgresql", lambda: self._sink.write(item.readings))
        copy_seconds = time.perf_counter() - started
        committed_at = datetime.now(timezone.utc)
        rejections = item.rejections + [unknown_vehicle(r) for r in written.unknown] + [
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
        result = BatchResult(len(written.stored), len(written.duplicates), len(rejections))
        await self.next_step.submit(Stored(item, written, result, started))


class StatusStep:
    """Redis statuses and last-known positions of the batch's newest readings.

    Both are derived data and best effort: when Redis (or PostgreSQL for the positions)
    is away, the skipped updates are counted and telemetry keeps flowing; statuses catch
    up with the next readings. Positions are written every ``positions_interval`` seconds.
    """

    def __init__(self, next_step: Step[Stored], status: StatusWriter | None, sink: TelemetrySink,
                 metrics: PipelineMetrics, *, positions_interval: float = 5.0) -> None:
        self.next_step = next_step
        self._status = status
        self._sink = sink
        self._metrics = metrics
        self._positions: dict[UUID, Reading] = {}
        self._positions_interval = positions_interval
        self._positions_flushed = time.monotonic()

    async def submit(self, item: Stored) -> None:
        live = item.live
        if live:
            newest = newest_per_vehicle(live)
            await self._update_status(newest)
            await self._update_positions(newest)
        await self.next_step.submit(item)

    async def _update_status(self, newest: dict[UUID, Reading]) -> None:
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

    async def _update_positions(self, newest: dict[UUID, Reading]) -> None:
        _keep_newest(self._positions, newest)
        await self.flush_positions_when_due()

    async def flush_positions_when_due(self) -> None:
        """Writes the positions gathered so far once ``positions_interval`` has passed since
        the last write (the pipeline also calls it while no batch comes)."""
        if self._positions and time.monotonic() - self._positions_flushed >= self._positions_interval:
            await self.flush_positions()

    async def flush_positions(self) -> None:
        """Writes the positions gathered so far; on a transient failure keeps them for the next flush."""
        pending, self._positions = self._positions, {}
        self._positions_flushed = time.monotonic()
        try:
            await self._sink.update_positions(pending)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("vehicle positions not updated, will retry", error=type(exc).__name__)
            _keep_newest(self._positions, pending)


def _keep_newest(positions: dict[UUID, Reading], newer: Mapping[UUID, Reading]) -> None:
    for vehicle_id, reading in newer.items():
        current = positions.get(vehicle_id)
        if current is None or reading.time > current.time:
            positions[vehicle_id] = reading


class RuleEvaluator(Protocol):
    """What the rules step needs of the rule engine (``RuleEngine``)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def after_write(self, readings: list[Reading]) -> None: ...


class RulesStep:
    """Geofences and alert rules over the batch's stored and duplicate readings (the rule engine).

    Blocks until the batch's states, transitions and alerts are committed; transient
    failures are retried by ``retrier`` (the engine re-reads what it needs after a
    failure, so a retry is safe). :meth:`start` and :meth:`stop` run the engine's timers.
    """

    def __init__(self, next_step: Step[Stored], engine: RuleEvaluator, retrier: Retrier) -> None:
        self.next_step = next_step
        self.engine = engine
        self._retry = retrier

    async def start(self) -> None:
        """Loads the geofences and starts the timers (refresh, offline, maintenance)."""
        await self.engine.start()

    async def stop(self) -> None:
        """Stops the timers and writes the states not written yet (best effort)."""
        await self.engine.stop()

    async def submit(self, item: Stored) -> None:
        live = item.live
        if live:
            # The stored readings and the duplicates: a duplicate may never have been
            # evaluated (a write that committed and then failed, a worker that died
            # before this step). The engine skips whatever is not newer than a vehicle's
            # last evaluated reading, so evaluating one twice changes nothing.
            await self._retry("postgresql", lambda: self.engine.after_write(live))
        await self.next_step.submit(item)


class TripTracking(Protocol):
    """What the trips step needs of the trips tracker (``TripTracker``)."""

    async def after_write(self, readings: list[Reading]) -> None: ...
    async def flush(self) -> None: ...


class TripsStep:
    """Trips, stops, idling and the accumulators over the batch's stored and duplicate
    readings (the trips tracker, :mod:`fleet_telemetry.trips`).

    Blocks until the batch's trip and stop rows, alerts, events and the states that go
    with them are committed; transient failures are retried by ``retrier`` (the tracker
    forgets the batch's vehicles after a failure and reads them back, so a retry is safe).
    """

    def __init__(self, next_step: Step[Stored], tracker: TripTracking, retrier: Retrier) -> None:
        self.next_step = next_step
        self.tracker = tracker
        self._retry = retrier

    async def stop(self) -> None:
        """Writes the states not written yet: best effort, 10 s at most (what is not
        written is caught up from ``vehicle_telemetry`` by the next owner)."""
        try:
            await asyncio.wait_for(self.tracker.flush(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - never mask why the worker stops
            log.warning("motion states not flushed at stop; the next owner catches up", error=type(exc).__name__)

    async def submit(self, item: Stored) -> None:
        live = item.live
        if live:
            # As for the rules: readings not newer than a vehicle's newest processed one change nothing.
            await self._retry("postgresql", lambda: self.tracker.after_write(live))
        await self.next_step.submit(item)


class CommitStep:
    """The last step: the batch's offsets become committable; the Kafka loop commits them."""

    def __init__(self, offsets: Committable, metrics: PipelineMetrics) -> None:
        self._offsets = offsets
        self._metrics = metrics

    async def submit(self, item: Stored) -> None:
        batch, result = item.batch, item.result
        self._offsets.mark(batch.offsets)
        self._metrics.committed_batches.inc()
        log.debug(
            "batch written",
            partitions={f"{tp.topic}[{tp.partition}]": [batch.first_offsets[tp], off - 1]
                        for tp, off in batch.offsets.items()},
            messages=batch.messages, rows=result.stored, duplicates=result.duplicates,
            dead_letters=result.dead_lettered,
            duration_ms=round((time.perf_counter() - item.started) * 1000, 1),
        )
