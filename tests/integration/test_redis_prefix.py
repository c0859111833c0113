"""Redis shared safely: two deployments (two databases) on one Redis keep apart with
``FLEET_REDIS_KEY_PREFIX``, and the dashboard cache follows the writes that change it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from pydantic import SecretStr

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.sink import create_pool
from fleet_telemetry.consumers.status import StatusWriter
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import dashboard
from fleet_telemetry.fleetops.commands import CommandConsumer, command_value
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.tokens import TokenKeys, issue
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.ingest.topics import ensure_topics
from tests.databases import create_database, drop_database
from tests.integration.cli import fleet
from tests.users import TEST_ADMIN, seed as seed_users

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def deployments(base_settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """Two freshly migrated databases, as two deployments would have."""
    names = [f"fleet_test_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    urls = [await create_database(base_settings.database_url, name, migrate=True) for name in names]
    for url in urls:
        await seed_users(url)
    yield urls[0], urls[1]
    for name in names:
        await drop_database(base_settings.database_url, name)


def deployment(base: Settings, url: str, prefix: str) -> Settings:
    return base.model_copy(update={"database_url": url, "redis_key_prefix": prefix, "metrics_port": 0,
                                   "geofence_dwell_seconds": 0.0, "alert_offline_seconds": 0.0})


async def forget(redis: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


async def add_vehicle(url: str) -> uuid.UUID:
    conn = await asyncpg.connect(url)
    try:
        vid = uuid.uuid4()
        await conn.execute("INSERT INTO vehicles (id, vin, license_plate, status) VALUES ($1, $2, $3, 'active')",
                           vid, vid.hex[:17].upper(), "P-" + vid.hex[:8].upper())
        return vid
    finally:
        await conn.close()


def dashboard_figures(settings: Settings) -> dict[str, Any]:
    result = fleet(settings, "dashboard", "--json")
    assert result.returncode == 0, result.stderr
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


async def test_two_deployments_sharing_one_redis_keep_their_dashboards_and_geofences_apart(
    base_settings: Settings, deployments: tuple[str, str], redis_client: aioredis.Redis
) -> None:
    tag = uuid.uuid4().hex[:6]
    a = deployment(base_settings, deployments[0], f"test-a-{tag}:")
    b = deployment(base_settings, deployments[1], f"test-b-{tag}:")
    try:
        # Deployment A has a fleet and a cached dashboard; B is freshly migrated and empty.
        vehicles = [await add_vehicle(a.database_url) for _ in range(3)]
        assert dashboard_figures(a)["active_vehicles"] == 3
        assert await redis_client.exists(f"test-a-{tag}:dashboard:stats:daily") == 1
        assert dashboard_figures(b)["active_vehicles"] == 0

        # Both have geofence 1; A's vehicle is inside A's.
        for settings in (a, b):
            added = fleet(settings, "geofences", "add", f"yard-{tag}", "--circle", "52.5,13.4,500", "--json")
            assert added.returncode == 0, added.stderr
            assert json.loads(added.stdout)["id"] == 1
        pool = await create_pool(a.database_url)
        try:
            engine = RuleEngine(pool, redis_client, a, PipelineMetrics())
            await engine.refresh_geofences()
            now = datetime.now(timezone.utc)
            await engine.after_write([Reading(vehicles[0], now - timedelta(seconds=s), 52.5, 13.4, 10.0, None, None,
                                              None, None, Source("t", 0, s), None, b"") for s in (20, 10)])
            await engine.flush()
            writer = StatusWriter(redis_client, pool, keys=a.redis_keys)
            await writer.update({vehicles[0]: Reading(vehicles[0], now, 52.5, 13.4, 10.0, None, None, None, None,
                                                       Source("t", 0, 30), None, b"")})
        finally:
            await pool.close()
        members = await redis_client.zrange(f"test-a-{tag}:geofence:1", 0, -1)
        assert members == [str(vehicles[0]).encode()]
        assert await redis_client.exists(f"test-a-{tag}:vehicle:{vehicles[0]}:status") == 1
        assert await redis_client.exists(f"vehicle:{vehicles[0]}:status") == 0
        assert await redis_client.zscore("geofence:1", str(vehicles[0])) is None

        # B removes its geofence 1: A's set stays.
        removed = fleet(b, "geofences", "remove", "1")
        assert removed.returncode == 0, removed.stderr
        assert await redis_client.zrange(f"test-a-{tag}:geofence:1", 0, -1) == [str(vehicles[0]).encode()]
        status = fleet(a, "vehicles", "status", str(vehicles[0]), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["live"]["lat"] == 52.5
    finally:
        await forget(redis_client, f"test-a-{tag}:")
        await forget(redis_client, f"test-b-{tag}:")


async def test_without_a_prefix_the_key_names_stay_as_they_were(base_settings: Settings) -> None:
    keys = base_settings.model_copy(update={"redis_key_prefix": ""}).redis_keys
    vid = uuid.UUID(int=7)
    assert (keys.vehicle_status(vid), keys.vehicle_newest(vid), keys.geofence(12), keys.dashboard) == (
        f"vehicle:{vid}:status", f"vehicle:{vid}:status:newest", "geofence:12", "dashboard:stats:daily")


async def test_a_write_invalidates_the_dashboard_cache(settings: Settings, redis_client: aioredis.Redis) -> None:
    settings = settings.model_copy(update={"redis_key_prefix": f"test-{uuid.uuid4().hex[:8]}:"})
    try:
        before = dashboard_figures(settings)
        assert await redis_client.exists(settings.redis_keys.dashboard) == 1
        tag = uuid.uuid4().hex[:8].upper()
        added = fleet(settings, "vehicles", "add", "--vin", f"INV{tag}", "--plate", f"INV-{tag}")
        assert added.returncode == 0, added.stderr
        assert await redis_client.exists(settings.redis_keys.dashboard) == 0
        assert dashboard_figures(settings)["active_vehicles"] == before["active_vehicles"] + 1
    finally:
        await forget(redis_client, settings.redis_key_prefix)


async def test_a_computation_overtaken_by_a_write_is_not_cached(
    database: Database, redis_client: aioredis.Redis
) -> None:
    key = f"test-{uuid.uuid4().hex[:8]}:{dashboard.DASHBOARD_KEY}"
    compute = dashboard.database_compute(database)
    started = asyncio.Event()

    async def slow() -> dict[str, Any]:
        started.set()
        await asyncio.sleep(0.3)
        return await compute()

    cache = dashboard.DashboardCache(redis_client, slow, 600, key=key)
    try:
        computing = asyncio.create_task(cache.get())
        await started.wait()
        assert await dashboard.invalidate(redis_client, key)  # a write lands while it computes
        _, cached = await computing
        assert not cached
        assert await redis_client.exists(key) == 0  # what it computed may predate the write
        _, cached = await cache.get()
        assert not cached and await redis_client.exists(key) == 1
    finally:
        await redis_client.delete(key, f"{key}:version", f"{key}:lock")


def test_a_prefix_with_a_space_is_refused_with_one_line(settings: Settings) -> None:
    result = fleet(settings, "dashboard", redis_key_prefix="fleet a:")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fleet dashboard: invalid configuration FLEET_REDIS_KEY_PREFIX:")


async def redis_admin_id(settings: Settings) -> uuid.UUID:
    conn = await asyncpg.connect(settings.database_url)
    try:
        user_id: uuid.UUID = await conn.fetchval("SELECT id FROM users WHERE email = $1", TEST_ADMIN)
        return user_id
    finally:
        await conn.close()


async def test_a_command_applied_by_the_consumer_invalidates_the_dashboard_cache(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    tag = uuid.uuid4().hex[:10]
    settings = settings.model_copy(update={
        "redis_key_prefix": f"test-{tag}:", "commands_topic": f"test.commands.{tag}",
        "commands_dlq_topic": f"test.commands.dlq.{tag}", "commands_group": f"test-commands-{tag}",
        "jwt_secret": SecretStr("a secret of at least thirty-two bytes")})
    keys = TokenKeys.from_settings(settings)
    assert keys is not None
    admin = await redis_admin_id(settings)
    token, _ = issue(keys, admin, ttl_seconds=600, now=time.time())
    await ensure_topics(settings, [settings.commands_topic, settings.commands_dlq_topic], partitions=1)
    try:
        before = dashboard_figures(settings)
        producer = await start_producer(settings)
        try:
            await producer.send_and_wait(settings.commands_topic, command_value(
                "vehicle.register", {"vin": f"CMD{tag[:10].upper()}", "license_plate": f"CMD-{tag[:6].upper()}"},
                command_id=uuid.uuid4(), token=token))
        finally:
            await producer.stop()
        assert await asyncio.wait_for(CommandConsumer(settings, stop_when_idle=2.0).run(), timeout=120) == 0
        assert await redis_client.exists(settings.redis_keys.dashboard) == 0
        assert dashboard_figures(settings)["active_vehicles"] == before["active_vehicles"] + 1
    finally:
        await forget(redis_client, settings.redis_key_prefix)
