"""``fleet replay``: backfills and dead-letter replays, idempotent and resumable.

Reads a source (:mod:`fleet_telemetry.replay.sources`: an NDJSON or CSV file, a range of a
Kafka topic, the dead-letter topic) in chunks and takes each chunk through the same
decoding as the consumer (:func:`fleet_telemetry.consumers.decode.decode_message`), then either

* ``--direct``: through the same sink (:class:`fleet_telemetry.consumers.sink.TelemetrySink`) into
  PostgreSQL; readings older than the raw retention are folded into the hourly and
  daily rollups only (:func:`fleet_telemetry.lifecycle.rollups.fold_into_rollups`), and at the end the
  rollups of the hours the sink touched are recomputed
  (:func:`fleet_telemetry.lifecycle.rollups.refresh_dirty_rollups`); or
* ``--via-kafka``: published to the telemetry topic with
  :class:`fleet_telemetry.ingest.producer.TelemetryProducer`, for the running consumers to store.

Decoding rules of a replay (docs/replay.md): ``now`` is the replay's start; a reading
more than ``FLEET_MAX_FUTURE_SECONDS`` ahead of it is rejected (``future_time``).
``--direct`` accepts readings of any age (older than ``FLEET_RAW_RETENTION_DAYS`` they
go to the rollups only); ``--via-kafka`` rejects those older than the raw retention
(``outside_retention``) as the consumer would. Readings of unregistered vehicles are
rejected (``unknown_vehicle``) in both modes, so nothing is published that the
pipeline would dead-letter again.

Chunks are processed in worker processes (``--workers``) or in this process, at most
a few in flight; results are applied in source order: rejects appended to the rejects
file, counts added, the checkpoint moved past the chunk. Ctrl-C (or SIGTERM) stops
reading, finishes the chunks in flight, saves the checkpoint and exits 130; the same
command resumes from there. A second Ctrl-C stops at once (the in-flight chunks are
redone on resume; the sink drops what was already stored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import IO, Any, Final, Protocol, TypeVar

import orjson
import structlog

from fleet_telemetry.consumers.deadletter import unknown_vehicle
from fleet_telemetry.consumers.decode import Rules, decode_message
from fleet_telemetry.replay.sources import (
    FORMATS,
    Chunk,
    FileSource,
    KafkaRange,
    KafkaSource,
    Lines,
    Records,
    messages,
    parse_time,
)
from fleet_telemetry.core.retry import Backoff, is_transient
from fleet_telemetry.consumers.sink import TelemetrySink, VehicleRegistry, WriteOutcome, create_pool
from fleet_telemetry.core.errors import FleetError, ServiceUnavailable, UsageError
from fleet_telemetry.core.reading import REASONS, Reading, Rejection
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.replay")
T = TypeVar("T")

DIRECT: Final = "direct"
VIA_KAFKA: Final = "via-kafka"
EXIT_INTERRUPTED: Final = 130
_CHECKPOINT_VERSION: Final = 1
_CHECKPOINT_EVERY_S: Final = 1.0
_LOG_EVERY_S: Final = 10.0
_BAR_EVERY_S: Final = 0.25
_EARLIEST: Final = datetime(1, 1, 2, tzinfo=timezone.utc)

_EXISTING = """
SELECT t.vehicle_id, t.time
  FROM vehicle_telemetry t
  JOIN unnest($1::uuid[], $2::timestamptz[]) AS u(vehicle_id, time)
    ON t.vehicle_id = u.vehicle_id AND t.time = u.time
 WHERE t.time BETWEEN $3 AND $4
"""


# --- what a chunk becomes ----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How every chunk of one replay is handled (sent to the worker processes)."""

    mode: str
    dry_run: bool
    rules: Rules
    fold_before: datetime | None
    """``--direct``: readings older than this go to the rollups only."""


@dataclass
class ChunkResult:
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    folded: int = 0
    published: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejects: bytes = b""
    """Lines for the rejects file, in source order."""


@dataclass
class Counts:
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    folded: int = 0
    published: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def add(self, result: ChunkResult) -> None:
        self.read += result.read
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.folded += result.folded
        self.published += result.published
        self.rejected.update(result.rejected)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rejected"] = dict(self.rejected)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Counts":
        return cls(data["read"], data["stored"], data["duplicates"], data["folded"], data["published"],
                   Counter(data["rejected"]))


