"""What the fault soak finds after the stream: every message in its place, once.

- **lost**: a valid reading not in ``vehicle_telemetry``, or a broken message not on the
  dead-letter topic;
- **duplicated**: a reading stored more than once, or stored and also dead-lettered;
- **misrouted**: a broken message stored, a valid reading dead-lettered, or a dead
  letter whose reason is not the one its kind of breakage calls for;
- **dead letters repeated**: dead letters beyond one per broken message; dead letters
  are sent at least once (a worker killed after sending them and before its commit
  sends them again), so these are expected and reported, not failures;
- **statuses**: ``vehicle:{id}:status`` in Redis holds each vehicle's newest stored
  reading (time, latitude, longitude);
- **alerts duplicated**: more than one open alert per vehicle, type and geofence; the
  same alert raised twice for one reading; two enters (or two exits) of one vehicle
  and geofence in a row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
from aiokafka.structs import TopicPartition

from bench.soak_stream import READING, Ledger
from fleet_telemetry.consumers.deadletter import HEADER_INDEX, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON
from fleet_telemetry.consumers.kafka_loop import LoopOptions, OffsetLookup, Ranges
from fleet_telemetry.consumers.kafka_range import read_ranges
from fleet_telemetry.consumers.status import status_key
from fleet_telemetry.core.reading import status_time
from fleet_telemetry.core.settings import Settings

DeadLetter = tuple[int, int, int | None, str]
"""(source partition, source offset, index in an array message or None, reason)."""

_NEWEST = """
SELECT DISTINCT ON (vehicle_id) vehicle_id, time, ST_Y(location) AS lat, ST_X(location) AS lon
FROM vehicle_telemetry ORDER BY vehicle_id, time DESC
"""
# More than one open alert per (vehicle, type, geofence); the same alert raised twice
# for one reading; the same transition kind twice in a row for a vehicle and geofence.
_ALERTS = """
SELECT
  (SELECT count(*) FROM alerts) AS alerts,
  (SELECT count(*) FROM alerts WHERE NOT is_resolved) AS open,
  (SELECT count(*) FROM geofence_transitions) AS transitions,
  (SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM alerts WHERE NOT is_resolved
     GROUP BY entity_id, type, coalesce(geofence_id, 0) HAVING count(*) > 1) o) AS open_twice,
  (SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM alerts
     GROUP BY entity_id, type, coalesce(geofence_id, 0), reading_time HAVING count(*) > 1) r) AS raised_twice,
  (SELECT count(*) FROM (SELECT kind, lag(kind) OVER (PARTITION BY vehicle_id, geofence_id ORDER BY time, id) AS before
     FROM geofence_transitions) t WHERE kind = before) AS transitions_twice
