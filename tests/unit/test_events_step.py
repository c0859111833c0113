"""The events step driven with a fake publisher and a fake next step: no services."""

from __future__ import annotations

import asyncio

import asyncpg

from fleet_telemetry.consumers.events import EventsStep, OutboxPublisher
from fleet_telemetry.core.metrics import PipelineMetrics
from tests.unit.test_stages import Collect, reading, retrier, stored


class FakePublisher:
    """Publishes nothing; notes when it was asked, and fails the first ``failures`` times."""

    def __init__(self, log: list[str], failures: int = 0) -> None:
        self.log = log
        self.failures = failures

    async def publish_pending(self) -> int:
        if self.failures:
            self.failures -= 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost")
        self.log.append("published")
        return 1


class Recorder(Collect):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def submit(self, item: object) -> None:
        self.log.append("committable")
        await super().submit(item)


def step(log: list[str], metrics: PipelineMetrics, failures: int = 0) -> EventsStep:
    publisher: OutboxPublisher = FakePublisher(log, failures)  # type: ignore[assignment]
    return EventsStep(Recorder(log), publisher, retrier(metrics))


async def test_a_batchs_events_are_published_before_its_offsets_become_committable() -> None:
    log: list[str] = []
    metrics = PipelineMetrics()
    await step(log, metrics).submit(stored([reading()]))
    assert log == ["published", "committable"]


async def test_a_batch_with_nothing_in_postgresql_asks_nothing() -> None:
    log: list[str] = []
    await step(log, PipelineMetrics()).submit(stored([]))
    assert log == ["committable"]


async def test_a_transient_failure_is_retried_before_the_batch_goes_on() -> None:
    log: list[str] = []
    metrics = PipelineMetrics()
    await asyncio.wait_for(step(log, metrics, failures=2).submit(stored([reading()])), 10)
    assert log == ["published", "committable"]
    assert metrics.value("fleet_retries_total", dependency="events") == 2
