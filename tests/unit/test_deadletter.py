"""Dead letters always fit the dead-letter topic (pure: no broker)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_telemetry.consumers.deadletter import fit, record_size

HEADERS = [("fleet.error.reason", b"invalid_reading"), ("fleet.error.detail", b"field 'lat' is missing"),
           ("fleet.source.topic", b"fleet.telemetry.v1"), ("fleet.source.partition", b"3"),
           ("fleet.source.offset", b"123456789")]


def test_a_dead_letter_that_fits_is_sent_as_it_is() -> None:
    assert fit(b"k", b"v" * 1000, HEADERS) == (b"k", b"v" * 1000, HEADERS)


def test_a_value_too_large_is_cut_and_the_headers_say_what_it_was() -> None:
    value = b"x" * 1_048_000
    key, cut, headers = fit(b"key", value, HEADERS, limit=1_000_000)
    assert record_size(key, cut, headers) <= 1_000_000 and key == b"key"
    assert value.startswith(cut) and len(cut) > 990_000
    extra = dict(headers[len(HEADERS):])
    assert extra == {"fleet.truncated": b"value", "fleet.original.value_size": b"1048000",
                     "fleet.original.value_sha256": hashlib.sha256(value).hexdigest().encode()}


def test_a_key_too_large_is_cut_too() -> None:
    key, value, headers = fit(b"k" * 1_040_000, b"v" * 20_000, HEADERS, limit=100_000)
    assert record_size(key, value, headers) <= 100_000
    assert dict(headers)["fleet.truncated"] == b"key,value"
    assert dict(headers)["fleet.original.key_size"] == b"1040000"


def test_a_detail_too_long_is_shortened_when_the_record_must_be_cut() -> None:
    headers = [("fleet.error.detail", b"d" * 50_000)]
    _, _, fitted = fit(None, b"v" * 60_000, headers, limit=30_000)
    assert len(dict(fitted)["fleet.error.detail"]) == 1_000


@settings(max_examples=200)
@given(st.binary(max_size=300).map(lambda b: b * 7) | st.just(b""), st.integers(0, 200_000),
       st.integers(16_384, 150_000))
def test_whatever_the_sizes_the_record_fits(key: bytes, value_size: int, limit: int) -> None:
    value = b"\x01" * value_size
    k, v, h = fit(key or None, value, HEADERS, limit=limit)
    assert record_size(k, v, h) <= limit
    assert value.startswith(v)
