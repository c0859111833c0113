"""The sink on its own: what PostgreSQL refuses is set aside, the rest of the batch is stored."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fleet_telemetry.consumers.sink import TelemetrySink, create_pool
from fleet_telemetry.core.reading import Reading, Source

pytestmark = pytest.mark.integration


async def test_a_value_postgresql_refuses_is_set_aside_and_the_rest_stored(database_url, db, make_vehicles) -> None:
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc) - timedelta(minutes=5)

    def reading(i: int, engine_status: dict[str, object] | None = None) -> Reading:
        return Reading(vid, start + timedelta(seconds=i), 1.0, 2.0, 10.0, None, None, None, engine_status,
                       Source("t", 0, i), None, b"{}")

    # A NUL character passes JSON but not jsonb; the decoder refuses it, the sink must too.
    batch = [reading(i) for i in range(10)] + [reading(10, {"note": "a\u0000b"})] + [reading(i) for i in range(11, 20)]
    pool = await create_pool(database_url)
    try:
        outcome = await TelemetrySink(pool).write(batch)
    finally:
        await pool.close()
    assert len(outcome.stored) == 19
    ((refused, message),) = outcome.refused
    assert refused.time == start + timedelta(seconds=10)
    assert "Unicode" in message  # PostgreSQL: unsupported Unicode escape sequence
    assert await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid) == 19


async def test_engine_status_is_stored_as_the_device_sent_it(database_url, db, make_vehicles) -> None:
    """The decoder hands the sink the object's own JSON text (no second encoding): every
    key, known or not, nested values and numbers arrive in jsonb as sent."""
    from fleet_telemetry.consumers.decode import Rules, decode_message

    (vid,) = await make_vehicles(1)
    when = datetime.now(timezone.utc) - timedelta(minutes=1)
    engine = (b'{"rpm":2035,"coolant_temp_c":86.3,"ignition":true,"dtc":["P0301"],'
              b'"vendor":{"pto":[1,2.5,null],"mode":"eco"},"big":1e300}')
    value = (b'{"vehicle_id":"%s","time":"%s","lat":52.5,"lon":13.4,"engine_status":%s}'
             % (str(vid).encode(), when.isoformat().encode(), engine))
    (reading,) = decode_message(value, key=None, source=Source("t", 0, 0),
                                rules=Rules(datetime.now(timezone.utc))).readings
    assert reading.engine_json == engine
    pool = await create_pool(database_url)
    try:
        outcome = await TelemetrySink(pool).write([reading])
    finally:
        await pool.close()
    assert len(outcome.stored) == 1
    stored = await db.fetchval(
        "SELECT engine_status = $2::jsonb FROM vehicle_telemetry WHERE vehicle_id = $1", vid, engine.decode())
    assert stored is True
