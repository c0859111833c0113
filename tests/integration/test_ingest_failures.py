"""Workers that die, share, and lose their dependencies still store every reading once."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import pytest

from fleet_telemetry.consumers.worker import Worker
from bench.soak_proxy import LinkProxy
from tests.integration.streams import publish, run_worker, wait_for, worker_env

pytestmark = pytest.mark.integration


def readings_for(vehicles: list[uuid.UUID], per_vehicle: int) -> list[tuple[bytes, dict[str, object]]]:
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    out = []
    for i in range(per_vehicle):
        for vid in vehicles:
            out.append((str(vid).encode(), {
                "vehicle_id": str(vid), "time": (start + timedelta(seconds=i)).isoformat(),
                "lat": 48.0 + i * 1e-5, "lon": 11.0, "speed": 42.0,
            }))
    return out


async def stored(db, vehicles: list[uuid.UUID]) -> int:
    return await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", vehicles)


async def test_a_worker_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(
    topics, producer, db, make_vehicles
) -> None:
    settings = topics
    vehicles = await make_vehicles(40)
    messages = readings_for(vehicles, 500)  # 20,000 readings
    await publish(producer, settings.telemetry_topic, messages)
    env = worker_env(settings, FLEET_BATCH_MAX_READINGS="300", FLEET_MAX_BATCHES_IN_FLIGHT="1")

    first = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleet_telemetry.cli", "consume", env=env,
                                                 stderr=asyncio.subprocess.DEVNULL)
    await wait_for(lambda: _more_than(db, vehicles, 2000), timeout=90, what="the first worker to store rows")
    first.send_signal(signal.SIGKILL)
    await first.wait()
    at_kill = await stored(db, vehicles)
    assert at_kill < len(messages), "the kill came too late to test anything"

    second = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleet_telemetry.cli", "consume",
                                                  "--stop-when-idle", "3", env=env,
                                                  stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(second.wait(), timeout=180) == 0
    assert await stored(db, vehicles) == len(messages)
    per_vehicle = await db.fetch("SELECT count(*) AS n, count(DISTINCT time) AS d FROM vehicle_telemetry"
                                 " WHERE vehicle_id = ANY($1::uuid[]) GROUP BY vehicle_id", vehicles)
    assert all(r["n"] == r["d"] == 500 for r in per_vehicle)


async def _more_than(db, vehicles: list[uuid.UUID], n: int) -> bool:
    return await stored(db, vehicles) > n


async def test_two_workers_share_the_partitions_and_store_every_reading_once(topics, producer, db, make_vehicles) -> None:
    settings = topics.model_copy(update={"batch_max_readings": 500})
    vehicles = await make_vehicles(40)
    one, two = Worker(settings, stop_when_idle=4), Worker(settings, stop_when_idle=4, worker_index=1)
    tasks = [asyncio.create_task(one.run()), asyncio.create_task(two.run())]

    async def both_assigned() -> bool:
        return all(len(w.assignment()) == 2 for w in (one, two))

    await wait_for(both_assigned, timeout=60, what="both workers to own two partitions each")
    messages = readings_for(vehicles, 250)  # 10,000 readings
    await publish(producer, settings.telemetry_topic, messages)
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=120) == [0, 0]

    assert await stored(db, vehicles) == len(messages)
    counts = [w.metrics.value("fleet_readings_total", outcome="stored") for w in (one, two)]
    assert all(c > 0 for c in counts)
    assert sum(counts) == len(messages)


async def test_postgresql_going_away_mid_stream_loses_nothing(topics, producer, db, make_vehicles) -> None:
    target = urlsplit(topics.database_url)
    proxy = LinkProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{proxy.port}"))
    settings = topics.model_copy(update={"database_url": via_proxy, "batch_max_readings": 200,
                                         "retry_max_seconds": 1.0})
    vehicles = await make_vehicles(20)
    messages = readings_for(vehicles, 150)  # 3,000 readings
    worker = Worker(settings, stop_when_idle=5)
    task = asyncio.create_task(worker.run())
    await publish(producer, settings.telemetry_topic, messages[:1000])
    await wait_for(lambda: _more_than(db, vehicles, 0), timeout=60, what="the first rows")

    await proxy.cut()  # PostgreSQL is gone for the worker
    await publish(producer, settings.telemetry_topic, messages[1000:2000])
    await asyncio.sleep(4)
    during = await stored(db, vehicles)
    await proxy.restore()
    await publish(producer, settings.telemetry_topic, messages[2000:])

    assert await asyncio.wait_for(task, timeout=120) == 0
    await proxy.cut()
    assert during < len(messages)
    assert await stored(db, vehicles) == len(messages)
    assert worker.metrics.value("fleet_retries_total", dependency="postgresql") > 0
    assert worker.metrics.value("fleet_readings_total", outcome="stored") + worker.metrics.value(
        "fleet_readings_total", outcome="duplicate") >= len(messages)


async def test_without_redis_telemetry_keeps_flowing_and_statuses_catch_up(
    topics, producer, db, redis_client, make_vehicles
) -> None:
    vehicles = await make_vehicles(3)
    no_redis = topics.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    messages = readings_for(vehicles, 10)
    await publish(producer, topics.telemetry_topic, messages)
    worker = await run_worker(no_redis)
    assert await stored(db, vehicles) == 30
    assert worker.metrics.value("fleet_status_updates_skipped_total") >= 3
    assert await redis_client.exists(*[f"vehicle:{v}:status" for v in vehicles]) == 0

    later = datetime.now(timezone.utc)
    await publish(producer, topics.telemetry_topic, [
        (str(v).encode(), {"vehicle_id": str(v), "time": later.isoformat(), "lat": 1.0, "lon": 1.0}) for v in vehicles])
    await run_worker(topics)
    assert await redis_client.exists(*[f"vehicle:{v}:status" for v in vehicles]) == 3
