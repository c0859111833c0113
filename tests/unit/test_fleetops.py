"""The pure parts of fleet operations: input rules, maintenance arithmetic, the command
envelope, dead-letter headers and the replica rotation. No service runs here."""

from __future__ import annotations

import argparse
import calendar
import inspect
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_telemetry.cli.fleetops_table import GROUPS, Action, create_job
from fleet_telemetry.fleetops import commands
from fleet_telemetry.fleetops.audit import jsonable
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import DoubleBooking, InvalidInput
from fleet_telemetry.fleetops.validation import (
    JOB_TRANSITIONS,
    add_months,
    check_job_transition,
    job_fields,
    next_due,
    schedule_fields,
    vehicle_fields,
)
from fleet_telemetry.fleetops.values import Point, check_period, parse_money, parse_point, parse_time
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.reading import Source

SOURCE = Source("fleet.commands.v1", 3, 42)


# --- input rules ---------------------------------------------------------------------------------


def test_vehicle_fields_normalise_and_refuse_with_the_field_named() -> None:
    assert vehicle_fields({"vin": " 1hgcm82633a004352 ", "license_plate": "b-xy 1", "type": "Truck"}) == {
        "vin": "1HGCM82633A004352", "license_plate": "B-XY 1", "type": "truck"}
    with pytest.raises(InvalidInput, match="needs field\\(s\\): license_plate"):
        vehicle_fields({"vin": "ABC"})
    with pytest.raises(InvalidInput, match="field 'year' must be 2100 or less, got 2300"):
        vehicle_fields({"vin": "ABC", "license_plate": "X", "year": 2300})
    with pytest.raises(InvalidInput, match="field 'status' must be one of active, maintenance"):
        vehicle_fields({"status": "flying"}, partial=True)
    with pytest.raises(InvalidInput, match="unknown field\\(s\\) for a vehicle: colour"):
        vehicle_fields({"colour": "red"}, partial=True)
    with pytest.raises(InvalidInput, match="nothing to change"):
        vehicle_fields({}, partial=True)
    with pytest.raises(InvalidInput, match="'type' of a vehicle cannot be null"):
        vehicle_fields({"type": None}, partial=True)


@pytest.mark.parametrize("value", ["2025-01-31T08:00:00", "yesterday", 3.5, None, True])
def test_times_need_an_offset(value: object) -> None:
    with pytest.raises(InvalidInput, match="field 'start'"):
        parse_time(value, "start")


def test_times_from_text_and_epoch_milliseconds() -> None:
    assert parse_time("2025-01-31T08:00:00Z", "t") == datetime(2025, 1, 31, 8, tzinfo=timezone.utc)
    assert parse_time(1_700_000_000_000, "t") == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)


def test_period_end_must_come_after_start() -> None:
    start = datetime(2030, 1, 1, 8, tzinfo=timezone.utc)
    check_period(start, None)
    check_period(start, start + timedelta(microseconds=1))
    for end in (start, start - timedelta(hours=1)):
        with pytest.raises(InvalidInput, match="'end_time' .* must be after 'start_time'"):
            check_period(start, end)


@given(st.floats(min_value=-90, max_value=90), st.floats(min_value=-180, max_value=180))
def test_points_in_range_are_accepted_in_every_notation(lat: float, lon: float) -> None:
    expected = Point(lat, lon)
    assert parse_point({"lat": lat, "lon": lon}, "p") == expected
    assert parse_point([lat, lon], "p") == expected
    assert parse_point(f"{lat!r},{lon!r}", "p") == expected


@given(st.one_of(st.floats(min_value=90.0001, max_value=1e6), st.floats(max_value=-90.0001, min_value=-1e6),
                 st.just(float("nan")), st.just(float("inf"))))
def test_latitudes_out_of_range_are_refused(lat: float) -> None:
    with pytest.raises(InvalidInput, match="field 'origin.lat'"):
        parse_point({"lat": lat, "lon": 0}, "origin")


