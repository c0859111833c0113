"""One run of ``fleet replay``: backfills and dead-letter replays, idempotent and resumable.

Reads a source (an NDJSON or CSV file, :mod:`fleet_telemetry.replay.sources`; a range of
a Kafka topic or the dead-letter topic, :mod:`fleet_telemetry.replay.kafka_source`) in
chunks and has each chunk decoded as the consumer decodes and then stored or published
(:mod:`fleet_telemetry.replay.processors`), in this process or in worker processes
(:mod:`fleet_telemetry.replay.executors`), at most a few chunks in flight.

Results are applied in source order: rejects appended to the rejects file, counts
added, the checkpoint moved past the chunk (:mod:`fleet_telemetry.replay.checkpoint`).
Setting ``stop`` (the command does on Ctrl-C or SIGTERM) stops reading, finishes the
chunks in flight and saves the checkpoint; the same command resumes from there.
Cancelling the run stops at once (the in-flight chunks are redone on resume; the sink
drops what was already stored). With ``--direct``, a complete run ends by recomputing
the rollups of the hours the sink touched
(:func:`fleet_telemetry.lifecycle.rollups.refresh_dirty_rollups`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

import orjson
import structlog

from fleet_telemetry.core.retry import CONNECT_TIMEOUT_SECONDS
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.checkpoint import Checkpoint, Ledger
from fleet_telemetry.replay.executors import Executor, executor_for
from fleet_telemetry.replay.kafka_source import KafkaRange, KafkaSource
from fleet_telemetry.replay.processors import Plan
from fleet_telemetry.replay.progress import Pacer, Progress, Summary
from fleet_telemetry.replay.results import DIRECT, VIA_KAFKA, ChunkResult
from fleet_telemetry.replay.sources import Chunk, ChunkSource, FileSource

log = structlog.get_logger("fleet.replay")


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


def replay_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def _checkpoint_path(rejects_path: str, replay: str) -> str:
    """Next to the rejects file; for rejects written to a pipe or device (``/dev/stdout``),
    ``fleet-replay-<id>.checkpoint`` in the working directory."""
    if os.path.exists(rejects_path) and not os.path.isfile(rejects_path):
        return f"fleet-replay-{replay}.checkpoint"
    return rejects_path + ".checkpoint"


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
        self.source: ChunkSource
        if o.kafka is not None:
            self.source = KafkaSource(settings, o.kafka, self._chunk_size())
        else:
            assert o.file is not None
            self.source = FileSource(o.file, o.fmt, self._chunk_size())
        fingerprint = {"source": self.source.fingerprint(), "mode": o.mode}
        self.id = replay_id(fingerprint)
        default = f"fleet-replay-{self.id}{'.dry-run' if o.dry_run else ''}.rejects.ndjson"
        self.rejects_path = o.rejects or default
        self.checkpoint = Checkpoint(_checkpoint_path(self.rejects_path, self.id), fingerprint)

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

    async def run(self) -> Summary:
        o = self.options
        ledger = Ledger(self.checkpoint, self.rejects_path, dry_run=o.dry_run, restart=o.restart)
        if ledger.resumed:
            log.info("resuming replay", checkpoint=self.checkpoint.path, position=ledger.position,
                     read=ledger.counts.read)
        plan = Plan.of(self.settings, o.mode, o.dry_run, datetime.now(timezone.utc))
        workers = self._workers()
        executor = executor_for(self.settings, plan, workers)
        in_flight = 3 * workers if workers > 1 else (1 if o.mode == VIA_KAFKA else 2)
        progress = Progress(self._progress_stream, tty=self._progress_stream.isatty(),
                            total=lambda: self.source.total, done=ledger.units, read=ledger.counts.read)
        try:
            completed = await self._pump(executor, ledger, progress, in_flight)
        except BaseException:
            await executor.close(force=True)
            ledger.abandon()
            raise
        await executor.close()
        progress.update(ledger.units, ledger.counts, final=True)
        seconds = ledger.seconds()
        rollups = None
        if completed:
            if o.mode == DIRECT and not o.dry_run:
                ledger.save(force=True)  # if the refresh fails, running the command again only refreshes
                rollups = await self._refresh_rollups()
            ledger.complete()
        else:
            ledger.suspend()
        counts = ledger.counts
        return Summary(
            "complete" if completed else "interrupted", self.source.describe(), o.mode, o.dry_run, counts,
            seconds, self.rejects_path if counts.rejected else None,
            None if completed or o.dry_run else self.checkpoint.path,
            ledger.resumed_from, rollups,
        )

    async def _pump(self, executor: Executor, ledger: Ledger, progress: Progress, in_flight: int) -> bool:
        """Submits chunks from where ``ledger`` stands and applies their results in order,
        at most ``in_flight`` outstanding; True when the source was read to its end,
        False when ``stop`` ended it first."""
        pacer = Pacer(self.options.rate)
        window: deque[tuple[Chunk, asyncio.Future[ChunkResult]]] = deque()
        completed = False

        async def apply(chunk: Chunk, future: asyncio.Future[ChunkResult]) -> None:
            ledger.apply(chunk, await future)
            progress.update(ledger.units, ledger.counts)
            ledger.save()

        await executor.start()
        async with contextlib.aclosing(self.source.chunks(ledger.position)) as chunks:
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
        return completed

    async def _refresh_rollups(self) -> dict[str, Any]:
        """Recomputes the rollups of the hours the sink marked (this replay's and any other
        pending ones); commits per day. Returns the rollup report as JSON."""
        import asyncpg

        from fleet_telemetry.lifecycle.rollups import refresh_dirty_rollups

        started = time.monotonic()
        conn = await asyncpg.connect(self.settings.database_url, timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            report = await refresh_dirty_rollups(conn)
        finally:
            await conn.close()
        return {**report.to_json(), "seconds": round(time.monotonic() - started, 3)}
