"""Each step of the telemetry chain driven with a fake next step, the chain as a whole with
fake outputs, and the command consumer's strategy: no services."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
import redis.exceptions
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.batch import Batch
from fleet_telemetry.consumers.chain import Abandoned, InTask, Retrier
from fleet_telemetry.consumers.kafka_loop import Committable
from fleet_telemetry.consumers.pipeline import Outputs, TelemetryPipeline
from fleet_telemetry.consumers.sink import WriteOutcome
from fleet_telemetry.consumers.stages import (
    BatchResult, CommitStep, DecodeStep, RulesStep, StatusStep, Stored, StoreStep,
)
from fleet_telemetry.core.metrics import CommandMetrics, PipelineMetrics
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.retry import Backoff
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.commands import APPLIED, HANDLERS, CommandStrategy, command_value

TP = TopicPartition("fleet.telemetry.v1", 2)
VID = uuid.UUID("6f1c2a4e-9b3d-4c1e-8f00-1234567890ab")
NOW = datetime.now(timezone.utc)


@dataclass
class Rec:
    offset: int
    value: bytes | None
    key: bytes | None = VID.bytes


def value(seconds_ago: float = 1.0, **fields: Any) -> bytes:
    body = {"vehicle_id": str(VID), "time": (NOW - timedelta(seconds=seconds_ago)).isoformat(),
            "lat": 48.1, "lon": 11.5, **fields}
    return orjson.dumps(body)


def reading(seconds_ago: float = 1.0, offset: int = 0) -> Reading:
    return Reading(VID, NOW - timedelta(seconds=seconds_ago), 48.1, 11.5, None, None, None, None, None,
                   Source(TP.topic, TP.partition, offset), None, b"")


class Collect:
    """A fake next step: keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    async def submit(self, item: Any) -> None:
        self.got.append(item)


def retrier(metrics: PipelineMetrics | CommandMetrics, give_up: asyncio.Event | None = None) -> Retrier:
    return Retrier(metrics.retries, lambda: Backoff(0.001, 0.002), give_up)


def stored(readings: list[Reading], duplicates: list[Reading] | None = None) -> Stored:
    batch = Batch()
    batch.note_offset(TP, 9)
    written = WriteOutcome(stored=readings, duplicates=duplicates or [])
    return Stored(batch, written, BatchResult(len(readings), len(duplicates or []), 0), 0.0)


async def test_decode_hands_on_one_batch_per_fetch_with_its_offsets() -> None:
    metrics, nxt = PipelineMetrics(), Collect()
    step = DecodeStep(nxt, metrics, max_future=timedelta(minutes=5), retention=timedelta(days=30))
    await step.submit({TP: [Rec(10, value()), Rec(11, b"not json"), Rec(12, orjson.dumps([orjson.loads(value(2)),
                                                                                           orjson.loads(value(3))]))]})
    (batch,) = nxt.got
    assert (len(batch.readings), [r.reason for r in batch.rejections]) == (3, ["malformed_json"])
    assert (batch.first_offsets, batch.offsets, batch.messages) == ({TP: 10}, {TP: 13}, 3)
    assert metrics.value("fleet_messages_total") == 3


class FakeSink:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.writes: list[list[Reading]] = []
        self.positions: list[dict[uuid.UUID, Reading]] = []

    async def write(self, readings: list[Reading]) -> WriteOutcome:
        if self.failures:
            raise self.failures.pop(0)
        self.writes.append(readings)
        return WriteOutcome(stored=list(readings), unknown=[])

    async def update_positions(self, newest: dict[uuid.UUID, Reading]) -> None:
        self.positions.append(dict(newest))


class FakeDeadLetters:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def publish(self, rejections: list[Any]) -> None:
        self.sent.extend(rejections)


