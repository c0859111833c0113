"""Users, roles and authenticated commands: given users of several roles, when they write
through the command line or the command topic, then only what their role allows is
written (with their id in the audit log); a refused write leaves no row and no audit
row; a command without a valid, unrevoked token is dead-lettered as ``unauthenticated``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from argon2 import PasswordHasher
from pydantic import SecretStr

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.access import roles, roles_table
from fleet_telemetry.fleetops.commands import CommandConsumer, command_value
from fleet_telemetry.fleetops.tokens import TokenKeys, issue
from fleet_telemetry.ingest.topics import ensure_topics
from tests.databases import create_database, drop_database
from tests.integration.cli import fleet
from tests.integration.streams import read_topic
from tests.users import TEST_ADMIN, TEST_JWT_SECRET, make_user

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def one_line(result: object) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    (line,) = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert result.stdout == ""  # type: ignore[attr-defined]
    return str(line)


def ok(result: object) -> str:
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]
    return str(result.stdout)  # type: ignore[attr-defined]


async def fleet_of(settings: Settings, *args: str, stdin: str | None = None, **extra: str) -> object:
    return await asyncio.to_thread(fleet, settings, *args, stdin=stdin, **extra)


async def vehicle_and_driver(db: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    vehicle, driver = uuid.uuid4(), uuid.uuid4()
    await db.execute("INSERT INTO vehicles (id, vin, license_plate) VALUES ($1, $2, $3)",
                     vehicle, vehicle.hex[:17].upper(), "U-" + vehicle.hex[:8].upper())
    await db.execute("INSERT INTO drivers (id, name) VALUES ($1, $2)", driver, f"Driver {driver.hex[:6]}")
    return vehicle, driver


async def audit_of(db: asyncpg.Connection, *entity_ids: object) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT actor, action FROM audit_logs WHERE entity_id = ANY($1::text[]) ORDER BY id",
                          [str(e) for e in entity_ids])
    return [(r["actor"], r["action"]) for r in rows]


# --- the command line ----------------------------------------------------------------------------


async def test_a_dispatcher_books_an_assignment_but_may_not_record_maintenance(
    settings: Settings, db: asyncpg.Connection
) -> None:
    email = f"dispatch-{uuid.uuid4().hex[:8]}@fleet.test"
    dispatcher = await make_user(db, email, "dispatcher")
    vehicle, driver = await vehicle_and_driver(db)

    booked = json.loads(ok(await fleet_of(settings, "assignments", "create", "--vehicle", str(vehicle), "--driver",
                                          str(driver), "--from", "2093-01-01T08:00:00Z", "--to",
                                          "2093-01-01T16:00:00Z", "--actor", email, "--json")))
    assert await audit_of(db, booked["id"]) == [(str(dispatcher), "assignment.create")]

    refused = one_line(await fleet_of(settings, "maintenance", "record", "--vehicle", str(vehicle), "--type",
                                      "oil_change", "--cost", "120", "--actor", email.upper()))
    assert refused == f"fleet maintenance: forbidden: {email} (role dispatcher) may not maintenance:write"
    assert await db.fetchval("SELECT count(*) FROM maintenance_records WHERE vehicle_id = $1", vehicle) == 0
    assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE actor = $1", str(dispatcher)) == 1

    unknown = one_line(await fleet_of(settings, "vehicles", "update", str(vehicle), "--year", "2001",
                                      "--actor", "nobody@fleet.test"))
    assert unknown == "fleet vehicles: unknown actor 'nobody@fleet.test': no user has this e-mail or id"
    nobody = one_line(await fleet_of(settings, "vehicles", "update", str(vehicle), "--year", "2001", ACTOR=""))
    assert nobody == "fleet vehicles: unknown actor: name a user with --actor EMAIL or FLEET_ACTOR"
    geofence = one_line(await fleet_of(settings, "geofences", "add", f"g-{uuid.uuid4().hex[:6]}",
                                       "--circle", "52.5,13.4,100", "--actor", email))
    assert geofence == f"fleet geofences: forbidden: {email} (role dispatcher) may not geofences:write"
    assert await db.fetchval("SELECT year FROM vehicles WHERE id = $1", vehicle) is None


# --- fleet users -----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def no_users(base_settings: Settings, settings: Settings) -> AsyncIterator[Settings]:
    """A migrated database of this test's own without any user."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    url = await create_database(base_settings.database_url, name, migrate=True)
    try:
        yield settings.model_copy(update={"database_url": url, "redis_key_prefix": f"test-{name}:"})
    finally:
        await drop_database(base_settings.database_url, name)


