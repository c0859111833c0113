"""Alerts are never skipped: given readings that raise an alert, when the PostgreSQL
write commits but reports a failure (so its retry finds every reading already stored),
or the worker dies between storing a batch and evaluating its rules and the vehicle
sends nothing more, then the alert is raised all the same, once."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.sink import TelemetrySink
from fleet_telemetry.consumers.worker import Worker
from tests.integration.streams import publish, run_worker
from tests.integration.test_alerts_scenarios import alert_rows, message, rules_settings

pytestmark = pytest.mark.integration


def low_fuel_then_silence(vid: uuid.UUID) -> list[tuple[bytes, dict[str, Any]]]:
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)
    return [message(vid, start + timedelta(seconds=10 * i), speed=40.0, fuel_level=fuel, lon=12.5 + 0.001 * i)
            for i, fuel in enumerate([30.0, 20.0, 6.0])]


async def test_a_write_that_commits_and_then_fails_still_raises_the_alert(
    topics, producer, db: asyncpg.Connection, make_vehicles, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = rules_settings(topics, alert_low_fuel_percent=10.0)
    (vid,) = await make_vehicles(1)
    await publish(producer, settings.telemetry_topic, low_fuel_then_silence(vid))
    write = TelemetrySink.write
    failed: list[int] = []

    async def commits_then_fails(self: TelemetrySink, readings: list[Any]) -> Any:
        outcome = await write(self, readings)
        if outcome.stored and not failed:  # the COPY is committed; the reply is lost
            failed.append(len(outcome.stored))
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost after the commit")
        return outcome

    monkeypatch.setattr(TelemetrySink, "write", commits_then_fails)

    await run_worker(settings)

    assert failed == [3]
    assert await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid) == 3
    assert [(a["type"], a["is_resolved"]) for a in await alert_rows(db, vid)] == [("low_fuel", False)]


async def test_a_worker_dying_between_the_write_and_the_rules_leaves_nothing_unevaluated(
    topics, producer, db: asyncpg.Connection, make_vehicles, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = rules_settings(topics, alert_low_fuel_percent=10.0)
    (vid,) = await make_vehicles(1)
    await publish(producer, settings.telemetry_topic, low_fuel_then_silence(vid))
    after_write = RuleEngine.after_write

    async def dies(self: RuleEngine, readings: list[Any]) -> None:
        raise RuntimeError("the worker died here")

    monkeypatch.setattr(RuleEngine, "after_write", dies)
    with pytest.raises(RuntimeError, match="died here"):
        await Worker(settings, stop_when_idle=2.0).run()
    assert await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid) == 3
    assert await alert_rows(db, vid) == []

    monkeypatch.setattr(RuleEngine, "after_write", after_write)
    await run_worker(settings)  # the same records again: every one a duplicate now

    assert [(a["type"], a["is_resolved"]) for a in await alert_rows(db, vid)] == [("low_fuel", False)]
