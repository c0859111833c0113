"""Event-driven writes: the small writers driven by command events from Kafka.

The format is documented in docs/commands.md. :func:`decode_command` turns a record's
bytes into a :class:`Command` or a :class:`CommandRejection` (pure). :class:`CommandApplier`
applies one command exactly once: its ``command_id`` goes into ``processed_commands``
in the same transaction as the writer's effect, so a redelivered or replayed command
finds its row and changes nothing. A command the writer refuses (bad input, unknown id,
double booking, ...) is dead-lettered with its reason, then recorded as rejected, so a
replay does not dead-letter it twice. :class:`CommandConsumer` runs
:class:`CommandStrategy` in the shared Kafka loop
(:class:`~fleet_telemetry.consumers.kafka_loop.KafkaLoop`): each fetched record is
applied in partition order and the offsets are committed after the fetch is applied.

Failure handling follows the telemetry consumer: invalid input -> dead letter, never
retried; transient trouble (PostgreSQL or the broker away) -> retried with backoff,
nothing committed; anything else is a bug and stops the consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer

from fleet_telemetry.consumers.chain import Abandoned, Retrier
from fleet_telemetry.consumers.deadletter import HEADER_REDACTED, fit, request_size
from fleet_telemetry.consumers.kafka_loop import Committable, KafkaLoop, LoopMetrics, LoopOptions, Records, start_with_retry
from fleet_telemetry.fleetops import access, assignments, customers, dashboard, drivers, jobs, maintenance, sessions, vehicles
from fleet_telemetry.fleetops.audit import jsonable
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import FleetOpsError, InvalidInput
from fleet_telemetry.fleetops.tokens import TokenKeys
from fleet_telemetry.fleetops.validation import parse_time, parse_uuid
from fleet_telemetry.core.metrics import CommandMetrics, serve
from fleet_telemetry.core.retry import Backoff
from fleet_telemetry.core.errors import ServiceUnavailable, UsageError
from fleet_telemetry.ingest.producer import start_producer
from fleet_telemetry.core.reading import Source
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.core.stopping import StopSignals

log = structlog.get_logger("fleet.commands")

# Dead-letter reasons (header fleet.error.reason) besides the writers' own
# (invalid_input, not_found, conflict, double_booking) and access's (unauthenticated, forbidden).
MALFORMED_JSON = "malformed_json"
INVALID_COMMAND = "invalid_command"
UNKNOWN_TYPE = "unknown_type"

HEADER_COMMAND_ID = "fleet.command.id"
HEADER_COMMAND_TYPE = "fleet.command.type"


@dataclass(frozen=True)
class Command:
    """A decoded command. ``token`` is the v2 command's signed token (None for v1, whose
    ``actor`` field names the user); ``value`` is the record's bytes with the token
    redacted, as a dead letter shows them (``redacted``: something was)."""

    command_id: UUID
    type: str
    actor: str | None
    data: dict[str, Any]
    source: Source
    key: bytes | None
    value: bytes = field(repr=False)
    token: str | None = field(default=None, repr=False)
    redacted: bool = False


@dataclass(frozen=True)
class CommandRejection:
    reason: str
    detail: str
    source: Source
    key: bytes | None
    value: bytes
    command_id: UUID | None = None
    type: str | None = None
    redacted: bool = False
    """A token was removed from ``value`` (dead-letter header ``fleet.redacted``)."""


REDACTED = "<redacted>"
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
"""Text shaped like a JWT: three base64url segments, the first a JSON object's (``eyJ``);
the signature may be cut short (a truncated record)."""


def redact_tokens(value: bytes) -> tuple[bytes, bool]:
    """``value`` with everything shaped like a JWT replaced by ``<redacted>``, and whether
    anything was: for bytes that are not a JSON object, whose token field cannot be found."""
    redacted, count = _JWT.subn(REDACTED.encode(), value)
    return redacted, count > 0


def decode_command(value: bytes, *, key: bytes | None, source: Source,
                   known: Collection[str] | None = None) -> Command | CommandRejection:
    """The envelope of docs/commands.md checked: ``command_id`` (UUID), ``type`` (one of
    ``known``, by default :data:`HANDLERS`), ``data`` (object), ``token`` (v2: text) or
    ``actor`` (v1: optional text). The ``data`` fields are the writer's business; whether
    the token is valid is the applier's. Pure: no I/O, no clock. A token never reaches a
    dead letter: the value kept is re-encoded with the token replaced by ``<redacted>``,
    and in every value kept (also bytes that are not JSON, or not an object) anything
    shaped like a JWT is replaced by ``<redacted>`` (:func:`redact_tokens`)."""
    known = HANDLERS if known is None else known
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        value, redacted = redact_tokens(value)
        return CommandRejection(MALFORMED_JSON, "the value is not UTF-8 JSON", source, key, value, redacted=redacted)
    if not isinstance(body, dict):
        value, redacted = redact_tokens(value)
        return CommandRejection(INVALID_COMMAND, "the value must be a JSON object", source, key, value,
                                redacted=redacted)
    token = body.get("token")
    if "token" in body:
        value = orjson.dumps({**body, "token": REDACTED})
    value, redacted = redact_tokens(value)
    redacted = redacted or "token" in body
    try:
        command_id = parse_uuid(body.get("command_id"), "command_id")
    except InvalidInput as exc:
        return CommandRejection(INVALID_COMMAND, str(exc), source, key, value, redacted=redacted)
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in known:
        return CommandRejection(
            UNKNOWN_TYPE, f"field 'type' must be one of {', '.join(sorted(known))}, got {kind!r}",
            source, key, value, command_id, kind if isinstance(kind, str) else None, redacted,
        )
    data = body.get("data", {})
    actor = body.get("actor")
    version = body.get("version", 2 if "token" in body else 1)
    problem = None
    if not isinstance(data, dict):
        problem = "field 'data' must be a JSON object"
    elif version not in (1, 2) or isinstance(version, bool):
        problem = f"field 'version' must be 1 or 2, got {version!r}"
    elif actor is not None and (not isinstance(actor, str) or not actor.strip() or len(actor) > 320):
        problem = "field 'actor' must be non-empty text of at most 320 characters"
    elif token is not None and (not isinstance(token, str) or len(token) > 8192):
        problem = "field 'token' must be text of at most 8192 characters"
    if problem is not None:
        return CommandRejection(INVALID_COMMAND, problem, source, key, value, command_id, kind, redacted)
    return Command(command_id, kind, actor.strip() if actor else None, data, source, key, value, token or None,
                   redacted)


# --- what each command type does ----------------------------------------------------------

Handler = Callable[[asyncpg.Connection, str, dict[str, Any]], Awaitable[dict[str, Any]]]


def _id(data: Mapping[str, Any], field: str = "id") -> UUID:
    return parse_uuid(data.get(field), field)


def _optional_id(data: Mapping[str, Any]) -> UUID | None:
    return None if data.get("id") is None else _id(data)


def _rest(data: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in drop}


def _optional_time(data: Mapping[str, Any], field: str) -> datetime | None:
    return None if data.get(field) is None else parse_time(data[field], field)


def _only(data: Mapping[str, Any], *allowed: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(allowed)}")


async def _assignment_create(conn: asyncpg.Connection, actor: str, d: dict[str, Any]) -> dict[str, Any]:
    _only(d, "id", "vehicle_id", "driver_id", "start_time", "end_time")
    if d.get("start_time") is None:
        raise InvalidInput("an assignment needs field(s): start_time")
    return await assignments.create_assignment(
        conn, actor=actor, vehicle_id=_id(d, "vehicle_id"), driver_id=_id(d, "driver_id"),
        start_time=parse_time(d["start_time"], "start_time"), end_time=_optional_time(d, "end_time"),
        assignment_id=_optional_id(d),
    )


async def _assignment_end(conn: asyncpg.Connection, actor: str, d: dict[str, Any]) -> dict[str, Any]:
    _only(d, "id", "at")
    return await assignments.end_assignment(conn, actor=actor, assignment_id=_id(d),
                                            at=_optional_time(d, "at"))


async def _assignment_cancel(conn: asyncpg.Connection, actor: str, d: dict[str, Any]) -> dict[str, Any]:
    _only(d, "id")
    return await assignments.cancel_assignment(conn, actor=actor, assignment_id=_id(d))


async def _job_status(conn: asyncpg.Connection, actor: str, d: dict[str, Any]) -> dict[str, Any]:
    _only(d, "id", "status", "at")
    return await jobs.set_job_status(conn, actor=actor, job_id=_id(d), status=d.get("status", ""),
                                     at=_optional_time(d, "at"))


async def _job_assign(conn: asyncpg.Connection, actor: str, d: dict[str, Any]) -> dict[str, Any]:
    _only(d, "id", "assignment_id")
    return await jobs.assign_job(conn, actor=actor, job_id=_id(d), assignment_id=_id(d, "assignment_id"))


HANDLERS: dict[str, Handler] = {
    "vehicle.register": lambda c, a, d: vehicles.register_vehicle(
        c, actor=a, data=_rest(d, "id"), vehicle_id=_optional_id(d)),
    "vehicle.update": lambda c, a, d: vehicles.update_vehicle(
        c, actor=a, vehicle_id=_id(d), changes=_rest(d, "id")),
    "vehicle.delete": lambda c, a, d: vehicles.delete_vehicle(c, actor=a, vehicle_id=_id(d)),
    "driver.register": lambda c, a, d: drivers.register_driver(
        c, actor=a, data=_rest(d, "id"), driver_id=_optional_id(d)),
    "driver.update": lambda c, a, d: drivers.update_driver(
        c, actor=a, driver_id=_id(d), changes=_rest(d, "id")),
    "driver.delete": lambda c, a, d: drivers.delete_driver(c, actor=a, driver_id=_id(d)),
    "customer.register": lambda c, a, d: customers.register_customer(
        c, actor=a, data=_rest(d, "id"), customer_id=_optional_id(d)),
    "customer.update": lambda c, a, d: customers.update_customer(
        c, actor=a, customer_id=_id(d), changes=_rest(d, "id")),
    "customer.delete": lambda c, a, d: customers.delete_customer(c, actor=a, customer_id=_id(d)),
    "assignment.create": _assignment_create,
    "assignment.end": _assignment_end,
    "assignment.cancel": _assignment_cancel,
    "job.create": lambda c, a, d: jobs.create_job(c, actor=a, data=_rest(d, "id"), job_id=_optional_id(d)),
    "job.update": lambda c, a, d: jobs.update_job(c, actor=a, job_id=_id(d), changes=_rest(d, "id")),
    "job.assign": _job_assign,
    "job.status": _job_status,
    "job.add_shipment": lambda c, a, d: jobs.add_shipment(c, actor=a, job_id=_id(d), data=_rest(d, "id")),
    "job.delete": lambda c, a, d: jobs.delete_job(c, actor=a, job_id=_id(d)),
    "maintenance.record": lambda c, a, d: maintenance.record_service(
        c, actor=a, data=_rest(d, "id"), record_id=_optional_id(d)),
    "maintenance.schedule.create": lambda c, a, d: maintenance.create_schedule(
        c, actor=a, data=_rest(d, "id"), schedule_id=_optional_id(d)),
    "maintenance.schedule.update": lambda c, a, d: maintenance.update_schedule(
        c, actor=a, schedule_id=_id(d), changes=_rest(d, "id")),
}


# --- applying one command exactly once -------------------------------------------------------


APPLIED = "applied"
DUPLICATE = "duplicate"
REJECTED = "rejected"

RETRYABLE = ("unauthenticated", "forbidden")
"""Rejections that do not use up a command id: the same id, delivered again with a token
that authenticates a user allowed to do it, replaces the rejection (docs/commands.md)."""


def _retryable(reasons: str) -> str:
    """SQL: the stored row is a rejection for one of the reasons in parameter ``reasons``."""
    return f"processed_commands.outcome = 'rejected' AND processed_commands.reason = ANY({reasons}::text[])"


_CLAIM = f"""
INSERT INTO processed_commands (command_id, type, actor, outcome, source_topic, source_partition, source_offset)
VALUES ($1, $2, $3, 'applied', $4, $5, $6)
ON CONFLICT (command_id) DO UPDATE
   SET type = EXCLUDED.type, actor = NULL, outcome = 'applied', reason = NULL, detail = NULL, result = NULL,
       source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
       source_offset = EXCLUDED.source_offset, processed_at = now()
 WHERE {_retryable("$7")}
