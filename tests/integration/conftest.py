"""Fixtures for tests that run readings through the real broker, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from tests.seaweedfs import private_seaweedfs

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


@pytest.fixture(scope="session")
def storage_settings(base_settings: Settings) -> Iterator[Settings]:
    """An S3 storage with a bucket of this session's own: the one ``FLEET_S3_ENDPOINT``
    names when the environment sets it (the bucket is emptied and removed at the end),
    else a SeaweedFS started for the session (:mod:`tests.seaweedfs`)."""
    if "FLEET_S3_ENDPOINT" not in os.environ:
        with private_seaweedfs(base_settings) as settings:
            yield settings
        return
    from fleet_telemetry.deploy.stack.probe import create_bucket

    settings = base_settings.model_copy(update={"s3_bucket": f"fleet-test-{uuid.uuid4().hex[:8]}"})
    asyncio.run(create_bucket(settings))
    try:
        yield settings
    finally:
        asyncio.run(_remove_bucket(settings))


async def _remove_bucket(settings: Settings) -> None:
    from fleet_telemetry.core.s3_client import connect_s3

    async with connect_s3(settings) as client:
        for upload in (await client.list_multipart_uploads(Bucket=settings.s3_bucket)).get("Uploads", []) or []:
            await client.abort_multipart_upload(Bucket=settings.s3_bucket, Key=upload["Key"],
                                                UploadId=upload["UploadId"])
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=settings.s3_bucket):
            for item in page.get("Contents", []):
                await client.delete_object(Bucket=settings.s3_bucket, Key=item["Key"])
        await client.delete_bucket(Bucket=settings.s3_bucket)


@pytest.fixture
def doc_settings(settings: Settings, storage_settings: Settings) -> Settings:
    """One test's settings with the session's object storage."""
    return settings.model_copy(update={name: getattr(storage_settings, name) for name in (
        "s3_endpoint", "s3_bucket", "s3_region", "s3_access_key", "s3_secret_key")})
