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
