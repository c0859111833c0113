"""On a Redis Cluster (``FLEET_REDIS_URL=redis+cluster://...``, three masters of the
test's own): a worker writes the statuses of vehicles whose keys fall on every node, a
geofence enter lands in the geofence's set and removing the geofence drops it, the
dashboard is cached, served from the cache and invalidated by a write, and a revoked
command token stays refused whether or not its user is linked to a driver profile."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster

from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.probe import Probe, probe_redis
from fleet_telemetry.fleetops import sessions
from fleet_telemetry.fleetops.tokens import TokenKeys, Unauthenticated, issue
from fleet_telemetry.views.vehicle_status import live_status
from tests.integration.cli import fleet
from tests.integration.streams import publish, run_worker
from tests.integration.test_geofence_scenarios import place, reading, rules_settings, square
from tests.redis_cluster import redis_cluster
from tests.users import TEST_JWT_SECRET, make_user

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with redis_cluster(3) as ports:
        yield f"redis+cluster://127.0.0.1:{ports[0]}"


@pytest_asyncio.fixture
async def cluster(cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = connect_redis(cluster_url)
    assert isinstance(client, RedisCluster)
    await client.initialize()  # learns which node holds which slots
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def on_cluster(topics: Settings, cluster_url: str) -> Settings:
    return rules_settings(topics, redis_url=cluster_url, redis_key_prefix=f"t{uuid.uuid4().hex[:6]}:")


async def test_a_worker_writes_statuses_for_vehicles_on_every_node_and_a_geofence_set(
    on_cluster: Settings, cluster: RedisCluster, producer, db, make_vehicles
) -> None:
    settings, keys = on_cluster, on_cluster.redis_keys
    vehicles = await make_vehicles(60)
    lat0, lon0 = place()
    yard = await square(db, lat0, lon0, 0.01)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)
    messages = [reading(vid, start + timedelta(seconds=10 * i), lat0 - 1 + i * 1e-4, lon0 - 1)
                for i in range(3) for vid in vehicles[1:]]
    # The first vehicle parks in the yard for three minutes: a confirmed enter.
    messages += [reading(vehicles[0], start + timedelta(seconds=10 * i), lat0 + 0.005, lon0 + 0.005, speed=5.0)
                 for i in range(18)]
    await publish(producer, settings.telemetry_topic, messages)

    await run_worker(settings)

    nodes = {cluster.get_node_from_key(keys.vehicle_status(vid)).name for vid in vehicles}
    assert len(nodes) == 3, "the vehicles' keys are spread over every node"
    for vid in vehicles[1:]:
        status = await cluster.hgetall(keys.vehicle_status(vid))  # type: ignore[misc]
        assert float(status[b"lat"]) == pytest.approx(lat0 - 1 + 2e-4)
        assert status[b"time"] == (start + timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
        assert await cluster.exists(keys.vehicle_newest(vid)) == 1
    live = await live_status(cluster, keys, vehicles[0])
    assert live is not None and live["lat"] == pytest.approx(lat0 + 0.005)
    assert await cluster.zrange(keys.geofence(yard), 0, -1) == [str(vehicles[0]).encode()]

    # Operators read the same keys through the command line.
    shown = fleet(settings, "vehicles", "status", str(vehicles[1]), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["live"]["lat"] == pytest.approx(lat0 - 1 + 2e-4)
    removed = fleet(settings, "geofences", "remove", str(yard))
    assert removed.returncode == 0, removed.stderr
    assert await cluster.exists(keys.geofence(yard)) == 0


async def test_the_dashboard_is_cached_and_invalidated_on_the_cluster(
    on_cluster: Settings, cluster: RedisCluster
) -> None:
    settings = on_cluster
    assert await probe_redis(settings.redis_url) == Probe(answers=True)  # what `fleet status` asks
    first = fleet(settings, "dashboard", "--json")
    assert first.returncode == 0, first.stderr
    key = settings.redis_keys.dashboard
    assert key == f"{settings.redis_key_prefix}{{dashboard:stats:daily}}"
    assert await cluster.exists(key) == 1
    again = fleet(settings, "dashboard")
    assert again.returncode == 0, again.stderr
    assert f"(from the cache {key})" in again.stdout

    tag = uuid.uuid4().hex[:8].upper()
    added = fleet(settings, "vehicles", "add", "--vin", f"CLU{tag}", "--plate", f"CLU-{tag}")
    assert added.returncode == 0, added.stderr
    assert await cluster.exists(key) == 0
    assert int(await cluster.get(f"{key}:version") or 0) >= 1
    after = fleet(settings, "dashboard", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["active_vehicles"] == json.loads(first.stdout)["active_vehicles"] + 1


async def test_a_revocation_on_the_cluster_holds_for_the_user_and_driver_keys_in_different_slots(
    on_cluster: Settings, cluster: RedisCluster, db
) -> None:
    keys = on_cluster.redis_keys
    token_keys = TokenKeys.from_settings(on_cluster.model_copy(update={"jwt_secret": SecretStr(TEST_JWT_SECRET)}))
    assert token_keys is not None
    user, profile = await make_user(db, role="driver"), uuid.uuid4()
    await db.execute("INSERT INTO drivers (id, name, user_id) VALUES ($1, 'Cluster', $2)", profile, user)
    now = datetime.now(timezone.utc).timestamp()
    token = issue(token_keys, user, ttl_seconds=600, now=now - 5)[0]

    written, _ = await sessions.revoke(db, cluster, keys, user, now=now, keep_seconds=600)
    assert written == [keys.user_session(user), keys.driver_session(profile)]
    assert cluster.keyslot(written[0]) != cluster.keyslot(written[1])  # no MGET across them
    for linked in (True, False):
        if not linked:
            await db.execute("UPDATE drivers SET user_id = NULL WHERE id = $1", profile)
        with pytest.raises(Unauthenticated, match="the token was revoked"):
            await sessions.authenticate(db, cluster, keys, token_keys, token, now=now)
    fresh = issue(token_keys, user, ttl_seconds=600, now=now + 1)[0]
    assert (await sessions.authenticate(db, cluster, keys, token_keys, fresh, now=now + 1)).user_id == user
