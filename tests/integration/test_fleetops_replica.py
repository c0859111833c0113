"""Read/write splitting (seed 4.3) against a real streaming replica.

The test makes a primary and a streaming replica of its own (``tests.clusters``:
initdb into a temporary folder, ``pg_basebackup -R``, each on a free port of 127.0.0.1
with its socket in that folder, as the ``postgres`` OS user when the tests run as root),
migrates the primary, and removes both at the end; the machine's server is not touched.
Given ``FLEET_DATABASE_REPLICA_URLS`` naming a dead replica and the live one, reads go to
the live replica, writes to the primary; when the replica stops, the primary serves the
reads; when it is back, reads return to it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import queries, vehicles
from fleet_telemetry.fleetops.db import Database
from tests.clusters import Cluster, free_port, postgres_bindir, private_clusters
from tests.databases import create_database
from tests.users import TEST_ADMIN, seed as seed_users

pytestmark = pytest.mark.integration


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))


@dataclass
class Pair:
    """The primary's test database and the streaming replica serving the same database."""

    primary_url: str
    replica_url: str
    replica: Cluster


async def wait_until(predicate, what: str, timeout: float = 60.0,  # type: ignore[no-untyped-def]
                     replica: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.2)
    detail = f"; replica log:\n{replica.log_tail()}" if replica is not None else ""
    raise AssertionError(f"timed out waiting for {what}{detail}")


@pytest_asyncio.fixture(scope="module")
async def pair() -> AsyncIterator[Pair]:
    bindir = postgres_bindir(with_postgis=True)
    if bindir is None:
        pytest.skip("no PostgreSQL with PostGIS installed under /usr/lib/postgresql to start a primary of its own")
    with private_clusters(bindir) as clusters:
        primary = await asyncio.to_thread(clusters.primary)
        primary_url = await create_database(primary.url(), "fleet_replica_test", migrate=True)
        await seed_users(primary_url)
        replica = await asyncio.to_thread(clusters.replica_of, primary)
        replica_url = with_port(primary_url, replica.port)

        async def in_recovery() -> bool:
            conn = await asyncpg.connect(replica_url, timeout=2)
            try:
                return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
            finally:
                await conn.close()

        await wait_until(in_recovery, "the replica to accept connections in recovery", replica=replica)
        yield Pair(primary_url, replica_url, replica)


async def test_reads_go_to_the_replica_writes_to_the_primary_and_a_down_replica_is_skipped(pair: Pair) -> None:
    database_url, replica = pair.primary_url, pair.replica
    dead = with_port(database_url, free_port())  # nothing listens there
    # As FLEET_DATABASE_REPLICA_URLS reads it: comma-separated text.
    replica_urls: Any = f"{dead}, {pair.replica_url}"
    settings = Settings(_env_file=None, database_url=database_url,  # type: ignore[call-arg]
                        database_replica_urls=replica_urls, replica_retry_seconds=3600)
    assert settings.database_replica_urls == (dead, pair.replica_url)
    vehicle_type = f"rr-{uuid.uuid4().hex[:8]}"
    start = datetime(2096, 1, 1, tzinfo=timezone.utc)
    window = (start, start + timedelta(hours=2))

    async with Database.from_settings(settings) as db:
        async with db.write() as conn:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            vehicle = await vehicles.register_vehicle(conn, actor=TEST_ADMIN, data={
                "vin": uuid.uuid4().hex[:17].upper(), "license_plate": f"RR-{uuid.uuid4().hex[:8]}",
                "type": vehicle_type})

        async def replicated() -> bool:
            async with db.read() as conn:
                rows = await queries.available_vehicles(conn, *window, vehicle_type=vehicle_type)
            return [r["id"] for r in rows] == [vehicle["id"]]

        await wait_until(replicated, "the new vehicle to reach the replica", replica=replica)
        for _ in range(4):  # every read, whoever's turn it is, lands on the live replica
            async with db.read() as conn:
                assert await conn.fetchval("SELECT pg_is_in_recovery()")
                assert await conn.fetchval("SELECT inet_server_port()") == replica.port
                with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
                    await conn.execute("UPDATE vehicles SET year = 2000 WHERE id = $1", uuid.UUID(vehicle["id"]))
        assert db.replicas_down() == [dead]

        await asyncio.to_thread(replica.stop)
        async with db.read() as conn:  # the pooled replica connection is dead: skipped, primary serves
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            rows = await queries.available_vehicles(conn, *window, vehicle_type=vehicle_type)
        assert [r["id"] for r in rows] == [vehicle["id"]]
        assert pair.replica_url in db.replicas_down()
        async with db.write() as conn:  # writes never depended on the replica
            await vehicles.update_vehicle(conn, actor=TEST_ADMIN, vehicle_id=uuid.UUID(vehicle["id"]),
                                          changes={"year": 2021})

        await asyncio.to_thread(replica.start)

    # A process started now (fresh skip list) reads from the replica again, once it is back.
    async with Database.from_settings(settings) as db:
        async def caught_up() -> bool:
            async with db.read() as conn:
                return bool(await conn.fetchval("SELECT pg_is_in_recovery()")) and await conn.fetchval(
                    "SELECT year FROM vehicles WHERE id = $1", uuid.UUID(vehicle["id"])) == 2021

        await wait_until(caught_up, "reads to be served by the restarted replica with the primary's write",
                         replica=replica)