def test_money_is_exact_with_two_decimals() -> None:
    assert parse_money("1250.5", "price") == Decimal("1250.50")
    assert parse_money(0, "price") == Decimal("0.00")
    for bad, message in (("-1", "0 or more"), ("1.005", "more than two decimals"), ("abc", "an amount"),
                         ("1e11", "at most"), (True, "an amount")):
        with pytest.raises(InvalidInput, match=message):
            parse_money(bad, "price")


def test_job_fields_with_route_and_cargo() -> None:
    out = job_fields({"customer_id": str(uuid.uuid4()), "currency": "usd",
                      "route": {"origin": "52.5,13.4", "destination": [48.1, 11.6], "waypoints": ["50.1,8.7"]},
                      "shipments": [{"weight_kg": "12.5"}]})
    assert out["currency"] == "USD"
    assert out["route"].path() == (Point(52.5, 13.4), Point(50.1, 8.7), Point(48.1, 11.6))
    assert out["shipments"][0].type == "general" and out["shipments"][0].weight_kg == Decimal("12.50")
    with pytest.raises(InvalidInput, match="'route.waypoints\\[0\\].lon' must be 180 or less"):
        job_fields({"customer_id": str(uuid.uuid4()), "route": {"origin": "0,0", "destination": "1,1",
                                                                "waypoints": ["0,181"]}})
    with pytest.raises(InvalidInput, match="'shipments\\[1\\].weight_kg' must be 0 or more"):
        job_fields({"customer_id": str(uuid.uuid4()), "shipments": [{}, {"weight_kg": -3}]})
    with pytest.raises(InvalidInput, match="unknown field\\(s\\) for a job update: customer_id"):
        job_fields({"customer_id": str(uuid.uuid4())}, partial=True)


def test_job_life_cycle() -> None:
    check_job_transition("pending", "assigned")
    check_job_transition("in_transit", "delivered")
    for final in ("delivered", "cancelled"):
        assert JOB_TRANSITIONS[final] == ()
        with pytest.raises(InvalidInput, match="it is final"):
            check_job_transition(final, "pending")
    with pytest.raises(InvalidInput, match="a pending job cannot become delivered; it can become: assigned, cancelled"):
        check_job_transition("pending", "delivered")


def test_a_schedule_needs_an_interval() -> None:
    with pytest.raises(InvalidInput, match="needs 'interval_km', 'interval_months' or both"):
        schedule_fields({"name": "oil", "vehicle_type": "truck"})
    assert schedule_fields({"name": "Oil", "vehicle_type": "Truck", "interval_months": "6"}) == {
        "name": "oil", "vehicle_type": "truck", "interval_months": 6}


# --- maintenance arithmetic ---------------------------------------------------------------------------


def test_add_months_clamps_to_the_last_day() -> None:
    assert add_months(date(2031, 1, 31), 1) == date(2031, 2, 28)
    assert add_months(date(2032, 1, 31), 1) == date(2032, 2, 29)
    assert add_months(date(2031, 11, 15), 14) == date(2033, 1, 15)
    assert add_months(date(2031, 3, 31), -1) == date(2031, 2, 28)


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2900, 12, 31)), st.integers(min_value=0, max_value=1200))
def test_add_months_moves_by_whole_months(day: date, months: int) -> None:
    moved = add_months(day, months)
    assert (moved.year * 12 + moved.month) - (day.year * 12 + day.month) == months
    assert moved.day == min(day.day, calendar.monthrange(moved.year, moved.month)[1])


def test_next_due_from_the_last_service() -> None:
    assert next_due(date(2031, 1, 31), 120_500, 12, 30_000) == (date(2032, 1, 31), 150_500)
    assert next_due(date(2031, 1, 31), None, 12, 30_000) == (date(2032, 1, 31), None)
    assert next_due(date(2031, 1, 31), 1000, None, 500) == (None, 1500)
    assert next_due(None, None, 12, 30_000) == (None, None)


# --- errors and JSON ---------------------------------------------------------------------------------


