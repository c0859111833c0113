"""The rule engine's timer loop and the Redis GEO sets, with fakes (no services)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
import redis.exceptions

from fleet_telemetry.consumers.rules.geo_sets import drop_sets, geofence_key, update_members
from fleet_telemetry.consumers.rules.timers import run_every
from fleet_telemetry.consumers.rules.transitions import Transition

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
VID = uuid.UUID("00000000-0000-0000-0000-00000000000a")


async def test_a_tick_that_fails_transiently_runs_again_and_a_bug_ends_the_loop() -> None:
    outcomes: list[BaseException | None] = [ConnectionRefusedError(), None, OSError(), None, ValueError("bug")]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        failure = outcomes.pop(0)
        if failure is not None:
            raise failure

    with pytest.raises(ValueError, match="bug"):
        await run_every(0.001, tick)
    assert ticks == 5 and not outcomes


class FakePipeline:
    def __init__(self, redis: "FakeRedis") -> None:
        self.redis = redis
        self.calls: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> "FakePipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def geoadd(self, key: str, values: tuple[float, float, str]) -> None:
        self.calls.append(("geoadd", key, values))

    def zrem(self, key: str, member: str) -> None:
        self.calls.append(("zrem", key, member))

    async def execute(self) -> None:
        if self.redis.failure is not None:
            raise self.redis.failure
        self.redis.calls.extend(self.calls)


class FakeRedis:
    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.calls: list[tuple[Any, ...]] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    async def delete(self, *keys: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.calls.append(("delete", *keys))


async def test_members_follow_the_last_confirmed_transition_and_ignore_crossings() -> None:
    fake = FakeRedis()
    await update_members(fake, [  # type: ignore[arg-type]
        Transition(VID, 1, "enter", T0, 50.0, 10.0),
        Transition(VID, 2, "enter", T0, 50.0, 10.0, crossing=True),
        Transition(VID, 2, "exit", T0, 50.0, 10.0, crossing=True),
        Transition(VID, 3, "enter", T0, 50.0, 10.0),
        Transition(VID, 3, "exit", T0, 50.1, 10.1),
    ])
    assert fake.calls == [("geoadd", geofence_key(1), (10.0, 50.0, str(VID))), ("zrem", "geofence:3", str(VID))]


async def test_a_redis_that_does_not_answer_is_skipped_and_other_errors_are_raised() -> None:
    down = FakeRedis(redis.exceptions.ConnectionError())
    await update_members(down, [Transition(VID, 1, "enter", T0, 50.0, 10.0)])  # type: ignore[arg-type]
    assert await drop_sets(down, [1, 2]) is False  # type: ignore[arg-type]
    up = FakeRedis()
    assert await drop_sets(up, [1, 2]) is True  # type: ignore[arg-type]
    assert up.calls == [("delete", "geofence:1", "geofence:2")]
    with pytest.raises(redis.exceptions.ResponseError):
        await drop_sets(FakeRedis(redis.exceptions.ResponseError("WRONGTYPE")), [1])  # type: ignore[arg-type]
