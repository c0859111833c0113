"""The whole system on one screen: what ``fleet status`` shows and whether it needs attention.

Each service is probed (PostgreSQL, Redis, Kafka), then each part is asked on its own
with a deadline: the schema version, the telemetry consumer group (members, lag per
partition in records and seconds), the dead letters of the last hour by reason, the open
alerts by type, and the lifecycle (last successful ``fleet maintain`` pass, rollup lag,
telemetry partitions ahead). A service that does not answer turns its parts into "not
answering"; nothing here raises for a service being down.

Needs attention (``fleet status`` exits 1), each with one line saying what to do:

- a service does not answer, or the database does not exist;
- the schema: migrations not applied, or an applied migration file changed since;
- the consumer: the telemetry topic does not exist, records wait and the group has no
  member, or the oldest waiting record is older than ``max_lag_seconds``;
- the lifecycle: no ``fleet maintain`` pass recorded, or the last one (or the oldest
  rollup mark) older than ``max_maintain_age``; today's or tomorrow's telemetry
  partition missing; readings in the default partition.

Dead letters and open alerts are reported, never attention: they are the pipeline doing
its job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import asyncpg

from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.core.settings import Settings, mask_url
from fleet_telemetry.deploy.stack.probe import Probe, probe_broker, probe_postgres, probe_redis
from fleet_telemetry.lifecycle.policy import telemetry_partition_name
from fleet_telemetry.lifecycle.rollups import rollup_backlog
from fleet_telemetry.schema.migrate import load_migrations
from fleet_telemetry.views.consumer_lag import group_lag
from fleet_telemetry.views.dead_letters import count_by_reason

T = TypeVar("T")

PART_TIMEOUT_SECONDS = 15.0
"""Longest one part may take before it is reported as not answering."""

_EXISTING = "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND relnamespace = current_schema()::regnamespace"


@dataclass(frozen=True)
class Limits:
    """What counts as too late."""

    max_lag_seconds: float = 300.0
    """The oldest unconsumed telemetry record may wait this long."""
    max_maintain_age: float = 3600.0
    """The last ``fleet maintain`` pass, and the oldest rollup mark, may be this old."""


@dataclass
class Report:
    """What ``fleet status`` prints; ``attention`` empty means healthy."""

    checked_at: datetime
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema: dict[str, Any] = field(default_factory=dict)
    consumer: dict[str, Any] = field(default_factory=dict)
    dead_letters: dict[str, Any] = field(default_factory=dict)
    alerts: dict[str, Any] = field(default_factory=dict)
    maintenance: dict[str, Any] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.attention

    def as_json(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at.isoformat(), "healthy": self.healthy, "attention": self.attention,
                "services": self.services, "schema": self.schema, "consumer": self.consumer,
                "dead_letters_last_hour": self.dead_letters, "open_alerts": self.alerts,
                "maintenance": self.maintenance}


def _failure(exc: BaseException) -> str:
    """A part's failure in words that hold no secret: our own message, else the class."""
    if isinstance(exc, FleetError):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return f"not answering within {PART_TIMEOUT_SECONDS:g} s"
    return f"not answering ({type(exc).__name__})"


