"""Given files, Kafka ranges and dead letters, when ``fleet replay`` runs, then exactly the
right rows, rollups, rejects and checkpoints exist, and running it again adds nothing."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio
import structlog

from fleet_telemetry.cli.main import build_parser
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from tests.databases import create_database, drop_database
from tests.integration.streams import publish, read_topic, run_worker

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _logs_to_the_real_stderr() -> None:
    """Loggers first used from here on write to fd 2 (captured by pytest as usual).

    A test that ran ``fleet_telemetry.cli.main.main`` under ``capsys`` left structlog writing to that
    test's captured stderr, closed since; any logger first used afterwards would raise
    ``ValueError: I/O operation on closed file``.
    """
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__))


async def replay(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Runs ``fleet replay ARGV --json`` in this process; returns the exit status and the summary."""
    args = build_parser().parse_args(["replay", *argv, "--json"])
    code = await args.handler(args, settings)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def reading(vid: uuid.UUID, when: datetime, **extra: Any) -> dict[str, Any]:
    return {"vehicle_id": str(vid), "time": when.isoformat(), "lat": 52.5, "lon": 13.4, "speed": 50.0, **extra}


def ndjson(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines))
    return path


def rejects_of(path: str | Path) -> list[tuple[Any, ...]]:
    out = []
    for line in Path(path).read_bytes().splitlines():
        obj = orjson.loads(line)
        out.append((obj.get("line", obj.get("offset")), obj.get("index"), obj["reason"]))
    return out


async def rows_of(db: asyncpg.Connection, ids: list[uuid.UUID]) -> set[tuple[uuid.UUID, datetime, float]]:
    rows = await db.fetch("SELECT vehicle_id, time, speed FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", ids)
    return {(r["vehicle_id"], r["time"], r["speed"]) for r in rows}


async def test_a_file_backfill_stores_exactly_the_good_lines_and_twice_adds_nothing(
    settings, db, make_vehicles, tmp_path, capsys
) -> None:
    a, b = await make_vehicles(2)
    stranger = uuid.uuid4()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t = [now - timedelta(minutes=30 - i) for i in range(6)]
    await db.execute(  # stored earlier by the live pipeline
        "INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed)"
        " VALUES ($1, $2, ST_SetSRID(ST_MakePoint(13.4, 52.5), 4326), 77.0)", t[5], b)
    path = ndjson(tmp_path / "history.ndjson", [
        reading(a, t[0], speed=10.0),                           # 1 stored
        reading(b, t[0], speed=11.0),                           # 2 stored
        reading(a, t[0], speed=99.0),                           # 3 duplicate of line 1
        b'{"vehicle_id": "' + str(a).encode() + b'", "time"',  # 4 malformed_json
        reading(a, t[1], lat=95.0),                             # 5 invalid_reading
        reading(stranger, t[1]),                                # 6 unknown_vehicle
        reading(b, now + timedelta(hours=2)),                   # 7 future_time
        b"",                                                    # 8 blank: skipped
        [reading(a, t[2], speed=12.0), {"vehicle_id": str(a), "time": t[3].isoformat(), "lat": 1.0}],  # 9
        reading(b, t[5], speed=13.0),                           # 10 duplicate of the stored row
    ])
    expected = {(a, t[0], 10.0), (b, t[0], 11.0), (a, t[2], 12.0), (b, t[5], 77.0)}
    rejects = tmp_path / "rejects.ndjson"
    expected_rejects = [(4, None, "malformed_json"), (5, None, "invalid_reading"), (6, None, "unknown_vehicle"),
                        (7, None, "future_time"), (9, 1, "invalid_reading")]

    code, dry = await replay(settings, capsys, str(path), "--direct", "--dry-run", "--workers", "1",
                             "--rejects", str(tmp_path / "dry.ndjson"))
    assert (code, dry["stored"], dry["duplicates"], dry["rejected_total"]) == (1, 3, 2, 5)
    assert await rows_of(db, [a, b]) == {(b, t[5], 77.0)}  # a dry run writes nothing
    assert rejects_of(tmp_path / "dry.ndjson") == expected_rejects

    code, first = await replay(settings, capsys, str(path), "--direct", "--workers", "1", "--rejects", str(rejects))
    assert code == 1
    assert (first["status"], first["read"], first["stored"], first["duplicates"]) == ("complete", 10, 3, 2)
    assert first["rejected"] == {"malformed_json": 1, "invalid_reading": 2, "unknown_vehicle": 1, "future_time": 1}
    assert first["rejects_file"] == str(rejects) and first["checkpoint"] is None
    assert await rows_of(db, [a, b, stranger]) == expected
    assert rejects_of(rejects) == expected_rejects
    assert not os.path.exists(str(rejects) + ".checkpoint")

    code, second = await replay(settings, capsys, str(path), "--direct", "--workers", "1", "--rejects", str(rejects))
    assert (code, second["stored"], second["duplicates"], second["rejected_total"]) == (1, 0, 5, 5)
    assert await rows_of(db, [a, b, stranger]) == expected
    assert rejects_of(rejects) == expected_rejects


