"""What a chunk becomes: decoded as the consumer decodes, then stored or published.

A :class:`Plan` says how every chunk of one replay is handled; :func:`processor_for`
gives the processor of its mode:

* :class:`DirectProcessor` (``--direct``): through the consumer's sink
  (:class:`fleet_telemetry.consumers.sink.TelemetrySink`) into PostgreSQL; readings older
  than the raw retention are folded into the rollups only
  (:func:`fleet_telemetry.lifecycle.rollups.fold_into_rollups`);
* :class:`ViaKafkaProcessor` (``--via-kafka``): readings of registered vehicles published
  to the telemetry topic with :class:`fleet_telemetry.ingest.producer.TelemetryProducer`.

Decoding rules of a replay (docs/replay.md): ``now`` is the replay's start; a reading
more than ``FLEET_MAX_FUTURE_SECONDS`` ahead of it is rejected (``future_time``).
``--direct`` accepts readings of any age (older than ``FLEET_RAW_RETENTION_DAYS`` they
go to the rollups only); ``--via-kafka`` rejects those older than the raw retention
(``outside_retention``) as the consumer would. Readings of unregistered vehicles are
rejected (``unknown_vehicle``) in both modes, so nothing is published that the
pipeline would dead-letter again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, TypeVar

import structlog

from fleet_telemetry.consumers.deadletter import unknown_vehicle
from fleet_telemetry.consumers.decode import Decoded, Rules, decode_into
from fleet_telemetry.consumers.sink import TelemetrySink, VehicleRegistry, WriteOutcome, create_pool
from fleet_telemetry.core.errors import unavailable
from fleet_telemetry.core.reading import Reading, Rejection
from fleet_telemetry.core.retry import Backoff, is_transient, retry
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.results import DIRECT, VIA_KAFKA, ChunkResult, Counts, reject_line
from fleet_telemetry.replay.sources import Lines, Records, messages
from fleet_telemetry.trips.store import mark_for_recompute

log = structlog.get_logger("fleet.replay")
T = TypeVar("T")

_EARLIEST: Final = datetime(1, 1, 2, tzinfo=timezone.utc)

_EXISTING = """
SELECT t.vehicle_id, t.time
  FROM vehicle_telemetry t
  JOIN unnest($1::uuid[], $2::timestamptz[]) AS u(vehicle_id, time)
    ON t.vehicle_id = u.vehicle_id AND t.time = u.time
 WHERE t.time BETWEEN $3 AND $4
"""


@dataclass(frozen=True)
class Plan:
    """How every chunk of one replay is handled (sent to the worker processes)."""

    mode: str
    dry_run: bool
    rules: Rules
    fold_before: datetime | None
    """``--direct``: readings older than this go to the rollups only."""

    @classmethod
    def of(cls, settings: Settings, mode: str, dry_run: bool, now: datetime) -> Plan:
        """The plan of a replay started at ``now`` (the decoding rules above)."""
        max_future = timedelta(seconds=settings.max_future_seconds)
        raw_retention = timedelta(days=settings.raw_retention_days)
        if mode == DIRECT:
            return cls(DIRECT, dry_run, Rules(now, max_future, now - _EARLIEST), now - raw_retention)
        return cls(VIA_KAFKA, dry_run, Rules(now, max_future, raw_retention), None)


async def _connect(service: str, address: str, start: Callable[[], Awaitable[T]]) -> T:
    """Runs ``start``; a transient failure is raised as "``service`` at ``address`` is not answering"."""
    try:
        return await start()
    except Exception as exc:
        if is_transient(exc):
            raise unavailable(service, address, exc) from None
        raise


def _log_retry(exc: BaseException, delay: float, attempt: int) -> None:
    log.warning("retrying after a transient failure", error=type(exc).__name__,
                detail=str(exc)[:200], retry_in_s=round(delay, 2), attempt=attempt)


class ChunkProcessor:
    """Decodes a chunk and hands its readings to the mode's :meth:`_write`. One per process.

    :meth:`process` blocks on PostgreSQL (and Kafka in ``--via-kafka`` mode); transient
    failures are retried with backoff until they succeed, anything else is raised.
    """

    def __init__(self, settings: Settings, plan: Plan) -> None:
        self._settings = settings
        self._plan = plan
        self._pool: Any = None
        self._registry = VehicleRegistry(settings.vehicle_cache_seconds)

    async def start(self) -> None:
        """Connects to PostgreSQL; raises :class:`ServiceUnavailable` if it does not answer."""
        s = self._settings
        self._pool = await _connect("PostgreSQL", s.database_url_masked,
                                    lambda: create_pool(s.database_url, min_size=1, max_size=2))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def process(self, payload: Lines | Records) -> ChunkResult:
        """The chunk's counts and rejects lines, once its readings are written."""
        decoded = Decoded()
        readings, rejections = decoded.readings, decoded.rejections
        dead_letters: dict[tuple[int, int], dict[str, str]] = {}
        rules = self._plan.rules
        for key, value, source, dead_letter in messages(payload, rejections):
            decode_into(value, key, source, rules, decoded)
            if dead_letter is not None:
                dead_letters[(source.partition, source.offset)] = dead_letter
        result = ChunkResult(Counts(read=len(readings) + len(rejections)))
        await self._write(readings, rejections, result.counts)
        if rejections:
            rejections.sort(key=lambda r: (r.source.partition, r.source.offset, r.source.index or 0))
            from_file = isinstance(payload, Lines)
            result.rejects = b"".join(
                reject_line(r, dead_letters.get((r.source.partition, r.source.offset)), from_file)
                for r in rejections
            )
            result.counts.rejected = Counter(r.reason for r in rejections)
        return result

    async def _write(self, readings: list[Reading], rejections: list[Rejection], counts: Counts) -> None:
        """Writes (or, in a dry run, judges) ``readings``; adds what it refuses to ``rejections``."""
        raise NotImplementedError

    async def _known(self, readings: list[Reading], rejections: list[Rejection]) -> list[Reading]:
        """The readings of registered vehicles; the others become ``unknown_vehicle`` rejections."""
        async with self._pool.acquire() as conn:
            unknown = await self._registry.unknown(conn, {r.vehicle_id for r in readings})
        if not unknown:
            return readings
        rejections.extend(unknown_vehicle(r) for r in readings if r.vehicle_id in unknown)
        return [r for r in readings if r.vehicle_id not in unknown]

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        s = self._settings
        return await retry(operation, what="replay chunk", on_retry=_log_retry,
                           backoff=Backoff(s.retry_initial_seconds, s.retry_max_seconds))


