"""A simulated fleet of vehicles driving plausible tracks, published to Kafka (``fleet simulate``).

Each vehicle keeps a position, heading, speed, fuel level and odometer and advances
them by the real time between two of its readings: positions are continuous, speeds
fit the distance covered, fuel falls with distance and jumps back at a refuel, and
engines now and then report an OBD-II trouble code. ``--bad-ratio`` replaces that
share of messages with broken ones (malformed JSON, out-of-range values, unknown
vehicles, future timestamps) for testing the dead-letter path.

The simulated vehicles are registered in ``vehicles`` (idempotently: their ids are
derived from ``--seed``), so their readings are accepted.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from fleet_telemetry.core.errors import unavailable
from fleet_telemetry.core.retry import CONNECT_TIMEOUT_SECONDS, is_transient
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.producer import TelemetryProducer
from fleet_telemetry.ingest.topics import ensure_topics

_NAMESPACE = uuid.UUID("5f0c63c8-3b0e-4d55-9a8e-0f1e2d3c4b5a")
_CITIES = ((52.52, 13.405), (48.137, 11.575), (50.110, 8.682), (53.551, 9.993), (51.227, 6.773))
_CODES = ("P0301", "P0420", "P0171", "P0128", "U0100", "C0035", "B1000")
_KM_PER_DEGREE = 111.32


def vehicle_ids(count: int, seed: int) -> list[uuid.UUID]:
    """The ids of a simulated fleet: the same for the same seed, so reruns reuse them."""
    return [uuid.uuid5(_NAMESPACE, f"sim-{seed}-{i}") for i in range(count)]


@dataclass
class SimulatedVehicle:
    id: uuid.UUID
    lat: float
    lon: float
    heading: float
    speed: float
    fuel: float
    odometer: float
    rng: random.Random
    last: datetime | None = None
    dtc: list[str] = field(default_factory=list)

    def step(self, now: datetime) -> dict[str, Any]:
        """Advance to ``now`` and return the reading taken there."""
        if self.last is not None and now <= self.last:
            now = self.last + timedelta(milliseconds=1)  # a vehicle's readings have distinct times
        dt = 0.0 if self.last is None else (now - self.last).total_seconds()
        self.last = now
        rng = self.rng
        # Speed drifts towards a cruising target and stops now and then.
        target = 0.0 if rng.random() < 0.02 else rng.choice((30.0, 50.0, 80.0, 110.0))
        self.speed = max(0.0, min(160.0, self.speed + (target - self.speed) * min(1.0, dt / 30) + rng.gauss(0, 1.5)))
        self.heading = (self.heading + rng.gauss(0, 4.0)) % 360.0
        km = self.speed * dt / 3600.0
        rad = math.radians(self.heading)
        self.lat = max(-89.0, min(89.0, self.lat + km * math.cos(rad) / _KM_PER_DEGREE))
        self.lon = ((self.lon + km * math.sin(rad) / (_KM_PER_DEGREE * max(0.1, math.cos(math.radians(self.lat))))
                     + 180.0) % 360.0) - 180.0
        self.odometer += km
        self.fuel -= km * 0.035  # about 35 l/100 km on a 1,000 l tank, in percent
        if self.fuel < 8.0:
            self.fuel = rng.uniform(90.0, 100.0)  # refuelled
        if rng.random() < 0.0005:
            self.dtc = [rng.choice(_CODES)]
        elif self.dtc and rng.random() < 0.01:
            self.dtc = []
        return {
            "vehicle_id": str(self.id),
            "time": now.isoformat(timespec="microseconds"),
            "lat": round(self.lat, 6),
            "lon": round(self.lon, 6),
            "speed": round(self.speed, 1),
            "fuel_level": round(max(0.0, self.fuel), 2),
            "heading": round(self.heading, 1) % 360.0,
            "odometer_km": round(self.odometer, 3),
            "engine_status": {
                "rpm": int(700 + self.speed * 18 + rng.gauss(0, 40)) if self.speed > 0 else 700,
                "coolant_temp_c": round(88 + rng.gauss(0, 1.5), 1),
                "ignition": True,
                "dtc": list(self.dtc),
            },
        }


def make_fleet(count: int, seed: int) -> list[SimulatedVehicle]:
    rng = random.Random(seed)
    fleet = []
    for vid in vehicle_ids(count, seed):
        city_lat, city_lon = rng.choice(_CITIES)
        fleet.append(SimulatedVehicle(
            id=vid, lat=city_lat + rng.uniform(-0.3, 0.3), lon=city_lon + rng.uniform(-0.3, 0.3),
            heading=rng.uniform(0, 360), speed=rng.uniform(0, 90), fuel=rng.uniform(30, 100),
            odometer=rng.uniform(10_000, 400_000), rng=random.Random(rng.random()),
        ))
    return fleet


BAD_KINDS = ("malformed_json", "invalid_reading", "unknown_vehicle", "future_time")


def bad_message(kind: str, good: dict[str, Any], rng: random.Random, now: datetime) -> tuple[bytes, bytes]:
    """A broken message of ``kind`` derived from a good reading: (key, value)."""
    import orjson

    key = good["vehicle_id"].encode()
    if kind == "malformed_json":
        return key, orjson.dumps(good)[:-7] + b"{oops"
    if kind == "invalid_reading":
        return key, orjson.dumps({**good, "lat": rng.choice((91.5, -123.0)), "speed": 512})
    if kind == "unknown_vehicle":
        stranger = str(uuid.uuid4())
        return stranger.encode(), orjson.dumps({**good, "vehicle_id": stranger})
    return key, orjson.dumps({**good, "time": (now + timedelta(hours=2)).isoformat()})


async def register_vehicles(database_url: str, ids: list[uuid.UUID], masked_url: str) -> None:
    try:
        conn = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:
        if not is_transient(exc):
            raise  # a database that does not exist, a login refused: the caller explains it
        raise unavailable("PostgreSQL", masked_url, exc) from None
    try:
        await conn.executemany(
            "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
            " VALUES ($1, $2, $3, 'Simulated', 'Truck', 2024, 'truck', 'active') ON CONFLICT DO NOTHING",
            [(vid, "SIM" + vid.hex[:14].upper(), "SIM-" + vid.hex[:8].upper()) for vid in ids],
        )
    finally:
        await conn.close()


@dataclass
class SimulationStats:
    sent: int = 0
    bad: Counter[str] = field(default_factory=Counter)


async def simulate(
    settings: Settings,
    *,
    vehicles: int,
    rate: float,
    duration: float | None,
    bad_ratio: float = 0.0,
    seed: int = 1,
    stop: asyncio.Event | None = None,
    stats: SimulationStats | None = None,
    progress: bool = False,
) -> SimulationStats:
    """Publish ``rate`` readings per second from ``vehicles`` vehicles for ``duration`` seconds."""
    stop = stop or asyncio.Event()
    stats = stats or SimulationStats()
    fleet = make_fleet(vehicles, seed)
    await register_vehicles(settings.database_url, [v.id for v in fleet], settings.database_url_masked)
    await ensure_topics(settings, [settings.telemetry_topic, settings.dlq_topic])
    rng = random.Random(seed + 1)
    tick = 0.1
    started = time.monotonic()
    last_report = started
    cursor = 0
    async with TelemetryProducer(settings) as producer:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if duration is not None and elapsed >= duration:
                break
            due = int(rate * elapsed) - stats.sent
            now = datetime.now(timezone.utc)
            for _ in range(max(0, due)):
                vehicle = fleet[cursor % len(fleet)]
                cursor += 1
                good = vehicle.step(now)
                if bad_ratio and rng.random() < bad_ratio:
                    kind = rng.choice(BAD_KINDS)
                    key, value = bad_message(kind, good, rng, now)
                    await producer.send_raw(value, key)
                    stats.bad[kind] += 1
                else:
                    await producer.send(good)
                stats.sent += 1
            if progress and time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                print(f"simulate: {stats.sent} readings sent ({stats.sent / max(elapsed, 1e-9):.0f}/s), "
                      f"{sum(stats.bad.values())} bad", file=sys.stderr)
            try:
                await asyncio.wait_for(stop.wait(), timeout=tick)
            except asyncio.TimeoutError:
                pass
        await producer.flush()
    return stats
