"""The consumer worker: the one place that touches the Kafka consumer.

Lifecycle of one worker::

    start: PostgreSQL pool, Redis, dead-letter producer, consumer joins the group
    loop:  fetch -> decode into the open batch -> hand full (or old) batches to the
           writer task (PostgreSQL, dead letters), which hands them to the publisher
           task (Redis, positions, geofences and alerts) -> commit offsets of batches
           the publisher has finished (partitions paused while the writer is
           ``max_batches_in_flight`` behind)
    revoke: the open batch is handed over, the writer drains, offsets are committed,
           then the partitions go
    stop (SIGTERM, Ctrl-C, idle in burst mode): stop fetching, flush, drain with a
           deadline, commit, leave the group

Offsets are committed only for batches that the :class:`~fleet_telemetry.consumers.batch.BatchProcessor`
has finished, so a crash at any point means redelivery, never loss; redelivered
readings are duplicates the sink drops.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from fleet_telemetry.consumers.alerts import RuleEngine
from fleet_telemetry.consumers.batch import Abandoned, Batch, BatchProcessor, Stored
from fleet_telemetry.consumers.deadletter import DeadLetters
from fleet_telemetry.consumers.decode import Rules, decode_message
from fleet_telemetry.core.metrics import PipelineMetrics, serve
from fleet_telemetry.core.retry import Backoff, is_transient
from fleet_telemetry.consumers.sink import TelemetrySink, VehicleRegistry, create_pool
from fleet_telemetry.consumers.status import StatusWriter
from fleet_telemetry.core.errors import FleetError, ServiceUnavailable, UsageError
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.core.reading import Source
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.consumer")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker") -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self._worker.handover(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Worker:
    """One member of the consumer group. ``run`` returns the process exit status."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: PipelineMetrics | None = None,
        stop_when_idle: float | None = None,
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or PipelineMetrics()
        self.stop_when_idle = stop_when_idle
        self.worker_index = worker_index
        self._stopping = asyncio.Event()
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=settings.max_batches_in_flight)
        self._stored: asyncio.Queue[tuple[Batch, Stored, float]] = asyncio.Queue(maxsize=1)
        self._open = Batch()
        self._committable: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._processor: BatchProcessor | None = None
        self._paused = False
        self._in_flight = 0

    def stop(self) -> None:
        """Ask the worker to finish its in-flight work, commit and leave (signal-safe)."""
        self._stopping.set()

    # --- the writer task -----------------------------------------------------

    async def _writer(self) -> None:
        """Step one of each batch, in order: PostgreSQL and dead letters."""
        assert self._processor is not None
        while True:
            batch = await self._queue.get()
            try:
                started = time.perf_counter()
                stored = await self._processor.store(batch)
                await self._stored.put((batch, stored, started))
            except BaseException:
                self._in_flight -= 1
                raise
            finally:
                self._queue.task_done()

    async def _publisher(self) -> None:
        """Step two, in the same order: statuses, positions, rules; then the batch is committable."""
        assert self._processor is not None
        while True:
            batch, stored, started = await self._stored.get()
            try:
                await self._processor.publish(stored)
                for tp, offset in batch.offsets.items():
                    self._committable[tp] = max(offset, self._committable.get(tp, 0))
                self.metrics.committed_batches.inc()
                result = stored.result
                log.debug(
                    "batch written",
                    partitions={f"{tp.topic}[{tp.partition}]": [batch.first_offsets[tp], off - 1]
                                for tp, off in batch.offsets.items()},
                    messages=batch.messages, rows=result.stored, duplicates=result.duplicates,
                    dead_letters=result.dead_lettered,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )
            finally:
                self._in_flight -= 1
                self.metrics.batches_in_flight.set(self._in_flight)
                self._stored.task_done()

    async def _hand_over_open_batch(self) -> None:
        if self._open.messages == 0:
            return
        batch, self._open = self._open, Batch()
        self._in_flight += 1
        self.metrics.batches_in_flight.set(self._in_flight)
        await self._queue.put(batch)

    async def handover(self, revoked: set[TopicPartition]) -> None:
        """Before partitions go: write everything fetched so far and commit it."""
        deadline = self.settings.shutdown_timeout_seconds
        try:
            await asyncio.wait_for(self._hand_over_open_batch(), deadline)
            await self._drain(deadline)
        except asyncio.TimeoutError:
            # Nothing of the revoked partitions is committed; their new owner reads them
            # again from the last commit and the sink drops what was already stored.
            log.error("partitions revoked before their batches were written; they will be redelivered",
                      deadline_s=deadline)
        await self._commit(final=True)
        for tp in revoked:
            self._committable.pop(tp, None)
            self._committed.pop(tp, None)
            try:
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        log.info("partitions revoked after commit", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def _drain(self, timeout: float | None = None) -> None:
        async def both() -> None:
            await self._queue.join()
            await self._stored.join()

        await asyncio.wait_for(both(), timeout)

    # --- commits and lag -------------------------------------------------------

    async def _commit(self, final: bool = False) -> None:
        consumer = self._consumer
        if consumer is None or not self._committable:
            return
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in self._committable.items()
                   if tp in assigned and off > self._committed.get(tp, -1)}
        if not offsets:
            return
        started = time.perf_counter()
        backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        while True:
            try:
                await consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
                break
            except (CommitFailedError, IllegalStateError) as exc:
                # The group moved on; these partitions belong to someone else now and
                # will be redelivered from the last commit (duplicates are dropped).
                log.warning("offset commit refused by the group", error=type(exc).__name__)
                return
            except KafkaError as exc:
                if not (final and is_transient(exc)):
                    log.warning("offset commit failed, will retry", error=type(exc).__name__)
                    self.metrics.retries.labels(dependency="kafka").inc()
                    return
                self.metrics.retries.labels(dependency="kafka").inc()
                await asyncio.sleep(backoff.next_delay())
        self.metrics.commit_duration.observe(time.perf_counter() - started)
        self._committed.update(offsets)

    def _update_lag(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            committed = self._committed.get(tp)
            if committed is None:
                continue
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - committed))

    def _set_paused(self, paused: bool) -> None:
        consumer = self._consumer
        assert consumer is not None
        if paused == self._paused:
            return
        assignment = list(consumer.assignment())
        if paused:
            consumer.pause(*assignment)
            self.metrics.paused_partitions.set(len(assignment))
            log.info("writer behind, partitions paused", partitions=len(assignment))
        else:
            consumer.resume(*consumer.paused())
            self.metrics.paused_partitions.set(0)
        self._paused = paused

    # --- the main loop -----------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        try:
            pool = await create_pool(s.database_url, max_size=4)
        except Exception as exc:
            if is_transient(exc):
                raise ServiceUnavailable(
                    f"PostgreSQL at {s.database_url_masked} is not answering ({type(exc).__name__});"
                    " start it (fleet services up) or set FLEET_DATABASE_URL"
                ) from None
            raise
        redis = aioredis.Redis.from_url(s.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        producer: AIOKafkaProducer | None = None
        consumer: AIOKafkaConsumer | None = None
        tasks: list[asyncio.Task[None]] = []
        rules = RuleEngine(pool, redis, s, self.metrics) if s.rules_enabled else None
        try:
            if rules is not None:
                await rules.start()  # geofences loaded; timers (refresh, offline, maintenance) run
            producer = await self._start_with_retry("kafka", lambda: start_producer(self.settings))
            self._processor = BatchProcessor(
                TelemetrySink(pool, VehicleRegistry(s.vehicle_cache_seconds)),
                DeadLetters(producer, s.dlq_topic),
                StatusWriter(redis, pool, s.status_ttl_seconds),
                self.metrics,
                backoff=lambda: Backoff(s.retry_initial_seconds, s.retry_max_seconds),
                after_write=None if rules is None else rules.after_write,
            )
            consumer = AIOKafkaConsumer(
                group_id=s.consumer_group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024,
                # A fetch never waits on the broker longer than a batch may age.
                fetch_max_wait_ms=min(500, s.batch_max_age_ms),
                **s.kafka_client_options(),  # type: ignore[arg-type]
            )
            consumer.subscribe([s.telemetry_topic], listener=_Rebalance(self))
            self._consumer = consumer
            await self._start_with_retry("kafka", consumer.start)
            log.info("consumer started", topic=s.telemetry_topic, group=s.consumer_group,
                     worker=self.worker_index)
            tasks = [asyncio.create_task(self._writer(), name="fleet-writer"),
                     asyncio.create_task(self._publisher(), name="fleet-publisher")]
            await self._loop(consumer, tasks)
            return await self._shutdown(tasks)
        except Abandoned as exc:
            log.error("stopped with work unwritten; it will be redelivered", detail=str(exc))
            return 1
        finally:
            if rules is not None:
                await rules.stop()
            for task in tasks:
                if not task.done():
                    task.cancel()
            if consumer is not None:
                await consumer.stop()  # leaves the group
            if producer is not None:
                await producer.stop()
            await redis.aclose()
            await pool.close()

    async def _start_with_retry(self, dependency: str, start: Any) -> Any:
        backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        while True:
            try:
                return await start()
            except Exception as exc:
                if not is_transient(exc) or self._stopping.is_set():
                    raise
                delay = backoff.next_delay()
                self.metrics.retries.labels(dependency=dependency).inc()
                log.warning("kafka not reachable, retrying", bootstrap=self.settings.kafka_bootstrap,
                            error=type(exc).__name__, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _loop(self, consumer: AIOKafkaConsumer, tasks: list[asyncio.Task[None]]) -> None:
        s = self.settings
        max_future = timedelta(seconds=s.max_future_seconds)
        retention = timedelta(days=s.raw_retention_days)
        age_limit = s.batch_max_age_ms / 1000
        last_record = time.monotonic()
        while not self._stopping.is_set():
            for task in tasks:
                if task.done():
                    task.result()  # a bug in a writer step: raise it here, nothing is committed
                    raise RuntimeError(f"the {task.get_name()} task stopped")
            behind = self._queue.full()
            self._set_paused(behind)
            room = s.batch_max_readings - len(self._open)
            records = await consumer.getmany(
                timeout_ms=min(s.batch_max_age_ms, 200), max_records=max(room, 1)
            )
            if records:
                last_record = time.monotonic()
                rules = Rules(datetime.now(timezone.utc), max_future, retention)
                batch = self._open
                for tp, messages in records.items():
                    for msg in messages:
                        out = decode_message(
                            msg.value, key=msg.key, source=Source(tp.topic, tp.partition, msg.offset), rules=rules
                        )
                        batch.readings.extend(out.readings)
                        batch.rejections.extend(out.rejections)
                        batch.note_offset(tp, msg.offset)
                    self.metrics.messages.inc(len(messages))
            # The age limit bounds latency when the worker keeps up; while a backlog is
            # being read (the fetch filled all the room asked for) batches fill up to
            # their size instead, which is what throughput needs, within 10 ages.
            fetched = sum(len(messages) for messages in records.values())
            backlog = fetched >= room > 0
            age = self._open.age() if self._open.messages else 0.0
            ready = len(self._open) >= s.batch_max_readings or (
                self._open.messages > 0 and (age >= 10 * age_limit or (age >= age_limit and not backlog))
            )
            if ready and not self._queue.full():
                await self._hand_over_open_batch()
            await self._commit()
            self._update_lag()
            if not consumer.assignment():
                last_record = time.monotonic()  # idle counts only once partitions are ours
            if (
                self.stop_when_idle is not None
                and time.monotonic() - last_record >= self.stop_when_idle
                and self._open.messages == 0
                and self._in_flight == 0
            ):
                log.info("no records for a while, stopping", idle_s=self.stop_when_idle)
                break

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> int:
        log.info("stopping: flushing in-flight batches", in_flight=self._in_flight + (1 if self._open.messages else 0))
        deadline = self.settings.shutdown_timeout_seconds
        try:
            await asyncio.wait_for(self._hand_over_open_batch(), deadline)
            await self._drain(deadline)
        except asyncio.TimeoutError:
            assert self._processor is not None
            self._processor.abandon()
            log.error("shutdown deadline passed; uncommitted work will be redelivered", deadline_s=deadline)
            return 1
        for task in tasks:
            if task.done():
                task.result()
        assert self._processor is not None
        await self._processor.flush_positions()
        await self._commit(final=True)
        log.info("stopped cleanly", committed={f"{tp.topic}[{tp.partition}]": off for tp, off in self._committed.items()})
        return 0


# --- the command -------------------------------------------------------------


def _run_one(settings: Settings, stop_when_idle: float | None, index: int) -> int:
    async def main() -> int:
        worker = Worker(settings, stop_when_idle=stop_when_idle, worker_index=index)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if settings.metrics_port:
            serve(worker.metrics, settings.metrics_port + index)
            log.info("metrics served", port=settings.metrics_port + index, path="/metrics")
        return await worker.run()

    return asyncio.run(main())


def _child(settings: Settings, stop_when_idle: float | None, index: int) -> None:
    from fleet_telemetry.core.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        code = _run_one(settings, stop_when_idle, index)
    except FleetError as exc:
        sys.stderr.write(f"fleet consume (worker {index}): {exc}\n")
        code = exc.exit_code
    sys.exit(code)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 1:
        raise UsageError("--workers must be 1 or more")
    if args.workers == 1:
        return _run_one(settings, args.stop_when_idle, 0)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child, args=(settings, args.stop_when_idle, i), name=f"fleet-worker-{i}")
                for i in range(args.workers)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max((child.exitcode or 0) if (child.exitcode or 0) >= 0 else 1 for child in children)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "consume",
        help="run the telemetry consumer workers",
        description="Consume telemetry from FLEET_TELEMETRY_TOPIC into PostgreSQL and Redis; "
        "rejected readings go to FLEET_DLQ_TOPIC. SIGTERM or Ctrl-C finishes the in-flight "
        "batches, commits and leaves the group. With --workers N, worker i serves metrics on "
        "FLEET_METRICS_PORT + i.",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the group (default 1)")
    parser.add_argument(
        "--stop-when-idle", type=float, default=None, metavar="SECONDS",
        help="exit 0 once no record arrived for SECONDS and everything is committed (backfills, tests)",
    )
    parser.set_defaults(handler=run)
