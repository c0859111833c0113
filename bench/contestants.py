"""The contestants the pipeline is measured against, each run as a process of its own.

``python -m bench.contestants ceiling|naive|peer ...`` is started by the benchmark,
which measures the process (CPU, peak RSS) from outside. Each prints ``BENCH {json}``
lines on stdout: ``ready`` once it is about to work (partitions assigned, or the data
loaded), and the ceiling also ``done`` (the Kafka contestants are done when their
committed offsets reach the end of the topic, which the benchmark watches).

- ``ceiling``: the same rows, already in memory, binary-COPYed straight into
  ``vehicle_telemetry`` with the sink's codecs: no Kafka, no validation, no Redis.
- ``naive``: what one writes in an afternoon: aiokafka, ``json.loads``, asyncpg
  ``executemany`` of an INSERT per fetched batch, offsets committed after each batch.
- ``peer``: a Quix Streams application with its PostgreSQL sink (psycopg2,
  ``execute_values``), ``ON CONFLICT DO NOTHING`` on the same table.
- ``fetch``: not a contestant but a probe of the producer's codec: aiokafka reading a
  topic from its start to the given end offsets (no group, so no join), touching every
  value and nothing else: the cost of fetching, decompressing and parsing the records.

The table is ``vehicle_telemetry`` of a freshly migrated database for every one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from bench.dataset import copy_row, read_dataset

_NAIVE_INSERT = (
    "INSERT INTO vehicle_telemetry"
    " (time, vehicle_id, location, speed, fuel_level, heading, odometer_km, engine_status)"
    " VALUES ($1, $2, ST_SetSRID(ST_MakePoint($3, $4), 4326), $5, $6, $7, $8, $9::jsonb)"
    " ON CONFLICT (vehicle_id, time) DO NOTHING"
)


def emit(event: str, **fields: Any) -> None:
    """One line the benchmark reads: ``BENCH {"event": ..., "t": wall-clock seconds}``."""
    sys.stdout.write("BENCH " + orjson.dumps({"event": event, "t": time.time(), **fields}).decode() + "\n")
    sys.stdout.flush()


# --- ceiling ---------------------------------------------------------------------


async def ceiling(database_url: str, dataset: Path, batch: int) -> None:
    """COPY the dataset's rows in transactions of ``batch`` rows; building them is not timed."""
    import asyncpg

    from fleet_telemetry.consumers.sink import COLUMNS, init_connection

    rows = [copy_row(value) for value in read_dataset(dataset)]
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        emit("ready", rows=len(rows))
        for start in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "vehicle_telemetry", records=rows[start:start + batch], columns=COLUMNS
                )
        emit("done")
        await asyncio.sleep(0.5)  # the benchmark samples this backend's CPU before it goes
    finally:
        await conn.close()


# --- naive -----------------------------------------------------------------------


def _naive_row(value: bytes) -> tuple[Any, ...]:
    from datetime import datetime

    r = orjson.loads(value)
    engine = r.get("engine_status")
    return (
        datetime.fromisoformat(r["time"]), r["vehicle_id"], r["lon"], r["lat"], r.get("speed"),
        r.get("fuel_level"), r.get("heading"), r.get("odometer_km"),
        None if engine is None else orjson.dumps(engine).decode(),
    )


async def naive(database_url: str, bootstrap: str, topic: str, group: str, idle: float) -> None:
    """Consume until ``idle`` seconds pass without a record; INSERT each fetched batch, then commit."""
    import asyncpg
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

    class Ready(ConsumerRebalanceListener):
        said = False

        async def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        async def on_partitions_assigned(self, assigned: Any) -> None:
            if assigned and not self.said:
                self.said = True
                emit("ready")

    conn = await asyncpg.connect(database_url)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    consumer.subscribe([topic], listener=Ready())
    await consumer.start()
    try:
        last = time.monotonic()
        while True:
            fetched = await consumer.getmany(timeout_ms=500)
            if not fetched:
                if time.monotonic() - last >= idle:
                    break
                continue
            last = time.monotonic()
            rows = [_naive_row(msg.value) for messages in fetched.values() for msg in messages]
            await conn.executemany(_NAIVE_INSERT, rows)
            await consumer.commit()
    finally:
        await consumer.stop()
        await conn.close()