class DirectProcessor(ChunkProcessor):
    """``--direct``: recent readings through the sink, older ones into the rollups."""

    def __init__(self, settings: Settings, plan: Plan) -> None:
        super().__init__(settings, plan)
        self._sink: TelemetrySink | None = None

    async def start(self) -> None:
        await super().start()
        self._sink = TelemetrySink(self._pool, self._registry)

    async def _write(self, readings: list[Reading], rejections: list[Rejection], counts: Counts) -> None:
        assert self._sink is not None
        sink = self._sink
        dry_run = self._plan.dry_run
        fold_before = self._plan.fold_before
        recent, old = readings, []
        if fold_before is not None and any(r.time < fold_before for r in readings):
            recent = [r for r in readings if r.time >= fold_before]
            old = [r for r in readings if r.time < fold_before]
        if recent:
            if dry_run:
                written = await self._retry(lambda: self._probe(recent))
            else:
                written = await self._retry(lambda: sink.write(recent))
            counts.stored += len(written.stored)
            counts.duplicates += len(written.duplicates)
            rejections.extend(unknown_vehicle(r) for r in written.unknown)
            if not dry_run:
                # The trips stage never sees these: their hours are recomputed by `fleet
                # maintain`. Duplicates too: after a crash between the write and the mark, the
                # resumed chunk finds its readings stored already (a recomputation that
                # changes nothing only costs time).
                touched = written.stored + written.duplicates
                await self._retry(lambda: self._mark_trips(touched))
        if old:
            known = await self._retry(lambda: self._known(old, rejections))
            if dry_run:
                counts.folded += len(known)
            elif known:
                folded = await self._retry(lambda: self._fold(known))
                counts.folded += folded
                counts.duplicates += len(known) - folded

    async def _mark_trips(self, readings: list[Reading]) -> None:
        async with self._pool.acquire() as conn:
            await mark_for_recompute(conn, readings)

    async def _fold(self, readings: list[Reading]) -> int:
        """Merges readings older than the raw retention into the rollups (commits per day)."""
        from fleet_telemetry.lifecycle.rollups import fold_into_rollups

        async with self._pool.acquire() as conn:
            return int(await fold_into_rollups(conn, readings))

    async def _probe(self, readings: list[Reading]) -> WriteOutcome:
        """``--dry-run``: what :meth:`TelemetrySink.write` would do, without writing."""
        outcome = WriteOutcome()
        async with self._pool.acquire() as conn:
            unknown = await self._registry.unknown(conn, {r.vehicle_id for r in readings})
            outcome.unknown = [r for r in readings if r.vehicle_id in unknown]
            known = [r for r in readings if r.vehicle_id not in unknown]
            if not known:
                return outcome
            rows = await conn.fetch(
                _EXISTING, [r.vehicle_id for r in known], [r.time for r in known],
                min(r.time for r in known), max(r.time for r in known),
            )
        seen = {(row["vehicle_id"], row["time"]) for row in rows}
        for reading in known:
            if reading.identity in seen:
                outcome.duplicates.append(reading)
            else:
                seen.add(reading.identity)
                outcome.stored.append(reading)
        return outcome


class ViaKafkaProcessor(ChunkProcessor):
    """``--via-kafka``: readings of registered vehicles published to the telemetry topic,
    in source order; each chunk is flushed to the broker before it counts as done."""

    def __init__(self, settings: Settings, plan: Plan) -> None:
        super().__init__(settings, plan)
        self._producer: Any = None

    async def start(self) -> None:
        """Connects to PostgreSQL and (unless a dry run) Kafka; raises
        :class:`ServiceUnavailable` if one does not answer."""
        await super().start()
        if self._plan.dry_run:
            return
        from fleet_telemetry.ingest.producer import TelemetryProducer

        s = self._settings
        producer = TelemetryProducer(s)
        await _connect("Kafka", s.kafka_bootstrap, producer.start)
        self._producer = producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        await super().close()

    async def _write(self, readings: list[Reading], rejections: list[Rejection], counts: Counts) -> None:
        known = await self._retry(lambda: self._known(readings, rejections))
        if self._producer is not None and known:
            for reading in known:
                await self._producer.send(reading.to_json())
            await self._producer.flush()
        counts.published += len(known)


def processor_for(settings: Settings, plan: Plan) -> ChunkProcessor:
    """The processor of the plan's mode."""
    if plan.mode == DIRECT:
        return DirectProcessor(settings, plan)
    return ViaKafkaProcessor(settings, plan)
