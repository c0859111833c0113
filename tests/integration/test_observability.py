"""What an operator watches: the lag in seconds of a worker that is behind and of one
that caught up; a worker's log lines as JSON, those of one batch sharing a trace id; the
fleet dashboard's SQL on the migrated schema."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from fleet_telemetry.consumers.worker import Worker
from tests.dashboards import concrete_sql, queries
from tests.integration.cli import environment, fleet
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


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of a worker's stderr as JSON, each with the common fields; the command's
    own one-line error message (``fleet consume: ...``) is the one plain line allowed."""
    records = []
    for line in stderr.splitlines():
        if not line.strip() or line.startswith("fleet consume: "):
            continue
        record = json.loads(line)  # raises on a line that is not JSON
        assert isinstance(record, dict), line
        assert COMMON_FIELDS <= record.keys(), record
        records.append(record)
    return records


COMMON_FIELDS = {"event", "level", "timestamp", "logger"}


async def test_the_lines_of_one_batch_share_a_trace_id_and_every_line_is_json(
        topics, producer, make_vehicles) -> None:
    (vehicle,) = await make_vehicles(1)
    start = datetime.now(timezone.utc)
    await publish(producer, topics.telemetry_topic, [
        (str(vehicle).encode(), {"vehicle_id": str(vehicle), "time": (start + timedelta(seconds=i)).isoformat(),
                                 "lat": 1.0, "lon": 2.0}) for i in range(6)])
    # Redis away: each batch logs its skipped status updates, then "batch written".
    result = await asyncio.to_thread(
        fleet, topics, "consume", "--stop-when-idle", "3", "--json", LOG_FORMAT="json", LOG_LEVEL="debug",
        REDIS_URL="redis://127.0.0.1:1/0", BATCH_MAX_READINGS="2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stored"] == 6  # --json: the run's summary on stdout, stderr all JSON
    records = json_lines(result.stderr)
    assert all(r["logger"].startswith("fleet") for r in records if r["event"] == "batch written")
    batches: dict[str, list[str]] = {}
    for record in records:
        if "trace_id" in record:
            batches.setdefault(record["trace_id"], []).append(record["event"])
    written = [r for r in records if r["event"] == "batch written"]
    assert sum(r["messages"] for r in written) == 6 and len(written) >= 2
    assert len(batches) == len(written), batches  # one trace id per batch, each on its own lines
    for events in batches.values():
        assert sorted(events) == ["batch written", "status updates skipped; statuses catch up with the next readings"]


async def test_library_lines_are_json_with_the_common_fields(topics) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_telemetry.cli", "consume",
        # At debug the worker keeps aiokafka's own line about the address it cannot reach.
        env=environment(topics, LOG_FORMAT="json", LOG_LEVEL="debug", KAFKA_BOOTSTRAP="127.0.0.1:1"),
        stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(3)  # aiokafka tries, fails and says so; the worker retries
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    records = json_lines(stderr.decode())
    library = [r for r in records if r["logger"].startswith("aiokafka")]
    ours = [r for r in records if r["logger"] == "fleet.consumer"]
    assert library and "127.0.0.1:1" in library[0]["event"] and library[0]["level"] == "error"
    assert ours and ours[0]["event"] == "kafka not reachable, retrying"


async def test_every_sql_panel_of_the_fleet_dashboard_runs_on_the_migrated_schema(
        make_vehicles, db: asyncpg.Connection) -> None:
    (vehicle,) = await make_vehicles(1)
    plate = await db.fetchval("SELECT license_plate FROM vehicles WHERE id = $1", vehicle)
    await db.execute("INSERT INTO vehicle_positions (vehicle_id, time, location, speed)"
                     " VALUES ($1, now(), ST_SetSRID(ST_MakePoint(13.4, 52.5), 4326), 42)", vehicle)
    await db.execute("INSERT INTO alerts (entity_id, type, severity, reading_time) VALUES ($1, 'speeding', 'warning', now())",
                     vehicle)
    await db.execute("INSERT INTO vehicle_telemetry_hourly (vehicle_id, bucket, samples)"
                     " VALUES ($1, date_trunc('hour', now()), 1)", vehicle)
    answers: dict[str, list[asyncpg.Record]] = {}
    for _board, title, sql in queries("grafana-postgresql-datasource"):
        answers[title] = await db.fetch(concrete_sql(sql))
    assert len(answers) >= 7
    for title in ("Vehicles reporting", "Active vehicles", "Open alerts", "Alerts raised by type",
                  "Vehicles reporting per hour"):
        assert answers[title], title
    mapped = {row["license_plate"]: (row["latitude"], row["longitude"]) for row in answers["Last known positions"]}
    assert mapped[plate] == (52.5, 13.4)
    assert plate in {row["license_plate"] for row in answers["Open alerts, newest first"]
                     if row["type"] == "speeding"}
    assert "speeding" in {row["metric"] for row in answers["Alerts raised by type"]}
