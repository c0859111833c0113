"""The shared Kafka loop with a fake consumer and a fake strategy: what it commits, when it
pauses, how it hands partitions over and when it stops. No broker."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.errors import CommitFailedError, KafkaConnectionError, RequestTimedOutError
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet_telemetry.consumers.kafka_loop import Committable, KafkaLoop, LoopMetrics, LoopOptions, Records
from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.retry import Backoff

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


@dataclass
class Rec:
    offset: int
    key: bytes | None = None
    value: bytes | None = b"{}"


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
