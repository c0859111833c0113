"""FLEET_REDIS_URL names a standalone Redis or a Redis Cluster (redis+cluster://): the
client kind, the key names (hash tags only on a cluster) and the refusals follow."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from fleet_telemetry.core.redis_client import connect_redis, is_cluster_url
from fleet_telemetry.core.settings import Settings


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_standalone_key_names_stay_as_documented() -> None:
    keys = _settings(redis_url="redis://cache:6379/0", redis_key_prefix="a:").redis_keys
    vid = uuid.UUID(int=5)
    assert (keys.vehicle_status(vid), keys.vehicle_newest(vid), keys.geofence(3), keys.dashboard) == (
        f"a:vehicle:{vid}:status", f"a:vehicle:{vid}:status:newest", "a:geofence:3", "a:dashboard:stats:daily")


def test_on_a_cluster_the_keys_used_together_share_a_slot() -> None:
    keys = _settings(redis_url="redis+cluster://node-1:7000", redis_key_prefix="a:").redis_keys
    vid = uuid.UUID(int=5)
    assert keys.vehicle_status(vid) == f"a:vehicle:{{{vid}}}:status"
    assert key_slot(keys.vehicle_status(vid).encode()) == key_slot(keys.vehicle_newest(vid).encode())
    dashboard = keys.dashboard
    assert dashboard == "a:{dashboard:stats:daily}"
    assert len({key_slot(k.encode()) for k in (dashboard, f"{dashboard}:lock", f"{dashboard}:version")}) == 1
    assert keys.geofence(3) == "a:geofence:3"
    other = uuid.UUID(int=6)
    assert key_slot(keys.vehicle_status(vid).encode()) != key_slot(keys.vehicle_status(other).encode())


async def test_the_client_kind_follows_the_url_scheme() -> None:
    assert is_cluster_url("redis+cluster://node:7000") and is_cluster_url("rediss+cluster://node:7000/0")
    assert not is_cluster_url("redis://node:6379/0")
    standalone, cluster = connect_redis("redis://node:6379/0"), connect_redis("redis+cluster://node:7000/0")
    try:
        assert isinstance(standalone, aioredis.Redis)
        assert isinstance(cluster, RedisCluster)
    finally:
        await standalone.aclose()
        await cluster.aclose()


@pytest.mark.parametrize("url", ["redis+cluster://node:7000/2", "http://node:7000", "redis+sentinel://node:1"])
def test_a_cluster_url_with_a_database_or_an_unknown_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        _settings(redis_url=url)
    assert "FLEET_REDIS_URL" in str(refused.value).upper() or "redis_url" in str(refused.value)
