"""Dead letters: every reading that is not stored and is not a duplicate.

Each :class:`~fleet_telemetry.core.reading.Rejection` becomes one record on the dead-letter topic with
the original key, the original bytes (or the array element as JSON) and the headers of
CONTRACT.md, "Dead letters". :meth:`DeadLetters.publish` returns only when the broker
has acknowledged every record, so the caller can commit the source offsets after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer

from fleet_telemetry.core.reading import INVALID_READING, UNKNOWN_VEHICLE, Reading, Rejection

HEADER_REASON = "fleet.error.reason"
HEADER_DETAIL = "fleet.error.detail"
HEADER_TOPIC = "fleet.source.topic"
HEADER_PARTITION = "fleet.source.partition"
HEADER_OFFSET = "fleet.source.offset"
HEADER_INDEX = "fleet.source.index"
HEADER_FAILED_AT = "fleet.failed_at"


def unknown_vehicle(reading: Reading) -> Rejection:
    return Rejection(
        UNKNOWN_VEHICLE,
        f"field 'vehicle_id' is {reading.vehicle_id}, which is not a registered vehicle",
        reading.source,
        reading.key,
        reading.dead_letter_value(),
    )


def refused(reading: Reading, message: str) -> Rejection:
    return Rejection(
        INVALID_READING,
        f"PostgreSQL refused the reading: {message}",
        reading.source,
        reading.key,
        reading.dead_letter_value(),
    )


def headers(rejection: Rejection, failed_at: datetime) -> list[tuple[str, bytes]]:
    source = rejection.source
    out = [
        (HEADER_REASON, rejection.reason.encode()),
        (HEADER_DETAIL, rejection.detail.encode()),
        (HEADER_TOPIC, source.topic.encode()),
        (HEADER_PARTITION, str(source.partition).encode()),
        (HEADER_OFFSET, str(source.offset).encode()),
    ]
    if source.index is not None:
        out.append((HEADER_INDEX, str(source.index).encode()))
    out.append((HEADER_FAILED_AT, failed_at.isoformat().encode()))
    return out


class DeadLetters:
    """Publishes rejections to the dead-letter topic."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def publish(self, rejections: Sequence[Rejection]) -> None:
        """Send every rejection and wait for the broker's acknowledgement of all of them."""
        if not rejections:
            return
        failed_at = datetime.now(timezone.utc)
        futures = [
            await self._producer.send(
                self._topic, value=r.value, key=r.key, headers=headers(r, failed_at)
            )
            for r in rejections
        ]
        await asyncio.gather(*futures)
