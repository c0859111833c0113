"""Shared fixtures.

Integration tests talk to the real services named by the ``FLEET_*`` settings (the
README's test command starts them on loopback). Each test session works in a database
of its own, created and migrated here and dropped at the end; each test gets topics and
a consumer group of its own, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from fleet_telemetry.core.settings import Settings
from tests.databases import create_database, drop_database
from tests.users import seed as seed_users


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    """The services to test against: the ``FLEET_*`` addresses, or throwaway containers.

    With ``FLEET_TEST_CONTAINERS=1`` (and a Docker engine) the session starts PostGIS,
    Redis and Kafka with testcontainers instead of using local services.
    """
    settings = Settings(_env_file=None)
    if os.environ.get("FLEET_TEST_CONTAINERS") != "1":
        yield settings
        return
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with PostgresContainer("postgis/postgis:16-3.4", driver=None) as pg, RedisContainer("redis:7") as rd, \
            KafkaContainer("confluentinc/cp-kafka:7.6.0") as kafka:
        yield settings.model_copy(update={
            "database_url": pg.get_connection_url(),
            "redis_url": f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0",
            "kafka_bootstrap": kafka.get_bootstrap_server(),
        })


@pytest_asyncio.fixture(scope="session")
async def database_url(base_settings: Settings) -> AsyncIterator[str]:
    """A freshly created and migrated database for this test session, with its admin
    (tests.users.TEST_ADMIN) whom the writes of the tests name as their actor."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    url = await create_database(base_settings.database_url, name, migrate=True)
    await seed_users(url)
    yield url
    await drop_database(base_settings.database_url, name)


@pytest.fixture
def settings(base_settings: Settings, database_url: str) -> Settings:
    """Settings for one test: the session's database, topics and group of its own."""
    tag = uuid.uuid4().hex[:10]
    return base_settings.model_copy(
        update={
            "database_url": database_url,
            "telemetry_topic": f"test.telemetry.{tag}",
            "dlq_topic": f"test.dlq.{tag}",
            "events_topic": f"test.events.{tag}",
            "notify_dlq_topic": f"test.notify-dlq.{tag}",
            "notify_group": f"test-notify-{tag}",
            "consumer_group": f"test-group-{tag}",
            "metrics_port": 0,
        }
    )


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def redis_client(base_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(base_settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def make_vehicles(db: asyncpg.Connection) -> Callable[[int], Awaitable[list[uuid.UUID]]]:
    """Registers ``n`` vehicles of this test and returns their ids."""

    async def make(n: int) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(n)]
        await db.executemany(
            "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
            " VALUES ($1, $2, $3, 'Volvo', 'FH16', 2022, 'truck', 'active')",
            [(vid, vid.hex[:17].upper(), "T-" + vid.hex[:8].upper()) for vid in ids],
        )
        return ids

    return make
