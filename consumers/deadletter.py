"""Dead letters: every reading that is not stored and is not a duplicate.

Each :class:`~fleet_telemetry.core.reading.Rejection` becomes one record on the dead-letter topic with
the original key, the original bytes (or the array element as JSON) and the headers of
docs/interface.md, "Dead letters". :meth:`DeadLetters.publish` returns only when the broker
has acknowledged every record, so the caller can commit the source offsets after it.

A dead letter always fits the dead-letter topic (:func:`fit`): a record the broker
accepted on the source topic can be a few hundred bytes short of the size limit, and
the headers would push it over. Then the value (and, if it must, the key) is cut to
what fits, and headers say so, with the original size and SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from fleet_telemetry.core.reading import INVALID_READING, UNKNOWN_VEHICLE, Reading, Rejection

HEADER_REASON = "fleet.error.reason"
HEADER_DETAIL = "fleet.error.detail"
HEADER_TOPIC = "fleet.source.topic"
HEADER_PARTITION = "fleet.source.partition"
HEADER_OFFSET = "fleet.source.offset"
HEADER_INDEX = "fleet.source.index"
HEADER_FAILED_AT = "fleet.failed_at"
HEADER_TRUNCATED = "fleet.truncated"
"""``value``, or ``key,value``: what was cut to make the dead letter fit."""
HEADER_REDACTED = "fleet.redacted"
"""``value``: a secret (a command's token) was replaced by ``<redacted>`` in the value kept."""
HEADER_VALUE_SIZE = "fleet.original.value_size"
HEADER_VALUE_SHA256 = "fleet.original.value_sha256"
HEADER_KEY_SIZE = "fleet.original.key_size"
HEADER_KEY_SHA256 = "fleet.original.key_sha256"

DEFAULT_MAX_BYTES = 1_000_000
"""Below Kafka's default ``max.message.bytes`` (1,048,588) and the producer's default
``max.request.size`` (1,048,576), with room for the record batch around the record."""
_DETAIL_LIMIT = 1_000

Headers = list[tuple[str, bytes]]


def request_size(limit: int) -> int:
    """A producer's ``max_request_size`` with room for dead letters of ``limit`` bytes
    (1 MiB at least, aiokafka's default)."""
    return max(1_048_576, limit + 1024)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Bytes of a one-record batch: what the producer checks against its request size."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))  # type: ignore[arg-type]


def _cut(data: bytes, room: int) -> bytes:
    return data[:max(room, 0)]


def fit(key: bytes | None, value: bytes, headers: Headers,
        limit: int = DEFAULT_MAX_BYTES) -> tuple[bytes | None, bytes, Headers]:
    """``key``, ``value`` and ``headers`` of a record no larger than ``limit`` bytes.

    Unchanged when they fit. Otherwise the value is cut to the room left (the key too,
    when the key alone leaves none), and headers give what was cut with its original
    size and SHA-256, so the original can be found and checked; nothing is dropped
    silently and the record can always be sent.
    """
    if record_size(key, value, headers) <= limit:
        return key, value, headers
    headers = [(name, data[:_DETAIL_LIMIT]) for name, data in headers]
    cut = ["value"]
    marks: Headers = [(HEADER_VALUE_SIZE, str(len(value)).encode()),
                      (HEADER_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode())]
    if key is not None and record_size(key, b"", [*headers, (HEADER_TRUNCATED, b"key,value"), *marks]) > limit:
        cut.insert(0, "key")
        marks += [(HEADER_KEY_SIZE, str(len(key)).encode()),
                  (HEADER_KEY_SHA256, hashlib.sha256(key).hexdigest().encode())]
        key = _cut(key, limit // 2)
    headers = [*headers, (HEADER_TRUNCATED, ",".join(cut).encode()), *marks]
    room = limit - record_size(key, b"", headers)
    value = _cut(value, room)
    while record_size(key, value, headers) > limit and value:  # varint lengths: settle the last bytes
        value = value[:-max(1, record_size(key, value, headers) - limit)]
    return key, value, headers


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
    """Publishes rejections to the dead-letter topic, each cut to ``max_bytes`` if it
    must be (:func:`fit`)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._producer = producer
        self._topic = topic
        self._max_bytes = max_bytes

    async def publish(self, rejections: Sequence[Rejection]) -> None:
        """Send every rejection and wait for the broker's acknowledgement of all of them."""
        if not rejections:
            return
        failed_at = datetime.now(timezone.utc)
        futures = []
        for r in rejections:
            key, value, fitted = fit(r.key, r.value, headers(r, failed_at), self._max_bytes)
            futures.append(await self._producer.send(self._topic, value=value, key=key, headers=fitted))
        await asyncio.gather(*futures)