async def test_a_gzip_csv_backfill_through_worker_processes(settings, db, make_vehicles, tmp_path, capsys) -> None:
    (a,) = await make_vehicles(1)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t = [now - timedelta(minutes=20 - i) for i in range(8)]
    text = "vehicle_id,time,lon,lat,speed,fuel_level,engine_status\n"
    text += "".join(f"{a},{t[i].isoformat()},13.4,52.5,{i},{50 + i},\n" for i in range(6))
    text += f'{a},{t[6].isoformat()},13.4,52.5,6,56,"{{""dtc"": [""P0301""],\n""rpm"": 1200}}"\n'  # lines 8-9
    text += f"{a},{t[7].isoformat()},13.4,52.5,fast,,\n"  # line 10
    path = tmp_path / "export.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    rejects = tmp_path / "rejects.ndjson"

    code, summary = await replay(settings, capsys, str(path), "--direct", "--workers", "2", "--batch-size", "3",
                                 "--rejects", str(rejects))
    assert (code, summary["read"], summary["stored"], summary["rejected"]) == (1, 8, 7, {"invalid_reading": 1})
    rows = await db.fetch("SELECT time, speed, fuel_level, engine_status FROM vehicle_telemetry"
                          " WHERE vehicle_id = $1 ORDER BY time", a)
    assert [(r["time"], r["speed"], r["fuel_level"]) for r in rows] == [(t[i], float(i), 50.0 + i) for i in range(7)]
    assert json.loads(rows[6]["engine_status"]) == {"dtc": ["P0301"], "rpm": 1200}
    assert rejects_of(rejects) == [(10, None, "invalid_reading")]


async def test_a_dead_letter_replay_after_registering_the_vehicle_stores_those_readings(
    topics, producer, db, make_vehicles, tmp_path, capsys
) -> None:
    settings = topics
    (known,) = await make_vehicles(1)
    late = uuid.uuid4()  # registered only after its readings were dead-lettered
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t = [now - timedelta(minutes=10 - i) for i in range(3)]
    await publish(producer, settings.telemetry_topic, [
        (str(known).encode(), reading(known, t[0])),
        (str(late).encode(), reading(late, t[0], speed=1.0)),
        (str(late).encode(), [reading(late, t[1], speed=2.0), reading(late, t[2], speed=3.0)]),
        (str(known).encode(), reading(known, t[1], lat=123.0)),
    ])
    await run_worker(settings)
    letters = await read_topic(settings, settings.dlq_topic, expected=4)
    assert sorted(x.headers["fleet.error.reason"] for x in letters) == ["invalid_reading"] + ["unknown_vehicle"] * 3

    await db.execute(
        "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
        " VALUES ($1, 'LATE00000000000001', 'L-1', 'MAN', 'TGX', 2023, 'truck', 'active')", late)
    code, summary = await replay(settings, capsys, "--dead-letters", "--reason", "unknown_vehicle", "--direct",
                                 "--rejects", str(tmp_path / "r.ndjson"))
    assert (code, summary["read"], summary["stored"], summary["rejected_total"]) == (0, 3, 3, 0)
    assert await rows_of(db, [late]) == {(late, t[0], 1.0), (late, t[1], 2.0), (late, t[2], 3.0)}

    # Every reason: the stored ones are duplicates now, the invalid one stays rejected.
    code, summary = await replay(settings, capsys, "--dead-letters", "--direct", "--rejects", str(tmp_path / "all.ndjson"))
    assert (code, summary["stored"], summary["duplicates"], summary["rejected"]) == (1, 0, 3, {"invalid_reading": 1})
    [reject] = [orjson.loads(line) for line in (tmp_path / "all.ndjson").read_bytes().splitlines()]
    assert reject["topic"] == settings.dlq_topic and reject["dead_letter"]["reason"] == "invalid_reading"
    assert reject["dead_letter"]["topic"] == settings.telemetry_topic
    assert await rows_of(db, [known]) == {(known, t[0], 50.0)}
    # The dead-letter topic is left as it was: nothing removed, nothing added.
    assert len(await read_topic(settings, settings.dlq_topic, expected=4)) == 4