"""


async def read_dead_letters(settings: Settings, topic: str) -> list[DeadLetter]:
    """Every record of ``topic`` from the beginning to its end now, by its headers."""
    async def seek(lookup: OffsetLookup) -> Ranges:
        tps = [TopicPartition(topic, p) for p in sorted(await lookup.partitions(topic))]
        return Ranges(await lookup.beginning_offsets(tps) if tps else {})

    options = LoopOptions.from_settings(settings, topics=[topic], group=None, seek=seek, retry_start=False,
                                        consumer_options={"fetch_max_wait_ms": 100}, fetch_timeout_ms=100)
    out: list[DeadLetter] = []
    async for fetched in read_ranges(options, room=5000):
        for records in fetched.records.values():
            for record in records:
                headers = {name: value.decode() for name, value in record.headers}
                index = headers.get(HEADER_INDEX)
                out.append((int(headers[HEADER_PARTITION]), int(headers[HEADER_OFFSET]),
                            None if index is None else int(index), headers[HEADER_REASON]))
    return out


def place_messages(ledger: Ledger, stored: set[tuple[UUID, datetime]], stored_rows: int,
                   dead_letters: Iterable[DeadLetter]) -> dict[str, Any]:
    """Where each sent message ended up, against where it belongs. Pure."""
    readings = ledger.readings()
    letters = list(dead_letters)
    first: dict[tuple[int, int, int | None], str] = {}
    for partition, offset, index, reason in letters:
        first.setdefault((partition, offset, index), reason)
    reasons: Counter[str] = Counter()
    good_lettered = wrong_reason = stored_and_lettered = 0
    lettered: set[tuple[int, int]] = set()
    for (partition, offset, _), reason in first.items():
        sent_index = ledger.placed.get((partition, offset))
        if sent_index is None:
            continue  # a copy of a message sent twice: counted with the repeats
        lettered.add((partition, offset))
        sent = ledger.messages[sent_index]
        reasons[reason] += 1
        if sent.kind == READING:
            good_lettered += 1
            stored_and_lettered += (sent.vehicle_id, sent.time) in stored
        elif reason != sent.kind:
            wrong_reason += 1
    bad_lost = sum(1 for where, i in ledger.placed.items()
                   if ledger.messages[i].kind != READING and where not in lettered)
    unplaced = len(ledger.messages) - len(set(ledger.placed.values()))
    readings_lost = len(readings - stored)
    return {
        "stored": stored_rows,
        "lost": readings_lost + bad_lost + unplaced,
        "lost_readings": readings_lost,
        "lost_bad_messages": bad_lost,
        "never_acknowledged": unplaced,
        "duplicated": (stored_rows - len(stored)) + stored_and_lettered,
        "misrouted": len(stored - readings) + good_lettered + wrong_reason,
        "dead_lettered": sum(reasons.values()),
        "dead_lettered_by_reason": dict(sorted(reasons.items())),
        "dead_letters_repeated": len(letters) - sum(reasons.values()),
    }


async def stored_readings(conn: asyncpg.Connection) -> tuple[set[tuple[UUID, datetime]], int]:
    """The distinct (vehicle, time) identities in ``vehicle_telemetry``, and its row count."""
    rows = await conn.fetch("SELECT vehicle_id, time FROM vehicle_telemetry")
    return {(r["vehicle_id"], r["time"]) for r in rows}, len(rows)


async def check_statuses(conn: asyncpg.Connection, redis: aioredis.Redis, fleet: list[UUID]) -> dict[str, Any]:
    """Each vehicle's Redis status against its newest stored reading."""
    newest = {r["vehicle_id"]: r for r in await conn.fetch(_NEWEST)}
    async with redis.pipeline(transaction=False) as pipe:
        for vehicle_id in fleet:
            pipe.hmget(status_key(vehicle_id), "time", "lat", "lon")
        statuses = await pipe.execute()
    wrong: list[dict[str, Any]] = []
    for vehicle_id, (time, lat, lon) in zip(fleet, statuses):
        row = newest.get(vehicle_id)
        expected = None if row is None else (status_time(row["time"]), row["lat"], row["lon"])
        actual = None if time is None else (time.decode(), float(lat), float(lon))
        if actual != expected:
            wrong.append({"vehicle_id": str(vehicle_id), "status": actual, "newest_stored": expected})
    return {"statuses_right": len(fleet) - len(wrong), "statuses_checked": len(fleet),
            "statuses_wrong_examples": wrong[:5]}


async def check_alerts(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(_ALERTS)
    counts = {name: int(row[name]) for name in row.keys()}
    return {
        "alerts": counts["alerts"], "alerts_open": counts["open"], "transitions": counts["transitions"],
        "alerts_duplicated": counts["open_twice"] + counts["raised_twice"] + counts["transitions_twice"],
        "alerts_duplicated_by_kind": {"open_twice": counts["open_twice"], "raised_twice": counts["raised_twice"],
                                      "transition_twice_in_a_row": counts["transitions_twice"]},
    }


async def verdict(database_url: str, redis_url: str, settings: Settings, dlq_topic: str, ledger: Ledger,
                  fleet: list[UUID]) -> dict[str, Any]:
    """Everything above, from the soak's own database, Redis and dead-letter topic."""
    letters = await read_dead_letters(settings, dlq_topic)
    conn = await asyncpg.connect(database_url)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        stored, rows = await stored_readings(conn)
        found = place_messages(ledger, stored, rows, letters)
        found.update(await check_statuses(conn, redis, fleet))
        found.update(await check_alerts(conn))
    finally:
        await redis.aclose()
        await conn.close()
    return found