async def test_store_retries_a_lost_connection_then_hands_on_what_is_durable() -> None:
    metrics, nxt = PipelineMetrics(), Collect()
    sink, letters = FakeSink([ConnectionResetError()]), FakeDeadLetters()
    step = StoreStep(nxt, sink, letters, metrics, retrier(metrics))  # type: ignore[arg-type]
    batch = Batch(readings=[reading(offset=4)])
    batch.note_offset(TP, 4)
    await step.submit(batch)
    (item,) = nxt.got
    assert item.batch is batch and item.result == BatchResult(1, 0, 0) and item.live == batch.readings
    assert metrics.value("fleet_retries_total", dependency="postgresql") == 1
    assert metrics.value("fleet_readings_total", outcome="stored") == 1


async def test_an_abandoned_store_raises_and_hands_nothing_on() -> None:
    metrics, nxt = PipelineMetrics(), Collect()
    retry = retrier(metrics)
    step = StoreStep(nxt, FakeSink([ConnectionResetError()] * 100), FakeDeadLetters(),  # type: ignore[arg-type]
                     metrics, retry)
    retry.abandon()
    with pytest.raises(Abandoned, match="postgresql still failing"):
        await step.submit(Batch(readings=[reading()]))
    assert nxt.got == []


class FailingStatus:
    async def update(self, newest: dict[uuid.UUID, Reading]) -> int:
        raise redis.exceptions.ConnectionError("gone")


async def test_status_updates_skipped_without_redis_and_the_batch_goes_on() -> None:
    metrics, nxt, sink = PipelineMetrics(), Collect(), FakeSink()
    step = StatusStep(nxt, FailingStatus(), sink, metrics, positions_interval=0)  # type: ignore[arg-type]
    item = stored([reading(5), reading(1)])
    await step.submit(item)
    assert nxt.got == [item]
    assert metrics.value("fleet_status_updates_skipped_total") == 1
    assert sink.positions == [{VID: item.written.stored[1]}]


