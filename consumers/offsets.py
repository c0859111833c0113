"""Offsets, the data the Kafka loop commits and seeks by (pure but for the broker lookups).

:class:`Committable`: what a strategy's last step has finished, per partition; the loop
commits it. :class:`Ranges`: what an assign-and-seek read covers, from where to where.
:class:`OffsetLookup`: what a seek plan may ask the broker before partitions are assigned.
:class:`RecordTimes`: when the records fetched and not yet committed were written, for
the lag in seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.structs import TopicPartition

Records = Mapping[TopicPartition, Sequence[Any]]
"""One fetch: per partition, the records in offset order (aiokafka ``ConsumerRecord``)."""


class Committable:
    """Per partition, the next offset to commit: what the strategy's last step has finished."""

    def __init__(self) -> None:
        self._offsets: dict[TopicPartition, int] = {}

    def mark(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Records finished work; an offset never moves back."""
        for tp, offset in offsets.items():
            if offset > self._offsets.get(tp, -1):
                self._offsets[tp] = offset

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.pop(tp, None)

    def items(self) -> Iterator[tuple[TopicPartition, int]]:
        return iter(list(self._offsets.items()))


class RecordTimes:
    """Per partition, the Kafka timestamps (ms) of the records fetched and not yet committed.

    Kept as one span per fetch and partition (first and last offset, with their
    timestamps), so nothing is looked at per record: the lag in seconds is read from it.
    """

    def __init__(self) -> None:
        self._spans: dict[TopicPartition, deque[tuple[int, int, int, int]]] = {}
        self._newest: dict[TopicPartition, int] = {}

    def fetched(self, records: Records) -> None:
        """Notes one fetch's spans (a record without a timestamp, -1, leaves its span out)."""
        for tp, batch in records.items():
            if not batch:
                continue
            first, last = batch[0], batch[-1]
            if first.timestamp < 0 or last.timestamp < 0:
                continue
            self._spans.setdefault(tp, deque()).append((first.offset, first.timestamp, last.offset, last.timestamp))
            self._newest[tp] = max(last.timestamp, self._newest.get(tp, last.timestamp))

    def lag_seconds(self, tp: TopicPartition, committed: int | None, end: int | None, now_ms: float) -> float | None:
        """How old ``tp``'s oldest record not yet committed is, in seconds, at ``now_ms``.

        ``committed`` is the next offset to commit (None: nothing committed yet), ``end``
        the partition's end as last fetched. 0 when ``committed`` reached ``end``; None
        when nothing says (nothing fetched nor committed yet). Inside a fetch's span the
        time is interpolated by offset; records not fetched yet are taken to be as old as
        the newest fetched one (they are younger, so the lag is never understated).
        Drops the spans ``committed`` has passed.
        """
        spans = self._spans.get(tp)
        if spans and committed is not None:
            while spans and spans[0][2] < committed:
                spans.popleft()
        if spans:
            first, first_ms, last, last_ms = spans[0]
            oldest = float(first_ms)
            if committed is not None and committed > first:
                oldest += (last_ms - first_ms) * (committed - first) / (last - first)
            return max(0.0, (now_ms - oldest) / 1000)
        if committed is None or end is None:
            return None
        if end <= committed:
            return 0.0
        newest = self._newest.get(tp)
        return None if newest is None else max(0.0, (now_ms - newest) / 1000)

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        for tp in partitions:
            self._spans.pop(tp, None)
            self._newest.pop(tp, None)


class Lookups(Protocol):
    """The consumer calls :class:`OffsetLookup` makes."""

    async def topics(self) -> set[str]: ...
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> Mapping[TopicPartition, Any]: ...


@dataclass
class Ranges:
    """Assign-and-seek mode: which partitions to read, from where, to where.

    ``next`` starts as each partition's start offset (the loop seeks there) and then holds
    the next offset to read; ``end`` the end offsets (exclusive) known so far, given ones
    first. A partition without a given end is read to its end as of the start of the
    read: the larger of the end offset the broker lists (ListOffsets: the high watermark,
    or the last stable offset under ``read_committed``) and the one its first fetch
    reports (some brokers list ends late). A partition is finished when ``next`` reached
    its end, or reached the fetched end (nothing more exists now: a given end beyond it
    stops there).
    """

    next: dict[TopicPartition, int]
    end: dict[TopicPartition, int] = field(default_factory=dict)

    def learn_end(self, tp: TopicPartition, listed: int, fetched: int | None) -> None:
        """Fixes ``tp``'s end from its listed end and the first fetched one."""
        if tp not in self.end and fetched is not None:
            self.end[tp] = max(listed, fetched)

    def finished(self, tp: TopicPartition, fetched: int | None) -> bool:
        end = self.end.get(tp)
        if end is None:
            return False
        return self.next[tp] >= end or (fetched is not None and self.next[tp] >= fetched)

    def take(self, fetched: Records) -> dict[TopicPartition, list[Any]]:
        """The fetched records before each partition's end; moves ``next`` past them."""
        taken: dict[TopicPartition, list[Any]] = {}
        for tp, records in fetched.items():
            if tp not in self.next:
                continue
            end = self.end.get(tp)
            kept = [r for r in records if end is None or r.offset < end]
            if kept:
                taken[tp] = kept
                self.next[tp] = max(self.next[tp], kept[-1].offset + 1)
        return taken

    def advance(self, tp: TopicPartition, position: int) -> None:
        """Moves ``next`` to the consumer's position, past offsets without a record
        (transaction markers, compacted records), never beyond the end nor back."""
        end = self.end.get(tp)
        self.next[tp] = max(self.next[tp], position if end is None else min(end, position))


class OffsetLookup:
    """What a :attr:`LoopOptions.seek` plan may ask the broker before partitions are assigned."""

    def __init__(self, consumer: Lookups) -> None:
        self._consumer = consumer

    async def partitions(self, topic: str) -> set[int]:
        """The partition numbers of ``topic``; empty when the topic does not exist."""
        await self._consumer.topics()
        return set(self._consumer.partitions_for_topic(topic) or ())

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict(await self._consumer.beginning_offsets(partitions))

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Per partition, the offset the next record will get (the high watermark)."""
        return dict(await self._consumer.end_offsets(partitions))

    async def offsets_at(self, partitions: list[TopicPartition], timestamp_ms: int) -> dict[TopicPartition, int]:
        """Per partition, the first offset whose record time is at or after ``timestamp_ms``,
        where the broker can say; a partition it cannot say for is left out."""
        found = await self._consumer.offsets_for_times({tp: timestamp_ms for tp in partitions})
        # Only an offset with a real timestamp at or after the time is an answer: a broker
        # that cannot look times up answers offset 0 with timestamp -1.
        return {tp: answer.offset for tp, answer in found.items()
                if answer is not None and answer.offset >= 0 and answer.timestamp >= timestamp_ms}


Seek = Callable[[OffsetLookup], Awaitable[Ranges]]
"""Plans an assign-and-seek read once the consumer is connected."""
