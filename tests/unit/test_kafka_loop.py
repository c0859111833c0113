"""The shared Kafka loop with a fake consumer and a fake strategy: what it commits, when it
pauses, how it hands partitions over and when it stops; in assign-and-seek mode, which
offsets it reads and where it ends. No broker."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import CommitFailedError, KafkaConnectionError, RequestTimedOutError
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet_telemetry.consumers.kafka_loop import (
    Committable, KafkaLoop, LoopMetrics, LoopOptions, OffsetLookup, Ranges, Records,
)
from fleet_telemetry.consumers.offsets import RecordTimes
from fleet_telemetry.consumers.kafka_range import Fetched, read_ranges
from fleet_telemetry.core.errors import ServiceUnavailable, UsageError
from fleet_telemetry.core.retry import Backoff

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


@dataclass
class Rec:
    offset: int
    key: bytes | None = None
    value: bytes | None = b"{}"
    timestamp: int = -1


class FakeConsumer:
    """Scripted fetches; records commits, pauses and the group calls."""

    def __init__(self, fetches: list[Records] | None = None, assignment: set[TopicPartition] | None = None) -> None:
        self.fetches = list(fetches or [])
        self._assignment = set(assignment if assignment is not None else {A, B})
        self._paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_failures: list[Exception] = []
        self.start_failures: list[Exception] = []
        self.highwaters: dict[TopicPartition, int] = {}
        self.listener: Any = None
        self.started = self.stopped = False
        self.asked: list[int] = []

    def subscribe(self, topics: list[str], *, listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        if self.start_failures:
            raise self.start_failures.pop(0)
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Records:
        self.asked.append(max_records)
        if self.fetches:
            fetch = self.fetches.pop(0)
            return {tp: records for tp, records in fetch.items() if tp not in self._paused}
        await asyncio.sleep(0.005)
        return {}

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        if self.commit_failures:
            raise self.commit_failures.pop(0)
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.highwaters.get(partition)


class FakeStrategy:
    """Finishes each fetch at once unless ``hold`` is set; then ``release`` finishes it."""

    def __init__(self) -> None:
        self.offsets = Committable()
        self.backpressure = False
        self.held: list[dict[TopicPartition, int]] = []
        self.hold = False
        self.handover_blocks = False
        self.calls: list[str] = []
        self.room_left = 50

    @property
    def in_flight(self) -> int:
        return len(self.held)

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")

    def room(self) -> int:
        return self.room_left

    async def submit(self, records: Records) -> None:
        done = {tp: recs[-1].offset + 1 for tp, recs in records.items() if recs}
        if self.hold:
            self.held.append(done)
        else:
            self.offsets.mark(done)

    async def poll(self) -> None:
        self.calls.append("poll")

    def release(self) -> None:
        for done in self.held:
            self.offsets.mark(done)
        self.held.clear()

    async def handover(self) -> None:
        self.calls.append("handover")
        if self.handover_blocks:
            await asyncio.sleep(3600)
        self.release()

    def abandon(self) -> None:
        self.calls.append("abandon")

    async def close(self) -> None:
        self.calls.append("close")


@dataclass
class Harness:
    loop: KafkaLoop
    consumer: FakeConsumer
    strategy: FakeStrategy
    metrics: LoopMetrics


def harness(consumer: FakeConsumer, **options: Any) -> Harness:
    registry = CollectorRegistry()
    metrics = LoopMetrics(
        retries=Counter("retries", "", ["dependency"], registry=registry),
        commit_duration=Histogram("commit", "", registry=registry),
        consumer_lag=Gauge("lag", "", ["topic", "partition"], registry=registry),
        paused_partitions=Gauge("paused", "", registry=registry),
        consumer_lag_seconds=Gauge("lag_seconds", "", ["topic", "partition"], registry=registry),
    )
    base: dict[str, Any] = {"topics": ("t",), "group": "g", "bootstrap": "fake:9092", "fetch_timeout_ms": 5,
                            "backoff": lambda: Backoff(0.001, 0.002), "shutdown_timeout": 0.2}
    base.update(options)
    strategy = FakeStrategy()
    loop = KafkaLoop(strategy, LoopOptions(**base), metrics, consumer_factory=lambda: consumer)
    return Harness(loop, consumer, strategy, metrics)


def fetch(tp: TopicPartition, *offsets: int) -> Records:
    return {tp: [Rec(o) for o in offsets]}


async def run_until_idle(h: Harness, timeout: float = 5.0) -> int:
    return await asyncio.wait_for(h.loop.run(), timeout)


async def test_finished_offsets_are_committed_after_each_fetch_and_again_only_when_they_move() -> None:
    h = harness(FakeConsumer([fetch(A, 0, 1, 2), {}, fetch(B, 7), fetch(A, 3)]), stop_when_idle=0.05)
    assert await run_until_idle(h) == 0
    assert h.consumer.commits == [{A: 3}, {B: 8}, {A: 4}]
    assert h.loop.committed == {A: 4, B: 8}
    assert h.strategy.calls[0] == "start" and h.strategy.calls[-3:] == ["handover", "close", "stop"]
    assert h.consumer.started and h.consumer.stopped
    assert h.consumer.asked[0] == 50  # the strategy's room


async def test_work_in_flight_is_committed_only_once_finished_and_keeps_the_loop_from_idling() -> None:
    h = harness(FakeConsumer([fetch(A, 0, 1)]), stop_when_idle=0.05)
    h.strategy.hold = True
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.2)
    assert not task.done(), "stopped with work in flight"
    assert h.consumer.commits == []
    h.strategy.release()
    assert await asyncio.wait_for(task, 5) == 0
    assert h.consumer.commits == [{A: 2}]


async def test_idle_counts_only_while_partitions_are_assigned() -> None:
    h = harness(FakeConsumer(assignment=set()), stop_when_idle=0.05)
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.2)
    assert not task.done()
    h.consumer._assignment = {A}
    assert await asyncio.wait_for(task, 5) == 0


async def test_a_refused_commit_is_dropped_and_a_failed_one_goes_with_the_next() -> None:
    consumer = FakeConsumer([fetch(A, 0), fetch(A, 1), fetch(A, 2)])
    consumer.commit_failures = [CommitFailedError(), RequestTimedOutError()]
    h = harness(consumer, stop_when_idle=0.05)
    assert await run_until_idle(h) == 0
    assert consumer.commits == [{A: 3}]
    assert h.metrics.retries.labels(dependency="kafka")._value.get() == 1


async def test_the_final_commit_retries_transient_failures_until_it_succeeds() -> None:
    consumer = FakeConsumer([fetch(A, 0, 1)])
    h = harness(consumer)
    h.strategy.hold = True  # finished only at the handover: the final commit has it
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    consumer.commit_failures = [KafkaConnectionError(), RequestTimedOutError()]
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert consumer.commits == [{A: 2}]
    assert h.metrics.retries.labels(dependency="kafka")._value.get() == 2


async def test_only_assigned_partitions_are_committed() -> None:
    consumer = FakeConsumer([fetch(A, 0), fetch(B, 5)], assignment={A})
    h = harness(consumer, stop_when_idle=0.05)
    assert await run_until_idle(h) == 0
    assert consumer.commits == [{A: 1}]


async def test_partitions_are_paused_under_backpressure_and_resumed_after() -> None:
    consumer = FakeConsumer()
    h = harness(consumer)
    h.strategy.backpressure = True
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    assert consumer.paused() == {A, B}
    assert h.metrics.paused_partitions is not None and h.metrics.paused_partitions._value.get() == 2
    h.strategy.backpressure = False
    await asyncio.sleep(0.05)
    assert consumer.paused() == set()
    assert h.metrics.paused_partitions._value.get() == 0
    # A rebalance hands out fresh, unpaused partitions: they are paused again while behind.
    h.strategy.backpressure = True
    await asyncio.sleep(0.05)
    consumer._paused.clear()
    await consumer.listener.on_partitions_assigned({A, B})
    await asyncio.sleep(0.05)
    assert consumer.paused() == {A, B}
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_revoked_partitions_are_finished_committed_then_forgotten() -> None:
    consumer = FakeConsumer([fetch(A, 0, 1), fetch(B, 4)])
    consumer.highwaters = {A: 10, B: 10}
    h = harness(consumer)
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    assert consumer.commits == [{A: 2}, {B: 5}]
    lag = h.metrics.consumer_lag
    assert lag is not None and lag.labels("t", "0")._value.get() == 8
    h.strategy.hold = True
    h.strategy.held.append({A: 6})  # fetched, not finished yet
    await consumer.listener.on_partitions_revoked({A, B})
    assert h.strategy.calls.count("handover") == 1
    assert consumer.commits[-1] == {A: 6}
    assert dict(h.strategy.offsets.items()) == {} and h.loop.committed == {}
    assert lag.collect()[0].samples == []
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_a_handover_past_its_deadline_commits_only_what_was_finished() -> None:
    consumer = FakeConsumer([fetch(A, 0, 1), fetch(B, 4)])
    h = harness(consumer)
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    h.strategy.hold = True
    h.strategy.held.append({B: 9})
    h.strategy.handover_blocks = True
    await consumer.listener.on_partitions_revoked({A, B})
    assert consumer.commits == [{A: 2}, {B: 5}]  # B: 9 never finished, it is redelivered
    h.strategy.held.clear()
    h.strategy.handover_blocks = False
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_the_lag_gauge_counts_from_the_committed_offset_to_the_end() -> None:
    consumer = FakeConsumer([fetch(A, 0, 1, 2)])
    consumer.highwaters = {A: 10}
    h = harness(consumer, stop_when_idle=0.05)
    assert await run_until_idle(h) == 0
    assert h.metrics.consumer_lag is not None
    assert h.metrics.consumer_lag.labels("t", "0")._value.get() == 7


def timed(tp: TopicPartition, *offsets_and_ms: tuple[int, int]) -> Records:
    return {tp: [Rec(offset, timestamp=ms) for offset, ms in offsets_and_ms]}


def test_record_times_read_the_oldest_uncommitted_record_from_the_spans_of_each_fetch() -> None:
    times = RecordTimes()
    times.fetched(timed(A, (0, 1_000), (9, 10_000)))
    times.fetched(timed(A, (10, 20_000), (19, 30_000)))
    assert times.lag_seconds(A, None, 20, now_ms=61_000) == 60.0  # nothing committed: the first record
    assert times.lag_seconds(A, 5, 20, now_ms=61_000) == 55.0  # inside the first span, by offset
    assert times.lag_seconds(A, 10, 20, now_ms=61_000) == 41.0  # the first span committed and dropped
    assert times.lag_seconds(A, 20, 20, now_ms=61_000) == 0.0  # caught up
    assert times.lag_seconds(A, 20, 25, now_ms=61_000) == 31.0  # not fetched yet: at most as old as the newest
    assert times.lag_seconds(B, None, 5, now_ms=61_000) is None  # nothing known
    assert times.lag_seconds(B, 5, 5, now_ms=61_000) == 0.0
    times.fetched(timed(B, (5, -1)))  # a record without a timestamp says nothing
    assert times.lag_seconds(B, 5, 6, now_ms=61_000) is None
    times.forget({A})
    assert times.lag_seconds(A, None, 30, now_ms=61_000) is None


async def test_the_lag_in_seconds_is_the_age_of_the_oldest_record_not_committed_then_0() -> None:
    now_ms = int(time.time() * 1000)
    consumer = FakeConsumer([timed(A, (0, now_ms - 120_000), (1, now_ms - 60_000))])
    consumer.highwaters = {A: 2}
    h = harness(consumer)
    seconds = h.metrics.consumer_lag_seconds
    assert seconds is not None
    h.strategy.hold = True
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.1)
    assert 119 < seconds.labels("t", "0")._value.get() < 125  # fetched, not committed
    h.strategy.release()
    await asyncio.sleep(0.1)
    assert seconds.labels("t", "0")._value.get() == 0.0  # committed up to the end
    await consumer.listener.on_partitions_revoked({A})
    assert seconds.collect()[0].samples == []
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_a_shutdown_past_its_deadline_abandons_and_exits_1_without_committing() -> None:
    consumer = FakeConsumer([fetch(A, 0)])
    h = harness(consumer)
    h.strategy.hold = True
    h.strategy.handover_blocks = True
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 1
    assert "abandon" in h.strategy.calls and "close" not in h.strategy.calls
    assert consumer.commits == [] and consumer.stopped


async def test_start_is_retried_while_the_broker_is_away_and_given_up_when_stopped() -> None:
    consumer = FakeConsumer(assignment={A})
    consumer.start_failures = [KafkaConnectionError(), KafkaConnectionError()]
    h = harness(consumer, stop_when_idle=0.05)
    assert await run_until_idle(h) == 0
    assert h.metrics.retries.labels(dependency="kafka")._value.get() == 2

    away = FakeConsumer()
    away.start_failures = [KafkaConnectionError()] * 1000
    h = harness(away)
    task = asyncio.create_task(h.loop.run())
    await asyncio.sleep(0.05)
    h.loop.stop()
    with pytest.raises(ServiceUnavailable, match="Kafka at fake:9092 is not answering"):
        await asyncio.wait_for(task, 5)
    assert h.strategy.calls[-1] == "stop" and away.stopped


async def test_a_strategy_failure_stops_the_loop_and_leaves_the_group_without_committing() -> None:
    consumer = FakeConsumer([fetch(A, 0)])
    h = harness(consumer)

    async def broken() -> None:
        raise RuntimeError("a bug downstream")

    h.strategy.poll = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug downstream"):
        await asyncio.wait_for(h.loop.run(), 5)
    assert consumer.commits == [] and consumer.stopped and h.strategy.calls[-1] == "stop"


def test_committable_offsets_never_move_back() -> None:
    offsets = Committable()
    offsets.mark({A: 5, B: 2})
    offsets.mark({A: 3, B: 4})
    assert dict(offsets.items()) == {A: 5, B: 4}
    offsets.forget([A])
    assert dict(offsets.items()) == {B: 4}


# --- assign-and-seek mode ----------------------------------------------------------------


@dataclass
class TimedRec:
    offset: int
    timestamp: int = 0
    key: bytes | None = None
    value: bytes | None = b"{}"
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Answer:
    offset: int
    timestamp: int


class FakeLog(FakeConsumer):
    """A broker's partitions as offset-ordered records (gaps are offsets without a record:
    transaction markers, compacted records). Fetches move positions as aiokafka does;
    ``listed`` is what ListOffsets answers (by default the true end)."""

    def __init__(self, logs: dict[TopicPartition, list[TimedRec]], ends: dict[TopicPartition, int] | None = None,
                 listed: dict[TopicPartition, int] | None = None) -> None:
        super().__init__(assignment=set())
        self.logs = logs
        self.ends = {tp: (ends or {}).get(tp, records[-1].offset + 1 if records else 0) for tp, records in logs.items()}
        self.listed = listed
        self.positions: dict[TopicPartition, int] = {}
        self.lso: dict[TopicPartition, int] = {}
        self.times: dict[TopicPartition, Answer | None] = {}
        self.subscribed = False
        self.fetched: list[set[TopicPartition]] = []

    def subscribe(self, topics: list[str], *, listener: Any) -> None:
        self.subscribed = True

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._assignment = set(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition] = offset

    async def position(self, partition: TopicPartition) -> int:
        return self.positions[partition]

    def last_stable_offset(self, partition: TopicPartition) -> int | None:
        return self.lso.get(partition, -1)

    async def topics(self) -> set[str]:
        return {tp.topic for tp in self.logs}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {tp.partition for tp in self.logs if tp.topic == topic} or None

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp][0].offset if self.logs[tp] else 0 for tp in partitions}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        listed = self.listed if self.listed is not None else self.ends
        return {tp: listed[tp] for tp in partitions}

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        return {tp: self.times.get(tp) for tp in timestamps}

    def append(self, tp: TopicPartition, record: TimedRec) -> None:
        self.logs[tp].append(record)
        self.ends[tp] = record.offset + 1

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Records:
        self.asked.append(max_records)
        out: dict[TopicPartition, list[TimedRec]] = {}
        wanted = sorted(self._assignment - self._paused, key=lambda tp: tp.partition)
        self.fetched.append(set(wanted))
        for tp in wanted:
            self.highwaters[tp] = self.ends[tp]
            position = self.positions[tp]
            batch = [r for r in self.logs[tp] if r.offset >= position][:max_records - sum(map(len, out.values()))]
            if batch:
                out[tp] = batch
                self.positions[tp] = batch[-1].offset + 1
            if len(batch) == len([r for r in self.logs[tp] if r.offset >= position]):
                self.positions[tp] = max(self.positions[tp], self.ends[tp])  # past trailing markers
        if not out:
            await asyncio.sleep(0.001)
        return out


def range_options(seek: Any, **options: Any) -> LoopOptions:
    base: dict[str, Any] = {"topics": ("t",), "group": None, "bootstrap": "fake:9092", "fetch_timeout_ms": 5,
                            "backoff": lambda: Backoff(0.001, 0.002), "shutdown_timeout": 0.2,
                            "seek": seek, "retry_start": False}
    base.update(options)
    return LoopOptions(**base)


def from_offsets(starts: dict[TopicPartition, int], ends: dict[TopicPartition, int] | None = None) -> Any:
    async def seek(lookup: OffsetLookup) -> Ranges:
        return Ranges(dict(starts), dict(ends or {}))
    return seek


async def read_all(consumer: FakeLog, options: LoopOptions, room: int = 50) -> list[Fetched]:
    reading = read_ranges(options, room=room, consumer_factory=lambda: consumer)
    return await asyncio.wait_for(_collect(reading), 5)


async def _collect(reading: AsyncIterator[Fetched]) -> list[Fetched]:
    return [fetched async for fetched in reading]


def offsets_of(fetches: list[Fetched]) -> dict[TopicPartition, list[int]]:
    out: dict[TopicPartition, list[int]] = {}
    for fetched in fetches:
        for tp, records in fetched.records.items():
            out.setdefault(tp, []).extend(r.offset for r in records)
    return out


def log_of(*offsets: int) -> list[TimedRec]:
    return [TimedRec(o) for o in offsets]


async def test_a_range_read_assigns_seeks_reads_to_the_end_and_commits_nothing() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2, 3, 4), B: log_of(0, 1, 2)})
    fetches = await read_all(consumer, range_options(from_offsets({A: 2, B: 0})), room=2)
    assert offsets_of(fetches) == {A: [2, 3, 4], B: [0, 1, 2]}
    assert not consumer.subscribed and consumer.commits == []
    assert consumer.started and consumer.stopped
    assert set(consumer.asked) == {2}  # the room of each fetch
    assert fetches[-1].next == {A: 5, B: 3} and fetches[-1].end == {A: 5, B: 3}


async def test_given_ends_clip_the_records_and_an_end_beyond_the_log_stops_at_the_fetched_end() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2, 3, 4), B: log_of(0, 1)})
    fetches = await read_all(consumer, range_options(from_offsets({A: 1, B: 0}, {A: 3, B: 10})))
    assert offsets_of(fetches) == {A: [1, 2], B: [0, 1]}
    assert fetches[-1].next == {A: 3, B: 2} and fetches[-1].end == {A: 3, B: 10}


async def test_an_empty_range_ends_without_a_fetch_and_says_where_it_stood() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2)})
    fetches = await read_all(consumer, range_options(from_offsets({A: 2}, {A: 2})))
    assert consumer.fetched == [] and offsets_of(fetches) == {}
    assert fetches[-1].next == {A: 2} and fetches[-1].end == {A: 2}


async def test_the_end_is_the_larger_of_the_listed_and_the_first_fetched_end_and_stays_put() -> None:
    # The broker lists A's end late (2 instead of 4): the first fetch's high watermark wins.
    consumer = FakeLog({A: log_of(0, 1, 2, 3)}, listed={A: 2})
    reading = read_ranges(range_options(from_offsets({A: 0})), room=1, consumer_factory=lambda: consumer)
    first = await asyncio.wait_for(reading.__anext__(), 5)
    assert first.end == {A: 4}
    consumer.append(A, TimedRec(4))  # written after the read started: not part of it
    rest = await asyncio.wait_for(_collect(reading), 5)
    assert offsets_of([first, *rest]) == {A: [0, 1, 2, 3]}
    assert rest[-1].next == {A: 4}


async def test_offsets_without_a_record_at_the_end_still_finish_the_range() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2)}, ends={A: 5})  # 3 and 4: transaction markers
    fetches = await read_all(consumer, range_options(from_offsets({A: 0})))
    assert offsets_of(fetches) == {A: [0, 1, 2]} and fetches[-1].next == {A: 5}


async def test_finished_partitions_are_paused_while_the_others_go_on() -> None:
    consumer = FakeLog({A: log_of(0, 1), B: log_of(*range(10))})
    fetches = await read_all(consumer, range_options(from_offsets({A: 0, B: 0}, {A: 1})), room=2)
    assert offsets_of(fetches) == {A: [0], B: list(range(10))}
    assert consumer.fetched[0] == {A, B} and all(fetched == {B} for fetched in consumer.fetched[2:])
    assert A in consumer.paused()


async def test_under_read_committed_the_fetched_end_is_the_last_stable_offset() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2, 3)}, listed={A: 2})
    consumer.lso = {A: 2}  # 2 and 3 belong to an open transaction
    options = range_options(from_offsets({A: 0}), consumer_options={"isolation_level": "read_committed"})
    fetches = await read_all(consumer, options, room=1)
    assert fetches[-1].end == {A: 2} and offsets_of(fetches) == {A: [0, 1]}


async def test_the_plan_looks_partitions_and_offsets_up_and_distrusts_answers_without_a_time() -> None:
    C = TopicPartition("t", 2)
    consumer = FakeLog({A: [TimedRec(o, 100 * o) for o in range(5)], B: log_of(0), C: log_of(0)})
    consumer.times = {A: Answer(3, 300), B: Answer(0, -1), C: None}
    seen: dict[str, Any] = {}

    async def seek(lookup: OffsetLookup) -> Ranges:
        seen["partitions"] = await lookup.partitions("t")
        seen["missing"] = await lookup.partitions("nope")
        tps = [A, B, C]
        seen["beginning"] = await lookup.beginning_offsets(tps)
        seen["at"] = await lookup.offsets_at(tps, 250)
        return Ranges({A: seen["at"][A]})

    fetches = await read_all(consumer, range_options(seek))
    assert seen == {"partitions": {0, 1, 2}, "missing": set(), "beginning": {A: 0, B: 0, C: 0}, "at": {A: 3}}
    assert offsets_of(fetches) == {A: [3, 4]}


async def test_a_failing_plan_or_an_absent_broker_ends_the_read_with_its_error() -> None:
    async def bad(lookup: OffsetLookup) -> Ranges:
        raise UsageError("topic 'x' does not exist")

    consumer = FakeLog({A: log_of(0)})
    with pytest.raises(UsageError, match="does not exist"):
        await read_all(consumer, range_options(bad))
    assert consumer.stopped

    away = FakeLog({A: log_of(0)})
    away.start_failures = [KafkaConnectionError()]
    with pytest.raises(ServiceUnavailable, match="Kafka at fake:9092 is not answering"):
        await read_all(away, range_options(from_offsets({A: 0})))  # one attempt, no retry
    assert away.stopped


async def test_closing_a_range_read_early_stops_the_loop() -> None:
    consumer = FakeLog({A: log_of(*range(100))})
    reading = read_ranges(range_options(from_offsets({A: 0})), room=1, consumer_factory=lambda: consumer)
    async with contextlib.aclosing(reading):
        first = await asyncio.wait_for(reading.__anext__(), 5)
    assert offsets_of([first]) == {A: [0]} and consumer.stopped


async def test_a_loop_with_ranges_hands_its_strategy_only_records_inside_them() -> None:
    consumer = FakeLog({A: log_of(0, 1, 2, 3), B: log_of(0, 1)})
    strategy = FakeStrategy()
    loop = KafkaLoop(strategy, range_options(from_offsets({A: 1, B: 0}, {A: 3})), LoopMetrics(),
                     consumer_factory=lambda: consumer)
    assert await asyncio.wait_for(loop.run(), 5) == 0
    assert dict(strategy.offsets.items()) == {A: 3, B: 2}  # marked, yet never committed
    assert consumer.commits == [] and strategy.calls[-3:] == ["handover", "close", "stop"]
    assert loop.ranges is not None and loop.ranges.next == {A: 3, B: 2}


def test_ranges_take_records_before_the_end_and_advance_past_markers_but_not_past_the_end() -> None:
    ranges = Ranges({A: 0, B: 5}, {A: 3})
    taken = ranges.take({A: log_of(0, 1, 2, 3, 4), B: log_of(5, 6), TopicPartition("u", 0): log_of(0)})
    assert {tp: [r.offset for r in records] for tp, records in taken.items()} == {A: [0, 1, 2], B: [5, 6]}
    assert ranges.next == {A: 3, B: 7}
    ranges.advance(A, 9)
    ranges.advance(B, 9)
    ranges.advance(B, 4)
    assert ranges.next == {A: 3, B: 9}
    assert ranges.finished(A, None) and not ranges.finished(B, None)
    ranges.learn_end(B, 8, None)
    assert B not in ranges.end
    ranges.learn_end(B, 8, 12)
    ranges.learn_end(B, 8, 20)  # fixed once
    assert ranges.end[B] == 12 and not ranges.finished(B, 12) and ranges.finished(B, 9)


def _names_aiokafka_consumer(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "AIOKafkaConsumer" for alias in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "AIOKafkaConsumer":
            return True
    return False


def test_only_the_kafka_loop_touches_the_aiokafka_consumer() -> None:
    root = Path(__file__).resolve().parents[2]
    found = []
    for folder, dirs, files in os.walk(root):  # the package's linked folders are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"bench", "node_modules"}]
        for name in files:
            path = Path(folder, name)
            if name.endswith(".py") and _names_aiokafka_consumer(path):
                found.append(str(path.relative_to(root)))
    assert found == ["consumers/kafka_loop.py"]