# --- fetch: the cost of reading records ---------------------------------------------


async def fetch(bootstrap: str, topic: str, ends: dict[int, int]) -> None:
    """Read ``topic``'s partitions from the start up to ``ends``; says ``done`` with the bytes seen."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        emit("ready")
        left = {tp: ends[tp.partition] for tp in partitions if ends[tp.partition] > 0}
        records = size = 0
        while left:
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                records += len(messages)
                size += sum(len(m.value or b"") for m in messages)
                if messages and messages[-1].offset + 1 >= left.get(tp, 0):
                    left.pop(tp, None)
        emit("done", records=records, bytes=size)
    finally:
        await consumer.stop()


def _ends(text: str) -> dict[int, int]:
    """``"0:10,1:12"`` -> ``{0: 10, 1: 12}``."""
    return {int(p): int(n) for p, _, n in (item.partition(":") for item in text.split(",") if item)}


# --- peer: Quix Streams ------------------------------------------------------------


def peer(database_url: str, bootstrap: str, topic: str, group: str, idle: float, state_dir: str) -> None:
    """A Quix Streams application: JSON in, one row per reading, its PostgreSQL sink out."""
    from quixstreams import Application
    from quixstreams.sinks.community.postgresql import PostgreSQLSink

    from fleet_telemetry.core.reading import ewkb_point

    url = urlsplit(database_url)
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        use_changelog_topics=False,
        state_dir=state_dir,
        loglevel="WARNING",
        # librdkafka's default (45 s) makes the broker used here hold the first join for
        # about 23 s; 10 s is aiokafka's default, so both clients join alike.
        consumer_extra_config={"session.timeout.ms": 10000},
    )
    source = app.topic(topic, value_deserializer="json", key_deserializer="str")
    first = [True]

    def to_row(r: dict[str, Any]) -> dict[str, Any]:
        if first[0]:
            first[0] = False
            emit("ready")
        return {
            "time": r["time"], "vehicle_id": r["vehicle_id"],
            # Hex EWKB: PostGIS reads it as a geometry literal.
            "location": ewkb_point(r["lon"], r["lat"]).hex(),
            "speed": r.get("speed"), "fuel_level": r.get("fuel_level"), "heading": r.get("heading"),
            "odometer_km": r.get("odometer_km"), "engine_status": r.get("engine_status"),
        }

    sdf = app.dataframe(source).apply(to_row)
    sdf.sink(PostgreSQLSink(
        host=url.hostname or "127.0.0.1", port=url.port or 5432, dbname=unquote(url.path.lstrip("/")),
        user=unquote(url.username or "postgres"), password=unquote(url.password or ""),
        table_name="vehicle_telemetry", schema_auto_update=False, include_metadata=False,
        on_conflict_do_nothing=True,
    ))
    app.run(timeout=idle, collect=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contestants")
    parser.add_argument("name", choices=("ceiling", "naive", "peer", "fetch"))
    parser.add_argument("--database-url", default="")
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic")
    parser.add_argument("--group")
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--state-dir", default="")
    parser.add_argument("--ends", default="", help="fetch: partition:end offset, comma-separated")
    args = parser.parse_args(argv)
    if args.name == "fetch":
        asyncio.run(fetch(args.bootstrap, args.topic, _ends(args.ends)))
    elif args.name == "ceiling":
        asyncio.run(ceiling(args.database_url, args.dataset, args.batch))
    elif args.name == "naive":
        asyncio.run(naive(args.database_url, args.bootstrap, args.topic, args.group, args.idle))
    else:
        peer(args.database_url, args.bootstrap, args.topic, args.group, args.idle, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