def test_double_booking_is_bad_input_naming_the_conflict() -> None:
    conflicting = uuid.uuid4()
    start = datetime(2030, 1, 1, 8, tzinfo=timezone.utc)
    err = DoubleBooking("driver", uuid.UUID(int=7), conflicting, start, None)
    assert isinstance(err, UsageError) and err.exit_code == 2 and err.reason == "double_booking"
    assert str(err) == (f"driver 00000000-0000-0000-0000-000000000007 is already booked by assignment"
                        f" {conflicting} from 2030-01-01T08:00:00+00:00 to open end")


def test_jsonable_keeps_amounts_exact() -> None:
    value = {"price": Decimal("0.10"), "when": date(2030, 1, 2), "id": uuid.UUID(int=1), "at": [Point(1, 2)]}
    assert jsonable(value) == {"price": "0.10", "when": "2030-01-02", "id": str(uuid.UUID(int=1)),
                               "at": [{"lat": 1, "lon": 2}]}


# --- the command envelope --------------------------------------------------------------------------------


def test_a_command_decodes_into_its_parts() -> None:
    command_id = uuid.uuid4()
    raw = commands.command_value("assignment.cancel", {"id": "x"}, command_id=command_id, actor="app")
    decoded = commands.decode_command(raw, key=b"k", source=SOURCE)
    assert isinstance(decoded, commands.Command)
    assert (decoded.command_id, decoded.type, decoded.actor, decoded.data) == (
        command_id, "assignment.cancel", "app", {"id": "x"})
    default_actor = commands.decode_command(orjson.dumps({"command_id": str(command_id), "type": "vehicle.delete"}),
                                            key=None, source=SOURCE)
    assert isinstance(default_actor, commands.Command)
    assert default_actor.actor is None and default_actor.token is None and default_actor.data == {}


def test_a_version_2_command_carries_its_token_and_never_shows_it() -> None:
    command_id = uuid.uuid4()
    raw = commands.command_value("vehicle.delete", {"id": "x"}, command_id=command_id, token="sec.ret.token")
    decoded = commands.decode_command(raw, key=None, source=SOURCE)
    assert isinstance(decoded, commands.Command)
    assert decoded.token == "sec.ret.token" and decoded.actor is None
    assert orjson.loads(decoded.value)["token"] == "<redacted>"
    assert b"sec.ret.token" not in decoded.value and "sec.ret.token" not in repr(decoded)


@pytest.mark.parametrize(("raw", "reason", "has_id"), [
    (b"{not json", "malformed_json", False),
    (b"\xff\xfe", "malformed_json", False),
    (b"[1, 2]", "invalid_command", False),
    (b'{"type": "vehicle.delete"}', "invalid_command", False),
    (b'{"command_id": "nope", "type": "vehicle.delete"}', "invalid_command", False),
    (b'{"command_id": "%s", "type": "vehicle.fly"}', "unknown_type", True),
    (b'{"command_id": "%s", "type": "vehicle.delete", "data": [1]}', "invalid_command", True),
    (b'{"command_id": "%s", "type": "vehicle.delete", "actor": ""}', "invalid_command", True),
    (b'{"command_id": "%s", "type": "vehicle.delete", "version": 3}', "invalid_command", True),
])
def test_bad_envelopes_are_rejections_with_a_reason(raw: bytes, reason: str, has_id: bool) -> None:
    command_id = uuid.uuid4()
    if b"%s" in raw:
        raw = raw.replace(b"%s", str(command_id).encode())
    decoded = commands.decode_command(raw, key=b"k", source=SOURCE)
    assert isinstance(decoded, commands.CommandRejection)
    assert decoded.reason == reason and decoded.value == raw and decoded.key == b"k"
    assert decoded.command_id == (command_id if has_id else None)
    assert decoded.detail


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_command_or_a_rejection(raw: bytes) -> None:
    decoded = commands.decode_command(raw, key=None, source=SOURCE)
    assert isinstance(decoded, (commands.Command, commands.CommandRejection))


