"""The rules stage of a worker: one batch of stored readings in, its rule states,
geofence transitions and alerts committed.

:class:`RuleEngine` ties the parts together, once per batch: load the states of
vehicles it has not seen yet (:mod:`.store`, one query), evaluate (:mod:`.evaluate`,
pure), then write states, transitions and alerts in one transaction (:mod:`.store`,
:mod:`.outcome`) and update the Redis GEO sets (:mod:`.geo_sets`). It also runs the
worker's timer task (:mod:`.timers`): the geofence refresh, the state flush, the
offline and maintenance checks.

Guarantees (schema/README.md, "Geofences and alerts"): no spam by construction, late
data fires nothing, idempotent under redelivery and rebalancing (see the modules named).
"""

from __future__ import annotations

import asyncio
import time as monotonic_clock
from datetime import datetime, timezone
from uuid import UUID

import asyncpg
import structlog

from fleet_telemetry.consumers.rules.evaluate import evaluate
from fleet_telemetry.consumers.rules.geo_sets import drop_sets, update_members
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import ALERT_TYPES, Evaluation, Thresholds
from fleet_telemetry.consumers.rules.store import StateConflict, StateStore
from fleet_telemetry.consumers.rules.timers import (
    check_maintenance,
    check_offline,
    geofences_version,
    load_index,
    run_every,
)
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, by_vehicle
from fleet_telemetry.core.redis_client import RedisClient
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.rules")

# States without transitions or alerts are written at most this often (write-behind;
# a tenth of the offline threshold if that is shorter).
STATE_FLUSH_SECONDS = 15.0
# A batch is evaluated again at most this often when other workers keep changing its states.
_ATTEMPTS = 10


def thresholds_from_settings(s: Settings) -> Thresholds:
    """The rules' thresholds as configured (``FLEET_ALERT_*``, ``FLEET_GEOFENCE_DWELL_SECONDS``,
    ``FLEET_BEHAVIOUR_*``)."""
    return Thresholds(
        dwell_seconds=s.geofence_dwell_seconds, overspeed_kmh=s.alert_overspeed_kmh,
        overspeed_min_seconds=s.alert_overspeed_min_seconds, low_fuel_percent=s.alert_low_fuel_percent,
        fuel_hysteresis_percent=s.alert_fuel_hysteresis_percent, fuel_drop_percent=s.alert_fuel_drop_percent,
        fuel_drop_seconds=s.alert_fuel_drop_seconds, stationary_kmh=s.alert_stationary_kmh,
        overheat_c=s.alert_overheat_c, overheat_hysteresis_c=s.alert_overheat_hysteresis_c,
        offline_seconds=s.alert_offline_seconds, max_gps_speed_kmh=s.alert_max_gps_speed_kmh,
        harsh_braking_mps2=s.behaviour_harsh_braking_mps2, harsh_acceleration_mps2=s.behaviour_harsh_acceleration_mps2,
        behaviour_max_gap_seconds=s.behaviour_max_gap_seconds,
    )


