"""The worker's control logic with fakes: what a handover past its deadline leaves behind,
when a batch's age starts, and how long the last commit may take. No services."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import structlog
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from fleet_telemetry.consumers.batch import Batch, BatchingStep, BatchLimits
from fleet_telemetry.consumers.kafka_loop import KafkaLoop, LoopMetrics, LoopOptions
from fleet_telemetry.consumers.pipeline import Outputs, TelemetryPipeline
from fleet_telemetry.consumers.sink import WriteOutcome
from fleet_telemetry.consumers.stages import StatusStep
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading
from fleet_telemetry.core.retry import Backoff
from fleet_telemetry.core.settings import Settings
from tests.unit.test_kafka_loop import A, B, FakeConsumer, fetch, harness
from tests.unit.test_stages import FakeDeadLetters, FakeSink, Rec, Collect, reading, stored, value

# --- a handover past its deadline while the writer is behind -----------------------------


class HeldSink:
    """A sink whose writes wait until released: a writer that is behind."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.writing = asyncio.Event()
        self.writes: list[list[Reading]] = []

    async def write(self, readings: list[Reading]) -> WriteOutcome:
        self.writing.set()
        await self.release.wait()
        self.writes.append(readings)
        return WriteOutcome(stored=list(readings), unknown=[])

    async def update_positions(self, newest: dict[uuid.UUID, Reading]) -> None:
        pass


def behind_pipeline(sink: HeldSink) -> tuple[TelemetryPipeline, PipelineMetrics]:
    settings = Settings(_env_file=None, batch_max_readings=2, max_batches_in_flight=1,  # type: ignore[call-arg]
                        batch_max_age_ms=3_600_000)
    metrics = PipelineMetrics()
    outputs = Outputs(sink, FakeDeadLetters(), None, None)  # type: ignore[arg-type]
    return TelemetryPipeline(settings, outputs, metrics), metrics


def records(tp: TopicPartition, *offsets: int) -> dict[TopicPartition, list[Rec]]:
    return {tp: [Rec(o, value(1 + o / 1000)) for o in offsets]}


async def fill_until_behind(pipeline: TelemetryPipeline, sink: HeldSink) -> None:
    """One batch being written, one waiting in the full queue, one open with a record."""
    await pipeline.submit(records(A, 0, 1))
    await pipeline.poll()
    await asyncio.wait_for(sink.writing.wait(), 1)
    await pipeline.submit(records(A, 2, 3))
    await pipeline.poll()
    await pipeline.submit(records(A, 4))
    await pipeline.poll()
    assert pipeline.backpressure and pipeline.in_flight == 3


async def until(condition: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_handover_timing_out_on_a_full_queue_leaves_nothing_counted_in_flight() -> None:
    sink = HeldSink()
    pipeline, metrics = behind_pipeline(sink)
    await pipeline.start()
    try:
        await fill_until_behind(pipeline, sink)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pipeline.handover(), 0.05)
        sink.release.set()
        await until(lambda: pipeline.in_flight == 0)
        assert metrics.value("fleet_batches_in_flight") == 0
        # The open batch was given up (offset 4 is redelivered); what was written is committable.
        assert dict(pipeline.offsets.items()) == {A: 4}
        assert [len(w) for w in sink.writes] == [2, 2]
    finally:
        await pipeline.stop()


async def test_after_a_revoke_past_its_deadline_an_idle_worker_still_stops() -> None:
    sink = HeldSink()
    pipeline, metrics = behind_pipeline(sink)
    consumer = FakeConsumer(assignment=set())  # idle counts only once partitions are assigned
    options = LoopOptions(topics=("t",), group="g", bootstrap="fake:9092", fetch_timeout_ms=5,
                          backoff=lambda: Backoff(0.001, 0.002), shutdown_timeout=0.1, stop_when_idle=0.1)
    loop = KafkaLoop(pipeline, options, LoopMetrics(), consumer_factory=lambda: consumer)
    task = asyncio.create_task(loop.run())
    await until(lambda: consumer.started)
    await fill_until_behind(pipeline, sink)
    consumer._assignment = {A}
    await consumer.listener.on_partitions_revoked({A})  # the handover times out on the full queue
    await consumer.listener.on_partitions_assigned({A})
    sink.release.set()
    assert await asyncio.wait_for(task, 5) == 0, "the idle worker did not stop"
    assert pipeline.in_flight == 0
    assert consumer.commits[-1] == {A: 4}  # offset 4, in the open batch given up, is redelivered


# --- a batch's age ----------------------------------------------------------------------


async def test_a_batch_ages_from_its_first_record_not_from_an_idle_spell_before_it() -> None:
    class Next:
        def __init__(self) -> None:
            self.full = False
            self.got: list[Batch] = []

        async def submit(self, item: Batch) -> None:
            self.got.append(item)

    nxt = Next()
    batching = BatchingStep(nxt, BatchLimits(max_readings=100, max_age=0.5))
    batching.open.started -= 60  # the empty batch has been open through a minute without records
    one = Batch()
    one.note_offset(A, 0)
    one.rejections.append(object())  # type: ignore[arg-type]
    await batching.submit(one)
    await batching.poll()
    assert nxt.got == [], "a one-record batch went at once after an idle spell"
    assert batching.open.age() < 30  # counted from its first record, not the idle minute
    batching.open.started -= 0.5  # its own age passed
    await batching.poll()
    assert len(nxt.got) == 1


