"""Given registered vehicles and a messy stream, when it flows through one worker, then
exactly the expected rows, statuses, dead letters and metrics exist."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from tests.integration.streams import publish, read_topic, run_worker

pytestmark = pytest.mark.integration


def iso(t: datetime) -> str:
    return t.isoformat()


async def test_a_messy_stream_ends_in_exact_rows_statuses_and_dead_letters(
    topics, producer, db, redis_client, make_vehicles
) -> None:
    settings = topics
    a, b = await make_vehicles(2)
    stranger = uuid.uuid4()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t = [now - timedelta(minutes=10 - i) for i in range(6)]  # t[0] oldest ... t[5] newest
    ka, kb = str(a).encode(), str(b).encode()

    def reading(vid: uuid.UUID, when: datetime, **extra: object) -> dict[str, object]:
        return {"vehicle_id": str(vid), "time": iso(when), "lat": 52.5, "lon": 13.4, "speed": 50.0, **extra}

    malformed = b'{"vehicle_id": "' + ka + b'", "time": '
    out_of_range = orjson.dumps(reading(a, t[1], lat=95.0))
    future = orjson.dumps(reading(b, now + timedelta(hours=1)))
    unknown = orjson.dumps(reading(stranger, t[2]))
    too_old = orjson.dumps(reading(b, now - timedelta(days=45)))
    array = [reading(b, t[0], speed=10.0), {"vehicle_id": str(b), "time": iso(t[1]), "lat": 52.5}, reading(b, t[2], speed=30.0, lon=13.9)]
    messages = [
        (ka, reading(a, t[0], speed=20.0)),
        (ka, reading(a, t[3], speed=40.0, fuel_level=55.5, heading=90.0)),
        (ka, reading(a, t[3], speed=99.0)),  # duplicate identity, other payload: dropped
        (ka, reading(a, t[1], speed=21.0)),  # late, out of order: stored, status unchanged
        (kb, array),  # element 1 lacks lon
        (ka, malformed),
        (ka, out_of_range),
        (kb, future),
        (str(stranger).encode(), unknown),
        (kb, too_old),
        (ka, reading(a, t[0], speed=20.0)),  # exact redelivery of the first reading
    ]
    await publish(producer, settings.telemetry_topic, messages)

    worker = await run_worker(settings)

    rows = await db.fetch(
        "SELECT vehicle_id, time, speed, ST_X(location) AS lon, fuel_level, heading FROM vehicle_telemetry"
        " WHERE vehicle_id = ANY($1::uuid[]) ORDER BY vehicle_id, time",
        [a, b, stranger],
    )
    got = {(r["vehicle_id"], r["time"], r["speed"]) for r in rows}
    assert got == {
        (a, t[0], 20.0), (a, t[1], 21.0), (a, t[3], 40.0),
        (b, t[0], 10.0), (b, t[2], 30.0),
    }

    status_a = {k.decode(): v.decode() for k, v in (await redis_client.hgetall(f"vehicle:{a}:status")).items()}
    assert status_a["time"] == t[3].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert (status_a["speed"], status_a["fuel_level"], status_a["heading"]) == ("40.0", "55.5", "90.0")
    assert "driver_id" not in status_a
    assert 0 < await redis_client.ttl(f"vehicle:{a}:status") <= 300
    status_b = {k.decode(): v.decode() for k, v in (await redis_client.hgetall(f"vehicle:{b}:status")).items()}
    assert (status_b["time"], status_b["lon"], status_b["speed"]) == (
        t[2].strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "13.9", "30.0")
    assert await redis_client.exists(f"vehicle:{stranger}:status") == 0

    letters = await read_topic(settings, settings.dlq_topic, expected=6)
    by_reason = {letter.headers["fleet.error.reason"]: letter for letter in letters}
    assert sorted(letter.headers["fleet.error.reason"] for letter in letters) == sorted(
        ["invalid_reading", "malformed_json", "invalid_reading", "future_time", "unknown_vehicle", "outside_retention"]
    )
    assert by_reason["malformed_json"].value == malformed
    assert by_reason["malformed_json"].key == ka
    assert by_reason["future_time"].value == future
    assert by_reason["unknown_vehicle"].value == unknown
    assert by_reason["unknown_vehicle"].headers["fleet.error.detail"] == (
        f"field 'vehicle_id' is {stranger}, which is not a registered vehicle")
    assert by_reason["outside_retention"].value == too_old
    invalid = [letter for letter in letters if letter.headers["fleet.error.reason"] == "invalid_reading"]
    element = next(letter for letter in invalid if "fleet.source.index" in letter.headers)
    assert element.headers["fleet.source.index"] == "1"
    assert orjson.loads(element.value) == array[1]
    assert element.headers["fleet.error.detail"] == "field 'lon' is missing"
    whole = next(letter for letter in invalid if "fleet.source.index" not in letter.headers)
    assert whole.value == out_of_range
    assert whole.headers["fleet.error.detail"] == "field 'lat' is 95.0, must be between -90 and 90"
    for letter in letters:
        assert letter.headers["fleet.source.topic"] == settings.telemetry_topic
        assert int(letter.headers["fleet.source.partition"]) in range(4)
        assert int(letter.headers["fleet.source.offset"]) >= 0
        datetime.fromisoformat(letter.headers["fleet.failed_at"])

    m = worker.metrics
    assert m.value("fleet_readings_total", outcome="stored") == 5
    assert m.value("fleet_readings_total", outcome="duplicate") == 2
    assert m.value("fleet_readings_total", outcome="dead_lettered") == 6
    for reason in ("future_time", "unknown_vehicle", "outside_retention", "malformed_json"):
        assert m.value("fleet_dead_letters_total", reason=reason) == 1
    assert m.value("fleet_dead_letters_total", reason="invalid_reading") == 2
    assert m.value("fleet_ingest_latency_seconds_count") == 5
    assert m.value("fleet_messages_total") == len(messages)


async def test_a_second_run_over_the_same_stream_adds_nothing(topics, producer, db, make_vehicles) -> None:
    settings = topics
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
    readings = [{"vehicle_id": str(vid), "time": iso(start + timedelta(seconds=i)), "lat": 10.0, "lon": 10.0}
                for i in range(200)]
    await publish(producer, settings.telemetry_topic, [(str(vid).encode(), r) for r in readings])
    first = await run_worker(settings)
    # A replay: the same records again, read by a fresh group from the beginning.
    replay = settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"})
    second = await run_worker(replay)
    count = await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid)
    assert count == 200
    assert first.metrics.value("fleet_readings_total", outcome="stored") == 200
    assert second.metrics.value("fleet_readings_total", outcome="stored") == 0
    assert second.metrics.value("fleet_readings_total", outcome="duplicate") == 200


async def test_the_driver_of_the_active_assignment_is_in_the_status(topics, producer, db, redis_client, make_vehicles) -> None:
    settings = topics
    (vid,) = await make_vehicles(1)
    driver = await db.fetchval("INSERT INTO drivers (name, license_number, status) VALUES ('Ada', $1, 'active') RETURNING id",
                               uuid.uuid4().hex[:10])
    await db.execute(
        "INSERT INTO vehicle_assignments (vehicle_id, driver_id, start_time, end_time, status)"
        " VALUES ($1, $2, now() - interval '1 hour', NULL, 'ACTIVE')", vid, driver)
    now = datetime.now(timezone.utc)
    await publish(producer, settings.telemetry_topic,
                  [(str(vid).encode(), {"vehicle_id": str(vid), "time": iso(now), "lat": 1.0, "lon": 2.0})])
    await run_worker(settings)
    assert await redis_client.hget(f"vehicle:{vid}:status", "driver_id") == str(driver).encode()
