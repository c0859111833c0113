"""What the pipeline decided, seen without SQL: a small stream goes through a real worker
(a vehicle runs low on fuel, broken messages are dead-lettered), then an operator lists,
shows and resolves its alert, reads the dead letters back, looks a vehicle up by id, VIN
or plate, and asks ``fleet status`` whether the whole system is healthy."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from tests.databases import create_database, drop_database
from tests.integration.cli import fleet
from tests.integration.streams import publish, run_worker
from tests.users import make_user

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Story:
    settings: Settings
    vehicle: uuid.UUID
    vin: str
    plate: str
    driver: str
    quiet: uuid.UUID
    """A vehicle with no readings at all."""
    unknown: uuid.UUID


@pytest_asyncio.fixture(scope="module")
async def story(base_settings: Settings, database_url: str) -> AsyncIterator[Story]:
    """One worker has stored a vehicle running low on fuel and dead-lettered three broken messages."""
    tag = uuid.uuid4().hex[:10]
    settings = base_settings.model_copy(update={
        "database_url": database_url, "telemetry_topic": f"test.telemetry.{tag}", "dlq_topic": f"test.dlq.{tag}",
        "consumer_group": f"test-group-{tag}", "metrics_port": 0, "redis_key_prefix": f"test-{tag}:",
        "alert_offline_seconds": 0.0, "geofence_dwell_seconds": 0.0})
    await ensure_topics(settings, [settings.telemetry_topic, settings.dlq_topic], partitions=2)
    vehicle, quiet, unknown = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    vin, plate, driver = f"VW{tag[:15].upper()}", f"OP-{tag[:6].upper()}", f"Driver {tag}"
    conn = await asyncpg.connect(database_url)
    try:
        for vid, v, p in ((vehicle, vin, plate), (quiet, f"Q{tag[:16].upper()}", f"Q-{tag[:6].upper()}")):
            await conn.execute("INSERT INTO vehicles (id, vin, license_plate, make, model, type, status)"
                               " VALUES ($1, $2, $3, 'Volvo', 'FH16', 'truck', 'active')", vid, v, p)
        driver_id = await conn.fetchval("INSERT INTO drivers (name) VALUES ($1) RETURNING id", driver)
        await conn.execute("INSERT INTO vehicle_assignments (vehicle_id, driver_id, start_time, status)"
                           " VALUES ($1, $2, now() - interval '1 hour', 'ACTIVE')", vehicle, driver_id)
    finally:
        await conn.close()
    now = datetime.now(timezone.utc)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await publish(producer, settings.telemetry_topic, [
            (str(vehicle).encode(), {"vehicle_id": str(vehicle), "time": (now - timedelta(seconds=s)).isoformat(),
                                     "lat": 48.1, "lon": 11.5, "speed": 40.0, "fuel_level": 6.0,
                                     "odometer_km": 120_345.5}) for s in (20, 10)
        ] + [
            (b"junk", b"not json at all " + b"x" * 300),
            (str(unknown).encode(), {"vehicle_id": str(unknown), "time": now.isoformat(), "lat": 1.0, "lon": 1.0}),
            (str(vehicle).encode(), {"vehicle_id": str(vehicle), "time": now.isoformat(), "lat": 95.0, "lon": 1.0}),
        ])
    finally:
        await producer.stop()
    await run_worker(settings, idle=2.0)
    yield Story(settings, vehicle, vin, plate, driver, quiet, unknown)
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def ok(result: "subprocess.CompletedProcess[str]") -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: "subprocess.CompletedProcess[str]", code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    return line


# --- alerts ---------------------------------------------------------------------------------------


async def test_alerts_list_show_and_resolve_with_an_audit_row(story: Story, db: asyncpg.Connection) -> None:
    s = story.settings
    listed = json.loads(ok(fleet(s, "alerts", "list", "--open", "--vehicle", story.plate, "--json")))
    assert [(a["type"], a["severity"], a["license_plate"], a["is_resolved"]) for a in listed] == [
        ("low_fuel", "warning", story.plate, False)]
    alert = listed[0]["id"]
    assert json.loads(ok(fleet(s, "alerts", "list", "--vehicle", story.vin, "--type", "overspeed", "--json"))) == []
    assert json.loads(ok(fleet(s, "alerts", "list", "--vehicle", story.plate, "--since", "2099-01-01T00:00:00Z",
                               "--json"))) == []
    text = ok(fleet(s, "alerts", "list", "--vehicle", str(story.vehicle), "--since", "1h"))
    assert f"id={alert}" in text and "type=low_fuel" in text and f"license_plate={story.plate}" in text

    shown = json.loads(ok(fleet(s, "alerts", "show", str(alert), "--json")))
    assert shown["vehicle_id"] == str(story.vehicle) and shown["details"] and shown["history"] == []

    anna = f"anna-{uuid.uuid4().hex[:8]}@fleet.test"
    anna_id = str(await make_user(db, anna, "dispatcher"))
    resolved = json.loads(ok(fleet(s, "alerts", "resolve", str(alert), "--note", "refuelled at the depot",
                                   "--actor", anna, "--json")))
    assert resolved["is_resolved"] and resolved["resolved_at"]
    assert resolved["details"]["note"] == "refuelled at the depot" and resolved["details"]["resolved_by"] == anna_id
    row = await db.fetchrow("SELECT actor, before, after FROM audit_logs WHERE entity_type = 'alert'"
                            " AND entity_id = $1 AND action = 'alert.resolve'", str(alert))
    assert row is not None and row["actor"] == anna_id
    assert json.loads(row["before"])["is_resolved"] is False and json.loads(row["after"])["is_resolved"] is True
    assert [h["actor"] for h in json.loads(ok(fleet(s, "alerts", "show", str(alert), "--json")))["history"]] == [anna_id]
    assert json.loads(ok(fleet(s, "alerts", "list", "--open", "--vehicle", story.plate, "--json"))) == []

    assert one_line_error(fleet(s, "alerts", "resolve", str(alert))).startswith(
        f"fleet alerts: alert {alert} was resolved already (")
    assert one_line_error(fleet(s, "alerts", "show", "987654321")) == \
        "fleet alerts: no alert with id 987654321 (see 'fleet alerts list')"
    assert "invalid choice: 'speeding'" in one_line_error(fleet(s, "alerts", "list", "--type", "speeding"))


# --- vehicles ---------------------------------------------------------------------------------------


async def test_vehicle_status_by_id_vin_or_plate(story: Story) -> None:
    s = story.settings
    by_id, by_vin, by_plate = (json.loads(ok(fleet(s, "vehicles", "status", name, "--json")))
                               for name in (str(story.vehicle), story.vin.lower(), story.plate.lower()))
    assert by_id["vehicle"]["id"] == by_vin["vehicle"]["id"] == by_plate["vehicle"]["id"] == str(story.vehicle)
    live, position = by_id["live"], by_id["position"]
    assert (live["lat"], live["lon"], live["fuel_level"], live["speed"]) == (48.1, 11.5, 6.0, 40.0)
    assert (position["lat"], position["lon"]) == (48.1, 11.5)
    assert by_id["on_duty"]["driver"] == story.driver and live["driver_id"] == by_id["on_duty"]["driver_id"]
    assert by_id["odometer_km"] == 120_345.5
    assert datetime.fromisoformat(by_id["last_reading_time"]) > datetime.now(timezone.utc) - timedelta(minutes=5)
    assert {a["type"] for a in by_id["open_alerts"]} <= {"low_fuel"}

    text = ok(fleet(s, "vehicles", "status", story.plate))
    assert f"plate {story.plate}" in text and f"driver {story.driver}" in text and "48.1,11.5" in text

    quiet = json.loads(ok(fleet(s, "vehicles", "status", str(story.quiet), "--json")))
    assert quiet["live"] is None and quiet["position"] is None and quiet["last_reading_time"] is None
    assert quiet["on_duty"] is None and "no live status" in quiet["live_note"]

    down = json.loads(ok(fleet(s, "vehicles", "status", story.vin, "--json", redis_url="redis://127.0.0.1:1/0")))
    assert down["live"] is None and down["live_note"].startswith("Redis not answering")
    assert down["position"]["lat"] == 48.1

    assert one_line_error(fleet(s, "vehicles", "status", "NO-SUCH-PLATE")) == \
        "fleet vehicles: no vehicle with id, VIN or plate 'NO-SUCH-PLATE' (see 'fleet vehicles list')"
    assert one_line_error(fleet(s, "vehicles", "status", str(story.unknown))) == \
        f"fleet vehicles: no vehicle with id {story.unknown}"


async def test_existing_commands_take_a_vehicle_by_plate(story: Story) -> None:
    s = story.settings
    shown = json.loads(ok(fleet(s, "vehicles", "show", story.plate, "--json")))
    assert shown["id"] == str(story.vehicle)
    bookings = json.loads(ok(fleet(s, "assignments", "list", "--vehicle", story.vin, "--json")))
    assert [b["vehicle_id"] for b in bookings] == [str(story.vehicle)]


# --- dead letters -------------------------------------------------------------------------------------


async def test_dead_letters_list_and_show_without_a_group_or_a_file(story: Story, tmp_path: Path) -> None:
    s = story.settings
    listed = json.loads(ok(fleet(s, "dead-letters", "list", "--json", cwd=tmp_path)))
    assert listed["matched"] == 3
    by_reason = {d["reason"]: d for d in listed["dead_letters"]}
    assert set(by_reason) == {"malformed_json", "unknown_vehicle", "invalid_reading"}
    junk = by_reason["malformed_json"]
    assert junk["value"] == "not json at all " + "x" * 300 and junk["key"] == "junk"
    assert junk["source"]["topic"] == s.telemetry_topic and junk["detail"]
    assert "field 'lat'" in by_reason["invalid_reading"]["detail"]
    times = [d["time"] for d in listed["dead_letters"]]
    assert times == sorted(times, reverse=True)

    only = json.loads(ok(fleet(s, "dead-letters", "list", "--reason", "unknown_vehicle", "--json")))
    assert [d["reason"] for d in only["dead_letters"]] == ["unknown_vehicle"]
    assert str(story.unknown) in only["dead_letters"][0]["value"]
    assert json.loads(ok(fleet(s, "dead-letters", "list", "--since", "2099-01-01T00:00:00Z", "--json")))[
        "matched"] == 0
    assert json.loads(ok(fleet(s, "dead-letters", "list", "--since", "1h", "--limit", "1", "--json")))[
        "matched"] == 3

    text = ok(fleet(s, "dead-letters", "list", cwd=tmp_path))
    assert "malformed_json" in text and "x" * 300 not in text and "..." in text
    assert text.rstrip().endswith("3 dead letters; 'fleet dead-letters show PARTITION:OFFSET' for one whole")

    whole = json.loads(ok(fleet(s, "dead-letters", "show", junk["at"], "--json", cwd=tmp_path)))
    assert whole["value"] == junk["value"] and whole["reason"] == "malformed_json"
    shown = ok(fleet(s, "dead-letters", "show", junk["at"]))
    assert "reason:    malformed_json" in shown and "x" * 300 in shown
    assert list(tmp_path.iterdir()) == []

    missing = one_line_error(fleet(s, "dead-letters", "show", "0:999999"))
    assert missing.startswith(f"fleet dead-letters: no dead letter at 0:999999 of {s.dlq_topic}")
    assert "PARTITION:OFFSET" in one_line_error(fleet(s, "dead-letters", "show", "twelve"))


# --- fleet status ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def fresh(base_settings: Settings, story: Story) -> AsyncIterator[Settings]:
    """The story's topics and group on a database of its own, migrated and maintained."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    url = await create_database(base_settings.database_url, name, migrate=True)
    settings = story.settings.model_copy(update={"database_url": url})
    try:
        ok(fleet(settings, "maintain"))
        yield settings
    finally:
        await drop_database(base_settings.database_url, name)


