"""The telemetry worker: one member of the consumer group.

:func:`open_outputs` connects what the pipeline writes to (PostgreSQL, Redis, the
dead-letter producer, the rule engine); :class:`Worker` runs the
:class:`~fleet_telemetry.consumers.pipeline.TelemetryPipeline` in the
:class:`~fleet_telemetry.consumers.kafka_loop.KafkaLoop` on the telemetry topic.

Offsets are committed only for batches the pipeline's commit step has reached, so a
crash at any point means redelivery, never loss; redelivered readings are duplicates
the sink drops. SIGTERM (``Worker.stop``) finishes the in-flight batches within the
shutdown deadline, commits and leaves the group.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.chain import Abandoned
from fleet_telemetry.consumers.deadletter import DeadLetters, request_size
from fleet_telemetry.consumers.events import OutboxPublisher
from fleet_telemetry.consumers.health import HealthProbe, probe_interval
from fleet_telemetry.consumers.kafka_loop import KafkaLoop, LoopMetrics, LoopOptions, start_with_retry
from fleet_telemetry.consumers.pipeline import Outputs, TelemetryPipeline
from fleet_telemetry.consumers.sink import TelemetrySink, VehicleRegistry, create_pool
from fleet_telemetry.consumers.status import StatusWriter
from fleet_telemetry.core.errors import unavailable
from fleet_telemetry.core.health import Health
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.retry import Backoff, is_transient
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.ingest.topics import ensure_topics_if_allowed
from fleet_telemetry.trips.tracker import TripTracker

log = structlog.get_logger("fleet.consumer")


@asynccontextmanager
async def open_outputs(settings: Settings, metrics: PipelineMetrics,
                       give_up: asyncio.Event, within: float | None = None,
                       probe: HealthProbe | None = None) -> AsyncIterator[Outputs]:
    """PostgreSQL pool, Redis client, dead-letter producer and rule engine, closed on exit;
    ``probe`` is handed the pool to ask PostgreSQL through.

    Raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable` when PostgreSQL does
    not answer, or when ``give_up`` is set (or ``within`` seconds passed) while the
    broker is still away.
    """
    s = settings
    try:
        pool = await create_pool(s.database_url, max_size=4)
    except Exception as exc:
        if is_transient(exc):
            raise unavailable("PostgreSQL", s.database_url_masked, exc) from None
        raise
    if probe is not None:
        probe.pool = pool
    redis = connect_redis(s.redis_url)
    try:
        producer = await start_with_retry(lambda: start_producer(s, max_request_size=request_size(s.dlq_max_message_bytes)),
                                          bootstrap=s.kafka_bootstrap,
                                          retries=metrics.retries,
                                          backoff=Backoff(s.retry_initial_seconds, s.retry_max_seconds),
                                          give_up=give_up, within=within)
        events: OutboxPublisher | None = None
        try:
            await ensure_topics_if_allowed(s, [s.events_topic], partitions=s.events_topic_partitions)
            events = OutboxPublisher(pool, producer, s.events_topic, metrics, batch=s.events_publish_batch,
                                     probe_url=s.database_url)
            yield Outputs(
                sink=TelemetrySink(pool, VehicleRegistry(s.vehicle_cache_seconds)),
                dead_letters=DeadLetters(producer, s.dlq_topic, s.dlq_max_message_bytes),
                status=StatusWriter(redis, pool, s.status_ttl_seconds, s.raw_retention_days * 86_400, s.redis_keys),
                rules=RuleEngine(pool, redis, s, metrics) if s.rules_enabled else None,
                events=events,
                trips=TripTracker(pool, s, metrics) if s.trips_enabled else None,
            )
        finally:
            if events is not None:
                await events.close()
            await producer.stop()
    finally:
        await redis.aclose()
        await pool.close()


class Worker:
    """One member of the consumer group. ``run`` returns the process exit status."""

    def __init__(self, settings: Settings, *, metrics: PipelineMetrics | None = None,
                 stop_when_idle: float | None = None, worker_index: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics or PipelineMetrics()
        self.stop_when_idle = stop_when_idle
        self.worker_index = worker_index
        self._stopping = asyncio.Event()
        self._loop: KafkaLoop | None = None
        self.health = Health(settings.health_stale_seconds)
        """What ``/healthz`` and ``/readyz`` answer (kept up to date while ``run`` runs)."""

    def stop(self) -> None:
        """Ask the worker to finish its in-flight work, commit and leave (signal-safe)."""
        self._stopping.set()

    def assignment(self) -> set[TopicPartition]:
        """The partitions this worker owns now."""
        return set() if self._loop is None else self._loop.assignment()

    def paused(self) -> set[TopicPartition]:
        """The partitions this worker has paused because its writer is behind."""
        return set() if self._loop is None else self._loop.paused()

    def _loop_options(self) -> LoopOptions:
        s = self.settings
        return LoopOptions.from_settings(
            s, topics=[s.telemetry_topic], group=s.consumer_group,
            consumer_options={
                "max_partition_fetch_bytes": 4 * 1024 * 1024,
                # A fetch never waits on the broker longer than a batch may age.
                "fetch_max_wait_ms": min(500, s.batch_max_age_ms),
            },
            fetch_timeout_ms=min(s.batch_max_age_ms, 200),
            stop_when_idle=self.stop_when_idle,
            log_fields={"worker": self.worker_index},
        )

    async def run(self) -> int:
        """Blocks until stopped (or idle with ``stop_when_idle``): 0 after a clean stop, 1
        when work was left unwritten or uncommitted at the shutdown deadline (it will be
        redelivered). Raises ``ServiceUnavailable`` when PostgreSQL does not answer at
        start-up, or the broker did not within ``stop_when_idle`` seconds."""
        m = self.metrics
        probe = HealthProbe(self.health, probe_interval(self.settings.health_stale_seconds))
        async with probe.running(), open_outputs(self.settings, m, self._stopping, self.stop_when_idle,
                                                 probe) as outputs:
            pipeline = TelemetryPipeline(self.settings, outputs, m)
            self._loop = probe.loop = KafkaLoop(
                pipeline, self._loop_options(),
                LoopMetrics(m.retries, m.commit_duration, m.consumer_lag, m.paused_partitions, m.consumer_lag_seconds),
                stopping=self._stopping,
            )
            try:
                return await self._loop.run()
            except Abandoned as exc:
                log.error("stopped with work unwritten; it will be redelivered", detail=str(exc))
                return 1
