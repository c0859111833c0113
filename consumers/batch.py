"""Batching: decoded readings and rejections, with the offsets they make committable.

A :class:`Batch` carries, per partition, the next offset to commit once the batch is
durable; offsets travel with the data. :func:`batch_ready` is the one decision of when
the open batch goes on (pure). :class:`BatchingStep` keeps the open batch and hands it
to its next step when it is ready and the next step has room.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka.structs import TopicPartition

from fleet_telemetry.core.reading import Reading, Rejection

BACKLOG_AGE_FACTOR = 10
"""While a backlog is read, a batch waits this many age limits at most before it goes."""


@dataclass
class Batch:
    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Per partition, the offset after the last record in this batch."""
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    messages: int = 0
    started: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when its first record was read: the batch's age counts from here."""
    trace_id: str = ""
    """Given when the batch goes on (:meth:`BatchingStep.flush`); the log lines of its steps carry it."""

    def __len__(self) -> int:
        return len(self.readings) + len(self.rejections)

    def age(self) -> float:
        return time.monotonic() - self.started

    def note_offset(self, tp: TopicPartition, offset: int) -> None:
        self.first_offsets.setdefault(tp, offset)
        self.offsets[tp] = offset + 1
        self.messages += 1

    def note_range(self, tp: TopicPartition, first: int, last: int, messages: int) -> None:
        """:meth:`note_offset` for ``messages`` records of ``tp``, from offset ``first`` to ``last``."""
        self.first_offsets.setdefault(tp, first)
        self.offsets[tp] = last + 1
        self.messages += messages

    def extend(self, other: "Batch") -> None:
        """Appends ``other``'s readings, rejections and offsets (records read after this
        batch's); a batch without records yet takes ``other``'s start as its own."""
        if not self.messages:
            self.started = other.started
        self.readings.extend(other.readings)
        self.rejections.extend(other.rejections)
        for tp, first in other.first_offsets.items():
            self.first_offsets.setdefault(tp, first)
        self.offsets.update(other.offsets)
        self.messages += other.messages


@dataclass(frozen=True)
class BatchLimits:
    max_readings: int
    """A batch of this many readings and rejections goes at once."""
    max_age: float
    """Seconds a batch may stay open while the worker keeps up."""


def batch_ready(*, size: int, messages: int, age: float, fetched: int, room: int, limits: BatchLimits) -> bool:
    """Whether the open batch goes on now.

    ``size`` readings and rejections from ``messages`` records, open for ``age``
    seconds; the last fetch brought ``fetched`` records where ``room`` were asked for. A
    full batch goes. The age limit bounds latency when the worker keeps up; while a
    backlog is read (the fetch filled all the room asked for) batches fill up to their
    size instead, which is what throughput needs, within :data:`BACKLOG_AGE_FACTOR` ages.
    """
    if size >= limits.max_readings:
        return True
    if messages == 0:
        return False
    backlog = fetched >= room > 0
    return age >= BACKLOG_AGE_FACTOR * limits.max_age or (age >= limits.max_age and not backlog)


class BoundedStep(Protocol):
    """A next step that may be full; while it is, ready batches wait."""

    @property
    def full(self) -> bool: ...

    async def submit(self, item: Batch) -> None: ...


class BatchingStep:
    """Collects decoded records into the open batch; hands it on when :func:`batch_ready`."""

    def __init__(self, next_step: BoundedStep, limits: BatchLimits) -> None:
        self.next_step = next_step
        self.limits = limits
        self.open = Batch()
        self._fetched = 0
        self._room = 0
        self._per_record = 1.0
        """Readings and rejections per record in the last fetch: a gateway's array holds many."""

    def room(self) -> int:
        """Records the next fetch may bring (at least one): what fills the open batch to its
        size at the last fetch's readings per record, so a batch of arrays stays near
        ``max_readings`` readings instead of holding that many arrays."""
        return max(int((self.limits.max_readings - len(self.open)) / self._per_record), 1)

    @property
    def pending(self) -> int:
        """1 while the open batch holds records, else 0."""
        return 1 if self.open.messages else 0

    async def submit(self, item: Batch) -> None:
        """Adds one fetch's decoded records to the open batch (never blocks)."""
        self._room = self.room()
        self._fetched = item.messages
        if item.messages:
            self._per_record = max(len(item) / item.messages, 1.0)
        self.open.extend(item)

    async def poll(self) -> None:
        """After each fetch: hands the open batch on if it is ready and the next step has room."""
        open_batch = self.open
        ready = batch_ready(size=len(open_batch), messages=open_batch.messages,
                            age=open_batch.age() if open_batch.messages else 0.0,
                            fetched=self._fetched, room=self._room, limits=self.limits)
        self._fetched = 0
        if ready and not self.next_step.full:
            await self.flush()

    async def flush(self) -> None:
        """Hands the open batch on now, whatever its size; blocks while the next step is full."""
        if self.open.messages == 0:
            return
        batch, self.open = self.open, Batch()
        batch.trace_id = uuid.uuid4().hex
        await self.next_step.submit(batch)
