"""The telemetry pipeline as the Kafka loop's strategy: the steps of
:mod:`~fleet_telemetry.consumers.stages` joined in order.

::

    decode -> batching -> [writer task] store -> [publisher task] status -> rules -> trips -> events -> commit

Each task binds the batch's trace id to the log context while it handles the batch, so
the log lines of one batch share a ``trace_id``. The writer task takes at most
``max_batches_in_flight`` batches waiting; while that
queue is full the loop pauses its partitions. The publisher task takes one, so one
batch's Redis, rules and trips work overlaps the next batch's COPY. Only the commit step
marks offsets committable, in batch order; the events step just before it publishes the
outbound events the batch (or anyone) recorded. A timer writes the last-known positions
gathered by the status step when they are due, also when no batch follows; another
publishes the outbox rows no batch picks up (:mod:`~fleet_telemetry.consumers.events`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

import structlog

from fleet_telemetry.consumers.batch import Batch, BatchingStep, BatchLimits
from fleet_telemetry.consumers.chain import InTask, Retrier, Step, Traced
from fleet_telemetry.consumers.deadletter import DeadLetters
from fleet_telemetry.consumers.events import EventsStep, OutboxPublisher
from fleet_telemetry.consumers.kafka_loop import Committable, Records
from fleet_telemetry.consumers.sink import TelemetrySink
from fleet_telemetry.consumers.stages import (
    CommitStep, DecodeStep, RuleEvaluator, RulesStep, StatusStep, Stored, StoreStep, TripsStep, TripTracking,
)
from fleet_telemetry.consumers.status import StatusWriter
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.retry import Backoff, is_transient
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.consumer")


@dataclass(frozen=True)
class Outputs:
    """Where the pipeline writes; opened and closed by its owner."""

    sink: TelemetrySink
    dead_letters: DeadLetters
    status: StatusWriter | None
    rules: RuleEvaluator | None
    events: OutboxPublisher | None = None
    """Publishes the outbound events; None: nothing is published."""
    trips: TripTracking | None = None
    """Trips, stops, idling and the accumulators; None: not tracked."""


def _batch_trace(batch: Batch) -> str:
    return batch.trace_id


def _stored_trace(stored: Stored) -> str:
    return stored.batch.trace_id


POSITIONS_TICK_SECONDS = 1.0
"""How often the positions timer looks whether gathered positions are due to be written."""


class TelemetryPipeline:
    """The :class:`~fleet_telemetry.consumers.kafka_loop.Strategy` of the telemetry worker."""

    def __init__(self, settings: Settings, outputs: Outputs, metrics: PipelineMetrics) -> None:
        s = settings
        self.offsets = Committable()
        self.retrier = Retrier(metrics.retries, lambda: Backoff(s.retry_initial_seconds, s.retry_max_seconds))
        after_status: Step[Stored] = CommitStep(self.offsets, metrics)
        # The events step stays the last before the commit, whatever steps come before it.
        self.events: EventsStep | None = None
        if outputs.events is not None:
            self.events = EventsStep(after_status, outputs.events, self.retrier)
            after_status = self.events
        self._events_interval = s.events_drain_seconds
        self.trips: TripsStep | None = None
        if outputs.trips is not None:
            self.trips = TripsStep(after_status, outputs.trips, self.retrier)
            after_status = self.trips
        self.rules: RulesStep | None = None
        if outputs.rules is not None:
            self.rules = RulesStep(after_status, outputs.rules, self.retrier)
            after_status = self.rules
        self.status = StatusStep(after_status, outputs.status, outputs.sink, metrics)
        self.publisher: InTask[Stored] = InTask(Traced(self.status, _stored_trace), maxsize=1,
                                                name="fleet-publisher")
        self.store = StoreStep(self.publisher, outputs.sink, outputs.dead_letters, metrics, self.retrier)
        self.writer: InTask[Batch] = InTask(Traced(self.store, _batch_trace), maxsize=s.max_batches_in_flight,
                                            name="fleet-writer")
        self.batching = BatchingStep(self.writer, BatchLimits(s.batch_max_readings, s.batch_max_age_ms / 1000))
        self.decode = DecodeStep(self.batching, metrics, max_future=timedelta(seconds=s.max_future_seconds),
                                 retention=timedelta(days=s.raw_retention_days))
        metrics.batches_in_flight.set_function(lambda: self.batches_in_flight)
        self._positions_timer: asyncio.Task[None] | None = None
        self._events_timer: asyncio.Task[None] | None = None

    @property
    def batches_in_flight(self) -> int:
        """Batches handed to the writer and not yet committable."""
        return self.writer.pending + self.publisher.pending

    @property
    def in_flight(self) -> int:
        return self.batching.pending + self.batches_in_flight

    @property
    def backpressure(self) -> bool:
        return self.writer.full

    async def start(self) -> None:
        if self.rules is not None:
            await self.rules.start()
        self.writer.start()
        self.publisher.start()
        self._positions_timer = asyncio.create_task(self._write_positions_when_due(), name="fleet-positions")
        if self.events is not None:
            self._events_timer = asyncio.create_task(self._drain_events(self.events.publisher),
                                                     name="fleet-events-drain")

    async def stop(self) -> None:
        for timer in (self._positions_timer, self._events_timer):
            if timer is not None:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer
        self._positions_timer = self._events_timer = None
        if self.rules is not None:
            await self.rules.stop()
        await self.writer.stop()
        await self.publisher.stop()
        if self.trips is not None:
            await self.trips.stop()

    async def _write_positions_when_due(self) -> None:
        while True:
            await asyncio.sleep(POSITIONS_TICK_SECONDS)
            await self.status.flush_positions_when_due()

    async def _drain_events(self, publisher: OutboxPublisher) -> None:
        """Publishes the outbox rows no batch picks up and counts the backlog, every
        ``FLEET_EVENTS_DRAIN_SECONDS``; a transient failure waits for the next turn."""
        while True:
            await asyncio.sleep(self._events_interval)
            try:
                await publisher.publish_pending()
                await publisher.count_backlog()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("outbound events not published, will retry", error=type(exc).__name__)

    def _check(self) -> None:
        """Raises the failure that ended one of the pipeline's tasks (a bug in a later step)."""
        self.writer.check()
        self.publisher.check()
        for timer in (self._positions_timer, self._events_timer):
            if timer is not None and timer.done():
                timer.result()

    def room(self) -> int:
        return self.batching.room()

    async def submit(self, records: Records) -> None:
        await self.decode.submit(records)

    async def poll(self) -> None:
        self._check()
        await self.batching.poll()

    async def handover(self) -> None:
        await self.batching.flush()
        await self.writer.join()
        await self.publisher.join()

    def abandon(self) -> None:
        self.retrier.abandon()

    async def close(self) -> None:
        self._check()
        await self.status.flush_positions()