async def _part(work: Awaitable[T]) -> T | BaseException:
    try:
        return await asyncio.wait_for(work, PART_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 - one part failing never fails the report
        return exc


def _service(name: str, address: str, probe: Probe, report: Report) -> None:
    report.services[name] = {"address": address, "answers": probe.answers and not probe.error,
                             "error": probe.error or None}
    if not probe.answers:
        report.attention.append(f"{name} at {address} is not answering ({probe.error})")
    elif probe.error:
        report.attention.append(f"{name} at {address} {probe.error}")


async def collect(settings: Settings, limits: Limits = Limits(), now: datetime | None = None) -> Report:
    """Probes every service and asks every part; never raises for a service being down."""
    now = now or datetime.now(timezone.utc)
    report = Report(now)
    postgres, redis, kafka = await asyncio.gather(
        probe_postgres(settings.database_url), probe_redis(settings.redis_url), probe_broker(settings))
    _service("PostgreSQL", settings.database_url_masked, postgres, report)
    _service("Redis", mask_url(settings.redis_url), redis, report)
    report.services["Redis"]["key_prefix"] = settings.redis_key_prefix
    _service("Kafka", settings.kafka_bootstrap, kafka, report)
    if postgres.answers and not postgres.error and not postgres.database_exists:
        report.attention.append(f"database {settings.database_url_masked} does not exist: run 'fleet migrate'")
    database_up = postgres.answers and not postgres.error and postgres.database_exists
    kafka_up = kafka.answers and not kafka.error
    not_answering = {"error": "not answering"}

    async def unanswered() -> None:
        return None

    database, consumer, letters = await asyncio.gather(
        _part(_database(settings, limits, now)) if database_up else unanswered(),
        _part(group_lag(settings, settings.telemetry_topic, settings.consumer_group, int(now.timestamp() * 1000)))
        if kafka_up else unanswered(),
        _part(count_by_reason(settings, now - timedelta(hours=1))) if kafka_up else unanswered(),
    )
    if database is None:
        report.schema = report.alerts = report.maintenance = dict(not_answering)
    elif isinstance(database, BaseException):
        report.schema = report.alerts = report.maintenance = {"error": _failure(database)}
        report.attention.append(f"PostgreSQL: {_failure(database)}")
    else:
        report.schema, report.alerts, report.maintenance, attention = database
        report.attention += attention
    _consumer(settings, limits, consumer, report)
    if letters is None:
        report.dead_letters = dict(not_answering)
    elif isinstance(letters, BaseException):
        report.dead_letters = {"error": _failure(letters)}
    else:
        report.dead_letters = {"total": sum(letters.values()), "by_reason": letters}
    return report


def _consumer(settings: Settings, limits: Limits, found: Any, report: Report) -> None:
    if found is None:
        report.consumer = {"error": "not answering"}
        return
    if isinstance(found, BaseException):
        report.consumer = {"group": settings.consumer_group, "topic": settings.telemetry_topic,
                           "error": _failure(found)}
        report.attention.append(f"consumer: {_failure(found)}")
        return
    report.consumer = found.as_json()
    if found.lag and not found.members:
        report.attention.append(f"{found.lag} records wait on {found.topic} and group {found.group} has no member:"
                                " start 'fleet consume'")
    if found.lag_seconds > limits.max_lag_seconds:
        report.attention.append(f"the oldest unconsumed record of {found.topic} waits {found.lag_seconds:.0f} s"
                                f" (more than {limits.max_lag_seconds:g} s)")


async def _database(settings: Settings, limits: Limits,
                    now: datetime) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    attention: list[str] = []
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        try:
            rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
        except asyncpg.exceptions.UndefinedTableError:
            attention.append("the schema is not applied: run 'fleet migrate'")
            missing = {"error": "no schema"}
            return _schema({}, []), missing, missing, attention
        schema = _schema({r["version"]: r["checksum"] for r in rows}, attention)
        if schema["pending"]:
            return schema, {"error": "schema not up to date"}, {"error": "schema not up to date"}, attention
        by_type = {r["type"]: r["n"] for r in await conn.fetch(
            "SELECT type, count(*) AS n FROM alerts WHERE NOT is_resolved GROUP BY type ORDER BY type")}
        alerts = {"total": sum(by_type.values()), "by_type": by_type}
        return schema, alerts, await _lifecycle(conn, settings, limits, now, attention), attention
    finally:
        await conn.close()


def _schema(applied: dict[str, str], attention: list[str]) -> dict[str, Any]:
    files = load_migrations()
    known = {m.version for m in files}
    pending = [m.version for m in files if m.version not in applied]
    changed = [m.version for m in files if applied.get(m.version) not in (None, m.checksum)]
    if pending:
        attention.append(f"{len(pending)} migration{'' if len(pending) == 1 else 's'} not applied"
                         f" ({', '.join(pending)}): run 'fleet migrate'")
    if changed:
        attention.append(f"applied migration files changed since: {', '.join(changed)}")
    return {"version": max(applied) if applied else None, "applied": len(applied), "pending": pending,
            "changed": changed, "newer_than_this_code": sorted(set(applied) - known)}


async def _lifecycle(conn: asyncpg.Connection, settings: Settings, limits: Limits, now: datetime,
                     attention: list[str]) -> dict[str, Any]:
    last = await conn.fetchval("SELECT last_success_at FROM maintenance_runs WHERE task = 'pass'")
    age = None if last is None else max(0.0, (now - last).total_seconds())
    if age is None:
        attention.append("no 'fleet maintain' pass recorded: run it (or 'fleet maintain --every 5m')")
    elif age > limits.max_maintain_age:
        attention.append(f"the last 'fleet maintain' pass was {age / 60:.0f} min ago"
                         f" (more than {limits.max_maintain_age / 60:g} min)")
    pending_hours, rollup_lag = await rollup_backlog(conn, now=now)
    if rollup_lag > limits.max_maintain_age:
        attention.append(f"rollups lag {rollup_lag / 60:.0f} min behind ({pending_hours} hours pending):"
                         " run 'fleet maintain'")
    today = now.astimezone(timezone.utc).date()
    days = [today + timedelta(days=i) for i in range(settings.partitions_ahead_days + 1)]
    names = [telemetry_partition_name(d) for d in days]
    present = {r["relname"] for r in await conn.fetch(_EXISTING, names)}
    ready = 0
    while ready < len(names) and names[ready] in present:
        ready += 1
    missing = [name for name in names if name not in present]
    if ready < 2:
        attention.append(f"telemetry partition {names[ready]} is missing: run 'fleet maintain'")
    stray = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM vehicle_telemetry_default)")
    if stray:
        attention.append("readings sit in vehicle_telemetry_default (no partition for their day): run 'fleet maintain'")
    return {"last_pass": last.isoformat() if last else None, "last_pass_age_seconds": age,
            "rollup_pending_hours": pending_hours, "rollup_lag_seconds": rollup_lag,
            "partitions_ready_days_ahead": ready - 1, "partitions_missing": missing,
            "default_partition_has_rows": bool(stray)}
