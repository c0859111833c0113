"""Keeps a worker's :class:`~fleet_telemetry.core.health.Health` up to date.

A background task wakes every ``interval`` seconds: it ticks (the event loop is alive),
asks PostgreSQL ``SELECT 1`` through the worker's pool (bounded by ``interval``), and
copies from the Kafka loop what it knows already: its partitions, its last turn and when
the broker last answered it. The HTTP probes then only read those numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import structlog

from fleet_telemetry.consumers.kafka_loop import KafkaLoop
from fleet_telemetry.core.health import Health

log = structlog.get_logger("fleet.consumer")


def probe_interval(stale_seconds: float) -> float:
    """How often the probe runs: a few times per staleness window, at most every 5 s."""
    return max(0.2, min(5.0, stale_seconds / 3))


class HealthProbe:
    """Feeds ``health`` from the worker's pool and Kafka loop, once they exist."""

    def __init__(self, health: Health, interval: float) -> None:
        self.health = health
        self.interval = interval
        self.pool: asyncpg.Pool | None = None
        self.loop: KafkaLoop | None = None

    async def check(self) -> None:
        """One round: tick, ask PostgreSQL, copy the Kafka loop's state."""
        health = self.health
        health.tick()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.fetchval("SELECT 1"), self.interval)
            except Exception as exc:  # noqa: BLE001 - any failure means "did not answer"
                log.debug("health probe: postgresql did not answer", error=type(exc).__name__)
            else:
                health.answered("postgresql")
        loop = self.loop
        if loop is not None:
            health.partitions = len(loop.assignment())
            health.turned_at = loop.turned_at
            answered = loop.kafka_answered_at()
            if answered is not None:
                health.answered("kafka", answered)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["HealthProbe"]:
        """Runs the probe in a task for the duration of the block."""
        task = asyncio.create_task(self.run(), name="fleet-health")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.health.partitions = 0
