"""Ranges of partitions read as an async iterator: the Kafka loop in assign-and-seek mode.

:func:`read_ranges` runs a :class:`~fleet_telemetry.consumers.kafka_loop.KafkaLoop` with
a strategy that hands each fetch over, so a reader that pulls (the Kafka replay source,
a test reading a topic back) gets the loop's end-offset and position handling without
touching a consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.kafka_loop import (
    Committable, KafkaConsumer, KafkaLoop, LoopMetrics, LoopOptions, Records,
)
@dataclass(frozen=True)
class Fetched:
    """One fetch of a range read: the records inside the ranges (maybe none) and where the
    ranges stood after it."""

    records: Records
    next: Mapping[TopicPartition, int]
    """Per partition, the next offset to read."""
    end: Mapping[TopicPartition, int]
    """Per partition, its end offset, once known."""


class _Handoff:
    """The :class:`~fleet_telemetry.consumers.kafka_loop.Strategy` of :func:`read_ranges`:
    hands each fetch to a queue (blocking while the reader has not taken the previous one)."""

    backpressure = False
    in_flight = 0

    def __init__(self, room: int, queue: asyncio.Queue[Fetched]) -> None:
        self.offsets = Committable()
        self.loop: KafkaLoop | None = None
        """The loop that drives it: its ranges say where the read stands."""
        self._room = room
        self._queue = queue
        self._records: Records = {}

    def room(self) -> int:
        return self._room

    async def submit(self, records: Records) -> None:
        self._records = records

    async def poll(self) -> None:
        ranges = None if self.loop is None else self.loop.ranges
        if ranges is not None:
            records, self._records = self._records, {}
            await self._queue.put(Fetched(records, dict(ranges.next), dict(ranges.end)))

    async def close(self) -> None:
        await self.poll()  # where the ranges ended, also when no fetch was needed

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def handover(self) -> None:
        pass

    def abandon(self) -> None:
        pass


async def read_ranges(options: LoopOptions, *, room: int, metrics: LoopMetrics | None = None,
                      consumer_factory: Callable[[], KafkaConsumer] | None = None,
                      ) -> AsyncGenerator[Fetched, None]:
    """Reads the ranges ``options.seek`` plans, as one :class:`Fetched` per fetch (at most
    ``room`` records each) and a last one once every partition is finished.

    Blocks on the broker; nothing is committed. Raises what the plan raises, and
    ``ServiceUnavailable`` when the broker does not answer. Closing the iterator early
    stops the read.
    """
    assert options.seek is not None, "read_ranges needs a seek plan"
    queue: asyncio.Queue[Fetched] = asyncio.Queue(maxsize=1)
    strategy = _Handoff(room, queue)
    loop = strategy.loop = KafkaLoop(strategy, options, metrics or LoopMetrics(), consumer_factory=consumer_factory)
    run = asyncio.ensure_future(loop.run())
    try:
        while True:
            take = asyncio.ensure_future(queue.get())
            await asyncio.wait({take, run}, return_when=asyncio.FIRST_COMPLETED)
            if take.done():
                yield take.result()
                continue
            take.cancel()  # the read ended; what it handed over is still in the queue
            with contextlib.suppress(asyncio.CancelledError):
                await take
            while not queue.empty():
                yield queue.get_nowait()
            run.result()  # raises what ended the read
            return
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