def test_dead_letter_headers_carry_the_reason_source_and_command() -> None:
    command_id = uuid.uuid4()
    rejection = commands.CommandRejection("double_booking", "vehicle X is already booked", SOURCE, b"k", b"{}",
                                          command_id, "assignment.create")
    failed_at = datetime(2030, 1, 1, tzinfo=timezone.utc)
    headers = dict(commands.dead_letter_headers(rejection, failed_at))
    assert headers == {
        "fleet.error.reason": b"double_booking", "fleet.error.detail": b"vehicle X is already booked",
        "fleet.source.topic": b"fleet.commands.v1", "fleet.source.partition": b"3", "fleet.source.offset": b"42",
        "fleet.failed_at": b"2030-01-01T00:00:00+00:00", "fleet.command.id": str(command_id).encode(),
        "fleet.command.type": b"assignment.create",
    }


def a_real_token() -> str:
    import jwt

    return jwt.encode({"sub": str(uuid.UUID(int=9)), "iss": "fleet", "aud": "fleet-commands", "iat": 1,
                       "exp": 2, "jti": "j"}, "a unit-test secret that is long enough", algorithm="HS256")


@pytest.mark.parametrize(("shape", "reason"), [
    ("array", "invalid_command"), ("truncated", "malformed_json"), ("not_utf8", "malformed_json"),
    ("two_tokens", "invalid_command"),
])
def test_a_token_in_a_value_that_is_no_command_object_never_reaches_a_dead_letter(shape: str, reason: str) -> None:
    token = a_real_token()
    command = commands.command_value("vehicle.delete", {"id": "x"}, command_id=uuid.uuid4(), token=token)
    jwt_bytes, cut = token.encode(), token.encode()[:-7]
    raw = {
        "array": orjson.dumps([{"token": token}]),
        "truncated": command[:-9],  # cut inside the token's signature: it ends '"}'
        "not_utf8": b"\xff" + command,
        "two_tokens": b'"' + jwt_bytes + b" and " + jwt_bytes + b'"',
    }[shape]
    decoded = commands.decode_command(raw, key=b"k", source=SOURCE)
    assert isinstance(decoded, commands.CommandRejection) and decoded.reason == reason
    assert cut in raw and cut[:-20] not in decoded.value and decoded.redacted
    found = jwt_bytes if jwt_bytes in raw else cut
    assert decoded.value == raw.replace(found, b"<redacted>")
    headers = dict(commands.dead_letter_headers(decoded, datetime(2030, 1, 1, tzinfo=timezone.utc)))
    assert headers["fleet.redacted"] == b"value"


def test_a_token_anywhere_in_a_command_is_redacted_and_a_clean_one_is_kept_as_sent() -> None:
    token = a_real_token()
    command_id = uuid.uuid4()
    raw = orjson.dumps({"command_id": str(command_id), "type": "vehicle.delete", "data": {"id": "x", "note": token}})
    decoded = commands.decode_command(raw, key=None, source=SOURCE)
    assert isinstance(decoded, commands.Command) and decoded.redacted
    assert orjson.loads(decoded.value)["data"] == {"id": "x", "note": "<redacted>"}
    clean = commands.command_value("vehicle.fly", {"id": "x"}, command_id=command_id, actor="app")
    rejected = commands.decode_command(clean, key=None, source=SOURCE)
    assert isinstance(rejected, commands.CommandRejection) and rejected.value == clean and not rejected.redacted
    assert "fleet.redacted" not in dict(commands.dead_letter_headers(rejected, datetime.now(timezone.utc)))


def test_every_command_type_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()
    missing = [kind for kind in commands.HANDLERS if f"`{kind}`" not in doc]
    assert missing == []


# --- replica rotation ---------------------------------------------------------------------------------