async def test_a_time_range_replay_from_kafka_redelivers_exactly_that_range(
    topics, producer, db, make_vehicles, tmp_path, capsys
) -> None:
    settings = topics
    (vid,) = await make_vehicles(1)
    history = f"{settings.telemetry_topic}.history"
    await ensure_topics(settings, [history], partitions=2)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    base_ms = int((now - timedelta(hours=1)).timestamp() * 1000)
    sent = []
    for i in range(10):  # record timestamps one minute apart, spread over both partitions
        value = reading(vid, now - timedelta(minutes=50 - i), speed=float(i))
        await producer.send(history, orjson.dumps(value), key=str(vid).encode(), partition=i % 2,
                            timestamp_ms=base_ms + i * 60_000)
        sent.append(value)
    await producer.flush()
    since = datetime.fromtimestamp((base_ms + 3 * 60_000) / 1000, tz=timezone.utc).isoformat()
    until = str(base_ms + 7 * 60_000)  # exclusive, as epoch milliseconds

    code, summary = await replay(settings, capsys, "--topic", history, "--since", since, "--until", until,
                                 "--via-kafka", "--rejects", str(tmp_path / "r.ndjson"))
    assert (code, summary["read"], summary["published"]) == (0, 4, 4)
    delivered = await read_topic(settings, settings.telemetry_topic, expected=4, timeout=15)
    assert sorted(orjson.loads(r.value)["speed"] for r in delivered) == [3.0, 4.0, 5.0, 6.0]
    assert {r.key for r in delivered} == {str(vid).encode()}

    # By offsets: partition 1 holds readings 1, 3, 5, 7, 9 at offsets 0..4.
    code, summary = await replay(settings, capsys, "--topic", history, "--partition", "1", "--from-offset", "1",
                                 "--to-offset", "4", "--direct", "--rejects", str(tmp_path / "o.ndjson"))
    assert (code, summary["stored"]) == (0, 3)
    assert {speed for _, _, speed in await rows_of(db, [vid])} == {3.0, 5.0, 7.0}


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "FLEET_DATABASE_URL": settings.database_url, "FLEET_METRICS_PORT": "0",
            "FLEET_TELEMETRY_TOPIC": settings.telemetry_topic, "FLEET_DLQ_TOPIC": settings.dlq_topic,
            "FLEET_LOG_LEVEL": "warning"}


