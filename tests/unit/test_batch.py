"""When a batch goes on: the pure decision, and the batching step with a fake next step; the
trace id each batch gets and carries into the log context."""

from __future__ import annotations

import pytest
import structlog
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.batch import BACKLOG_AGE_FACTOR, Batch, BatchingStep, BatchLimits, batch_ready
from fleet_telemetry.consumers.chain import Traced

LIMITS = BatchLimits(max_readings=100, max_age=0.1)
TP = TopicPartition("t", 0)


def ready(size: int = 10, messages: int = 10, age: float = 0.0, fetched: int = 0, room: int = 100) -> bool:
    return batch_ready(size=size, messages=messages, age=age, fetched=fetched, room=room, limits=LIMITS)


def test_an_empty_batch_never_goes() -> None:
    assert not ready(size=0, messages=0, age=3600)


def test_a_full_batch_goes_at_once_even_while_a_backlog_is_read() -> None:
    assert ready(size=100, age=0.0, fetched=90, room=90)
    assert ready(size=150, age=0.0)


def test_a_young_batch_waits() -> None:
    assert not ready(age=0.05)


def test_a_batch_past_its_age_goes_when_the_worker_keeps_up() -> None:
    assert ready(age=0.1, fetched=5, room=90)  # the fetch brought less than asked: no backlog
    assert ready(age=0.1, fetched=0, room=90)  # an empty fetch


def test_while_a_backlog_is_read_a_batch_fills_up_within_ten_ages() -> None:
    assert not ready(age=0.5, fetched=90, room=90)  # the fetch filled all the room asked for
    assert not ready(age=BACKLOG_AGE_FACTOR * 0.1 - 0.01, fetched=95, room=90)
    assert ready(age=BACKLOG_AGE_FACTOR * 0.1, fetched=90, room=90)


def test_no_room_asked_for_is_no_backlog() -> None:
    assert ready(age=0.2, fetched=0, room=0)


def record_batch(offsets: range, readings: int = 0) -> Batch:
    batch = Batch()
    for offset in offsets:
        batch.note_offset(TP, offset)
    batch.rejections.extend([object()] * readings)  # type: ignore[list-item]
    return batch


def test_extending_a_batch_keeps_the_first_offset_and_moves_the_next() -> None:
    batch = record_batch(range(3, 5))
    batch.extend(record_batch(range(5, 9), readings=4))
    other = TopicPartition("t", 1)
    more = Batch()
    more.note_offset(other, 70)
    batch.extend(more)
    assert batch.first_offsets == {TP: 3, other: 70}
    assert batch.offsets == {TP: 9, other: 71}
    assert (batch.messages, len(batch)) == (7, 4)


class FakeNext:
    def __init__(self) -> None:
        self.full = False
        self.got: list[Batch] = []

    async def submit(self, item: Batch) -> None:
        self.got.append(item)


@pytest.fixture
def step() -> tuple[BatchingStep, FakeNext]:
    nxt = FakeNext()
    return BatchingStep(nxt, BatchLimits(max_readings=10, max_age=3600)), nxt


async def test_the_step_hands_on_a_full_batch_and_asks_for_what_fits(step: tuple[BatchingStep, FakeNext]) -> None:
    batching, nxt = step
    assert batching.room() == 10
    await batching.submit(record_batch(range(0, 4), readings=4))
    await batching.poll()
    assert nxt.got == [] and batching.room() == 6 and batching.pending == 1
    await batching.submit(record_batch(range(4, 10), readings=6))
    await batching.poll()
    assert [b.offsets for b in nxt.got] == [{TP: 10}]
    assert batching.pending == 0 and batching.room() == 10


async def test_a_ready_batch_waits_while_the_next_step_is_full(step: tuple[BatchingStep, FakeNext]) -> None:
    batching, nxt = step
    nxt.full = True
    await batching.submit(record_batch(range(0, 12), readings=12))
    await batching.poll()
    assert nxt.got == [] and batching.room() == 1
    nxt.full = False
    await batching.poll()
    assert len(nxt.got) == 1 and len(nxt.got[0]) == 12


async def test_flush_hands_on_whatever_is_open_and_nothing_when_empty(step: tuple[BatchingStep, FakeNext]) -> None:
    batching, nxt = step
    await batching.flush()
    assert nxt.got == []
    await batching.submit(record_batch(range(0, 1), readings=1))
    await batching.flush()
    assert len(nxt.got) == 1 and batching.open.messages == 0


async def test_each_batch_handed_on_gets_a_trace_id_of_its_own(step: tuple[BatchingStep, FakeNext]) -> None:
    batching, nxt = step
    for first in (0, 1):
        await batching.submit(record_batch(range(first, first + 1), readings=1))
        await batching.flush()
    ids = [b.trace_id for b in nxt.got]
    assert len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_traced_binds_the_trace_id_while_the_next_step_runs_then_restores_the_context() -> None:
    seen: list[object] = []

    class Next:
        async def submit(self, item: Batch) -> None:
            seen.append(structlog.contextvars.get_contextvars().get("trace_id"))

    traced: Traced[Batch] = Traced(Next(), lambda b: b.trace_id)
    await traced.submit(Batch(trace_id="a" * 32))
    assert seen == ["a" * 32]
    assert "trace_id" not in structlog.contextvars.get_contextvars()


async def test_records_holding_arrays_are_asked_for_by_the_readings_they_bring() -> None:
    """A gateway's record holds many readings: a batch of arrays stays near its size in
    readings instead of holding ``max_readings`` arrays."""
    nxt = FakeNext()
    batching = BatchingStep(nxt, BatchLimits(max_readings=1000, max_age=3600))
    assert batching.room() == 1000  # nothing known yet: one reading per record
    await batching.submit(record_batch(range(0, 4), readings=200))  # arrays of 50
    await batching.poll()
    assert batching.room() == (1000 - 200) // 50
    await batching.submit(record_batch(range(4, 20), readings=800))
    await batching.poll()
    assert [len(b) for b in nxt.got] == [1000]
    assert batching.room() == 1000 // 50
    await batching.submit(record_batch(range(20, 30), readings=10))  # single readings again
    assert batching.room() == 1000 - 10