class FakeEngine:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.seen: list[list[Reading]] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def after_write(self, readings: list[Reading]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError()
        self.seen.append(readings)


async def test_the_rules_see_the_stored_readings_and_the_duplicates_and_retry_transient_failures() -> None:
    metrics, nxt, engine = PipelineMetrics(), Collect(), FakeEngine(failures=1)
    step = RulesStep(nxt, engine, retrier(metrics))  # type: ignore[arg-type]
    fresh, again = reading(1), reading(9)
    item = stored([fresh], duplicates=[again])
    await step.submit(item)
    assert engine.seen == [[fresh, again]] and nxt.got == [item]
    await step.submit(stored([]))
    assert engine.seen == [[fresh, again]] and len(nxt.got) == 2


async def test_commit_marks_the_batch_offsets_committable() -> None:
    offsets, metrics = Committable(), PipelineMetrics()
    await CommitStep(offsets, metrics).submit(stored([reading()]))
    assert dict(offsets.items()) == {TP: 10}
    assert metrics.value("fleet_batches_committed_total") == 1


async def test_in_task_pending_is_read_off_the_queue_and_the_task() -> None:
    release = asyncio.Event()

    class Slow:
        async def submit(self, item: int) -> None:
            await release.wait()

    step: InTask[int] = InTask(Slow(), maxsize=1, name="slow")
    step.start()
    await step.submit(1)
    await asyncio.sleep(0)
    assert (step.pending, step.full) == (1, False)
    await step.submit(2)
    assert (step.pending, step.full) == (2, True)
    release.set()
    await asyncio.wait_for(step.join(), 1)
    assert step.pending == 0
    step.check()
    await step.stop()


async def test_in_task_reports_a_failure_of_its_next_step() -> None:
    class Broken:
        async def submit(self, item: int) -> None:
            raise ValueError("bug")

    step: InTask[int] = InTask(Broken(), maxsize=2, name="broken")
    step.start()
    await step.submit(1)
    await asyncio.sleep(0.01)
    assert step.pending == 0
    with pytest.raises(ValueError, match="bug"):
        step.check()


async def test_the_telemetry_chain_commits_a_batch_once_written_everywhere() -> None:
    settings = Settings(_env_file=None, batch_max_readings=3, batch_max_age_ms=3_600_000)  # type: ignore[call-arg]
    metrics, sink, engine = PipelineMetrics(), FakeSink(), FakeEngine()
    pipeline = TelemetryPipeline(settings, Outputs(sink, FakeDeadLetters(), None, engine),  # type: ignore[arg-type]
                                 metrics)
    await pipeline.start()
    try:
        assert engine.started and pipeline.room() == 3
        await pipeline.submit({TP: [Rec(0, value(3)), Rec(1, value(2))]})
        await pipeline.poll()
        assert pipeline.in_flight == 1 and dict(pipeline.offsets.items()) == {}  # not ready: open
        await pipeline.submit({TP: [Rec(2, value(1))]})
        await pipeline.poll()  # full: handed to the writer
        await asyncio.wait_for(pipeline.handover(), 1)
        assert dict(pipeline.offsets.items()) == {TP: 3}
        assert pipeline.in_flight == 0 and metrics.value("fleet_batches_in_flight") == 0
        assert [len(w) for w in sink.writes] == [3] and len(engine.seen) == 1
        await pipeline.submit({TP: [Rec(3, value(0.5))]})
        await asyncio.wait_for(pipeline.handover(), 1)  # hands on the open batch too
        assert dict(pipeline.offsets.items()) == {TP: 4}
        await pipeline.close()
        assert sink.positions[-1][VID].time == NOW - timedelta(seconds=0.5)
    finally:
        await pipeline.stop()
    assert engine.stopped


async def test_the_writer_queue_full_is_backpressure() -> None:
    settings = Settings(_env_file=None, batch_max_readings=1, max_batches_in_flight=1)  # type: ignore[call-arg]
    metrics = PipelineMetrics()
    pipeline = TelemetryPipeline(settings, Outputs(FakeSink(), FakeDeadLetters(), None, None),  # type: ignore[arg-type]
                                 metrics)
    # The tasks are not started: batches stay where they were handed.
    for offset in range(3):
        await pipeline.submit({TP: [Rec(offset, value())]})
        await pipeline.poll()
    assert pipeline.backpressure
    assert pipeline.in_flight == 2 and metrics.value("fleet_batches_in_flight") == 1


class FakeApplier:
    handlers = HANDLERS

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.applied: list[Any] = []

    async def apply(self, item: Any) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError()
        self.applied.append(item)
        return APPLIED


async def test_the_command_strategy_applies_each_record_then_marks_its_offset() -> None:
    metrics, applier = CommandMetrics(), FakeApplier(failures=1)
    strategy = CommandStrategy(applier, metrics, retrier(metrics))  # type: ignore[arg-type]
    tp = TopicPartition("commands", 0)
    records = [Rec(o, command_value("vehicle.delete", {"id": str(VID)}, command_id=uuid.uuid4())) for o in (5, 6)]
    await strategy.submit({tp: records})
    assert len(applier.applied) == 2 and dict(strategy.offsets.items()) == {tp: 7}
    assert metrics.commands.labels(outcome=APPLIED)._value.get() == 2
    assert metrics.retries.labels(dependency="postgresql")._value.get() == 1
    assert strategy.in_flight == 0 and not strategy.backpressure


async def test_the_command_strategy_gives_up_when_the_consumer_stops() -> None:
    metrics, stopping = CommandMetrics(), asyncio.Event()
    strategy = CommandStrategy(FakeApplier(failures=1000), metrics, retrier(metrics, stopping))  # type: ignore[arg-type]
    task = asyncio.create_task(strategy.submit({TopicPartition("c", 0): [Rec(0, b"{}")]}))
    await asyncio.sleep(0.02)
    stopping.set()
    with pytest.raises(Abandoned):
        await asyncio.wait_for(task, 1)
    assert dict(strategy.offsets.items()) == {}