async def test_fleet_users_from_the_first_admin_to_a_disabled_user(no_users: Settings) -> None:
    s, first, password = no_users, f"root-{uuid.uuid4().hex[:6]}@fleet.test", "first admin's password"
    conn = await asyncpg.connect(s.database_url)
    try:
        # Nobody to act as: only the first admin may be added, once.
        refused = one_line(await fleet_of(s, "users", "add", "--email", "x@fleet.test", "--role", "viewer",
                                          "--password-stdin", stdin="long enough password\n", ACTOR=""))
        assert refused == "fleet users: forbidden: without an actor only the first admin can be added (--role admin)"
        # FLEET_ACTOR may already name the first admin-to-be.
        added = await fleet_of(s, "users", "add", "--email", first, "--role", "admin", "--password-stdin",
                               "--json", stdin=password + "\n", ACTOR=first, LOG_LEVEL="debug")
        admin = json.loads(ok(added))
        assert admin["role"] == "admin" and admin["is_active"] and "password_hash" not in admin
        again = one_line(await fleet_of(s, "users", "add", "--email", "y@fleet.test", "--role", "admin",
                                        "--password-stdin", stdin="long enough password\n", ACTOR=""))
        assert again.startswith("fleet users: unknown actor: an admin exists")

        # The admin adds a dispatcher linked to nothing and a driver linked to a profile.
        email = f"Dis-{uuid.uuid4().hex[:6]}@Fleet.test"
        dispatcher = json.loads(ok(await fleet_of(s, "users", "add", "--email", email, "--role", "dispatcher",
                                                  "--password-stdin", "--json", stdin="dispatcher pass 1\n",
                                                  ACTOR=first, LOG_LEVEL="debug")))
        assert one_line(await fleet_of(s, "users", "add", "--email", email.lower(), "--password-stdin",
                                       stdin="another password\n", ACTOR=first)) == \
            f"fleet users: a user with e-mail {email.lower()} exists already"
        assert one_line(await fleet_of(s, "users", "add", "--email", "short@fleet.test", "--password-stdin",
                                       stdin="short\n", ACTOR=first)) == \
            "fleet users: a password needs at least 10 characters"
        driver_profile = uuid.uuid4()
        await conn.execute("INSERT INTO drivers (id, name) VALUES ($1, 'Dana')", driver_profile)
        dana = json.loads(ok(await fleet_of(s, "users", "add", "--email", "dana@fleet.test", "--role", "driver",
                                            "--driver", str(driver_profile), "--password-stdin", "--json",
                                            stdin="dana's password\n", ACTOR=first)))
        assert dana["driver_id"] == str(driver_profile)
        assert await conn.fetchval("SELECT user_id FROM drivers WHERE id = $1", driver_profile) == uuid.UUID(dana["id"])

        listed = ok(await fleet_of(s, "users", "list"))
        assert email in listed and first in listed and "dispatcher  active" in listed
        shown = json.loads(ok(await fleet_of(s, "users", "show", email.upper(), "--json")))
        assert shown["id"] == dispatcher["id"]

        # Only an admin changes roles; the dispatcher may not.
        assert one_line(await fleet_of(s, "users", "set-role", "dana@fleet.test", "admin", ACTOR=email)) == \
            f"fleet users: forbidden: {email} (role dispatcher) may not users:write"
        ok(await fleet_of(s, "users", "set-role", email, "mechanic", ACTOR=first))
        assert await conn.fetchval("SELECT role FROM users WHERE id = $1", uuid.UUID(dispatcher["id"])) == "mechanic"

        # A user sets their own password; it is stored as an argon2id hash.
        new = "a brand new password"
        changed = await fleet_of(s, "users", "passwd", email, "--password-stdin", stdin=new + "\n", ACTOR=email,
                                 LOG_LEVEL="debug", LOG_FORMAT="json")
        assert new not in ok(changed) + changed.stderr and "argon2" not in changed.stdout  # type: ignore[attr-defined]
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", uuid.UUID(dispatcher["id"]))
        assert stored.startswith("$argon2id$") and PasswordHasher().verify(stored, new)
        assert one_line(await fleet_of(s, "users", "passwd", "dana@fleet.test", "--password-stdin",
                                       stdin="not my password\n", ACTOR=email)).endswith("may not users:write")
        assert one_line(await fleet_of(s, "users", "passwd", email, ACTOR=email)) == \
            "fleet users: no terminal to ask for the password: give it on standard input with --password-stdin"

        # Disabled: the user's writes are refused; deleted: the e-mail is free again.
        ok(await fleet_of(s, "users", "disable", email, ACTOR=first))
        vehicle, _ = await vehicle_and_driver(conn)
        assert one_line(await fleet_of(s, "maintenance", "record", "--vehicle", str(vehicle), "--type", "oil",
                                       ACTOR=email)) == f"fleet maintenance: forbidden: user {email} is disabled"
        ok(await fleet_of(s, "users", "enable", email, ACTOR=first))
        ok(await fleet_of(s, "maintenance", "record", "--vehicle", str(vehicle), "--type", "oil", ACTOR=email))
        ok(await fleet_of(s, "users", "delete", email, ACTOR=first))
        assert one_line(await fleet_of(s, "maintenance", "record", "--vehicle", str(vehicle), "--type", "oil",
                                       ACTOR=email)).startswith("fleet maintenance: unknown actor")
        ok(await fleet_of(s, "users", "add", "--email", email, "--password-stdin", stdin="reused address!\n",
                          ACTOR=first))

        # Every change is audited under the acting user's id, and no audit row holds a password or its hash.
        audit = await conn.fetch("SELECT actor, action, before::text, after::text FROM audit_logs"
                                 " WHERE entity_type = 'user' AND entity_id = $1 ORDER BY id", dispatcher["id"])
        assert [(r["actor"], r["action"]) for r in audit] == [
            (admin["id"], "user.add"), (admin["id"], "user.set_role"), (dispatcher["id"], "user.passwd"),
            (admin["id"], "user.disable"), (admin["id"], "user.enable"), (admin["id"], "user.delete")]
        everything = " ".join(str(r) for r in await conn.fetch("SELECT * FROM audit_logs"))
        assert "argon2" not in everything and new not in everything and password not in everything
    finally:
        await conn.close()
    for result in (added,):
        assert password not in result.stdout + result.stderr  # type: ignore[attr-defined]