RETURNING command_id
"""
_RECORD_REJECTION = f"""
INSERT INTO processed_commands (command_id, type, actor, outcome, reason, detail,
                                source_topic, source_partition, source_offset)
VALUES ($1, $2, NULL, 'rejected', $3, $4, $5, $6, $7)
ON CONFLICT (command_id) DO UPDATE
   SET type = EXCLUDED.type, reason = EXCLUDED.reason, detail = EXCLUDED.detail,
       source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
       source_offset = EXCLUDED.source_offset, processed_at = now()
 WHERE $9::boolean AND {_retryable("$8")}
"""
_SEEN = f"""
SELECT CASE WHEN {_retryable("$2")} THEN 'retryable' ELSE 'final' END
  FROM processed_commands WHERE command_id = $1
"""


def _reason(exc: Exception) -> str:
    if isinstance(exc, FleetOpsError):
        return exc.reason
    return "invalid_input"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CommandApplier:
    """Applies commands through the writers on the primary, once per ``command_id``."""

    def __init__(self, database: Database,
                 dead_letter: Callable[[CommandRejection], Awaitable[None]],
                 applied: Callable[[], Awaitable[object]] | None = None, *,
                 authenticate: sessions.Authenticate,
                 handlers: Mapping[str, Handler] | None = None) -> None:
        self._database = database
        self.handlers: Mapping[str, Handler] = HANDLERS if handlers is None else handlers
        """The command types applied and their writers (:data:`HANDLERS` and, given by the
        command line, those of other packages such as ``document.attach``)."""
        self._dead_letter = dead_letter
        self._authenticate = authenticate
        self._applied = applied
        """Called after each command applied (the dashboard cache is invalidated)."""

    async def apply(self, item: Command | CommandRejection) -> str:
        """Returns APPLIED, DUPLICATE or REJECTED. The effect and the processed row commit
        together; a rejection is dead-lettered (acknowledged) before it is recorded.
        A command is applied only when ``authenticate`` names its user (else
        ``unauthenticated``) and that user may do it (else ``forbidden``,
        :func:`~fleet_telemetry.fleetops.access.authorize`).

        A command id seen before is a duplicate whatever its token, with one exception:
        an id recorded as rejected ``unauthenticated`` or ``forbidden`` (:data:`RETRYABLE`)
        is taken by the next delivery of that id whose token authenticates a user allowed
        to do it: the command is applied (or refused by its writer, and dead-lettered) and
        its outcome replaces the rejection. A delivery refused again for its token or
        role is a duplicate (one dead letter per id and reason).

        Raises transient errors (PostgreSQL, broker) for the caller to retry.
        """
        if isinstance(item, CommandRejection):
            return await self._reject(item)
        rejection: CommandRejection | None = None
        async with self._database.write() as conn:
            try:
                async with conn.transaction():
                    # Takes a new id, or one whose rejection was for its token or role (the
                    # row stays locked until commit, so two deliveries cannot both take it);
                    # rolled back with the rest when the command is refused.
                    claimed = await conn.fetchval(
                        _CLAIM, item.command_id, item.type, None, item.source.topic,
                        item.source.partition, item.source.offset, list(RETRYABLE),
                    )
                    if claimed is None:
                        return DUPLICATE
                    who = await access.resolve(conn, await self._authenticate(conn, item.token, item.actor))
                    result = await self.handlers[item.type](conn, str(who.id), item.data)
                    await conn.execute(
                        "UPDATE processed_commands SET result = $2, actor = $3 WHERE command_id = $1",
                        item.command_id, _result_ids(result), str(who.id),
                    )
            except (FleetOpsError, asyncpg.exceptions.IntegrityConstraintViolationError,
                    asyncpg.exceptions.DataError) as exc:
                # Class 23 and 22: the input broke a rule the writer did not check first.
                rejection = CommandRejection(_reason(exc), _first_line(exc), item.source, item.key,
                                             item.value, item.command_id, item.type, item.redacted)
        if rejection is not None:
            return await self._reject(rejection, authorized=rejection.reason not in RETRYABLE)
        if self._applied is not None:
            await self._applied()
        return APPLIED

    async def _reject(self, rejection: CommandRejection, *, authorized: bool = False) -> str:
        """Dead-letters and records a rejection, unless its command id was seen before.
        ``authorized``: the command's user was authenticated and allowed, and its writer
        refused it; that outcome replaces a recorded ``unauthenticated``/``forbidden``."""
        if rejection.command_id is not None:
            async with self._database.write() as conn:
                seen = await conn.fetchval(_SEEN, rejection.command_id, list(RETRYABLE))
            if seen == "final" or (seen == "retryable" and not authorized):
                return DUPLICATE
        await self._dead_letter(rejection)
        if rejection.command_id is not None:
            async with self._database.write() as conn:
                await conn.execute(
                    _RECORD_REJECTION, rejection.command_id, rejection.type or "?",
                    rejection.reason, rejection.detail, rejection.source.topic,
                    rejection.source.partition, rejection.source.offset, list(RETRYABLE), authorized,
                )
        log.info("command rejected", reason=rejection.reason, detail=rejection.detail,
                 command_id=str(rejection.command_id) if rejection.command_id else None,
                 offset=rejection.source.offset, partition=rejection.source.partition)
        return REJECTED


def _result_ids(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a command created or changed, kept small: the id(s) of the rows."""
    if "record" in result:
        return {"id": (result["record"] or {}).get("id")}
    return {"id": result.get("id")}


