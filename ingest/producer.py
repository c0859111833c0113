"""The gateway side: a producer client for telemetry readings (docs/interface.md, version 1).

Readings are keyed by ``vehicle_id`` so one vehicle's readings stay ordered in one
partition; values are UTF-8 JSON, one reading or an array (a gateway's batch). The
client batches (``linger_ms``), compresses (:data:`DEFAULT_COMPRESSION` unless told
otherwise), retries, and uses the idempotent producer where the broker supports it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4
from aiokafka.errors import KafkaConnectionError, KafkaError

from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.producer")

DEFAULT_COMPRESSION: str | None = "lz4" if has_lz4() else "gzip"
"""The codec :class:`TelemetryProducer` compresses its batches with unless told otherwise.

lz4 where aiokafka has its codec (the ``aiokafka[lz4]`` dependency brings it): the
consumer decompresses an lz4 batch in well under a microsecond, a gzip batch in about
eight, which is most of what one reading costs to fetch when a batch holds few
readings, as a gateway's do; lz4 still shrinks big batches about threefold. gzip where
aiokafka lacks lz4.
"""


_WITHOUT_IDEMPOTENCE: set[str] = set()
"""Bootstrap addresses whose broker refused idempotent producers: this process does not ask again."""


async def start_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """A started producer: idempotent where the broker supports it, acks from all replicas."""
    base: dict[str, Any] = {**settings.kafka_client_options(), "acks": "all", "linger_ms": 5, **options}
    if settings.kafka_bootstrap in _WITHOUT_IDEMPOTENCE:
        return await _started(AIOKafkaProducer(**base))
    producer = AIOKafkaProducer(enable_idempotence=True, **base)
    sender_log = logging.getLogger("aiokafka.producer.sender")
    level = sender_log.level
    sender_log.setLevel(logging.CRITICAL)  # the probe below is expected to fail on some brokers
    try:
        await producer.start()
        return producer
    except KafkaError as exc:
        await producer.stop()
        if isinstance(exc, KafkaConnectionError):
            raise
        # Brokers without InitProducerId (some Kafka-compatible ones) answer with an
        # error here; fall back to plain acks=all with retries.
        _WITHOUT_IDEMPOTENCE.add(settings.kafka_bootstrap)
        log.debug("broker does not support idempotent producers; using acks=all", error=type(exc).__name__)
    finally:
        sender_log.setLevel(level)
    return await _started(AIOKafkaProducer(**base))


async def _started(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """``producer`` started, or stopped again when it cannot start."""
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer


class TelemetryProducer:
    """Publishes readings to the telemetry topic. Use as ``async with``."""

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        compression_type: str | None = DEFAULT_COMPRESSION,
        linger_ms: int = 20,
        max_batch_size: int = 512 * 1024,
    ) -> None:
        self._settings = settings
        self.topic = topic or settings.telemetry_topic
        self._options: dict[str, Any] = {
            "compression_type": compression_type,
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_size,
        }
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = await start_producer(self._settings, **self._options)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> "TelemetryProducer":
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("TelemetryProducer is not started")
        return self._producer

    async def send(self, reading: Mapping[str, Any]) -> None:
        """Queue one reading; returns once it is in the producer's buffer."""
        await self.producer.send(
            self.topic, orjson.dumps(reading), key=str(reading["vehicle_id"]).encode()
        )

    async def send_batch(self, readings: Sequence[Mapping[str, Any]]) -> None:
        """Queue a gateway batch of one vehicle's readings as one array message."""
        if not readings:
            return
        await self.producer.send(
            self.topic, orjson.dumps(list(readings)), key=str(readings[0]["vehicle_id"]).encode()
        )

    async def send_raw(self, value: bytes, key: bytes | None) -> None:
        """Queue bytes as they are (tests and the simulator's bad messages)."""
        await self.producer.send(self.topic, value, key=key)

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged by the broker."""
        await self.producer.flush()
