"""Statuses never go backwards, also across their expiry: given a vehicle's status, when
an older reading arrives later (in a later batch, or after the status expired, as a
replay delivers it), then the status keeps the newer reading and its TTL is not renewed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio

from fleet_telemetry.consumers.sink import create_pool
from fleet_telemetry.consumers.status import StatusWriter, newest_key, status_key
from fleet_telemetry.core.reading import Reading, Source, status_time

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def writer(database_url: str, redis_client) -> AsyncIterator[StatusWriter]:
    pool = await create_pool(database_url, max_size=2)
    try:
        yield StatusWriter(redis_client, pool, ttl_seconds=300, newest_seconds=3600)
    finally:
        await pool.close()


def reading(vid: uuid.UUID, when: datetime, speed: float) -> Reading:
    return Reading(vid, when, 52.5, 13.4, speed, None, None, None, None, Source("t", 0, 0), None, b"")


async def test_an_older_reading_in_a_later_batch_neither_moves_the_status_back_nor_renews_it(
    writer: StatusWriter, redis_client
) -> None:
    vid = uuid.uuid4()
    now = datetime.now(timezone.utc)
    assert await writer.update({vid: reading(vid, now - timedelta(seconds=30), 50.0)}) == 1
    await redis_client.expire(status_key(vid), 100)

    assert await writer.update({vid: reading(vid, now - timedelta(seconds=90), 10.0)}) == 0

    status = await redis_client.hgetall(status_key(vid))
    assert status[b"time"].decode() == status_time(now - timedelta(seconds=30)) and status[b"speed"] == b"50.0"
    assert 0 < await redis_client.ttl(status_key(vid)) <= 100


async def test_an_expired_status_is_not_brought_back_by_an_older_reading(writer: StatusWriter, redis_client) -> None:
    vid = uuid.uuid4()
    now = datetime.now(timezone.utc)
    await writer.update({vid: reading(vid, now - timedelta(minutes=1), 50.0)})
    await redis_client.delete(status_key(vid))  # the status expired

    assert await writer.update({vid: reading(vid, now - timedelta(minutes=20), 10.0)}) == 0
    assert await redis_client.exists(status_key(vid)) == 0
    assert 3500 < await redis_client.ttl(newest_key(vid)) <= 3600

    assert await writer.update({vid: reading(vid, now, 70.0)}) == 1  # a newer one still moves it
    assert await redis_client.hget(status_key(vid), "speed") == b"70.0"