def reject_line(rejection: Rejection, dead_letter: dict[str, str] | None, from_file: bool) -> bytes:
    """One line of the rejects file: where the reading was, why it was rejected, its bytes."""
    source = rejection.source
    where: dict[str, Any] = (
        {"line": source.offset} if from_file
        else {"topic": source.topic, "partition": source.partition, "offset": source.offset}
    )
    if source.index is not None:
        where["index"] = source.index
    where["reason"] = rejection.reason
    where["detail"] = rejection.detail
    where["value"] = rejection.value.decode("utf-8", "replace")
    if dead_letter:
        where["dead_letter"] = dead_letter
    return orjson.dumps(where) + b"\n"


class ChunkProcessor:
    """Decodes a chunk and stores, folds or publishes its readings. One per process.

    :meth:`process` blocks on PostgreSQL (and Kafka in ``--via-kafka`` mode); transient
    failures are retried with backoff until they succeed, anything else is raised.
    """

    def __init__(self, settings: Settings, plan: Plan) -> None:
        self._settings = settings
        self._plan = plan
        self._pool: Any = None
        self._registry = VehicleRegistry(settings.vehicle_cache_seconds)
        self._sink: TelemetrySink | None = None
        self._producer: Any = None

    async def start(self) -> None:
        """Connects to PostgreSQL (and Kafka); raises :class:`ServiceUnavailable` if they do not answer."""
        s = self._settings
        try:
            self._pool = await create_pool(s.database_url, min_size=1, max_size=2)
        except Exception as exc:
            if is_transient(exc):
                raise ServiceUnavailable(
                    f"PostgreSQL at {s.database_url_masked} is not answering ({type(exc).__name__});"
                    " start it (fleet services up) or set FLEET_DATABASE_URL"
                ) from None
            raise
        self._sink = TelemetrySink(self._pool, self._registry)
        if self._plan.mode == VIA_KAFKA and not self._plan.dry_run:
            from fleet_telemetry.ingest.producer import TelemetryProducer

            producer = TelemetryProducer(s)
            try:
                await producer.start()
            except Exception as exc:
                if is_transient(exc):
                    raise ServiceUnavailable(
                        f"Kafka at {s.kafka_bootstrap} is not answering ({type(exc).__name__});"
                        " start it (fleet services up) or set FLEET_KAFKA_BOOTSTRAP"
                    ) from None
                raise
            self._producer = producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def process(self, payload: Lines | Records) -> ChunkResult:
        plan = self._plan
        rules = plan.rules
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        dead_letters: dict[tuple[int, int], dict[str, str]] = {}
        for key, value, source, dead_letter in messages(payload, rejections):
            decoded = decode_message(value, key=key, source=source, rules=rules)
            readings.extend(decoded.readings)
            rejections.extend(decoded.rejections)
            if dead_letter is not None:
                dead_letters[(source.partition, source.offset)] = dead_letter
        result = ChunkResult(read=len(readings) + len(rejections))
        if plan.mode == DIRECT:
            await self._direct(readings, rejections, result)
        else:
            await self._via_kafka(readings, rejections, result)
        if rejections:
            rejections.sort(key=lambda r: (r.source.partition, r.source.offset, r.source.index or 0))
            from_file = isinstance(payload, Lines)
            result.rejects = b"".join(
                reject_line(r, dead_letters.get((r.source.partition, r.source.offset)), from_file)
                for r in rejections
            )
            result.rejected = dict(Counter(r.reason for r in rejections))
        return result

    async def _direct(self, readings: list[Reading], rejections: list[Rejection], result: ChunkResult) -> None:
        assert self._sink is not None
        sink = self._sink
        fold_before = self._plan.fold_before
        recent, old = readings, []
        if fold_before is not None and any(r.time < fold_before for r in readings):
            recent = [r for r in readings if r.time >= fold_before]
            old = [r for r in readings if r.time < fold_before]
        if recent:
            if self._plan.dry_run:
                written = await self._retry(lambda: self._probe(recent))
            else:
                written = await self._retry(lambda: sink.write(recent))
            result.stored += len(written.stored)
            result.duplicates += len(written.duplicates)
            rejections.extend(unknown_vehicle(r) for r in written.unknown)
        if old:
            known = await self._retry(lambda: self._known(old, rejections))
            if self._plan.dry_run:
                result.folded += len(known)
            elif known:
                folded = await self._retry(lambda: self._fold(known))
                result.folded += folded
                result.duplicates += len(known) - folded

    async def _via_kafka(self, readings: list[Reading], rejections: list[Rejection], result: ChunkResult) -> None:
        known = await self._retry(lambda: self._known(readings, rejections))
        if self._producer is not None and known:
            for reading in known:
                await self._producer.send(reading.to_json())
            await self._producer.flush()
        result.published += len(known)

    async def _known(self, readings: list[Reading], rejections: list[Rejection]) -> list[Reading]:
        """The readings of registered vehicles; the others become ``unknown_vehicle`` rejections."""
        async with self._pool.acquire() as conn:
            unknown = await self._registry.unknown(conn, {r.vehicle_id for r in readings})
        if not unknown:
            return readings
        rejections.extend(unknown_vehicle(r) for r in readings if r.vehicle_id in unknown)
        return [r for r in readings if r.vehicle_id not in unknown]

    async def _fold(self, readings: list[Reading]) -> int:
        """Merges readings older than the raw retention into the rollups (commits per day)."""
        from fleet_telemetry.lifecycle.rollups import fold_into_rollups

        async with self._pool.acquire() as conn:
            return int(await fold_into_rollups(conn, readings))

    async def _probe(self, readings: list[Reading]) -> WriteOutcome:
        """``--dry-run``: what :meth:`TelemetrySink.write` would do, without writing."""
        outcome = WriteOutcome()
        async with self._pool.acquire() as conn:
            unknown = await self._registry.unknown(conn, {r.vehicle_id for r in readings})
            outcome.unknown = [r for r in readings if r.vehicle_id in unknown]
            known = [r for r in readings if r.vehicle_id not in unknown]
            if not known:
                return outcome
            rows = await conn.fetch(
                _EXISTING, [r.vehicle_id for r in known], [r.time for r in known],
                min(r.time for r in known), max(r.time for r in known),
            )
        seen = {(row["vehicle_id"], row["time"]) for row in rows}
        for reading in known:
            if reading.identity in seen:
                outcome.duplicates.append(reading)
            else:
                seen.add(reading.identity)
                outcome.stored.append(reading)
        return outcome

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        s = self._settings
        backoff = Backoff(s.retry_initial_seconds, s.retry_max_seconds)
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = backoff.next_delay()
                log.warning("retrying after a transient failure", error=type(exc).__name__,
                            detail=str(exc)[:200], retry_in_s=round(delay, 2), attempt=backoff.attempts)
                await asyncio.sleep(delay)