async def test_status_is_healthy_then_needs_attention(fresh: Settings, story: Story) -> None:
    healthy = fleet(fresh, "status", "--json")
    report = json.loads(healthy.stdout)
    assert healthy.returncode == 0, report["attention"]
    assert report["healthy"] and report["attention"] == []
    assert all(s["answers"] for s in report["services"].values())
    assert report["schema"]["pending"] == [] and report["schema"]["version"].startswith("00")
    consumer = report["consumer"]
    assert consumer["group"] == fresh.consumer_group and consumer["lag"] == 0
    assert [p["partition"] for p in consumer["partitions"]] == [0, 1]
    assert sum(p["end"] for p in consumer["partitions"]) == 5
    assert report["dead_letters_last_hour"] == {"total": 3, "by_reason": {
        "invalid_reading": 1, "malformed_json": 1, "unknown_vehicle": 1}}
    assert report["maintenance"]["partitions_ready_days_ahead"] == fresh.partitions_ahead_days
    text = ok(fleet(fresh, "status"))
    assert "healthy" in text.splitlines()[-1] and "dead letters  last hour: 3" in text

    redis_down = fleet(fresh, "status", redis_url="redis://127.0.0.1:1/0")
    assert redis_down.returncode == 1
    assert "  - Redis at redis://127.0.0.1:1/0 is not answering" in redis_down.stdout
    assert "dead letters  last hour: 3" in redis_down.stdout  # the other parts still answer

    conn = await asyncpg.connect(fresh.database_url)
    try:
        today = datetime.now(timezone.utc).strftime("%Y%m%d")
        await conn.execute(f"DROP TABLE vehicle_telemetry_p{today}")
    finally:
        await conn.close()
    missing = fleet(fresh, "status", "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["attention"] == [
        f"telemetry partition vehicle_telemetry_p{today} is missing: run 'fleet maintain'"]

    # A reading waiting ten minutes for a consumer.
    producer = AIOKafkaProducer(bootstrap_servers=fresh.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        waited = int((datetime.now(timezone.utc) - timedelta(minutes=10)).timestamp() * 1000)
        await producer.send_and_wait(fresh.telemetry_topic, b"{}", partition=1, timestamp_ms=waited)
    finally:
        await producer.stop()
    late = json.loads(fleet(fresh, "status", "--json").stdout)
    assert late["consumer"]["lag"] == 1 and 600 <= late["consumer"]["lag_seconds"] < 700
    assert [p["lag"] for p in late["consumer"]["partitions"]] == [0, 1]
    assert any(line.startswith(f"the oldest unconsumed record of {fresh.telemetry_topic} waits 6")
               for line in late["attention"])


async def test_status_when_everything_is_down_says_so_in_one_screen(story: Story) -> None:
    down = fleet(story.settings, "status", database_url="postgresql://postgres@127.0.0.1:1/fleet",
                 redis_url="redis://127.0.0.1:1/0", kafka_bootstrap="127.0.0.1:1")
    assert down.returncode == 1 and down.stderr == ""
    lines = down.stdout.splitlines()
    assert sum("NOT ANSWERING" in line for line in lines) == 3
    assert "schema        not answering" in lines and "consumer      not answering" in lines
