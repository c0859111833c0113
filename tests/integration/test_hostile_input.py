"""Input near the broker's size limit never stops a partition: given a message a few
hundred bytes short of 1 MiB that is not a valid reading, when it flows through a
worker between two good readings, then both readings are stored and the message is
dead-lettered, cut to fit, with headers that say so and identify the original."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from fleet_telemetry.consumers.deadletter import HEADER_TRUNCATED, record_size
from tests.integration.streams import publish, read_topic, run_worker

pytestmark = pytest.mark.integration

PRODUCER_LIMIT = 1_048_576  # aiokafka's default max_request_size, Kafka's default message size


async def test_a_message_near_the_size_limit_is_dead_lettered_cut_to_fit(topics, producer, db, make_vehicles) -> None:
    settings = topics
    (vid,) = await make_vehicles(1)
    key = str(vid).encode()
    now = datetime.now(timezone.utc).replace(microsecond=0)

    def reading(when: datetime) -> bytes:
        return orjson.dumps({"vehicle_id": str(vid), "time": when.isoformat(), "lat": 52.5, "lon": 13.4})

    # Valid JSON, not a reading (no time, no position), as large as a producer may send
    # (1 MiB with the record batch around it): the dead-letter headers cannot fit beside it.
    def message(padding: int) -> bytes:
        return b'{"vehicle_id": "' + str(vid).encode() + b'", "note": "' + b"x" * padding + b'"}'

    padding = 1_048_576 - 200
    while record_size(key, message(padding), []) > PRODUCER_LIMIT - 16:
        padding -= 1
    huge = message(padding)
    assert record_size(key, huge, [("fleet.error.reason", b"invalid_reading")] * 8) > PRODUCER_LIMIT
    await publish(producer, settings.telemetry_topic,
                  [(key, reading(now - timedelta(minutes=2))), (key, huge), (key, reading(now - timedelta(minutes=1)))])

    await run_worker(settings)

    stored = await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid)
    assert stored == 2
    (letter,) = await read_topic(settings, settings.dlq_topic, expected=1)
    assert letter.headers["fleet.error.reason"] == "invalid_reading"
    assert letter.headers[HEADER_TRUNCATED] == "value"
    assert letter.headers["fleet.original.value_size"] == str(len(huge))
    assert letter.headers["fleet.original.value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(letter.value) and len(letter.value) > 900_000
    assert letter.key == key