# --- where chunks are processed ------------------------------------------------


class Executor(Protocol):
    async def start(self) -> None: ...

    def submit(self, payload: Lines | Records) -> "asyncio.Future[ChunkResult]": ...

    async def close(self, force: bool = False) -> None: ...


class LocalExecutor:
    """Processes chunks in this process, ``concurrency`` at a time (decoding one chunk
    while the previous one is being written)."""

    def __init__(self, processor: ChunkProcessor) -> None:
        self._processor = processor
        self._tasks: set[asyncio.Task[ChunkResult]] = set()

    async def start(self) -> None:
        await self._processor.start()

    def submit(self, payload: Lines | Records) -> "asyncio.Future[ChunkResult]":
        task = asyncio.ensure_future(self._processor.process(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, force: bool = False) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._processor.close()


@dataclass
class _Failed:
    error: str
    message: str
    service: bool


def _worker_main(settings: Settings, plan: Plan, inbox: Any, outbox: Any) -> None:
    """A worker process: chunks from ``inbox``, results to ``outbox``, ``None`` ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from fleet_telemetry.core.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(_worker_loop(settings, plan, inbox, outbox))


async def _worker_loop(settings: Settings, plan: Plan, inbox: Any, outbox: Any) -> None:
    """Two chunks at a time: one is decoded while the other one's COPY is in flight."""
    processor = ChunkProcessor(settings, plan)
    try:
        await processor.start()
    except Exception as exc:
        outbox.put((-1, _Failed(type(exc).__name__, str(exc), isinstance(exc, ServiceUnavailable))))
        return
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(2)
    tasks: set[asyncio.Task[None]] = set()
    failed = False

    async def one(seq: int, payload: Lines | Records) -> None:
        nonlocal failed
        try:
            outbox.put((seq, await processor.process(payload)))
        except Exception as exc:
            failed = True
            outbox.put((seq, _Failed(type(exc).__name__, str(exc)[:500], False)))
        finally:
            slots.release()

    try:
        while not failed:
            await slots.acquire()
            job = await loop.run_in_executor(None, inbox.get)
            if job is None:
                break
            task = asyncio.create_task(one(*job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await processor.close()


class ProcessExecutor:
    """Processes chunks in ``workers`` processes of their own, each with its own
    PostgreSQL connections, so decoding uses every core."""

    def __init__(self, settings: Settings, plan: Plan, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._inbox: Any = context.Queue()
        self._outbox: Any = context.Queue()
        self._processes = [
            context.Process(target=_worker_main, args=(settings, plan, self._inbox, self._outbox),
                            name=f"fleet-replay-{i}", daemon=True)
            for i in range(workers)
        ]
        self._futures: dict[int, asyncio.Future[ChunkResult]] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collector: threading.Thread | None = None
        self._closing = False
        self._failure: FleetError | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for process in self._processes:
            process.start()
        self._collector = threading.Thread(target=self._collect, name="fleet-replay-results", daemon=True)
        self._collector.start()

    def submit(self, payload: Lines | Records) -> "asyncio.Future[ChunkResult]":
        assert self._loop is not None
        future: asyncio.Future[ChunkResult] = self._loop.create_future()
        if self._failure is not None:
            future.set_exception(self._failure)
            return future
        self._futures[self._seq] = future
        self._inbox.put((self._seq, payload))
        self._seq += 1
        return future

    def _collect(self) -> None:
        """Thread: hands results from the worker processes to the event loop."""
        assert self._loop is not None
        while True:
            try:
                item = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if self._closing:
                    return
                if any(not p.is_alive() for p in self._processes):
                    self._loop.call_soon_threadsafe(
                        self._fail_all, _Failed("WorkerDied", "a replay worker process exited unexpectedly", False))
                    return
                continue
            self._loop.call_soon_threadsafe(self._resolve, *item)

    def _resolve(self, seq: int, outcome: ChunkResult | _Failed) -> None:
        if isinstance(outcome, _Failed):
            self._fail_all(outcome)
            return
        future = self._futures.pop(seq, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def _fail_all(self, failure: _Failed) -> None:
        error: FleetError = (ServiceUnavailable(failure.message) if failure.service
                             else FleetError(f"a replay worker failed: {failure.error}: {failure.message}"))
        if self._failure is None:
            self._failure = error
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()

    async def close(self, force: bool = False) -> None:
        self._closing = True
        if not force:
            for _ in self._processes:
                self._inbox.put(None)
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 30
            for process in self._processes:
                await loop.run_in_executor(None, process.join, max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
        if self._collector is not None:
            self._collector.join(2)
        self._inbox.cancel_join_thread()
        self._outbox.cancel_join_thread()


# --- checkpoints, progress, pacing --------------------------------------------


class Checkpoint:
    """The resume point of one replay: a JSON file written atomically next to the rejects file.

    It holds the replay's fingerprint (source and mode), the position after the last
    chunk applied, the counts so far and the size of the rejects file at that moment.
    """

    def __init__(self, path: str, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        """The saved state, ``None`` if there is none; raises UsageError if it belongs elsewhere."""
        try:
            with open(self.path, "rb") as f:
                state = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise UsageError(f"checkpoint {self.path} is unreadable ({exc}); remove it or use --restart") from None
        if state.get("version") != _CHECKPOINT_VERSION or state.get("fingerprint") != self.fingerprint:
            raise UsageError(
                f"checkpoint {self.path} belongs to another replay (or the source changed);"
                " use --restart to start over, or pass another --rejects"
            )
        return dict(state)

    def save(self, state: dict[str, Any]) -> None:
        """Replaces the file atomically (write, fsync, rename)."""
        body = orjson.dumps({"version": _CHECKPOINT_VERSION, "fingerprint": self.fingerprint, **state})
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A progress bar with rate and ETA on a terminal, a log line every 10 s otherwise."""

    def __init__(self, stream: IO[str], *, tty: bool, total: Callable[[], int | None], done: int, read: int) -> None:
        self._stream = stream
        self._tty = tty
        self._total = total
        self._started = time.monotonic()
        self._units0 = done
        self._read0 = read
        self._shown = 0.0
        self._width = 0

    def update(self, units: int, counts: Counts, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._shown < (_BAR_EVERY_S if self._tty else _LOG_EVERY_S):
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-6)
        rate = (counts.read - self._read0) / elapsed
        total = self._total()
        fraction = min(1.0, units / total) if total else None
        eta = None
        if fraction is not None and units > self._units0 and total:
            eta = (total - units) / ((units - self._units0) / elapsed)
        rejected = sum(counts.rejected.values())
        if self._tty:
            width = 24
            filled = int(width * (fraction or 0.0))
            bar = "#" * filled + "-" * (width - filled)
            pct = f"{fraction * 100:5.1f}%" if fraction is not None else "  ?  "
            text = (f"\r[{bar}] {pct} {counts.read:,} read, {rejected:,} rejected, {rate:,.0f}/s"
                    f", ETA {_duration(eta) if eta is not None else '?'}")
            self._stream.write(text.ljust(self._width))
            self._width = len(text)
            if final:
                self._stream.write("\n")
            self._stream.flush()
        elif not final:
            log.info("replay progress", read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                     folded=counts.folded, published=counts.published, rejected=rejected,
                     percent=None if fraction is None else round(fraction * 100, 1),
                     rate_per_s=round(rate), eta_s=None if eta is None else round(eta))


class Pacer:
    """``--rate``: releases chunks so that at most ``rate`` lines or records go per second."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._started: float | None = None
        self._sent = 0

    async def wait(self, count: int, stop: asyncio.Event) -> None:
        if not self._rate:
            return
        if self._started is None:
            self._started = time.monotonic()
        delay = self._started + self._sent / self._rate - time.monotonic()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        self._sent += count


# --- the replay ----------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    """A replay, as the command line asked for it."""

    mode: str
    file: str | None = None
    fmt: str | None = None
    kafka: KafkaRange | None = None
    dry_run: bool = False
    rate: float | None = None
    rejects: str | None = None
    restart: bool = False
    workers: int | None = None
    batch_size: int = 5000
    as_json: bool = False


@dataclass
class Summary:
    status: str
    source: str
    mode: str
    dry_run: bool
    counts: Counts
    seconds: float
    rejects_file: str | None
    checkpoint: str | None
    resumed_from: dict[str, Any] | None
    rollups: dict[str, Any] | None = None
    """``--direct``: what the final :func:`refresh_dirty_rollups` did."""

    def to_json(self) -> dict[str, Any]:
        counts = self.counts.to_json()
        return {
            "status": self.status, "source": self.source, "mode": self.mode, "dry_run": self.dry_run,
            **counts, "rejected_total": sum(self.counts.rejected.values()),
            "seconds": round(self.seconds, 3), "rejects_file": self.rejects_file,
            "checkpoint": self.checkpoint, "resumed_from": self.resumed_from, "rollups": self.rollups,
        }

    def text(self) -> str:
        c = self.counts
        would = "would be " if self.dry_run else ""
        rate = c.read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"replay of {self.source} (--{self.mode}{', dry run' if self.dry_run else ''}): {self.status}",
            f"  read        {c.read:>12,}  readings in {self.seconds:.1f} s ({rate:,.0f}/s)",
        ]
        if self.mode == DIRECT:
            lines += [
                f"  stored      {c.stored:>12,}  {would}new rows in vehicle_telemetry",
                f"  duplicates  {c.duplicates:>12,}  already stored, {would}skipped",
                f"  folded      {c.folded:>12,}  older than the raw retention, {would}handed to the rollups",
            ]
            if self.rollups is not None:
                lines.append(f"  rollups: {self.rollups.get('hours', 0):,} hour(s) and {self.rollups.get('days', 0):,}"
                             " day(s) recomputed" + ("; some hours left for fleet maintain (lock busy)"
                                                   if self.rollups.get("claim_deferred") else ""))
        else:
            lines.append(f"  published   {c.published:>12,}  {would}sent to the telemetry topic")
        rejected = sum(c.rejected.values())
        by_reason = ", ".join(f"{reason} {n:,}" for reason, n in sorted(c.rejected.items()))
        lines.append(f"  rejected    {rejected:>12,}" + (f"  {by_reason}" if rejected else ""))
        if rejected and self.rejects_file:
            lines.append(f"  rejects file: {self.rejects_file} (line or offset, reason, detail, value)")
        if self.checkpoint:
            lines.append(f"  checkpoint: {self.checkpoint} (run the same command again to resume)")
        return "\n".join(lines)


def replay_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class Replay:
    """One run of ``fleet replay``. :meth:`run` returns the :class:`Summary`.

    Blocks on the source, PostgreSQL and Kafka; raises :class:`UsageError` for a bad
    source or checkpoint, :class:`ServiceUnavailable` when a service does not answer.
    Setting ``stop`` ends the run after the chunks in flight, with a checkpoint saved.
    Cancelling it abandons the chunks in flight (the checkpoint stays before them).
    """

    def __init__(self, options: ReplayOptions, settings: Settings, *, stop: asyncio.Event | None = None,
                 progress_stream: IO[str] | None = None) -> None:
        self.options = options
        self.settings = settings
        self.stop = stop or asyncio.Event()
        self._progress_stream = progress_stream if progress_stream is not None else sys.stderr
        o = options
        if o.kafka is not None:
            self.source: FileSource | KafkaSource = KafkaSource(settings, o.kafka, self._chunk_size())
        else:
            assert o.file is not None
            self.source = FileSource(o.file, o.fmt, self._chunk_size())
        fingerprint = {"source": self.source.fingerprint(), "mode": o.mode}
        self.id = replay_id(fingerprint)
        default = f"fleet-replay-{self.id}{'.dry-run' if o.dry_run else ''}.rejects.ndjson"
        self.rejects_path = o.rejects or default
        self.checkpoint = Checkpoint(self.rejects_path + ".checkpoint", fingerprint)

    def _chunk_size(self) -> int:
        size = self.options.batch_size
        if self.options.rate:
            size = min(size, max(1, int(self.options.rate // 5)))
        return size

    def _workers(self) -> int:
        o = self.options
        if o.workers is not None:
            return o.workers
        if o.mode == DIRECT and isinstance(self.source, FileSource):
            # Decoding costs more than PostgreSQL's share of a row, and workers wait on
            # PostgreSQL part of the time: one per core beats leaving cores to it.
            return max(1, min(4, os.cpu_count() or 1))
        return 1

    def _plan(self, now: datetime) -> Plan:
        s = self.settings
        max_future = timedelta(seconds=s.max_future_seconds)
        raw_retention = timedelta(days=s.raw_retention_days)
        if self.options.mode == DIRECT:
            return Plan(DIRECT, self.options.dry_run, Rules(now, max_future, now - _EARLIEST), now - raw_retention)
        return Plan(VIA_KAFKA, self.options.dry_run, Rules(now, max_future, raw_retention), None)

    async def run(self) -> Summary:
        o = self.options
        started = time.monotonic()
        if o.dry_run and os.path.exists(self.checkpoint.path):
            raise UsageError(f"{self.rejects_path} belongs to an interrupted replay (checkpoint "
                             f"{self.checkpoint.path}); give the dry run another --rejects")
        state = None if (o.dry_run or o.restart) else self.checkpoint.load()
        if o.restart and not o.dry_run:
            self.checkpoint.remove()
        counts = Counts.from_json(state["counts"]) if state else Counts()
        position: dict[str, Any] | None = state["position"] if state else None
        units: int = int(state["units"]) if state else 0
        elapsed_before = float(state["seconds"]) if state else 0.0
        resumed_from = position
        rejects = self._open_rejects(int(state["rejects_size"]) if state else 0)
        if state:
            log.info("resuming replay", checkpoint=self.checkpoint.path, position=position, read=counts.read)
        plan = self._plan(datetime.now(timezone.utc))
        workers = self._workers()
        executor: Executor = (ProcessExecutor(self.settings, plan, workers) if workers > 1
                              else LocalExecutor(ChunkProcessor(self.settings, plan)))
        in_flight = 3 * workers if workers > 1 else (1 if o.mode == VIA_KAFKA else 2)
        progress = Progress(self._progress_stream, tty=self._progress_stream.isatty(),
                            total=lambda: self.source.total, done=units, read=counts.read)
        pacer = Pacer(o.rate)
        window: deque[tuple[Chunk, asyncio.Future[ChunkResult]]] = deque()
        completed = False
        saved = time.monotonic()

        def save(force: bool = False) -> None:
            """Rejects flushed to disk first, then the checkpoint that counts them."""
            nonlocal saved
            if o.dry_run or (not force and time.monotonic() - saved < _CHECKPOINT_EVERY_S):
                return
            saved = time.monotonic()
            rejects.flush()
            os.fsync(rejects.fileno())
            self.checkpoint.save({
                "position": position, "units": units, "counts": counts.to_json(),
                "rejects_size": rejects.tell(), "seconds": elapsed_before + time.monotonic() - started,
            })

        async def apply(chunk: Chunk, future: asyncio.Future[ChunkResult]) -> None:
            nonlocal position, units
            result = await future
            if result.rejects:
                rejects.write(result.rejects)
            counts.add(result)
            position = chunk.position
            units += chunk.units
            progress.update(units, counts)
            save()

        try:
            await executor.start()
            async with contextlib.aclosing(self.source.chunks(position)) as chunks:
                async for chunk in chunks:
                    if self.stop.is_set():
                        break
                    await pacer.wait(chunk.count, self.stop)
                    if self.stop.is_set():
                        break
                    window.append((chunk, executor.submit(chunk.payload)))
                    while window and (window[0][1].done() or len(window) >= in_flight):
                        await apply(*window.popleft())
                else:
                    completed = True
            while window:
                await apply(*window.popleft())
        except BaseException:
            await executor.close(force=True)
            if state or units:
                save(force=True)
                rejects.close()
            else:  # nothing done: leave nothing behind
                rejects.close()
                self._remove_if_empty(self.rejects_path)
            raise
        await executor.close()
        progress.update(units, counts, final=True)
        seconds = elapsed_before + time.monotonic() - started
        rollups = None
        if completed:
            if o.mode == DIRECT and not o.dry_run:
                save(force=True)  # if the refresh fails, running the command again only refreshes
                rollups = await self._refresh_rollups()
            self.checkpoint.remove()
            rejects.close()
            if not counts.rejected:
                self._remove_if_empty(self.rejects_path)
            status = "complete"
        else:
            save(force=True)
            rejects.close()
            status = "interrupted"
        return Summary(
            status, self.source.describe(), o.mode, o.dry_run, counts, seconds,
            self.rejects_path if counts.rejected else None,
            None if completed or o.dry_run else self.checkpoint.path,
            resumed_from, rollups,
        )

    @staticmethod
    def _remove_if_empty(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path) == 0:
                os.remove(path)

    def _open_rejects(self, size: int) -> IO[bytes]:
        directory = os.path.dirname(os.path.abspath(self.rejects_path))
        if not os.path.isdir(directory):
            raise UsageError(f"--rejects {self.rejects_path}: the directory {directory} does not exist")
        if size and os.path.exists(self.rejects_path):
            f = open(self.rejects_path, "r+b")
            f.truncate(size)
            f.seek(size)
            return f
        if size:
            log.warning("the rejects file of the interrupted run is gone; earlier rejects are not in the new one",
                        path=self.rejects_path)
        return open(self.rejects_path, "wb")

    async def _refresh_rollups(self) -> dict[str, Any]:
        """Recomputes the rollups of the hours the sink marked (this replay's and any other
        pending ones); commits per day. Returns the rollup report as JSON."""
        import asyncpg

        from fleet_telemetry.lifecycle.rollups import refresh_dirty_rollups

        started = time.monotonic()
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            report = await refresh_dirty_rollups(conn)
        finally:
            await conn.close()
        return {**report.to_json(), "seconds": round(time.monotonic() - started, 3)}


# --- the command -----------------------------------------------------------------


def options_from_args(args: argparse.Namespace, settings: Settings) -> ReplayOptions:
    """Checks the command line; raises :class:`UsageError` with one line on misuse."""
    kafka_flags = {
        "--partition": args.partition, "--from-offset": args.from_offset, "--to-offset": args.to_offset,
        "--since": args.since, "--until": args.until, "--reason": args.reason,
    }
    sources = [name for name, given in (("FILE", args.file), ("--topic", args.topic),
                                         ("--dead-letters", args.dead_letters)) if given]
    if len(sources) != 1:
        raise UsageError("give exactly one source: FILE, --topic TOPIC or --dead-letters"
                         + (f" (got {', '.join(sources)})" if sources else ""))
    mode = DIRECT if args.direct else VIA_KAFKA
    if args.file:
        used = [name for name, value in kafka_flags.items() if value not in (None, [], ())]
        if used:
            raise UsageError(f"{', '.join(used)}: only for a --topic or --dead-letters source")
    elif args.format:
        raise UsageError("--format only applies to a FILE source")
    if args.reason and not args.dead_letters:
        raise UsageError("--reason only applies to --dead-letters")
    for reason in args.reason or ():
        if reason not in REASONS:
            raise UsageError(f"--reason {reason!r} is not one of {', '.join(REASONS)}")
    for flag, value in (("--from-offset", args.from_offset), ("--to-offset", args.to_offset)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be 0 or more")
    if args.from_offset is not None and args.to_offset is not None and args.to_offset <= args.from_offset:
        raise UsageError("--to-offset must be greater than --from-offset (it is exclusive)")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    if since and until and until <= since:
        raise UsageError("--until must be later than --since")
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise UsageError("--rate must be a positive number of readings per second")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be 1 or more")
    if args.workers is not None and args.workers > 1 and mode == VIA_KAFKA:
        raise UsageError("--via-kafka publishes from one process, in order; leave --workers out")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be 1 or more")
    kafka = None
    if not args.file:
        kafka = KafkaRange(
            topic=settings.dlq_topic if args.dead_letters else args.topic,
            partitions=tuple(sorted(set(args.partition or ()))),
            from_offset=args.from_offset, to_offset=args.to_offset, since=since, until=until,
            reasons=tuple(args.reason or ()), dead_letters=bool(args.dead_letters),
        )
    return ReplayOptions(
        mode=mode, file=args.file, fmt=args.format, kafka=kafka, dry_run=args.dry_run, rate=args.rate,
        rejects=args.rejects, restart=args.restart, workers=args.workers, batch_size=args.batch_size,
        as_json=args.json,
    )


async def main(args: argparse.Namespace, settings: Settings) -> int:
    """The command: 0 all stored (or duplicates), 1 something rejected or failed, 130 interrupted."""
    options = options_from_args(args, settings)
    stop = asyncio.Event()
    replay = Replay(options, settings, stop=stop)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(replay.run())
    forced = False

    def on_signal() -> None:
        nonlocal forced
        if stop.is_set():
            forced = True
            task.cancel()
            return
        stop.set()
        sys.stderr.write("\nfleet replay: stopping after the chunks in flight (Ctrl-C again to stop at once)\n")

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        try:
            summary = await task
        except asyncio.CancelledError:
            if not forced:
                raise
            sys.stderr.write(f"fleet replay: stopped at once; run the same command to resume "
                             f"(checkpoint {replay.checkpoint.path})\n")
            return EXIT_INTERRUPTED
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    if options.as_json:
        sys.stdout.write(orjson.dumps(summary.to_json()).decode() + "\n")
    else:
        sys.stdout.write(summary.text() + "\n")
    sys.stdout.flush()
    rejected = sum(summary.counts.rejected.values())
    if summary.status == "interrupted":
        sys.stderr.write(f"fleet replay: interrupted; run the same command to resume "
                         f"(checkpoint {replay.checkpoint.path})\n")
        return EXIT_INTERRUPTED
    if rejected:
        sys.stderr.write(f"fleet replay: {rejected:,} readings rejected; see {summary.rejects_file}\n")
        return 1
    return 0


def run(args: argparse.Namespace, settings: Settings) -> Awaitable[int]:
    return main(args, settings)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "replay",
        help="backfill from files, Kafka ranges and the dead-letter topic",
        description="Re-ingest readings, idempotently: from an NDJSON or CSV file (plain or gzip), a range "
        "of a Kafka topic, or the dead-letter topic. --direct writes through the consumer's decoding and sink "
        "into PostgreSQL (readings older than the raw retention go to the rollups only); --via-kafka publishes "
        "to FLEET_TELEMETRY_TOPIC. Rejected readings go to a rejects file and the run goes on. Ctrl-C stops "
        "with a checkpoint; the same command resumes. Exit 0: everything stored or duplicate; 1: something "
        "rejected (see the rejects file) or failed; 2: bad usage; 130: interrupted. See docs/replay.md.",
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="an NDJSON or CSV file, plain or gzip")
    parser.add_argument("--format", choices=FORMATS, help="the FILE's format (default: from its name)")
    parser.add_argument("--topic", help="replay a range of this Kafka topic")
    parser.add_argument("--dead-letters", action="store_true", help="replay the dead-letter topic (FLEET_DLQ_TOPIC)")
    parser.add_argument("--partition", type=int, action="append", metavar="N",
                        help="only this partition (repeatable; default all)")
    parser.add_argument("--from-offset", type=int, metavar="N", help="first offset, in each selected partition")
    parser.add_argument("--to-offset", type=int, metavar="N",
                        help="stop before this offset (exclusive; default: the end when the replay starts)")
    parser.add_argument("--since", metavar="TIME", help="records with a timestamp at or after TIME (RFC 3339 or epoch ms)")
    parser.add_argument("--until", metavar="TIME", help="records with a timestamp before TIME (exclusive)")
    parser.add_argument("--reason", action="append", metavar="REASON",
                        help=f"dead letters with this reason only (repeatable: {', '.join(REASONS)})")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--direct", action="store_true", help="write straight into PostgreSQL through the sink")
    mode.add_argument("--via-kafka", action="store_true", help="publish to the telemetry topic for the consumers")
    parser.add_argument("--dry-run", action="store_true",
                        help="read and validate everything, report what would happen, write nothing")
    parser.add_argument("--rate", type=float, metavar="N", help="at most N readings per second")
    parser.add_argument("--rejects", metavar="PATH",
                        help="rejects file (default fleet-replay-<id>.rejects.ndjson here); "
                        "the checkpoint is PATH.checkpoint")
    parser.add_argument("--restart", action="store_true", help="ignore a checkpoint and start from the beginning")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes decoding and writing (default: the CPU count, up to 4, for a file "
                        "with --direct; otherwise 1)")
    parser.add_argument("--batch-size", type=int, default=5000, metavar="N",
                        help="lines or records per chunk (default 5000)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run)
