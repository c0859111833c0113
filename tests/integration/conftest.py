"""Fixtures for tests that run readings through the real broker, PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def topics(settings: Settings) -> Settings:
    """The test's telemetry (4 partitions) and dead-letter topics, created."""
    await ensure_topics(settings, [settings.telemetry_topic, settings.dlq_topic], partitions=4)
    return settings


@pytest_asyncio.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest_asyncio.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """The fleet-operations database handle (primary, no replicas) on the session database."""
    async with Database(database_url) as db:
        yield db


@pytest_asyncio.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the primary, for the fleet-operations writers."""
    async with database.write() as connection:
        yield connection
