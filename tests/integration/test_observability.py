"""What an operator watches: the lag in seconds of a worker that is behind and of one
that caught up."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import asyncpg
import pytest

from fleet_telemetry.consumers.worker import Worker
from tests.integration.streams import publish, wait_for

pytestmark = pytest.mark.integration


def lag_seconds(worker: Worker) -> dict[str, float]:
    """``fleet_consumer_lag_seconds`` by partition, as the worker's /metrics shows it."""
    return {sample.labels["partition"]: sample.value
            for metric in worker.metrics.registry.collect() if metric.name == "fleet_consumer_lag_seconds"
            for sample in metric.samples}


async def test_a_worker_behind_shows_its_lag_in_seconds_and_0_once_caught_up(
        topics, producer, make_vehicles, database_url: str, db: asyncpg.Connection) -> None:
    vehicles = await make_vehicles(3)
    worker = Worker(topics)
    running = asyncio.create_task(worker.run())

    async def joined() -> bool:
        return bool(worker.assignment())

    await wait_for(joined, what="the worker to join its group")
    # The writer is held up: a lock on the telemetry table keeps the batches from PostgreSQL.
    blocker = await asyncpg.connect(database_url)
    holding = blocker.transaction()
    await holding.start()
    try:
        await blocker.execute("LOCK TABLE vehicle_telemetry IN ACCESS EXCLUSIVE MODE")
        now = datetime.now(timezone.utc).isoformat()
        await publish(producer, topics.telemetry_topic, [
            (str(v).encode(), {"vehicle_id": str(v), "time": now, "lat": 1.0, "lon": 2.0}) for v in vehicles])

        async def behind() -> bool:
            lags = lag_seconds(worker)
            return bool(lags) and max(lags.values()) >= 2.0

        await wait_for(behind, timeout=30, what="a lag of 2 seconds")
    finally:
        await holding.rollback()
        await blocker.close()

    async def caught_up() -> bool:
        lags = lag_seconds(worker)
        return bool(lags) and set(lags.values()) == {0.0}

    await wait_for(caught_up, timeout=30, what="the lag to come back to 0")
    stored = await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", vehicles)
    assert stored == len(vehicles)
    worker.stop()
    assert await asyncio.wait_for(running, 60) == 0
