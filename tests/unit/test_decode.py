"""The decoder from byte fixtures: no services, no clock (``now`` is passed in)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_telemetry.consumers.decode import Rules, decode_checked, decode_message
from fleet_telemetry.core.reading import Source

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
RULES = Rules(now=NOW)
SRC = Source("fleet.telemetry.v1", 3, 42)
VID = "6f1c2a4e-9b3d-4c1e-8f00-1234567890ab"


def decode(value: bytes | None, key: bytes | None = VID.encode()):
    return decode_message(value, key=key, source=SRC, rules=RULES)


def reading(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"vehicle_id": VID, "time": "2026-11-25T11:59:00+01:00", "lat": 52.52, "lon": 13.405}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def test_a_full_reading_is_accepted_with_every_field() -> None:
    raw = orjson.dumps(
        reading(speed=88.5, fuel_level=42, heading=359.9, odometer_km=120345.6,
                engine_status={"rpm": 2100, "coolant_temp_c": 91, "dtc": ["P0301"], "ignition": True},
                firmware="1.2.3")
    )
    out = decode(raw)
    assert out.rejections == []
    (r,) = out.readings
    assert r.vehicle_id == UUID(VID)
    assert r.time == datetime(2026, 11, 25, 10, 59, tzinfo=timezone.utc)
    assert (r.lat, r.lon, r.speed, r.fuel_level, r.heading, r.odometer_km) == (52.52, 13.405, 88.5, 42.0, 359.9, 120345.6)
    assert r.engine_status == {"rpm": 2100, "coolant_temp_c": 91, "dtc": ["P0301"], "ignition": True}
    assert r.dead_letter_value() == raw
    assert r.source.index is None


def test_epoch_milliseconds_are_accepted() -> None:
    ms = int((NOW - timedelta(seconds=1)).timestamp() * 1000)
    (r,) = decode(orjson.dumps(reading(time=ms))).readings
    assert r.time == NOW - timedelta(seconds=1)


def test_an_array_message_yields_each_element_with_its_index() -> None:
    good = reading(speed=10)
    bad = reading(lat=91)
    out = decode(orjson.dumps([good, bad, 7]))
    assert [r.source.index for r in out.readings] == [0]
    assert [(j.reason, j.source.index) for j in out.rejections] == [("invalid_reading", 1), ("invalid_reading", 2)]
    assert orjson.loads(out.rejections[0].value) == bad
    assert out.rejections[0].detail == "field 'lat' is 91, must be between -90 and 90"
    assert out.rejections[1].value == b"7"


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b"{not json", "malformed_json", "the message is not valid UTF-8 JSON"),
        (b"\xff\xfe\x00", "malformed_json", "the message is not valid UTF-8 JSON"),
        (b"", "malformed_json", "the message value is empty"),
        (b"42", "invalid_reading", "the message is a number, expected a reading object or an array of them"),
        (orjson.dumps(reading(vehicle_id=...)), "invalid_reading", "field 'vehicle_id' is missing"),
        (orjson.dumps(reading(vehicle_id="truck-7")), "invalid_reading", "field 'vehicle_id' is \"truck-7\", not a UUID"),
        (orjson.dumps(reading(time=...)), "invalid_reading", "field 'time' is missing"),
        (orjson.dumps(reading(time="2026-11-25T11:00:00")), "invalid_reading", "which has no UTC offset"),
        (orjson.dumps(reading(time="yesterday")), "invalid_reading", "not an RFC 3339 timestamp"),
        (orjson.dumps(reading(time=1.5)), "invalid_reading", "field 'time' is a number"),
        (orjson.dumps(reading(lon=-180.5)), "invalid_reading", "field 'lon' is -180.5, must be between -180 and 180"),
        (orjson.dumps(reading(lat="52")), "invalid_reading", "field 'lat' is text, expected a number"),
        (orjson.dumps(reading(speed=401)), "invalid_reading", "field 'speed' is 401, must be between 0 and 400"),
        (orjson.dumps(reading(fuel_level=-1)), "invalid_reading", "field 'fuel_level' is -1, must be between 0 and 100"),
        (orjson.dumps(reading(heading=360)), "invalid_reading", "field 'heading' is 360, must be from 0 to below 360"),
        (orjson.dumps(reading(odometer_km=-0.1)), "invalid_reading", "field 'odometer_km' is -0.1, must be 0 or more"),
        (orjson.dumps(reading(engine_status=[1])), "invalid_reading", "field 'engine_status' is an array"),
        (orjson.dumps(reading(engine_status={"dtc": ["X123"]})), "invalid_reading", "not an OBD-II code"),
        (orjson.dumps(reading(engine_status={"ignition": "on"})), "invalid_reading", "expected true or false"),
        (orjson.dumps(reading(time="2026-11-25T12:05:01Z")), "future_time", "ahead of the consumer's clock"),
        (orjson.dumps(reading(time="2026-10-26T11:59:59Z")), "outside_retention", "older than the raw retention of 30 days"),
    ],
)
def test_each_broken_rule_is_rejected_with_its_reason(value: bytes, reason: str, detail: str) -> None:
    out = decode(value)
    assert out.readings == []
    (rejection,) = out.rejections
    assert rejection.reason == reason
    assert detail in rejection.detail
    assert rejection.value == value
    assert rejection.key == VID.encode()
    assert rejection.source == SRC


def test_the_edges_of_the_time_window_are_accepted() -> None:
    edge_future = orjson.dumps(reading(time="2026-11-25T12:05:00Z"))
    edge_past = orjson.dumps(reading(time="2026-10-26T12:00:00Z"))
    assert len(decode(edge_future).readings) == 1
    assert len(decode(edge_past).readings) == 1


def test_a_missing_value_is_a_malformed_message() -> None:
    (rejection,) = decode(None).rejections
    assert rejection.reason == "malformed_json"
    assert rejection.value == b""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
reading_like = st.fixed_dictionaries(
    {},
    optional={
        "vehicle_id": st.sampled_from([VID, "x", ""]) | st.uuids().map(str) | json_values,
        "time": st.integers() | st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat()) | st.text(),
        "lat": st.floats() | st.integers() | json_values,
        "lon": st.floats() | st.integers() | json_values,
        "speed": st.floats() | json_values,
        "heading": st.floats() | json_values,
        "engine_status": json_values,
    },
)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_no_bytes_at_all_make_the_decoder_raise(value: bytes) -> None:
    out = decode(value)
    if len(out.readings) + len(out.rejections) == 0:
        assert orjson.loads(value) == []  # only an empty array holds nothing to report


@settings(max_examples=400)
@given(st.one_of(reading_like, st.lists(reading_like | json_values, max_size=5)))
def test_no_json_at_all_makes_the_decoder_raise(document: object) -> None:
    try:
        value = orjson.dumps(document)
    except orjson.JSONEncodeError:
        return
    out = decode(value)
    expected = len(document) if isinstance(document, list) else 1
    assert len(out.readings) + len(out.rejections) == expected


def test_a_nul_character_in_engine_status_is_refused_before_it_reaches_jsonb() -> None:
    (rejection,) = decode(orjson.dumps(reading(engine_status={"note": "a\u0000b"}))).rejections
    assert rejection.reason == "invalid_reading"
    assert "NUL character" in rejection.detail


# Readings near every rule's edge, for the comparison of the one-pass decoding with the
# field-by-field checks.
_edge_numbers = (st.floats(min_value=-400, max_value=400) | st.integers(-400, 400)
                 | st.sampled_from([0, -0.0, 90, 90.0000001, -90, 180, -180.5, 359.999, 360, 400, 400.01, 100, 1e308]))
_times = (st.integers(int((NOW - timedelta(days=31)).timestamp() * 1000), int((NOW + timedelta(minutes=6)).timestamp() * 1000))
          | st.datetimes(min_value=datetime(2026, 10, 20), max_value=datetime(2026, 11, 26),
                         timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                                                    timezone(timedelta(hours=-8))])).map(lambda d: d.isoformat())
          | st.sampled_from(["2026-11-25T11:00:00Z", "2026-11-25T11:00:00", "2026-11-25", "2026-11-25T11:00:00.123+00:00",
                             "2026-11-25 11:00:00+00:00", True, 1.5e12, None]))
_engines = st.one_of(
    st.none(), st.integers(), st.text(max_size=3),
    st.fixed_dictionaries({}, optional={
        "rpm": st.integers(-5, 9000) | st.floats(allow_nan=False) | st.booleans() | st.none(),
        "coolant_temp_c": st.floats(allow_nan=False) | st.text(max_size=2) | st.none(),
        "ignition": st.booleans() | st.integers(0, 1) | st.none(),
        "dtc": st.lists(st.sampled_from(["P0301", "C1234", "p0301", "X0000", "P03011", 7]), max_size=3) | st.none(),
        "extra": json_values,
    }),
)
edge_reading = st.fixed_dictionaries(
    {"vehicle_id": st.sampled_from([VID, VID.upper(), VID.replace("-", ""), "{" + VID + "}", "x"]) | st.uuids().map(str),
     "time": _times, "lat": _edge_numbers, "lon": _edge_numbers},
    optional={"speed": _edge_numbers | st.none(), "fuel_level": _edge_numbers | st.none(),
              "heading": _edge_numbers | st.none(), "odometer_km": _edge_numbers | st.none(),
              "engine_status": _engines, "unknown": json_values},
)


def _verdict(out: object) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    readings = [(r.vehicle_id, r.time, r.lat, r.lon, r.speed, r.fuel_level, r.heading, r.odometer_km,
                 r.engine_status, r.source, orjson.loads(r.dead_letter_value())) for r in out.readings]  # type: ignore[attr-defined]
    rejections = [(j.reason, j.detail, j.source, j.value) for j in out.rejections]  # type: ignore[attr-defined]
    return readings, rejections


@settings(max_examples=600)
@given(st.one_of(edge_reading, st.lists(edge_reading, max_size=4)))
def test_the_one_pass_decoding_agrees_with_the_field_by_field_checks(document: object) -> None:
    try:
        value = orjson.dumps(document)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: not JSON a producer can send
        return
    fast = decode_message(value, key=None, source=SRC, rules=RULES)
    checked = decode_checked(value, key=None, source=SRC, rules=RULES)
    assert _verdict(fast) == _verdict(checked)


def test_a_reading_at_a_foreign_offset_is_stored_in_utc() -> None:
    (r,) = decode(orjson.dumps(reading(time="2026-11-25T17:29:00+05:30"))).readings
    assert r.time == datetime(2026, 11, 25, 11, 59, tzinfo=timezone.utc) and r.time.tzinfo is timezone.utc


_HOSTILE = [
    b"1e99999", b"123456789012345678901234567890", b"NaN", b"-0", b"[" * 600 + b"]" * 600,
    b"[" * 3000 + b"]" * 3000, b'{"a":' * 1500 + b"1" + b"}" * 1500, b'"a\\u0000"', b'"\\ud800"',
    b'{"n": 1e99999}', b'{"n": "\xff\xfe"}', b'"\xc3\x28"', b'{"dtc": ["P0301"], "deep": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"rpm": 1e400}', b'{"dtc": "P0301"}', b'{"ignition": 1}',
]


@pytest.mark.parametrize("field", ["unknown", "engine_status"])
@pytest.mark.parametrize("extra", _HOSTILE)
def test_hostile_values_get_the_same_verdict_on_both_paths(field: str, extra: bytes) -> None:
    value = (b'{"vehicle_id":"%s","time":"2026-11-25T11:00:00Z","lat":1,"lon":2,"%s":%s}'
             % (VID.encode(), field.encode(), extra))
    fast = decode_message(value, key=None, source=SRC, rules=RULES)
    assert _verdict(fast) == _verdict(decode_checked(value, key=None, source=SRC, rules=RULES))
    assert len(fast.readings) + len(fast.rejections) == 1


# Sizes and depths near the broker's limits (1 MiB by default): the decoder never raises
# and accounts for every element.
@pytest.mark.parametrize("value", [
    b'{"vehicle_id":"' + b"a" * 1_048_000 + b'"}',
    orjson.dumps(reading(engine_status={"note": "x" * 1_040_000})),
    b"[" * 1023 + b"]" * 1023, b"[" * 1025 + b"]" * 1025, b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    orjson.dumps([reading()] * 20_000),
    b"[" + b",".join([b"1"] * 500_000) + b"]",
    b'{"vehicle_id":"' + VID.encode() + b'","time":"\xff\xfe' + b"\x80" * 1_000_000 + b'"}',
])
def test_messages_near_the_size_limit_are_decoded_or_rejected_whole(value: bytes) -> None:
    out = decode(value)
    document_count = 1
    if value.startswith(b"[1,"):
        document_count = 500_000
    elif value.startswith(b'[{"vehicle_id"'):
        document_count = 20_000
    assert len(out.readings) + len(out.rejections) == document_count


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 2000))
def test_bytes_at_any_depth_never_make_the_decoder_raise(junk: bytes, depth: int) -> None:
    for value in (b"[" * depth + junk + b"]" * depth, b'{"engine_status":' * depth + junk + b"}" * depth):
        out = decode(value)
        assert len(out.readings) + len(out.rejections) >= 1 or orjson.loads(value) == []


def test_an_engine_status_deeper_than_jsonb_can_be_written_is_refused() -> None:
    deep = b'{"n":' + b"[" * 300 + b"]" * 300 + b"}"
    value = b'{"vehicle_id":"%s","time":"2026-11-25T11:00:00Z","lat":1,"lon":2,"engine_status":%s}' % (VID.encode(), deep)
    (rejection,) = decode(value).rejections
    assert (rejection.reason, rejection.detail) == ("invalid_reading", "field 'engine_status' nests deeper than 254 levels")
    assert rejection.value == value


def test_an_element_nested_deeper_than_the_encoders_go_is_dead_lettered_as_sent() -> None:
    element = b"[" * 1000 + b"]" * 1000
    value = b"[" + element + b', {"vehicle_id": "x"}]'
    first, second = decode(value).rejections
    assert (first.reason, first.source.index, first.value) == ("invalid_reading", 0, element)
    assert (second.source.index, second.value) == (1, b'{"vehicle_id": "x"}')


def test_vehicle_ids_are_asyncpg_uuids_equal_and_hashed_like_the_standard_ones() -> None:
    """Every stage keys dictionaries by the vehicle id: the decoder's ids must be
    interchangeable with ``uuid.UUID`` (asyncpg returns its own type from queries)."""
    from asyncpg.pgproto.pgproto import UUID as PgUUID

    for raw in (orjson.dumps(reading()), orjson.dumps(reading(speed="fast")),
                orjson.dumps(reading(vehicle_id=VID.replace("-", "")))):
        out = decode_checked(raw, key=None, source=Source("t", 0, 0), rules=RULES)
        fast = decode(raw)
        for r in out.readings + fast.readings:
            assert type(r.vehicle_id) is PgUUID
            assert r.vehicle_id == UUID(VID) and hash(r.vehicle_id) == hash(UUID(VID))
            assert {UUID(VID): 1}[r.vehicle_id] == 1


def test_the_one_pass_decoding_keeps_engine_status_as_sent() -> None:
    engine = b'{"rpm":800,"vendor":{"a":[1,2]},"ignition":false}'
    raw = b'{"vehicle_id":"%s","time":"2026-11-25T11:59:00+01:00","lat":1,"lon":2,"engine_status":%s}' % (
        VID.encode(), engine)
    (r,) = decode(raw).readings
    assert r.engine_json == engine
    assert r.engine_status == {"rpm": 800, "vendor": {"a": [1, 2]}, "ignition": False}
    (null,) = decode(orjson.dumps(reading(engine_status=None))).readings
    assert (null.engine_status, null.engine_json) == (None, None)