def test_replicas_take_turns_and_a_failed_one_is_skipped_until_its_retry_time() -> None:
    db = Database("postgresql://p/db", ["postgresql://r1/db", "postgresql://r2/db"], replica_retry_seconds=30)
    assert db.replicas_in_turn(now=0) == ["postgresql://r1/db", "postgresql://r2/db"]
    assert db.replicas_in_turn(now=0) == ["postgresql://r2/db", "postgresql://r1/db"]
    db.mark_down("postgresql://r1/db", now=100)
    assert db.replicas_down(now=100) == ["postgresql://r1/db"]
    assert db.replicas_in_turn(now=129.9) == ["postgresql://r2/db"]
    assert sorted(db.replicas_in_turn(now=130)) == ["postgresql://r1/db", "postgresql://r2/db"]
    db.mark_down("postgresql://r2/db", now=200)
    db.mark_down("postgresql://r1/db", now=200)
    assert db.replicas_in_turn(now=210) == []  # the primary serves
    assert Database("postgresql://p/db").replicas_in_turn() == []


# --- the command table --------------------------------------------------------------------------------


def _action(group: str, name: str) -> Action:
    return next(a for g in GROUPS if g.name == group for a in g.actions if a.name == name)


def _parsed(*argv: str) -> argparse.Namespace:
    from fleet_telemetry.cli.main import build_parser

    return build_parser().parse_args(list(argv))


def test_every_action_of_the_table_calls_its_function_with_keywords_it_takes() -> None:
    for group in GROUPS:
        for action in group.actions:
            keywords = {option.to or option.destination for option in action.options if option.field is None}
            keywords |= {action.gather} if action.gather else set()
            keywords |= {"actor"} if action.writes else set()
            keywords |= {"settings"} if action.with_settings else set()
            inspect.signature(action.call).bind(None, **dict.fromkeys(keywords))  # raises TypeError if not


def test_given_field_options_are_gathered_for_the_writer_and_the_rest_passed_as_keywords() -> None:
    args = _parsed("vehicles", "add", "--vin", "V1", "--plate", "P1", "--year", "2020", "--actor", "ops")
    assert _action("vehicles", "add").arguments(args) == {
        "actor": "ops", "vehicle_id": None, "data": {"vin": "V1", "license_plate": "P1", "year": 2020}}
    vehicle_id = uuid.uuid4()
    args = _parsed("vehicles", "update", str(vehicle_id), "--status", "retired")
    assert _action("vehicles", "update").arguments(args) == {  # the id, VIN or plate is resolved when it runs
        "actor": None, "vehicle_id": str(vehicle_id), "changes": {"status": "retired"}}
    args = _parsed("assignments", "list", "--driver", str(vehicle_id), "--limit", "3")
    assert _action("assignments", "list").arguments(args) == {
        "vehicle_id": None, "driver_id": vehicle_id, "status": None, "limit": 3}


def test_options_checked_when_the_command_runs_refuse_with_the_option_named() -> None:
    nearest = _action("drivers", "nearest")
    kwargs = nearest.arguments(_parsed("drivers", "nearest", "--at", "52.5,13.4", "--radius-km", "2"))
    assert (kwargs["pickup"], kwargs["radius_m"], kwargs["max_age_seconds"]) == (Point(52.5, 13.4), 2000.0, 900.0)
    with pytest.raises(InvalidInput, match="field '--at.lon' must be 180 or less, got 190"):
        nearest.arguments(_parsed("drivers", "nearest", "--at", "52.5,190"))
    record = _action("maintenance", "record").arguments(
        _parsed("maintenance", "record", "--vehicle", str(uuid.uuid4()), "--type", "oil_change"))
    assert record["data"]["date"] == datetime.now(timezone.utc).date() and record["data"]["cost"] == "0"


async def test_a_job_route_needs_both_ends_before_any_connection() -> None:
    with pytest.raises(UsageError, match="a route needs both --origin and --destination"):
        await create_job(None, actor="a", data={}, origin="52.5,13.4", destination=None,  # type: ignore[arg-type]
                         via=None, distance_km=None, shipment=None, job_id=None)