def dead_letter_headers(rejection: CommandRejection, failed_at: datetime) -> list[tuple[str, bytes]]:
    """The contract's dead-letter headers plus the command's id and type when known."""
    source = rejection.source
    headers = [
        ("fleet.error.reason", rejection.reason.encode()),
        ("fleet.error.detail", rejection.detail.encode()),
        ("fleet.source.topic", source.topic.encode()),
        ("fleet.source.partition", str(source.partition).encode()),
        ("fleet.source.offset", str(source.offset).encode()),
        ("fleet.failed_at", failed_at.isoformat().encode()),
    ]
    if rejection.command_id is not None:
        headers.append((HEADER_COMMAND_ID, str(rejection.command_id).encode()))
    if rejection.type is not None:
        headers.append((HEADER_COMMAND_TYPE, rejection.type.encode()))
    if rejection.redacted:
        headers.append((HEADER_REDACTED, b"value"))
    return headers


# --- the consumer -------------------------------------------------------------------------------

FETCH_RECORDS = 200
"""Commands fetched at most at once; the offsets are committed after each applied fetch."""


class CommandStrategy:
    """Applies each fetched record, in partition order, before the next fetch (the Kafka
    loop's :class:`~fleet_telemetry.consumers.kafka_loop.Strategy`).

    A transient failure is retried by ``retrier`` until it succeeds or the consumer is
    asked to stop (then :class:`~fleet_telemetry.consumers.chain.Abandoned` is raised and
    nothing more is committed); each applied record's offset becomes committable.
    """

    backpressure = False
    in_flight = 0

    def __init__(self, applier: CommandApplier, metrics: CommandMetrics, retrier: Retrier) -> None:
        self.offsets = Committable()
        self._applier = applier
        self._metrics = metrics
        self._retry = retrier

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def room(self) -> int:
        return FETCH_RECORDS

    async def submit(self, records: Records) -> None:
        for tp, fetched in records.items():
            for record in fetched:
                item = decode_command(record.value or b"", key=record.key,
                                      source=Source(tp.topic, tp.partition, record.offset),
                                      known=self._applier.handlers)
                outcome = await self._retry("postgresql", lambda: self._applier.apply(item))
                self._metrics.commands.labels(outcome=outcome).inc()
                self.offsets.mark({tp: record.offset + 1})

    async def poll(self) -> None:
        pass

    async def handover(self) -> None:
        pass  # every fetched record was applied before the next fetch

    def abandon(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def _check_schema(database: Database) -> None:
    """Fails at start, not at the first command, when the database does not exist or was
    never migrated. A PostgreSQL that does not answer yet is waited for later, command by
    command, like any transient failure."""
    try:
        async with database.write() as conn:
            await conn.fetchval("SELECT 1 FROM processed_commands LIMIT 1")
    except ServiceUnavailable:
        pass


class CommandConsumer:
    """Consumes ``FLEET_COMMANDS_TOPIC`` in group ``FLEET_COMMANDS_GROUP``. ``run`` returns
    the exit status: 0 after a clean stop (SIGTERM, or idle in ``stop_when_idle`` mode)."""

    def __init__(self, settings: Settings, *, stop_when_idle: float | None = None,
                 metrics: CommandMetrics | None = None, handlers: Mapping[str, Handler] | None = None) -> None:
        self.settings = settings
        self.handlers = handlers
        self.stop_when_idle = stop_when_idle
        self.metrics = metrics or CommandMetrics()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the record in hand, commit and leave (signal-safe)."""
        self._stopping.set()

    async def run(self) -> int:
        """Blocks until stopped; raises ``ServiceUnavailable`` when asked to stop while
        PostgreSQL or the broker is still away (the uncommitted commands are redelivered)."""
        s = self.settings
        database = Database.from_settings(s, max_size=2)
        redis = connect_redis(s.redis_url)
        producer: AIOKafkaProducer | None = None
        try:
            await _check_schema(database)
            producer = await start_with_retry(
                lambda: start_producer(s, max_request_size=request_size(s.dlq_max_message_bytes)),
                bootstrap=s.kafka_bootstrap, retries=self.metrics.retries, backoff=self._backoff(),
                give_up=self._stopping, within=self.stop_when_idle)
            retrier = Retrier(self.metrics.retries, self._backoff, give_up=self._stopping)
            applier = CommandApplier(database, self._dead_letter_to(producer),
                                     applied=lambda: dashboard.invalidate(redis, s.redis_keys.dashboard),
                                     authenticate=sessions.authenticator(s, redis),
                                     handlers=self.handlers)
            strategy = CommandStrategy(applier, self.metrics, retrier)
            options = LoopOptions.from_settings(
                s, topics=[s.commands_topic], group=s.commands_group, stop_when_idle=self.stop_when_idle,
                what="commands", started_event="command consumer started")
            return await KafkaLoop(strategy, options, LoopMetrics(self.metrics.retries),
                                   stopping=self._stopping).run()
        except Abandoned as exc:
            raise ServiceUnavailable(f"{exc}; the uncommitted commands will be redelivered") from None
        finally:
            if producer is not None:
                await producer.stop()
            await redis.aclose()
            await database.close()

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)

    def _dead_letter_to(self, producer: AIOKafkaProducer) -> Callable[[CommandRejection], Awaitable[None]]:
        topic = self.settings.commands_dlq_topic

        async def send(rejection: CommandRejection) -> None:
            key, value, headers = fit(rejection.key, rejection.value,
                                      dead_letter_headers(rejection, datetime.now(timezone.utc)),
                                      self.settings.dlq_max_message_bytes)
            future = await producer.send(topic, value=value, key=key, headers=headers)
            await future
            self.metrics.rejections.labels(reason=rejection.reason).inc()

        return send


def run_consumer(args: argparse.Namespace, settings: Settings,
                 handlers: Mapping[str, Handler] | None = None) -> int:
    """``fleet commands consume``: runs until SIGTERM/Ctrl-C (or idle with --stop-when-idle),
    applying ``handlers`` (default :data:`HANDLERS`). Refuses to start (exit 2) when it
    could authenticate no command at all."""
    if TokenKeys.from_settings(settings) is None and not settings.commands_allow_unsigned:
        raise UsageError("no key to verify command tokens: set FLEET_JWT_SECRET (or FLEET_JWT_PUBLIC_KEY),"
                         " or FLEET_COMMANDS_ALLOW_UNSIGNED=true while producers move to version 2")

    async def main() -> int:
        worker = CommandConsumer(settings, stop_when_idle=args.stop_when_idle, handlers=handlers)
        signals = StopSignals(worker.stop).install()
        if args.metrics_port:
            serve(worker.metrics, args.metrics_port, settings.metrics_address, setting="--metrics-port")
        return await signals.run(worker.run())

    return asyncio.run(main())


def command_value(command_type: str, data: Mapping[str, Any], *, command_id: UUID,
                  token: str | None = None, actor: str | None = None) -> bytes:
    """The JSON bytes of one command (docs/commands.md), for producers and tests: version 2
    with ``token``, else version 1 naming ``actor``."""
    body: dict[str, Any] = {"version": 2 if token is not None else 1, "command_id": str(command_id),
                            "type": command_type, "data": jsonable(data)}
    if token is not None:
        body["token"] = token
    if actor is not None:
        body["actor"] = actor
    return orjson.dumps(body)