def test_extending_an_empty_batch_takes_the_age_of_its_first_records() -> None:
    empty = Batch(started=time.monotonic() - 60)
    first = Batch()
    first.note_offset(A, 0)
    empty.extend(first)
    assert empty.started == first.started
    later = Batch(started=first.started + 5)
    later.note_offset(A, 1)
    empty.extend(later)
    assert empty.started == first.started


# --- positions while no batch comes -------------------------------------------------------


async def test_positions_gathered_are_written_when_due_without_a_later_batch() -> None:
    sink = FakeSink()
    step = StatusStep(Collect(), None, sink, PipelineMetrics(), positions_interval=60)  # type: ignore[arg-type]
    item = stored([reading(5), reading(1)])
    await step.submit(item)
    await step.flush_positions_when_due()
    assert sink.positions == []  # not due yet
    step._positions_flushed -= 60  # a minute passed without another batch
    await step.flush_positions_when_due()
    assert sink.positions == [{item.written.stored[1].vehicle_id: item.written.stored[1]}]
    await step.flush_positions_when_due()
    assert len(sink.positions) == 1  # nothing new: nothing written


# --- the last commit within the shutdown deadline --------------------------------------


class OutageConsumer(FakeConsumer):
    """Commits during a broker outage: failing (``hangs`` False) or never answering, as
    aiokafka's own commit does while it retries the coordinator."""

    def __init__(self, *args: Any, hangs: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage = False
        self.hangs = hangs
        self.attempts = 0

    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        if self.outage:
            self.attempts += 1
            if self.hangs:
                await asyncio.sleep(3600)
            raise KafkaConnectionError()
        await super().commit(offsets)


@pytest.mark.parametrize("hangs", [False, True], ids=["failing", "not answering"])
async def test_the_final_commit_gives_up_at_the_shutdown_deadline_and_exits_1(hangs: bool) -> None:
    consumer = OutageConsumer([fetch(A, 0, 1)], hangs=hangs)
    h = harness(consumer, shutdown_timeout=0.3)
    h.strategy.hold = True  # finished only at the handover: the final commit has it
    task = asyncio.create_task(h.loop.run())
    await until(lambda: h.strategy.in_flight == 1)
    consumer.outage = True
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        h.loop.stop()
        code = await asyncio.wait_for(task, 5)
    assert code == 1
    assert time.monotonic() - started < 0.3 + 2.0  # the deadline, not the 5 s wait below it
    assert consumer.attempts >= 1 and consumer.commits == [] and consumer.stopped
    gave_up = [e for e in logs if e["event"].startswith("offset commit gave up")]
    assert gave_up and gave_up[0]["log_level"] == "error" and gave_up[0]["partitions"] == ["t[0]"]


async def test_one_deadline_covers_the_handover_and_the_final_commit() -> None:
    consumer = OutageConsumer([fetch(A, 0, 1)], hangs=True)
    h = harness(consumer, shutdown_timeout=0.3)
    h.strategy.hold = True
    task = asyncio.create_task(h.loop.run())
    await until(lambda: h.strategy.in_flight == 1)
    consumer.outage = True
    release_at_handover = h.strategy.handover

    async def slow_handover() -> None:
        await asyncio.sleep(0.2)  # most of the deadline goes on the last writes
        await release_at_handover()

    h.strategy.handover = slow_handover  # type: ignore[method-assign]
    started = time.monotonic()
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 1
    assert time.monotonic() - started < 0.3 + 2.0  # the deadline, not the 5 s wait below it


async def test_a_revoke_during_a_broker_outage_hands_over_within_the_deadline() -> None:
    consumer = OutageConsumer([fetch(A, 0, 1), fetch(B, 4)], hangs=True)
    h = harness(consumer, shutdown_timeout=0.3)
    task = asyncio.create_task(h.loop.run())
    await until(lambda: consumer.commits == [{A: 2}, {B: 5}])
    h.strategy.hold = True
    h.strategy.held.append({A: 6})
    consumer.outage = True
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(consumer.listener.on_partitions_revoked({A, B}), 5)
    assert time.monotonic() - started < 0.3 + 2.0  # the deadline, not the 5 s wait below it
    assert consumer.attempts >= 1
    assert dict(h.strategy.offsets.items()) == {} and h.loop.committed == {}
    assert any(e["event"].startswith("offset commit gave up") for e in logs)
    consumer.outage = False
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_the_final_commit_still_retries_a_short_outage_within_the_deadline() -> None:
    consumer = OutageConsumer([fetch(A, 0, 1)])
    h = harness(consumer, shutdown_timeout=2.0)
    h.strategy.hold = True
    task = asyncio.create_task(h.loop.run())
    await until(lambda: h.strategy.in_flight == 1)
    consumer.outage = True
    h.loop.stop()
    await until(lambda: consumer.attempts >= 3)
    consumer.outage = False
    assert await asyncio.wait_for(task, 5) == 0
    assert consumer.commits == [{A: 2}]


async def test_a_stop_while_a_commit_waits_on_an_absent_broker_is_not_held_up_by_it() -> None:
    consumer = OutageConsumer([fetch(A, 0, 1)], hangs=True)
    consumer.outage = True
    h = harness(consumer, shutdown_timeout=0.3)
    task = asyncio.create_task(h.loop.run())
    await until(lambda: consumer.attempts == 1)  # the commit after the fetch waits
    started = time.monotonic()
    h.loop.stop()
    assert await asyncio.wait_for(task, 5) == 1  # the final commit gives up at the deadline
    assert time.monotonic() - started < 0.3 + 2.0  # the deadline, not the 5 s wait below it
    assert consumer.attempts == 2