class RuleEngine:
    """Evaluates each stored batch of one worker; owns the worker's timer task.

    ``after_write`` is the :class:`~fleet_telemetry.consumers.batch.BatchProcessor` hook: it blocks until
    the batch's states, transitions and alerts are committed (one transaction) and
    raises asyncpg errors, which the worker treats like any write failure. The Redis
    ``geofence:{id}`` sets are updated after the commit, best effort.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient | None,
        settings: Settings,
        metrics: PipelineMetrics,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._settings = settings
        self._th = thresholds_from_settings(settings)
        self._metrics = metrics
        self.index = GeofenceIndex(())
        self._index_version: tuple[int, datetime | None] | None = None
        self._store = StateStore(pool, metrics)
        self._flushed = monotonic_clock.monotonic()
        # The offline timer reads last_time from the table: keep it well within the threshold.
        offline = self._th.offline_seconds
        self._flush_seconds = min(STATE_FLUSH_SECONDS, offline / 10) if offline else STATE_FLUSH_SECONDS
        self._lock = asyncio.Lock()
        """One batch or flush at a time: the timers flush too."""
        self._timer: asyncio.Task[None] | None = None
        self._next_check = 0.0
        for kind in ALERT_TYPES:
            for action in ("raised", "resolved"):
                metrics.alerts.labels(type=kind, action=action)

    async def start(self) -> None:
        """Loads the geofences and starts the timer task; raises asyncpg errors."""
        await self.refresh_geofences()
        s = self._settings
        self._timer = asyncio.create_task(
            run_every(min(s.geofence_refresh_seconds, s.alert_timer_seconds), self._tick), name="fleet-rule-timers")

    async def stop(self) -> None:
        """Stops the timers and writes the states not written yet: best effort, 10 s at
        most (what is not written is caught up from ``vehicle_telemetry`` by the next owner)."""
        if self._timer is not None:
            self._timer.cancel()
            try:
                await self._timer
            except (asyncio.CancelledError, Exception):
                pass
            self._timer = None
        try:
            await asyncio.wait_for(self.flush(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - never mask why the worker stops
            log.warning("rule states not flushed at stop; the next owner catches up", error=type(exc).__name__)

    # --- geofences --------------------------------------------------------------

    async def refresh_geofences(self) -> bool:
        """Reloads the index if any geofence was added, changed or removed; True if so.
        Raises asyncpg errors, and Redis errors other than not answering."""
        async with self._pool.acquire() as conn:
            version = await geofences_version(conn)
            if version == self._index_version:
                return False
            index = await load_index(conn)
        gone = set(self.index.fences) - set(index.fences)
        self.index, self._index_version = index, version
        for vs in self._store.states.values():  # grid cells and settled sides belong to the old index
            if vs.position is not None:
                vs.position = vs.position._replace(key=-1, settled=False)
        self._metrics.geofences_active.set(len(index))
        log.info("geofences loaded", active=len(index), cell_deg=index.cell, removed=len(gone))
        if gone and self._redis is not None:
            await drop_sets(self._redis, gone, self._settings.redis_keys)
        return True

    # --- the hook -----------------------------------------------------------------

    async def after_write(self, readings: list[Reading]) -> None:
        """Evaluates one batch of stored readings and commits what it changed.

        Transitions and alerts are committed with the states of their vehicles; the other
        states are written every :data:`STATE_FLUSH_SECONDS` or so (a worker that dies before
        catches up from ``vehicle_telemetry``, see :meth:`StateStore.load`). When another
        worker changed a state meanwhile, the batch's vehicles are read back and the batch
        is evaluated again. Any other failure (asyncpg errors) is raised after forgetting the
        batch's vehicles, so calling again with the same readings is safe: the
        :class:`~fleet_telemetry.consumers.batch.BatchProcessor` retries transient ones.
        """
        if self._timer is not None and self._timer.done():
            self._timer.result()  # a bug in the timers: raise it in the worker
        if not readings:
            return
        async with self._lock:
            await self._after_write(readings)

    async def _after_write(self, readings: list[Reading]) -> None:
        started = monotonic_clock.perf_counter()
        groups = by_vehicle(readings)
        for attempt in range(_ATTEMPTS):
            try:
                result, gone = await self._evaluate_and_commit(groups)
            except StateConflict as conflict:
                log.info("vehicle states changed by another worker, evaluating again",
                         vehicles=len(conflict.vehicles), attempt=attempt)
                continue
            break
        else:
            raise RuntimeError("vehicle rule states kept changing under this worker")
        m = self._metrics
        m.late_readings.inc(result.late)
        m.rule_duration.observe(monotonic_clock.perf_counter() - started)
        if gone:  # removed after this worker's last refresh, which comes soon
            log.info("nothing written for geofences removed meanwhile", geofences=sorted(gone))
        transitions = [t for t in result.transitions if t.geofence_id not in gone]
        if transitions and self._redis is not None:
            await update_members(self._redis, transitions, self._settings.redis_keys)

    async def _evaluate_and_commit(self, groups: dict[UUID, list[Reading]]) -> tuple[Evaluation, set[int]]:
        """One attempt: evaluate the batch against the cached states and commit it; returns
        what it evaluated and the geofences found removed meanwhile (nothing was written
        for them). Raises :class:`StateConflict` and asyncpg errors after forgetting the
        batch's vehicles (the states were advanced in memory: they are read back next time)."""
        store = self._store
        batch = await self._with_catch_up(groups)
        result = evaluate(store.states, batch, self.index, self._th, datetime.now(timezone.utc))
        flush = self._flush_due()
        if flush:
            write = store.dirty | set(result.states)
        else:  # a vehicle's first state is written at once: catching up starts from it
            write = result.urgent | store.unwritten(result.states)
        try:
            gone = await store.commit(write, result)
        except Exception:
            store.forget(groups)
            raise  # the caller retries transient failures; the states are read back then
        if flush:
            self._flushed = monotonic_clock.monotonic()
        return result, gone

    async def _with_catch_up(self, groups: dict[UUID, list[Reading]]) -> dict[UUID, list[Reading]]:
        """The batch, with the readings stored but never evaluated of vehicles not cached yet."""
        missing = [vid for vid in groups if vid not in self._store.states]
        if not missing:
            return groups
        extra = await self._store.load(missing, groups, self.index)
        if not extra:
            return groups
        batch = {vid: list(rs) for vid, rs in groups.items()}
        for r in extra:
            batch[r.vehicle_id].append(r)
        return batch

    def _flush_due(self) -> bool:
        return monotonic_clock.monotonic() - self._flushed >= self._flush_seconds

    async def flush(self) -> None:
        """Writes every state not written yet; a state another worker changed is dropped.
        Raises asyncpg errors."""
        async with self._lock:
            for _ in range(_ATTEMPTS):
                write = set(self._store.dirty)
                if not write:
                    return
                try:
                    await self._store.commit(write, None)
                except StateConflict:
                    continue  # those vehicles were forgotten: write the others
                self._flushed = monotonic_clock.monotonic()
                return

    # --- the timers -------------------------------------------------------------------

    async def _tick(self) -> None:
        """One round of the timer task: geofences, overdue state writes, and the checks
        every ``FLEET_ALERT_TIMER_SECONDS``."""
        await self.refresh_geofences()
        if self._store.dirty and self._flush_due():
            await self.flush()
        if monotonic_clock.monotonic() >= self._next_check:
            self._next_check = monotonic_clock.monotonic() + self._settings.alert_timer_seconds
            await self.check_offline()
            await self.check_maintenance()

    async def check_offline(self) -> None:
        """Raises ``offline`` for vehicles silent for longer than the threshold (wall
        clock); does nothing when the threshold is 0. Raises asyncpg errors."""
        if self._th.offline_seconds:
            await check_offline(self._pool, self._th.offline_seconds, self._metrics)

    async def check_maintenance(self) -> None:
        """Raises ``maintenance_due`` by date or odometer; resolves it once nothing is due.
        Raises asyncpg errors."""
        await check_maintenance(self._pool, self._metrics)