async def test_the_readme_roles_table_is_the_seeded_roles(db: asyncpg.Connection) -> None:
    table = roles_table(await roles(db))
    text = README.read_text()
    found = re.search(r"<!-- roles-table -->\n(.*?)\n<!-- /roles-table -->", text, re.S)
    assert found is not None, "README.md lacks the roles table markers"
    assert found.group(1).strip() == table, "regenerate it with: fleet users roles"
    seeded = {r["name"]: r["permissions"] for r in await roles(db)}
    assert {"admin", "dispatcher", "mechanic", "driver", "viewer"} <= set(seeded)
    assert set(seeded["mechanic"]) == {"vehicles:read", "maintenance:read", "maintenance:write",
                                       "documents:read", "documents:write"}
    assert [name for name, permissions in seeded.items() if "shipments:deliver" in permissions] == [
        "dispatcher", "driver"]  # and admin through "*"


# --- the command topic -------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def commands(settings: Settings) -> AsyncIterator[tuple[Settings, AIOKafkaProducer]]:
    tag = uuid.uuid4().hex[:10]
    s = settings.model_copy(update={
        "commands_topic": f"test.commands.{tag}", "commands_dlq_topic": f"test.commands.dlq.{tag}",
        "commands_group": f"test-commands-{tag}", "redis_key_prefix": f"test-{tag}:",
        "jwt_secret": SecretStr(TEST_JWT_SECRET), "jwt_max_ttl_seconds": 3600,
    })
    await ensure_topics(s, [s.commands_topic, s.commands_dlq_topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        yield s, producer
    finally:
        await producer.stop()


async def consume(settings: Settings) -> CommandConsumer:
    consumer = CommandConsumer(settings, stop_when_idle=2.0)
    assert await asyncio.wait_for(consumer.run(), timeout=120) == 0
    return consumer


def counted(consumer: CommandConsumer, outcome: str) -> float:
    return consumer.metrics.commands.labels(outcome=outcome)._value.get()


async def test_commands_need_a_valid_unrevoked_token_of_a_user_allowed_to_write(
    commands: tuple[Settings, AIOKafkaProducer], db: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    s, producer = commands
    keys = TokenKeys.from_settings(s)
    assert keys is not None
    dispatcher_email = f"dispatch-{uuid.uuid4().hex[:8]}@fleet.test"
    dispatcher = await make_user(db, dispatcher_email, "dispatcher")
    revoked_user, disabled = await make_user(db, role="dispatcher"), await make_user(db, role="dispatcher")
    vehicle, driver = await vehicle_and_driver(db)
    now = time.time()
    valid = issue(keys, dispatcher, ttl_seconds=600, now=now)[0]
    forged = issue(TokenKeys("HS256", keys.issuer, keys.audience, 3600, "x" * 40, "x" * 40), dispatcher,
                   ttl_seconds=600, now=now)[0]
    expired = issue(keys, dispatcher, ttl_seconds=60, now=now - 120)[0]
    other_audience = issue(TokenKeys("HS256", keys.issuer, "elsewhere", 3600, TEST_JWT_SECRET, TEST_JWT_SECRET),
                           dispatcher, ttl_seconds=600, now=now)[0]
    to_revoke = issue(keys, revoked_user, ttl_seconds=600, now=now - 5)[0]
    of_disabled = issue(keys, disabled, ttl_seconds=600, now=now)[0]
    await db.execute("UPDATE users SET is_active = false WHERE id = $1", disabled)
    revoked = await fleet_of(s, "users", "revoke", str(revoked_user), "--json",
                             REDIS_KEY_PREFIX=s.redis_key_prefix, JWT_MAX_TTL_SECONDS="3600")
    key = json.loads(ok(revoked))["key"]
    assert key == f"{s.redis_key_prefix}user:{revoked_user}:session"
    assert 3590 <= await redis_client.ttl(key) <= 3600

    ids = {name: uuid.uuid4() for name in ("book", "maintain", "forged", "expired", "audience", "revoked",
                                          "disabled", "unsigned", "missing")}
    booking = {"id": str(uuid.uuid4()), "vehicle_id": str(vehicle), "driver_id": str(driver),
               "start_time": "2093-02-01T08:00:00Z", "end_time": "2093-02-01T16:00:00Z"}
    service = {"vehicle_id": str(vehicle), "type": "oil_change", "date": "2093-01-01"}
    later = {**booking, "id": str(uuid.uuid4()), "start_time": "2093-03-01T08:00:00Z", "end_time": None}
    messages = [
        command_value("assignment.create", booking, command_id=ids["book"], token=valid),
        command_value("maintenance.record", service, command_id=ids["maintain"], token=valid),
        command_value("assignment.create", later, command_id=ids["forged"], token=forged),
        command_value("assignment.create", later, command_id=ids["expired"], token=expired),
        command_value("assignment.create", later, command_id=ids["audience"], token=other_audience),
        command_value("assignment.create", later, command_id=ids["revoked"], token=to_revoke),
        command_value("assignment.create", later, command_id=ids["disabled"], token=of_disabled),
        command_value("assignment.create", later, command_id=ids["unsigned"], actor=dispatcher_email),
        command_value("assignment.create", later, command_id=ids["missing"], token=""),
        command_value("assignment.create", booking, command_id=ids["book"], token=valid),  # redelivered
    ]
    for value in messages:
        await producer.send(s.commands_topic, value)
    await producer.flush()

    first = await consume(s)
    assert (counted(first, "applied"), counted(first, "duplicate"), counted(first, "rejected")) == (1, 1, 8)
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 1
    assert await db.fetchval("SELECT count(*) FROM maintenance_records WHERE vehicle_id = $1", vehicle) == 0
    assert await audit_of(db, booking["id"], later["id"], vehicle) == [(str(dispatcher), "assignment.create")]
    assert await db.fetchval("SELECT actor FROM processed_commands WHERE command_id = $1", ids["book"]) == \
        str(dispatcher)

    dead = await read_topic(s, s.commands_dlq_topic, expected=8)
    reasons = {uuid.UUID(r.headers["fleet.command.id"]): r.headers["fleet.error.reason"] for r in dead}
    assert reasons == {ids["maintain"]: "forbidden", ids["disabled"]: "forbidden",
                       **{ids[n]: "unauthenticated" for n in ("forged", "expired", "audience", "revoked",
                                                              "unsigned", "missing")}}
    details = {uuid.UUID(r.headers["fleet.command.id"]): r.headers["fleet.error.detail"] for r in dead}
    assert details[ids["maintain"]] == f"forbidden: {dispatcher_email} (role dispatcher) may not maintenance:write"
    assert details[ids["forged"]] == "the token's signature does not verify"
    assert details[ids["expired"]] == "the token has expired"
    assert details[ids["revoked"]] == "the token was revoked"
    for record in dead:  # no token, valid or not, reaches the dead-letter topic
        assert all(t.encode() not in record.value for t in (valid, forged, expired, to_revoke, of_disabled))

    # Replayed: nothing applies or is dead-lettered twice.
    replay = await consume(s.model_copy(update={"commands_group": s.commands_group + "-replay"}))
    assert (counted(replay, "applied"), counted(replay, "duplicate")) == (0, 10)
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 1


async def test_unsigned_commands_are_applied_only_in_the_transition_and_as_their_actor(
    commands: tuple[Settings, AIOKafkaProducer], db: asyncpg.Connection
) -> None:
    s, producer = commands
    email = f"fm-{uuid.uuid4().hex[:8]}@fleet.test"
    manager = await make_user(db, email, "fleet_manager")
    vehicle = uuid.uuid4()
    sent = await fleet_of(s, "commands", "send", "vehicle.register", "--unsigned", "--actor", email, "--data",
                          json.dumps({"id": str(vehicle), "vin": vehicle.hex[:17], "license_plate": vehicle.hex[:8]}),
                          COMMANDS_TOPIC=s.commands_topic)
    ok(sent)
    await consume(s.model_copy(update={"commands_allow_unsigned": True}))
    assert await audit_of(db, vehicle) == [(str(manager), "vehicle.register")]

    # fleet commands send signs with a token issued for the actor (FLEET_ACTOR here).
    signed = uuid.uuid4()
    ok(await fleet_of(s, "commands", "send", "vehicle.register", "--data",
                      json.dumps({"id": str(signed), "vin": signed.hex[:17], "license_plate": signed.hex[:8]}),
                      COMMANDS_TOPIC=s.commands_topic))
    await consume(s)
    admin = await db.fetchval("SELECT id FROM users WHERE email = $1", TEST_ADMIN)
    assert await audit_of(db, signed) == [(str(admin), "vehicle.register")]


async def test_tokens_from_fleet_users_token_and_the_secret_never_shown(
    commands: tuple[Settings, AIOKafkaProducer], db: asyncpg.Connection
) -> None:
    s, producer = commands
    email = f"self-{uuid.uuid4().hex[:8]}@fleet.test"
    await make_user(db, email, "dispatcher")
    issued = await fleet_of(s, "users", "token", email, "--ttl", "120", ACTOR=email, LOG_LEVEL="debug")
    token = ok(issued).strip()
    assert token.count(".") == 2 and TEST_JWT_SECRET not in issued.stdout + issued.stderr  # type: ignore[attr-defined]
    keys = TokenKeys.from_settings(s)
    assert keys is not None and TEST_JWT_SECRET not in repr(keys) and TEST_JWT_SECRET not in repr(s)
    assert one_line(await fleet_of(s, "users", "token", TEST_ADMIN, ACTOR=email)).endswith("may not users:write")
    assert one_line(await fleet_of(s, "users", "token", email, "--ttl", "999999", ACTOR=email)) == \
        "fleet users: --ttl must be between 1 and 86400 seconds (FLEET_JWT_MAX_TTL_SECONDS)"
    assert one_line(await fleet_of(s, "users", "token", email, JWT_SECRET="short")) == \
        "fleet users: invalid configuration FLEET_JWT_SECRET: use at least 32 bytes"

    ok(await fleet_of(s, "commands", "send", "vehicle.delete", "--token-stdin", "--data",
                      json.dumps({"id": str(uuid.uuid4())}), stdin=token + "\n", COMMANDS_TOPIC=s.commands_topic))
    consumed = await asyncio.to_thread(
        fleet, s, "commands", "consume", "--stop-when-idle", "2", COMMANDS_TOPIC=s.commands_topic,
        COMMANDS_DLQ_TOPIC=s.commands_dlq_topic, COMMANDS_GROUP=s.commands_group, LOG_LEVEL="debug",
        LOG_FORMAT="json")
    assert consumed.returncode == 0, consumed.stderr
    assert TEST_JWT_SECRET not in consumed.stdout + consumed.stderr and token not in consumed.stderr
    [dead] = await read_topic(s, s.commands_dlq_topic, expected=1)
    assert dead.headers["fleet.error.reason"] == "forbidden"  # a dispatcher deletes no vehicle
    assert token.encode() not in dead.value


async def test_a_revoked_token_stays_revoked_when_the_driver_profile_is_unlinked_or_linked(
    commands: tuple[Settings, AIOKafkaProducer], db: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    s, producer = commands
    keys = TokenKeys.from_settings(s)
    assert keys is not None
    admin = await db.fetchval("SELECT id FROM users WHERE email = $1", TEST_ADMIN)
    linked, unlinked = await make_user(db, role="dispatcher"), await make_user(db, role="dispatcher")
    vehicle, profile = await vehicle_and_driver(db)
    other_profile = uuid.uuid4()
    await db.execute("INSERT INTO drivers (id, name) VALUES ($1, 'Other')", other_profile)
    await db.execute("UPDATE drivers SET user_id = $2 WHERE id = $1", profile, linked)
    now = time.time()
    of_linked, of_unlinked = (issue(keys, u, ttl_seconds=600, now=now - 5)[0] for u in (linked, unlinked))

    revoked = json.loads(ok(await fleet_of(s, "users", "revoke", str(linked), "--json",
                                           REDIS_KEY_PREFIX=s.redis_key_prefix, JWT_MAX_TTL_SECONDS="3600")))
    user_key, driver_key = f"{s.redis_key_prefix}user:{linked}:session", f"{s.redis_key_prefix}driver:{profile}:session"
    assert revoked["key"] == user_key and revoked["keys"] == [user_key, driver_key]
    for key in (user_key, driver_key):
        assert await redis_client.get(key) == str(revoked["revoked_at"]).encode()
        assert 3590 <= await redis_client.ttl(key) <= 3600
    assert json.loads(ok(await fleet_of(s, "users", "revoke", str(unlinked), "--json",
                                        REDIS_KEY_PREFIX=s.redis_key_prefix)))["keys"] == \
        [f"{s.redis_key_prefix}user:{unlinked}:session"]

    # After the revocations the first user's driver profile is unlinked, and the second
    # user is linked to one: neither revoked token is accepted for it.
    admin_token = issue(keys, admin, ttl_seconds=600, now=now)[0]
    booking = {"vehicle_id": str(vehicle), "driver_id": str(profile), "start_time": "2093-04-01T08:00:00Z",
               "end_time": "2093-04-01T16:00:00Z"}
    ids = [uuid.uuid4() for _ in range(4)]
    for value in (
        command_value("driver.update", {"id": str(profile), "user_id": None}, command_id=ids[0], token=admin_token),
        command_value("driver.update", {"id": str(other_profile), "user_id": str(unlinked)}, command_id=ids[1],
                      token=admin_token),
        command_value("assignment.create", booking, command_id=ids[2], token=of_linked),
        command_value("assignment.create", booking, command_id=ids[3], token=of_unlinked),
    ):
        await producer.send(s.commands_topic, value)
    await producer.flush()
    consumer = await consume(s)

    assert (counted(consumer, "applied"), counted(consumer, "rejected")) == (2, 2)
    assert await db.fetchval("SELECT user_id FROM drivers WHERE id = $1", profile) is None
    assert await db.fetchval("SELECT user_id FROM drivers WHERE id = $1", other_profile) == unlinked
    dead = await read_topic(s, s.commands_dlq_topic, expected=2)
    assert {(r.headers["fleet.command.id"], r.headers["fleet.error.reason"], r.headers["fleet.error.detail"])
            for r in dead} == {(str(i), "unauthenticated", "the token was revoked") for i in ids[2:]}
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 0


async def test_a_command_refused_for_its_token_or_role_is_applied_once_when_sent_again_with_a_valid_token(
    commands: tuple[Settings, AIOKafkaProducer], db: asyncpg.Connection
) -> None:
    s, producer = commands
    keys = TokenKeys.from_settings(s)
    assert keys is not None
    dispatcher = await make_user(db, role="dispatcher")
    manager = await make_user(db, role="fleet_manager")
    vehicle, driver = await vehicle_and_driver(db)
    now = time.time()
    valid, of_manager = (issue(keys, u, ttl_seconds=600, now=now)[0] for u in (dispatcher, manager))
    forged = issue(TokenKeys("HS256", keys.issuer, keys.audience, 3600, "x" * 40, "x" * 40), dispatcher,
                   ttl_seconds=600, now=now)[0]
    book, service, clash = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    booking = {"id": str(uuid.uuid4()), "vehicle_id": str(vehicle), "driver_id": str(driver),
               "start_time": "2093-05-01T08:00:00Z", "end_time": "2093-05-01T16:00:00Z"}
    overlapping = {**booking, "id": str(uuid.uuid4()), "start_time": "2093-05-01T12:00:00Z"}
    maintenance = {"vehicle_id": str(vehicle), "type": "oil_change", "date": "2093-01-01"}
    messages = [
        command_value("assignment.create", booking, command_id=book, token=forged),          # unauthenticated
        command_value("maintenance.record", maintenance, command_id=service, token=valid),   # forbidden
        command_value("assignment.create", booking, command_id=book, token=valid),           # applied
        command_value("maintenance.record", maintenance, command_id=service, token=of_manager),  # applied
        command_value("assignment.create", booking, command_id=book, token=valid),           # duplicate
        command_value("assignment.create", booking, command_id=book, token=forged),          # duplicate
        command_value("assignment.create", overlapping, command_id=clash, token=forged),     # unauthenticated
        command_value("assignment.create", overlapping, command_id=clash, token=forged),     # duplicate
        command_value("assignment.create", overlapping, command_id=clash, token=valid),      # double_booking
        command_value("assignment.create", overlapping, command_id=clash, token=valid),      # duplicate
        # Not a command object: kept for the dead letter with the token redacted.
        command_value("assignment.create", booking, command_id=uuid.uuid4(), token=valid)[:-9],
        json.dumps([{"token": valid}]).encode(),
    ]
    for value in messages:
        await producer.send(s.commands_topic, value)
    await producer.flush()
    first = await consume(s)

    assert (counted(first, "applied"), counted(first, "duplicate"), counted(first, "rejected")) == (2, 4, 6)
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 1
    assert await db.fetchval("SELECT count(*) FROM maintenance_records WHERE vehicle_id = $1", vehicle) == 1
    assert await audit_of(db, booking["id"], overlapping["id"]) == [(str(dispatcher), "assignment.create")]
    rows = await db.fetch("SELECT command_id, outcome, reason, actor FROM processed_commands"
                          " WHERE command_id = ANY($1)", [book, service, clash])
    assert {(r["command_id"], r["outcome"], r["reason"], r["actor"]) for r in rows} == {
        (book, "applied", None, str(dispatcher)), (service, "applied", None, str(manager)),
        (clash, "rejected", "double_booking", None)}

    dead = await read_topic(s, s.commands_dlq_topic, expected=6)
    assert sorted((r.headers.get("fleet.command.id", "-"), r.headers["fleet.error.reason"]) for r in dead) == sorted([
        (str(book), "unauthenticated"), (str(service), "forbidden"), (str(clash), "unauthenticated"),
        (str(clash), "double_booking"), ("-", "malformed_json"), ("-", "invalid_command")])
    for record in dead:
        assert all(t.encode().rsplit(b".", 1)[0] not in record.value for t in (valid, forged, of_manager))
        assert record.headers["fleet.redacted"] == "value" and b"<redacted>" in record.value

    # Replayed: every command id is a duplicate now; only the two records without one are
    # dead-lettered again.
    replay = await consume(s.model_copy(update={"commands_group": s.commands_group + "-replay"}))
    assert (counted(replay, "applied"), counted(replay, "duplicate"), counted(replay, "rejected")) == (0, 10, 2)
    assert await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle) == 1
