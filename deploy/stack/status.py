"""``fleet services status``: probes the four services at once and says which answer
and can be used, and which of them ``fleet services up`` started."""

from __future__ import annotations

import asyncio

from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.settings import Settings, mask_url
from fleet_telemetry.deploy.stack.addresses import BROKER, POSTGRESQL, REDIS, STORAGE
from fleet_telemetry.deploy.stack.install import postgis_package, postgres_major
from fleet_telemetry.deploy.stack.probe import (
    PostgresProbe,
    Probe,
    StorageProbe,
    probe_broker,
    probe_postgres,
    probe_redis,
    probe_storage,
)
from fleet_telemetry.deploy.stack.reports import Report, print_reports, problem_summary
from fleet_telemetry.deploy.stack.state import Stack
from fleet_telemetry.schema.migrate import database_name

STARTED_BY_UP = "started by fleet services up"


async def status(settings: Settings, as_json: bool) -> int:
    """Prints the status table (or JSON); returns 0 when all four can be used.
    Raises :class:`ServiceUnavailable` naming every one that cannot."""
    reports = await collect(settings, Stack(settings.stack_dir))
    print_reports(reports, as_json)
    check(reports)
    return 0


def check(reports: list[Report]) -> None:
    """Raises :class:`ServiceUnavailable` with one line if a service is not usable."""
    if not all(r.ok for r in reports):
        raise ServiceUnavailable(problem_summary(reports))


async def collect(settings: Settings, stack: Stack) -> list[Report]:
    """Probes the four services concurrently; one report each, in a fixed order."""
    pg, rd, br, st = await asyncio.gather(
        probe_postgres(settings.database_url),
        probe_redis(settings.redis_url),
        probe_broker(settings),
        probe_storage(settings),
    )
    return [
        postgres_report(settings, pg, stack.started_by_us(POSTGRESQL)),
        redis_report(settings, rd, stack.started_by_us(REDIS)),
        broker_report(settings, br, stack.started_by_us(BROKER)),
        storage_report(settings, st, stack.started_by_us(STORAGE)),
    ]


def _unusable(service: str, address: str, probe: Probe, ours: bool) -> Report | None:
    """The report of a service that does not answer or refuses us; None if usable."""
    if not probe.answers:
        return Report(service, address, False, False, f"not answering ({probe.error})", ours)
    if probe.error:
        return Report(service, address, True, False, f"answers but {probe.error}", ours)
    return None


def postgres_report(settings: Settings, probe: PostgresProbe, ours: bool) -> Report:
    address = mask_url(settings.database_url)
    unusable = _unusable(POSTGRESQL, address, probe, ours)
    if unusable is not None:
        return unusable
    if probe.postgis is None:
        major = postgres_major(probe.server_version_num or 0)
        detail = f"answers; PostGIS is not available (install {postgis_package(major)})"
        return Report(POSTGRESQL, address, True, False, detail, ours)
    detail = f"answers; PostGIS {probe.postgis} available"
    if not probe.database_exists:
        detail += f"; database {database_name(settings.database_url)!r} not created yet"
    if ours:
        detail += f"; {STARTED_BY_UP}"
    return Report(POSTGRESQL, address, True, True, detail, ours, probe.postgis)


def redis_report(settings: Settings, probe: Probe, ours: bool) -> Report:
    address = mask_url(settings.redis_url)
    unusable = _unusable(REDIS, address, probe, ours)
    if unusable is not None:
        return unusable
    detail = "answers" + (f"; {STARTED_BY_UP}" if ours else "")
    return Report(REDIS, address, True, True, detail, ours)


def broker_report(settings: Settings, probe: Probe, ours: bool) -> Report:
    address = settings.kafka_bootstrap
    unusable = _unusable(BROKER, address, probe, ours)
    if unusable is not None:
        return unusable
    detail = "answers" + ("; Tansu started by fleet services up, memory only" if ours else "")
    return Report(BROKER, address, True, True, detail, ours)


def storage_report(settings: Settings, probe: StorageProbe, ours: bool) -> Report:
    address = settings.s3_endpoint
    unusable = _unusable(STORAGE, address, probe, ours)
    if unusable is not None:
        return unusable
    if not probe.bucket_exists:
        return Report(STORAGE, address, True, False,
                      f"answers; bucket {settings.s3_bucket!r} does not exist (fleet services up creates it)", ours)
    detail = f"answers; bucket {settings.s3_bucket!r}" + ("; SeaweedFS started by fleet services up" if ours else "")
    return Report(STORAGE, address, True, True, detail, ours)
