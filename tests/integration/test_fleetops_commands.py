"""Event-driven writes: given command events on the command topic, when the command
consumer runs, then exactly these rows and audit rows exist, refused commands are
dead-lettered with their reason, and replaying the topic changes nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fleet_telemetry.fleetops.commands import CommandConsumer, command_value
from fleet_telemetry.fleetops.tokens import TokenKeys, issue
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from tests.integration.streams import read_topic
from tests.users import TEST_ADMIN

pytestmark = pytest.mark.integration

JWT_SECRET = "a test secret of more than 32 bytes, never logged"


def token_for(settings: Settings, user_id: uuid.UUID, ttl: int = 600) -> str:
    keys = TokenKeys.from_settings(settings)
    assert keys is not None
    return issue(keys, user_id, ttl_seconds=ttl, now=time.time())[0]


@pytest_asyncio.fixture
async def command_settings(settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:10]
    s = settings.model_copy(update={
        "commands_topic": f"test.commands.{tag}",
        "commands_dlq_topic": f"test.commands.dlq.{tag}",
        "commands_group": f"test-commands-{tag}",
        "jwt_secret": SecretStr(JWT_SECRET),
    })
    await ensure_topics(s, [s.commands_topic, s.commands_dlq_topic], partitions=2)
    return s


@pytest_asyncio.fixture
async def command_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def consume(settings: Settings) -> CommandConsumer:
    consumer = CommandConsumer(settings, stop_when_idle=2.0)
    assert await asyncio.wait_for(consumer.run(), timeout=120) == 0
    return consumer


def counted(consumer: CommandConsumer, outcome: str) -> float:
    return consumer.metrics.commands.labels(outcome=outcome)._value.get()


async def test_commands_are_applied_once_and_refusals_dead_lettered_with_their_reason(
    command_settings: Settings, command_producer: AIOKafkaProducer, db: asyncpg.Connection
) -> None:
    s = command_settings
    tag = uuid.uuid4().hex[:10].upper()
    admin = await db.fetchval("SELECT id FROM users WHERE email = $1", TEST_ADMIN)
    token = token_for(s, admin)
    vehicle, driver, other_driver, booking = (uuid.uuid4() for _ in range(4))
    ids = {name: uuid.uuid4() for name in ("vehicle", "driver", "other", "book", "clash", "unknown_type",
                                          "bad_field", "no_such", "no_customer")}

    # One key for all: these commands depend on each other, so they share a partition
    # and are applied in the order sent (docs/commands.md, "Ordering").
    key = f"depot-{tag}".encode()

    def cmd(name: str, kind: str, data: dict[str, object]) -> tuple[bytes | None, bytes]:
        return key, command_value(kind, data, command_id=ids[name], token=token)

    register = cmd("vehicle", "vehicle.register", {"id": str(vehicle), "vin": f"C{tag}", "license_plate": f"C-{tag}"})
    messages = [
        register,
        cmd("driver", "driver.register", {"id": str(driver), "name": f"Cmd {tag}"}),
        cmd("other", "driver.register", {"id": str(other_driver), "name": f"Cmd2 {tag}"}),
        cmd("book", "assignment.create", {"id": str(booking), "vehicle_id": str(vehicle), "driver_id": str(driver),
                                          "start_time": "2094-05-01T08:00:00Z", "end_time": "2094-05-01T16:00:00Z"}),
        cmd("clash", "assignment.create", {"vehicle_id": str(vehicle), "driver_id": str(other_driver),
                                           "start_time": "2094-05-01T12:00:00Z"}),
        (key, b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "type": '),
        cmd("unknown_type", "vehicle.paint", {"id": str(vehicle)}),
        cmd("bad_field", "vehicle.update", {"id": str(vehicle), "colour": "red"}),
        cmd("no_such", "assignment.cancel", {"id": str(uuid.uuid4())}),
        register,  # redelivered: the same command id again
        cmd("no_customer", "job.create", {"customer_id": str(uuid.uuid4())}),
    ]
    for message_key, value in messages:
        await command_producer.send(s.commands_topic, value, key=message_key)
    await command_producer.flush()

    first = await consume(s)

    assert (counted(first, "applied"), counted(first, "duplicate"), counted(first, "rejected")) == (4, 1, 6)
    assert await db.fetchval("SELECT count(*) FROM vehicles WHERE vin = $1", f"C{tag}") == 1
    row = await db.fetchrow("SELECT vehicle_id, driver_id, status FROM vehicle_assignments WHERE id = $1", booking)
    assert (row["vehicle_id"], row["driver_id"], row["status"]) == (vehicle, driver, "ACTIVE")
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 1
    audit = await db.fetch("SELECT actor, action FROM audit_logs WHERE entity_id = ANY($1::text[]) ORDER BY id",
                           [str(vehicle), str(driver), str(booking)])
    assert [(r["actor"], r["action"]) for r in audit] == [
        (str(admin), "vehicle.register"), (str(admin), "driver.register"), (str(admin), "assignment.create")]

    dead = await read_topic(s, s.commands_dlq_topic, expected=6)
    by_reason = {r.headers["fleet.error.reason"]: r for r in dead}
    assert len(dead) == 6
    assert set(by_reason) == {"double_booking", "malformed_json", "unknown_type", "invalid_input", "not_found"}
    clash = by_reason["double_booking"]
    assert clash.headers["fleet.error.detail"] == (
        f"vehicle {vehicle} is already booked by assignment {booking}"
        " from 2094-05-01T08:00:00+00:00 to 2094-05-01T16:00:00+00:00")
    assert clash.headers["fleet.command.id"] == str(ids["clash"])
    assert clash.headers["fleet.command.type"] == "assignment.create"
    # The dead letter is the command with its token redacted.
    assert orjson.loads(clash.value) == {**orjson.loads(messages[4][1]), "token": "<redacted>"}
    assert token.encode() not in clash.value and clash.key == key
    assert clash.headers["fleet.source.topic"] == s.commands_topic
    assert "colour" in by_reason["invalid_input"].headers["fleet.error.detail"]
    assert by_reason["malformed_json"].value == messages[5][1]
    assert "fleet.command.id" not in by_reason["malformed_json"].headers
    not_found = [r for r in dead if r.headers["fleet.error.reason"] == "not_found"]
    assert {r.headers["fleet.command.type"] for r in not_found} == {"assignment.cancel", "job.create"}

    outcomes = await db.fetch("SELECT command_id, outcome, reason FROM processed_commands WHERE command_id = ANY($1)",
                              list(ids.values()))
    assert {(r["command_id"], r["outcome"], r["reason"]) for r in outcomes} == {
        (ids["vehicle"], "applied", None), (ids["driver"], "applied", None), (ids["other"], "applied", None),
        (ids["book"], "applied", None), (ids["clash"], "rejected", "double_booking"),
        (ids["unknown_type"], "rejected", "unknown_type"), (ids["bad_field"], "rejected", "invalid_input"),
        (ids["no_such"], "rejected", "not_found"), (ids["no_customer"], "rejected", "not_found")}

    # Replay the whole topic with a fresh group: nothing applies twice, nothing is
    # dead-lettered twice, except the record without a command id, which cannot be recognised.
    replay = await consume(s.model_copy(update={"commands_group": s.commands_group + "-replay"}))
    assert (counted(replay, "applied"), counted(replay, "duplicate"), counted(replay, "rejected")) == (0, 10, 1)
    assert await db.fetchval("SELECT count(*) FROM vehicles WHERE vin = $1", f"C{tag}") == 1
    assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE entity_id = ANY($1::text[])",
                             [str(vehicle), str(driver), str(booking)]) == 3
    again = await read_topic(s, s.commands_dlq_topic, expected=7)
    assert len(again) == 7
    assert [r.headers["fleet.error.reason"] for r in again].count("malformed_json") == 2
