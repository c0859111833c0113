"""The trips stage of a worker: one batch of stored readings in; its trips, stops,
``idling`` alerts, accumulators and outbox events committed.

:class:`TripTracker` keeps the motion states of the vehicles it has seen. Once per
batch: load the states of vehicles not cached (one query, plus the readings stored but
not processed since the row was written), run the machine
(:func:`~fleet_telemetry.trips.machine.advance`, pure), then write in one transaction the
rows it decided with the states of their vehicles (:mod:`.store`).

- **No boundary lost across a restart.** A state is written in the transaction of every
  trip, stop or alert it decided; the others are written every
  :data:`STATE_FLUSH_SECONDS` (write-behind), and what a worker processed but did not
  write is processed again from ``vehicle_telemetry`` by the next owner, with the same
  outcome.
- **Idempotent under redelivery and rebalancing.** Readings not newer than a vehicle's
  newest processed one change nothing; a state row changed by another writer (a worker
  or a recomputation) since it was read rolls the batch back, and the batch is run again
  on the row as it is now.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from operator import attrgetter
from uuid import UUID

import asyncpg
import structlog

from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, by_vehicle
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.trips.machine import advance
from fleet_telemetry.trips.model import IDLING, Changes, MotionState, thresholds_from_settings
from fleet_telemetry.trips.store import (
    CATCH_UP,
    LOAD_STATES,
    StateConflict,
    readings_of,
    state_from_row,
    write_changes,
    write_states,
)

log = structlog.get_logger("fleet.trips")

STATE_FLUSH_SECONDS = 60.0
"""States without rows or alerts to write are written at most this often."""
_ATTEMPTS = 10
_time_of = attrgetter("time")


class TripTracker:
    """Runs each stored batch of one worker through the trips machine.

    :meth:`after_write` blocks until the batch's rows, alerts, events and the states that
    must go with them are committed; it raises asyncpg errors (the pipeline retries the
    transient ones: the batch's vehicles were forgotten, so a retry starts from their rows).
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings, metrics: PipelineMetrics) -> None:
        self._pool = pool
        self._th = thresholds_from_settings(settings)
        self._metrics = metrics
        self.states: dict[UUID, MotionState] = {}
        self._versions: dict[UUID, tuple[datetime, int] | None] = {}
        """(last_time, revision) of each cached vehicle's row as last read or written; None: no row."""
        self._dirty: set[UUID] = set()
        self._unwritten: set[UUID] = set()
        """The cached vehicles without a row yet."""
        self._flushed = time.monotonic()
        self._lock = asyncio.Lock()
        for action in ("raised", "resolved"):
            metrics.alerts.labels(type=IDLING, action=action)

    def forget(self, vehicles: set[UUID] | list[UUID]) -> None:
        for vid in vehicles:
            self.states.pop(vid, None)
            self._versions.pop(vid, None)
            self._dirty.discard(vid)
            self._unwritten.discard(vid)

    async def after_write(self, readings: list[Reading]) -> None:
        """Runs one batch of stored (and duplicate) readings; see the class."""
        if not readings:
            return
        async with self._lock:
            started = time.perf_counter()
            groups = by_vehicle(readings)
            for attempt in range(_ATTEMPTS):
                try:
                    await self._run(groups)
                except StateConflict as conflict:
                    log.info("vehicle motion states changed by another writer, running again",
                             vehicles=len(conflict.vehicles), attempt=attempt)
                    continue
                break
            else:
                raise RuntimeError("vehicle motion states kept changing under this worker")
            self._metrics.trip_duration.observe(time.perf_counter() - started)

    async def _run(self, groups: dict[UUID, list[Reading]]) -> None:
        out = Changes()
        states, th = self.states, self._th
        try:
            missing = [vid for vid in groups if vid not in states]
            extra = await self._load(missing, groups) if missing else {}
            for vid, rs in groups.items():
                if extra:
                    caught = extra.get(vid)
                    if caught:
                        rs = caught + rs
                if len(rs) > 1:
                    rs = sorted(rs, key=_time_of)
                advance(vid, states[vid], rs, th, out)
            flush = time.monotonic() - self._flushed >= STATE_FLUSH_SECONDS
            self._dirty.update(groups)
            if flush:
                write = set(self._dirty)
            elif self._unwritten:  # a vehicle's first state is written at once: catching up starts from it
                write = out.urgent | (self._unwritten & groups.keys())
            else:
                write = out.urgent
            if write or out.late:
                await self._commit(write, out)
        except BaseException as exc:  # cancelled too: never flush a state its rows did not commit with
            self.forget(list(groups))  # loaded or advanced in memory: read back (and caught up) next time
            if isinstance(exc, StateConflict):
                self.forget(exc.vehicles)
            raise
        if flush:
            self._flushed = time.monotonic()

    async def _load(self, vehicles: list[UUID], groups: dict[UUID, list[Reading]]) -> dict[UUID, list[Reading]]:
        """Reads the states of ``vehicles`` (a fresh one for a vehicle without a row) and
        returns, per vehicle, the readings stored after its row and before the batch's."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(LOAD_STATES, vehicles)
            for vid in vehicles:
                self.states[vid] = MotionState()
                self._versions[vid] = None
                self._unwritten.add(vid)
            gaps = []
            for row in rows:
                vid = row["vehicle_id"]
                self.states[vid] = state_from_row(row)
                self._versions[vid] = (row["last_time"], row["revision"])
                self._unwritten.discard(vid)
                first = min(r.time for r in groups[vid])
                if row["last_time"] < first:
                    gaps.append((vid, row["last_time"], first))
            if not gaps:
                return {}
            caught = await conn.fetch(CATCH_UP, [g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps])
        if caught:
            log.info("processing readings stored but not processed before", readings=len(caught))
        extra: dict[UUID, list[Reading]] = {}
        for r in readings_of(caught):
            extra.setdefault(r.vehicle_id, []).append(r)
        return extra

    async def _commit(self, write: set[UUID], out: Changes) -> None:
        states = {vid: self.states[vid] for vid in write if self.states[vid].last_time is not None}
        async with self._pool.acquire() as conn, conn.transaction():
            await write_states(conn, states, self._versions)
            _, (raised, resolved) = await write_changes(conn, out)
        for vid, st in states.items():
            version = self._versions.get(vid)
            assert st.last_time is not None
            self._versions[vid] = (st.last_time, 0 if version is None else version[1])
        self._unwritten -= write
        self._dirty -= write
        self._count(out, raised, resolved)

    def _count(self, out: Changes, raised: int, resolved: int) -> None:
        m = self._metrics
        for row in out.trips:
            m.trips.labels(kind="trip", action="started" if row.end is None else "ended").inc()
        for stop in out.stops:
            m.trips.labels(kind="stop", action="started" if stop.end is None else "ended").inc()
        if raised:
            m.alerts.labels(type=IDLING, action="raised").inc(raised)
        if resolved:
            m.alerts.labels(type=IDLING, action="resolved").inc(resolved)

    async def flush(self) -> None:
        """Writes every state not written yet (at stop); a state changed by another writer is dropped."""
        async with self._lock:
            for _ in range(_ATTEMPTS):
                if not self._dirty:
                    return
                try:
                    await self._commit(set(self._dirty), Changes())
                except StateConflict as conflict:
                    self.forget(conflict.vehicles)
                    continue
                return
