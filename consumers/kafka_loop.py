"""The one Kafka consumer loop: the only place that touches an ``AIOKafkaConsumer``.

Lifecycle of one loop::

    start:   the strategy starts, the consumer joins the group (retried while the broker
             is away)
    loop:    fetch (as many records as the strategy has room for) -> strategy.submit ->
             strategy.poll -> commit the offsets the strategy has finished -> lag gauges
             (records, and seconds by the Kafka timestamps of the records not committed);
             partitions are paused while the strategy reports backpressure
    revoke:  the strategy hands over everything fetched so far and waits for it, the
             finished offsets are committed (both within the shutdown deadline), then the
             revoked partitions' state goes
    stop:    (:meth:`KafkaLoop.stop`, or idle with ``stop_when_idle``) stop fetching, hand
             over, close the strategy and commit, all within the shutdown deadline (past
             it: exit status 1, the uncommitted records are redelivered), leave the group

What to do with the records is the :class:`Strategy`'s business (the telemetry pipeline,
the command consumer). Offsets travel with the data: the strategy marks in its
:class:`~fleet_telemetry.consumers.offsets.Committable` the offsets its last step has finished, and only those are
committed, so a crash at any point means redelivery, never loss.

Assign-and-seek mode (``LoopOptions.seek``, no group, nothing committed)::

    start:   the consumer connects, the seek plan asks the broker what it needs
             (:class:`~fleet_telemetry.consumers.offsets.OffsetLookup`) and returns the
             :class:`~fleet_telemetry.consumers.offsets.Ranges`; their partitions are
             assigned and each is sought to its start offset
    loop:    fetch -> keep only the records before each partition's end -> move the
             ranges past every offset consumed -> strategy.submit -> strategy.poll; a
             partition that reached its end is paused
    stop:    once every partition reached its end, as above without the commit

:func:`fleet_telemetry.consumers.kafka_range.read_ranges` runs it as an async iterator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from fleet_telemetry.consumers.offsets import Committable, OffsetLookup, Ranges, RecordTimes, Records, Seek
from fleet_telemetry.core.errors import unavailable
from fleet_telemetry.core.retry import Backoff, GaveUp, retry
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.consumer")
T = TypeVar("T")


class Strategy(Protocol):
    """What the loop drives: the steps after the fetch."""

    offsets: Committable
    """Offsets the strategy has finished; the loop commits them."""

    @property
    def backpressure(self) -> bool:
        """True while the strategy cannot take more: the loop pauses its partitions."""

    @property
    def in_flight(self) -> int:
        """Units of work open or under way; 0 means idle (nothing uncommitted in hand)."""

    async def start(self) -> None:
        """Before the consumer joins the group."""

    async def stop(self) -> None:
        """On every way out, before the consumer leaves the group: release tasks and timers."""

    def room(self) -> int:
        """How many records the next fetch may bring (at least one)."""

    async def submit(self, records: Records) -> None:
        """Takes one non-empty fetch. May block (that is backpressure too); raises what it cannot handle."""

    async def poll(self) -> None:
        """After every fetch, empty or not: moves work on, raises a downstream failure."""

    async def handover(self) -> None:
        """Hands on everything fetched so far and blocks until it is finished (committable)."""

    def abandon(self) -> None:
        """The handover's deadline passed: stop retrying; unfinished work is redelivered."""

    async def close(self) -> None:
        """After a complete handover at shutdown: last writes; raises downstream failures."""


class KafkaConsumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the loop uses (a test passes a fake)."""

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, *, timeout_ms: int, max_records: int) -> Records: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    def last_poll_timestamp(self, partition: TopicPartition) -> int | None: ...
    # Assign-and-seek mode only:
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    def last_stable_offset(self, partition: TopicPartition) -> int | None: ...
    async def topics(self) -> set[str]: ...
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> Mapping[TopicPartition, Any]: ...


@dataclass(frozen=True)
class LoopOptions:
    topics: tuple[str, ...]
    group: str | None
    """``None`` with ``seek``: no group, nothing committed."""
    bootstrap: str
    """For messages only (no secrets)."""
    consumer_options: Mapping[str, Any] = field(default_factory=dict)
    """``AIOKafkaConsumer`` keyword arguments besides the group and the commit mode."""
    backoff: Callable[[], Backoff] = Backoff
    fetch_timeout_ms: int = 200
    shutdown_timeout: float = 30.0
    stop_when_idle: float | None = None
    """Stop once this many seconds passed with partitions assigned, no record and nothing in
    flight; and give up (``ServiceUnavailable``) when the broker did not answer at start for as long."""
    what: str = "records"
    """What the records are, for the log ("no records for a while, stopping")."""
    started_event: str = "consumer started"
    log_fields: Mapping[str, Any] = field(default_factory=dict)
    seek: Seek | None = None
    """Assign-and-seek mode: the partitions and offsets to read instead of subscribing."""
    retry_start: bool = True
    """False: one attempt to connect; any failure raises ``ServiceUnavailable`` at once."""

    @classmethod
    def from_settings(cls, settings: Settings, *, topics: Sequence[str], group: str | None,
                      consumer_options: Mapping[str, Any] | None = None, **options: Any) -> "LoopOptions":
        """Connection, backoff and shutdown deadline from ``settings``; the rest as given."""
        return cls(
            topics=tuple(topics), group=group, bootstrap=settings.kafka_bootstrap,
            consumer_options={**(consumer_options or {}), **settings.kafka_client_options()},
            backoff=lambda: Backoff(settings.retry_initial_seconds, settings.retry_max_seconds),
            shutdown_timeout=settings.shutdown_timeout_seconds, **options,
        )


@dataclass(frozen=True)
class LoopMetrics:
    retries: Counter | None = None
    """By ``dependency``; the loop counts ``kafka``."""
    commit_duration: Histogram | None = None
    consumer_lag: Gauge | None = None
    """By ``topic`` and ``partition``: records between the committed offset and the end."""
    paused_partitions: Gauge | None = None
    consumer_lag_seconds: Gauge | None = None
    """By ``topic`` and ``partition``: age of the oldest record not committed (0: caught up)."""


async def start_with_retry(start: Callable[[], Awaitable[T]], *, bootstrap: str, retries: Counter | None,
                           backoff: Backoff, give_up: asyncio.Event, within: float | None = None) -> T:
    """Starts a Kafka client, retrying while the broker is not reachable.

    Raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable` when ``give_up`` is
    set, or ``within`` seconds have passed, while it still fails; any non-transient
    failure at once.
    """
    def count(exc: BaseException, delay: float, attempt: int) -> None:
        if retries is not None:
            retries.labels(dependency="kafka").inc()
        log.warning("kafka not reachable, retrying", bootstrap=bootstrap, error=type(exc).__name__,
                    retry_in_s=round(delay, 2))

    deadline = give_up
    relay: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    if within is not None:
        deadline = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(within, deadline.set)
        relay = asyncio.create_task(_relay(give_up, deadline))
    try:
        return await retry(start, what="kafka", backoff=backoff, on_retry=count, give_up=deadline)
    except GaveUp as exc:
        raise unavailable("Kafka", bootstrap, exc.cause) from None
    finally:
        if timer is not None:
            timer.cancel()
        if relay is not None:
            relay.cancel()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    """Sets ``target`` once ``source`` is set."""
    await source.wait()
    target.set()


async def _unless_set(event: asyncio.Event, operation: Awaitable[None]) -> bool:
    """Runs ``operation`` to its end (True), or cancels it once ``event`` is set (False)."""
    work = asyncio.ensure_future(operation)
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return False
    work.result()
    return True


def _names(partitions: Collection[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: "KafkaLoop") -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self._loop.handover(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._loop.assigned(assigned)


class KafkaLoop:
    """Feeds one consumer group member's records to a :class:`Strategy` and commits what it finished.

    :meth:`run` returns the exit status: 0 after a clean stop, 1 when the shutdown
    deadline passed with work unfinished or uncommitted (it will be redelivered). With
    ``options.seek`` it reads the planned :attr:`ranges` instead (no group, nothing
    committed, the strategy is handed only records before each partition's end) and
    stops once every partition is finished.
    """

    def __init__(self, strategy: Strategy, options: LoopOptions, metrics: LoopMetrics, *,
                 stopping: asyncio.Event | None = None,
                 consumer_factory: Callable[[], KafkaConsumer] | None = None) -> None:
        self.strategy = strategy
        self.options = options
        self.metrics = metrics
        self._stopping = stopping if stopping is not None else asyncio.Event()
        self._factory = consumer_factory or self._aiokafka_consumer
        self._consumer: KafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._paused = False
        self._last_activity = time.monotonic()
        self.turned_at: float | None = None
        """``time.time()`` of the loop's last turn (a fetch and what follows it)."""
        self.committed_at: float | None = None
        """``time.time()`` of the last offset commit the broker accepted."""
        self.ranges: Ranges | None = None
        """Assign-and-seek mode: the ranges being read, kept up to date after each fetch."""
        self._listed: dict[TopicPartition, int] = {}
        self._finished: set[TopicPartition] = set()
        # Only a group member commits, so only it has a lag in seconds.
        self._times = RecordTimes() if metrics.consumer_lag_seconds is not None and options.group else None
        # A range read is a short errand: its lifecycle is not news.
        self._lifecycle = log.debug if options.seek is not None else log.info

    def stop(self) -> None:
        """Ask the loop to finish its in-flight work, commit and leave (signal-safe)."""
        self._stopping.set()

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns now (none before it joined)."""
        return set() if self._consumer is None else set(self._consumer.assignment())

    def paused(self) -> set[TopicPartition]:
        """The partitions paused now: while the strategy is behind, and in assign-and-seek
        mode those finished."""
        return set() if self._consumer is None else set(self._consumer.paused())

    def kafka_answered_at(self) -> float | None:
        """``time.time()`` when the broker last answered this member: a fetch response for
        one of its partitions, or an accepted commit. Cached state, no I/O."""
        latest = self.committed_at
        consumer = self._consumer
        if consumer is not None:
            for tp in consumer.assignment():
                polled = consumer.last_poll_timestamp(tp)
                if polled is not None and (latest is None or polled / 1000 > latest):
                    latest = polled / 1000
        return latest

    @property
    def committed(self) -> dict[TopicPartition, int]:
        """Per partition, the offset this member last committed."""
        return dict(self._committed)

    def _aiokafka_consumer(self) -> KafkaConsumer:
        consumer: KafkaConsumer = AIOKafkaConsumer(
            group_id=self.options.group, enable_auto_commit=False, auto_offset_reset="earliest",
            **self.options.consumer_options,
        )
        return consumer

    async def run(self) -> int:
        """Blocks until stopped (or idle, or done with its ranges); returns the exit status.
        Raises what the strategy or the seek plan raises (nothing more is committed then)
        and ``ServiceUnavailable`` when asked to stop while the broker was still away (at
        once without ``retry_start``)."""
        o = self.options
        consumer = self._factory()
        if o.seek is None:
            consumer.subscribe(list(o.topics), listener=_Rebalance(self))
        self._consumer = consumer
        try:
            await self.strategy.start()
            await self._start(consumer)
            if o.seek is not None:
                await self._assign(consumer, o.seek)
            self._lifecycle(o.started_event, topic=",".join(o.topics), group=o.group, **o.log_fields)
            self._last_activity = time.monotonic()
            while not self._stopping.is_set():
                if await self._iterate(consumer):
                    break
            return await self._shutdown()
        finally:
            await self.strategy.stop()
            await consumer.stop()  # leaves the group

    async def _start(self, consumer: KafkaConsumer) -> None:
        o = self.options
        if o.retry_start:
            # A run meant to end once idle also ends when the broker never answered for as long.
            await start_with_retry(consumer.start, bootstrap=o.bootstrap, retries=self.metrics.retries,
                                   backoff=o.backoff(), give_up=self._stopping, within=o.stop_when_idle)
            return
        try:
            await consumer.start()
        except Exception as exc:
            raise unavailable("Kafka", o.bootstrap, exc) from None

    async def _iterate(self, consumer: KafkaConsumer) -> bool:
        """One fetch and what follows it; True when the loop has been idle long enough to
        stop, or has finished its ranges."""
        strategy = self.strategy
        if self.ranges is not None and self._reached_ends(consumer, self.ranges):
            return True
        self._set_paused(strategy.backpressure)
        records = await consumer.getmany(timeout_ms=self.options.fetch_timeout_ms, max_records=strategy.room())
        if self.ranges is not None:
            records = await self._within(consumer, self.ranges, records)
        if records:
            if self._times is not None:
                self._times.fetched(records)
            await strategy.submit(records)
        await strategy.poll()
        await self.commit()
        self._update_lag()
        self.turned_at = time.time()
        now = time.monotonic()
        # Idle counts only while partitions are ours and nothing is open or in flight.
        if records or not consumer.assignment() or strategy.in_flight:
            self._last_activity = now
        idle = self.options.stop_when_idle
        if idle is not None and now - self._last_activity >= idle:
            log.info(f"no {self.options.what} for a while, stopping", idle_s=idle)
            return True
        return False

    async def _shutdown(self) -> int:
        """Hands over, closes the strategy and commits, all within the shutdown deadline."""
        timeout = self.options.shutdown_timeout
        deadline = time.monotonic() + timeout
        self._lifecycle("stopping: flushing in-flight batches", in_flight=self.strategy.in_flight)
        try:
            await asyncio.wait_for(self._finish(), timeout)
        except asyncio.TimeoutError:
            self.strategy.abandon()
            log.error("shutdown deadline passed; uncommitted work will be redelivered", deadline_s=timeout)
            return 1
        if not await self.commit(until=deadline):
            return 1
        self._lifecycle("stopped cleanly", committed={f"{tp.topic}[{tp.partition}]": off
                                                      for tp, off in self._committed.items()})
        return 0

    async def _finish(self) -> None:
        await self.strategy.handover()
        await self.strategy.close()

    # --- assign and seek --------------------------------------------------------------

    async def _assign(self, consumer: KafkaConsumer, seek: Seek) -> None:
        """Plans the ranges, assigns their partitions and seeks each to its start."""
        ranges = await seek(OffsetLookup(consumer))
        partitions = list(ranges.next)
        consumer.assign(partitions)
        self._listed = dict(await consumer.end_offsets(partitions)) if partitions else {}
        for tp, offset in ranges.next.items():
            consumer.seek(tp, offset)
        self.ranges = ranges

    def _fetched_end(self, consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
        """The end of ``tp`` its last fetch reported, as far as this consumer may read."""
        if self.options.consumer_options.get("isolation_level") == "read_committed":
            stable = consumer.last_stable_offset(tp)
            if stable is not None and stable >= 0:
                return stable
        return consumer.highwater(tp)

    def _reached_ends(self, consumer: KafkaConsumer, ranges: Ranges) -> bool:
        """Pauses the partitions that just finished; True once all of them have."""
        done = [tp for tp in ranges.next
                if tp not in self._finished and ranges.finished(tp, self._fetched_end(consumer, tp))]
        if done:
            consumer.pause(*done)
            self._finished.update(done)
        return len(self._finished) == len(ranges.next)

    async def _within(self, consumer: KafkaConsumer, ranges: Ranges, fetched: Records) -> Records:
        """The fetched records inside the ranges; moves the ranges past what was consumed."""
        for tp in ranges.next:
            ranges.learn_end(tp, self._listed.get(tp, 0), self._fetched_end(consumer, tp))
        records = ranges.take(fetched)
        for tp in ranges.next:
            if tp not in self._finished:
                ranges.advance(tp, await consumer.position(tp))
        return records

    # --- the group ------------------------------------------------------------------

    async def handover(self, revoked: set[TopicPartition]) -> None:
        """Before partitions go: finish everything fetched so far and commit it, then forget
        them. The handover and the commit together take at most the shutdown deadline."""
        timeout = self.options.shutdown_timeout
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.strategy.handover(), timeout)
        except asyncio.TimeoutError:
            # Nothing unfinished is committed; the new owner reads it again from the
            # last commit and the sink drops what was already stored.
            log.error("partitions revoked before their batches were written; they will be redelivered",
                      deadline_s=timeout)
        await self.commit(until=deadline)
        self.strategy.offsets.forget(revoked)
        if self._times is not None:
            self._times.forget(revoked)
        for tp in revoked:
            self._committed.pop(tp, None)
            for lag in (self.metrics.consumer_lag, self.metrics.consumer_lag_seconds):
                if lag is not None:
                    try:
                        lag.remove(tp.topic, str(tp.partition))
                    except KeyError:
                        pass
        log.info("partitions revoked after commit", partitions=_names(revoked))

    def assigned(self, partitions: set[TopicPartition]) -> None:
        """New partitions start unpaused; the next fetch pauses them if the strategy is still behind."""
        self._paused = False
        if self.metrics.paused_partitions is not None:
            self.metrics.paused_partitions.set(0)
        log.info("partitions assigned", partitions=_names(partitions), **self.options.log_fields)

    # --- commits, pause and lag ----------------------------------------------------

    async def commit(self, *, until: float | None = None) -> bool:
        """Commits the finished offsets of the assigned partitions that moved on; returns
        False when some are left uncommitted.

        Without ``until``: one attempt, given up when the loop is asked to stop meanwhile;
        a failure is logged and the offsets go with the next commit. With ``until`` (a
        ``time.monotonic()`` deadline), the last commit before partitions go: transient
        failures are retried until the commit succeeds or the deadline passes; then the
        offsets stay uncommitted (logged as an error) and their records are redelivered.
        A commit the group refuses (it rebalanced) is dropped: the partitions' new owner
        reads them again from the last commit.
        """
        consumer = self._consumer
        if consumer is None or self.options.group is None:
            return True
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in self.strategy.offsets.items()
                   if tp in assigned and off > self._committed.get(tp, -1)}
        if not offsets:
            return True
        started = time.perf_counter()

        async def send() -> None:
            await consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})

        def count(exc: BaseException, delay: float, attempt: int) -> None:
            self._count_retry()

        try:
            if until is None:
                if not await _unless_set(self._stopping, send()):
                    return False  # the shutdown's commit takes them, within its deadline
            else:
                # aiokafka's own commit waits while the coordinator is away: the deadline
                # bounds each attempt too, not only the retries between them.
                retrying = retry(send, what="offset commit", backoff=self.options.backoff(), on_retry=count)
                await asyncio.wait_for(retrying, max(0.0, until - time.monotonic()))
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit refused by the group", error=type(exc).__name__)
            return True
        except asyncio.TimeoutError:
            log.error("offset commit gave up at the shutdown deadline; the uncommitted records will be redelivered",
                      partitions=_names(offsets), deadline_s=self.options.shutdown_timeout)
            return False
        except KafkaError as exc:
            log.warning("offset commit failed, will retry", error=type(exc).__name__)
            self._count_retry()
            return False
        if self.metrics.commit_duration is not None:
            self.metrics.commit_duration.observe(time.perf_counter() - started)
        self._committed.update(offsets)
        self.committed_at = time.time()
        return True

    def _count_retry(self) -> None:
        if self.metrics.retries is not None:
            self.metrics.retries.labels(dependency="kafka").inc()

    def _set_paused(self, paused: bool) -> None:
        consumer = self._consumer
        if consumer is None or paused == self._paused:
            return
        gauge = self.metrics.paused_partitions
        if paused:
            assignment = list(consumer.assignment())
            consumer.pause(*assignment)
            if gauge is not None:
                gauge.set(len(assignment))
            log.info("writer behind, partitions paused", partitions=len(assignment))
        else:
            consumer.resume(*(consumer.paused() - self._finished))
            if gauge is not None:
                gauge.set(0)
        self._paused = paused

    def _update_lag(self) -> None:
        consumer, gauge, seconds, times = self._consumer, self.metrics.consumer_lag, \
            self.metrics.consumer_lag_seconds, self._times
        if consumer is None or (gauge is None and times is None):
            return
        now_ms = time.time() * 1000
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if times is not None and seconds is not None:
                age = times.lag_seconds(tp, committed, highwater, now_ms)
                if age is not None:
                    seconds.labels(tp.topic, str(tp.partition)).set(age)
            if gauge is None or highwater is None or committed is None:
                continue
            gauge.labels(tp.topic, str(tp.partition)).set(max(0, highwater - committed))