async def test_an_interrupted_replay_resumes_without_loss_or_duplicates(settings, db, make_vehicles, tmp_path) -> None:
    vehicles = await make_vehicles(3)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    lines: list[Any] = []
    for i in range(240):
        if i % 20 == 7:
            lines.append(b"not json %d" % i)  # line i + 1 is rejected
        else:
            lines.append(reading(vehicles[i % 3], now - timedelta(seconds=1000 - i), speed=float(i % 100)))
    path = ndjson(tmp_path / "big.ndjson", lines)
    rejects = tmp_path / "rejects.ndjson"
    checkpoint = Path(str(rejects) + ".checkpoint")
    command = [sys.executable, "-m", "fleet_telemetry.cli", "replay", str(path), "--direct", "--workers", "1",
               "--rejects", str(rejects), "--json"]

    process = await asyncio.create_subprocess_exec(
        *command, "--rate", "100", "--batch-size", "20", cwd=tmp_path, env=_env(settings),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(300):  # until the checkpoint is past the first chunks
        if checkpoint.exists() and json.loads(checkpoint.read_bytes())["position"]["line"] >= 60:
            break
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 130, err.decode()
    assert b"run the same command to resume" in err
    interrupted = json.loads(out)
    stopped_at = json.loads(checkpoint.read_bytes())["position"]["line"]
    assert interrupted["status"] == "interrupted" and 60 <= stopped_at < 240
    assert interrupted["stored"] == len(await db.fetch(
        "SELECT 1 FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", vehicles))

    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err.decode()
    resumed = json.loads(out)
    assert resumed["resumed_from"]["line"] == stopped_at
    good = 240 - 12
    assert (resumed["status"], resumed["read"], resumed["stored"], resumed["duplicates"]) == ("complete", 240, good, 0)
    assert len(await db.fetch("SELECT 1 FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", vehicles)) == good
    assert rejects_of(rejects) == [(i + 1, None, "malformed_json") for i in range(240) if i % 20 == 7]
    assert not checkpoint.exists()


@pytest_asyncio.fixture
async def past_retention(settings: Settings) -> AsyncIterator[Settings]:
    """A database of its own where retention has run: raw data before 30 days ago is gone."""
    name = f"fleet_test_replay_{uuid.uuid4().hex[:8]}"
    try:
        url = await create_database(settings.database_url, name, migrate=True)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE telemetry_lifecycle SET raw_horizon = date_trunc('day', now() - interval '30 days', 'UTC')")
        finally:
            await conn.close()
        yield settings.model_copy(update={"database_url": url})
    finally:
        await drop_database(settings.database_url, name)


async def test_history_older_than_the_raw_retention_shows_up_in_the_hourly_and_daily_rollups(
    past_retention, tmp_path, capsys
) -> None:
    settings = past_retention
    db = await asyncpg.connect(settings.database_url)
    try:
        vid = uuid.uuid4()
        await db.execute(
            "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
            " VALUES ($1, 'HIST0000000000001', 'H-1', 'DAF', 'XF', 2019, 'truck', 'active')", vid)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        old_hour = (now - timedelta(days=40)).replace(minute=0, second=0)
        recent_hour = (now - timedelta(hours=3)).replace(minute=0, second=0)
        path = ndjson(tmp_path / "history.ndjson", [
            reading(vid, old_hour + timedelta(minutes=10), speed=10.0),
            reading(vid, old_hour + timedelta(minutes=20), speed=20.0),
            reading(vid, old_hour + timedelta(minutes=30), speed=30.0),
            reading(vid, recent_hour + timedelta(minutes=5), speed=60.0),
            reading(vid, recent_hour + timedelta(minutes=6), speed=80.0),
        ])
        args = ("--direct", "--workers", "1", "--rejects", str(tmp_path / "r.ndjson"))

        code, summary = await replay(settings, capsys, str(path), *args)
        assert (code, summary["stored"], summary["folded"], summary["duplicates"]) == (0, 2, 3, 0)
        assert summary["rollups"]["hours"] >= 1
        raw = await db.fetch("SELECT time FROM vehicle_telemetry WHERE vehicle_id = $1", vid)
        assert sorted(r["time"] for r in raw) == [recent_hour + timedelta(minutes=5), recent_hour + timedelta(minutes=6)]

        async def rollups() -> dict[tuple[str, datetime], tuple[int, float]]:
            out = {}
            for table in ("vehicle_telemetry_hourly", "vehicle_telemetry_daily"):
                for r in await db.fetch(f"SELECT bucket, samples, avg_speed FROM {table} WHERE vehicle_id = $1", vid):
                    out[(table, r["bucket"])] = (r["samples"], r["avg_speed"])
            return out

        old_day = old_hour.replace(hour=0)
        before = await rollups()
        assert before[("vehicle_telemetry_hourly", old_hour)] == (3, 20.0)
        assert before[("vehicle_telemetry_daily", old_day)] == (3, 20.0)
        assert before[("vehicle_telemetry_hourly", recent_hour)] == (2, 70.0)

        code, again = await replay(settings, capsys, str(path), *args)
        assert (code, again["stored"], again["folded"], again["duplicates"]) == (0, 0, 0, 5)
        assert await rollups() == before
    finally:
        await db.close()
