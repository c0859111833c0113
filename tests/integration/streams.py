"""Helpers for scenario tests: publish readings, read a topic back, run a worker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.kafka_loop import LoopOptions, OffsetLookup, Ranges
from fleet_telemetry.consumers.kafka_range import read_ranges
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.settings import Settings
from tests.users import TEST_ADMIN, TEST_JWT_SECRET


@dataclass
class Record:
    key: bytes | None
    value: bytes
    headers: dict[str, str]


async def publish(producer: AIOKafkaProducer, topic: str, messages: list[tuple[bytes | None, Any]]) -> None:
    """Send (key, value) pairs in order; dict/list values are JSON-encoded."""
    for key, value in messages:
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        await producer.send(topic, raw, key=key)
    await producer.flush()


async def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list[Record]:
    """Read ``topic`` from the beginning until ``expected`` records came (or timeout), then a bit more.

    Each pass reads every partition from where the last one ended to its end, through the
    Kafka loop's assign-and-seek mode.
    """
    out: list[Record] = []
    nexts: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout
    surplus = False
    while True:
        nexts = await _read_on(settings, topic, nexts, out)
        if surplus or time.monotonic() >= deadline:
            return out
        if len(out) >= expected:
            surplus = True  # one more pass a second later catches any surplus
            await asyncio.sleep(1.0)
        else:
            await asyncio.sleep(0.3)


async def _read_on(settings: Settings, topic: str, nexts: dict[TopicPartition, int],
                   out: list[Record]) -> dict[TopicPartition, int]:
    """Appends the records of ``topic`` from ``nexts`` (or the beginning) to the end; returns where it ended."""
    async def seek(lookup: OffsetLookup) -> Ranges:
        tps = [TopicPartition(topic, p) for p in sorted(await lookup.partitions(topic))]
        beginning = await lookup.beginning_offsets(tps) if tps else {}
        return Ranges({tp: max(beginning[tp], nexts.get(tp, 0)) for tp in tps})

    # A fetch at the end waits for new records this long before it reports the end.
    options = LoopOptions.from_settings(settings, topics=[topic], group=None, seek=seek, retry_start=False,
                                        consumer_options={"fetch_max_wait_ms": 100}, fetch_timeout_ms=100)
    ended = dict(nexts)
    async for fetched in read_ranges(options, room=500):
        for records in fetched.records.values():
            out.extend(Record(r.key, r.value, {k: v.decode() for k, v in r.headers}) for r in records)
        ended = dict(fetched.next)
    return ended


async def run_worker(settings: Settings, idle: float = 2.0, **kwargs: Any) -> Worker:
    """Run one worker in this process until the topic has been idle for ``idle`` seconds."""
    worker = Worker(settings, stop_when_idle=idle, **kwargs)
    code = await asyncio.wait_for(worker.run(), timeout=120)
    assert code == 0
    return worker


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``fleet`` subprocess on ``settings``' services, topics and group
    (no ``FLEET_*`` variable of the caller's; metrics off), acting as the session's admin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({
        "FLEET_DATABASE_URL": settings.database_url, "FLEET_REDIS_URL": settings.redis_url,
        "FLEET_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "FLEET_TELEMETRY_TOPIC": settings.telemetry_topic,
        "FLEET_DLQ_TOPIC": settings.dlq_topic, "FLEET_CONSUMER_GROUP": settings.consumer_group,
        "FLEET_METRICS_PORT": "0", "FLEET_ACTOR": TEST_ADMIN, "FLEET_JWT_SECRET": TEST_JWT_SECRET, **extra,
    })
    return env
