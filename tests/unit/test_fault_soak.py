"""The fault soak's pure parts: where each message ended up, the fault plan, the options."""

from __future__ import annotations

import argparse
import uuid
from datetime import datetime, timedelta, timezone
from random import Random

import pytest

from bench.faults import build_parser, options_from
from bench.soak_plan import KILL, POSTGRES, REDIS, plan_faults
from bench.soak_stream import READING, Ledger, Sent
from bench.soak_verdict import place_messages
from fleet_telemetry.core.errors import UsageError

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
V = uuid.UUID(int=1)


def ledger(*kinds: str) -> Ledger:
    """One message per kind, message i at partition 0, offset i."""
    out = Ledger()
    for i, kind in enumerate(kinds):
        out.messages.append(Sent(kind, V, T0 + timedelta(seconds=i)) if kind == READING else Sent(kind))
        out.placed[(0, i)] = i
    return out


def stored(sent: Ledger, *indexes: int) -> set[tuple[uuid.UUID, datetime]]:
    return {(V, sent.messages[i].time) for i in indexes}  # type: ignore[misc]


def test_every_message_in_its_place_once_is_clean() -> None:
    sent = ledger(READING, "malformed_json", READING, "unknown_vehicle")
    found = place_messages(sent, stored(sent, 0, 2), 2, [(0, 1, None, "malformed_json"), (0, 3, None, "unknown_vehicle")])
    assert (found["lost"], found["duplicated"], found["misrouted"]) == (0, 0, 0)
    assert found["dead_lettered_by_reason"] == {"malformed_json": 1, "unknown_vehicle": 1}
    assert found["dead_letters_repeated"] == 0


def test_a_reading_not_stored_and_a_broken_message_not_dead_lettered_are_lost() -> None:
    sent = ledger(READING, "invalid_reading", READING)
    found = place_messages(sent, stored(sent, 0), 1, [])
    assert (found["lost_readings"], found["lost_bad_messages"], found["lost"]) == (1, 1, 2)


def test_a_reading_stored_twice_or_also_dead_lettered_is_duplicated() -> None:
    sent = ledger(READING, READING)
    found = place_messages(sent, stored(sent, 0, 1), 3, [(0, 1, None, "invalid_reading")])
    assert found["duplicated"] == 2  # one row too many, one reading stored and dead-lettered
    assert found["misrouted"] == 1


def test_dead_letters_sent_again_are_repeats_not_failures() -> None:
    sent = ledger("future_time")
    letters = [(0, 0, None, "future_time"), (0, 0, None, "future_time"), (0, 7, None, "future_time")]
    found = place_messages(sent, set(), 0, letters)  # offset 7: a copy of a message the producer sent again
    assert (found["lost"], found["dead_lettered"], found["dead_letters_repeated"]) == (0, 1, 2)


def test_a_wrong_reason_or_a_broken_message_stored_is_misrouted() -> None:
    sent = ledger("malformed_json")
    found = place_messages(sent, {(V, T0)}, 1, [(0, 0, None, "invalid_reading")])
    assert found["misrouted"] == 2


def test_faults_are_spread_over_the_stream_in_a_seeded_order() -> None:
    plan = plan_faults(Random(7), 100.0, 3, 2.0, {POSTGRES: 8.0, REDIS: 5.0, "broker restart": 0.0})
    assert sorted(f.kind for f in plan) == sorted([KILL, KILL, KILL, POSTGRES, REDIS])
    assert all(10.0 <= f.at_s <= 75.0 for f in plan)
    assert [f.at_s for f in plan] == sorted(f.at_s for f in plan)
    assert plan == plan_faults(Random(7), 100.0, 3, 2.0, {POSTGRES: 8.0, REDIS: 5.0, "broker restart": 0.0})
    assert all(f.latest_start(100.0) >= f.at_s for f in plan)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(("argv", "shape"), [
    ((), (60_000, 500.0, 120.0)),
    (("--readings", "3000", "--rate", "100"), (3000, 100.0, 30.0)),
    (("--rate", "200", "--duration", "10"), (2000, 200.0, 10.0)),
    (("--readings", "1000", "--duration", "20"), (1000, 50.0, 20.0)),
])
def test_any_two_of_readings_rate_and_duration_fix_the_third(argv: tuple[str, ...], shape: tuple[int, float, float]) -> None:
    o = options_from(parse(*argv))
    assert (o.readings, o.rate, o.duration) == shape


@pytest.mark.parametrize("argv", [
    ("--readings", "1000", "--rate", "10", "--duration", "5"),
    ("--rate", "0",),
    ("--vehicles", "10", "--readings", "5"),
    ("--bad-ratio", "1",),
    ("--kills", "-1",),
])
def test_options_that_cannot_work_are_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        options_from(parse(*argv))
