"""The fault soak's producer: a live fleet streaming readings, a share of them broken.

Each vehicle is a simulated one of :mod:`fleet_telemetry.ingest.simulate` (plausible
tracks, speeds, fuel, trouble codes) with an id of this run's own, so nothing else on
the services shares its keys. Readings carry the wall-clock time they are sent at, one
vehicle after the other, at a steady rate. A share of the messages is replaced by a
broken one (malformed JSON, an invalid reading, an unknown vehicle, a time in the
future: ``ingest.simulate.bad_message``).

The :class:`Ledger` remembers every message and, once the broker acknowledged it, its
partition and offset: what the soak later looks for in the table and the dead letters.
A send the broker failed is sent again (as a gateway would); the copy that was
acknowledged is the one remembered.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from fleet_telemetry.core.retry import Backoff, retry
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.ingest.simulate import BAD_KINDS, SimulatedVehicle, bad_message, make_fleet

READING = "reading"
"""The kind of a valid reading; the others are ``BAD_KINDS``."""
_FLEET_NAMESPACE = uuid.UUID("8c1d1d7e-51a8-4e43-9a55-6f3b5e0d9a21")


def soak_fleet(vehicles: int, seed: int, tag: str) -> list[SimulatedVehicle]:
    """``vehicles`` simulated vehicles (their motion from ``seed``) with ids of run ``tag``."""
    fleet = make_fleet(vehicles, seed)
    for i, vehicle in enumerate(fleet):
        vehicle.id = uuid.uuid5(_FLEET_NAMESPACE, f"{tag}-{i}")
    return fleet


@dataclass
class Sent:
    kind: str
    vehicle_id: uuid.UUID | None = None
    """Valid readings only, with ``time``: the reading's identity."""
    time: datetime | None = None


@dataclass
class Ledger:
    """What was sent, and where the broker put it."""

    messages: list[Sent] = field(default_factory=list)
    placed: dict[tuple[int, int], int] = field(default_factory=dict)
    """(partition, offset) -> index in ``messages``."""
    resent: int = 0

    def kinds(self) -> Counter[str]:
        return Counter(m.kind for m in self.messages)

    def readings(self) -> set[tuple[uuid.UUID, datetime]]:
        return {(m.vehicle_id, m.time) for m in self.messages if m.kind == READING}  # type: ignore[misc]


@dataclass(frozen=True)
class StreamSpec:
    readings: int
    rate: float
    bad_ratio: float
    seed: int


class Stream:
    """Sends ``spec.readings`` messages to ``topic`` at ``spec.rate`` per second."""

    def __init__(self, settings: Settings, topic: str, fleet: list[SimulatedVehicle], spec: StreamSpec,
                 progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.topic = topic
        self.fleet = fleet
        self.spec = spec
        self.ledger = Ledger()
        self._progress = progress
        self._rng = random.Random(spec.seed)
        self._resends: set[asyncio.Task[None]] = set()
        self._producer: AIOKafkaProducer | None = None

    async def run(self) -> None:
        """Blocks until every message was sent and acknowledged (sent again while the
        broker fails it); raises what is not a transient failure."""
        self._producer = await start_producer(self.settings, compression_type="gzip", linger_ms=100)
        try:
            started = time.monotonic()
            next_report = started + 10.0
            for i in range(self.spec.readings):
                delay = started + i / self.spec.rate - time.monotonic()
                if delay > 0.002:
                    await asyncio.sleep(delay)
                key, value = self._message(i)
                await self._send(i, key, value)
                if time.monotonic() >= next_report:
                    next_report += 10.0
                    self._progress(f"stream: {i + 1:,} of {self.spec.readings:,} sent,"
                                   f" {len(self.ledger.placed):,} acknowledged")
            await self._producer.flush()
            while self._resends:
                await asyncio.gather(*list(self._resends))
        finally:
            await self._producer.stop()

    def _message(self, i: int) -> tuple[bytes, bytes]:
        vehicle = self.fleet[i % len(self.fleet)]
        now = datetime.now(timezone.utc)
        reading = vehicle.step(now)
        if self._rng.random() < self.spec.bad_ratio:
            kind = self._rng.choice(BAD_KINDS)
            self.ledger.messages.append(Sent(kind))
            return bad_message(kind, reading, self._rng, now)
        self.ledger.messages.append(Sent(READING, vehicle.id, datetime.fromisoformat(reading["time"])))
        return str(vehicle.id).encode(), orjson.dumps(reading)

    async def _enqueue(self, key: bytes, value: bytes) -> "asyncio.Future[Any]":
        assert self._producer is not None
        try:
            return await self._producer.send(self.topic, value, key=key)
        except KafkaTimeoutError as exc:  # the broker away for longer than a request may wait
            raise asyncio.TimeoutError(str(exc)) from exc

    async def _send(self, index: int, key: bytes, value: bytes) -> None:
        future = await retry(lambda: self._enqueue(key, value), what="kafka", backoff=Backoff(0.2, 2.0))
        future.add_done_callback(lambda done: self._acknowledged(index, key, value, done))

    def _acknowledged(self, index: int, key: bytes, value: bytes, future: "asyncio.Future[Any]") -> None:
        if future.cancelled() or future.exception() is not None:
            task = asyncio.ensure_future(self._send_again(index, key, value))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)
            return
        meta = future.result()
        self.ledger.placed[(meta.partition, meta.offset)] = index

    async def _send_again(self, index: int, key: bytes, value: bytes) -> None:
        async def once() -> Any:
            future = await self._enqueue(key, value)
            try:
                return await future
            except KafkaTimeoutError as exc:
                raise asyncio.TimeoutError(str(exc)) from exc

        self.ledger.resent += 1
        meta = await retry(once, what="kafka", backoff=Backoff(0.2, 2.0))
        self.ledger.placed[(meta.partition, meta.offset)] = index
