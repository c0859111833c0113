"""Reading geofence shapes given on the command line (no services)."""

from __future__ import annotations

import pytest

from fleet_telemetry.consumers.rules.geofences import geojson_features, parse_circle, positive
from fleet_telemetry.core.errors import UsageError


def test_a_circle_is_lat_lon_and_a_positive_radius() -> None:
    assert parse_circle(" -33.9, 151.2 ,500") == (-33.9, 151.2, 500.0)
    for text, message in (("1,2", "three numbers"), ("91,0,10", "outside -90..90"), ("0,0,0", "more than 0")):
        with pytest.raises(UsageError, match=message):
            parse_circle(text)


def test_geojson_documents_give_their_features() -> None:
    polygon = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}
    assert geojson_features('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}') == [
        {"type": "Feature", "geometry": polygon, "properties": {}}]
    for text, message in (("{", "not valid JSON"), ("[]", "must be an object"),
                          ('{"type": "FeatureCollection", "features": []}', "no features"),
                          ('{"type": "LineString"}', "'LineString' is not")):
        with pytest.raises(UsageError, match=message):
            geojson_features(text)


def test_limits_are_numbers_above_zero() -> None:
    assert positive(None, "x", "here") is None
    assert positive(30, "x", "here") == 30.0
    for value in (0, -1, True, "30"):
        with pytest.raises(UsageError, match="here: x must be a number above 0"):
            positive(value, "x", "here")
