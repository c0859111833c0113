"""What a worker's ``/healthz`` and ``/readyz`` answer, beside ``/metrics``.

The answers come from state the worker keeps up to date in the background
(``fleet_telemetry.consumers.health``): a request reads a few numbers and does no I/O,
so an orchestrator may probe as often as it likes.

``/healthz`` (liveness): the worker's event loop has ticked within ``stale_seconds``. A
loop that stopped ticking (blocked, deadlocked) is what a restart cures; PostgreSQL or
Kafka being away is not, so they do not count here.

``/readyz`` (readiness): the worker holds partitions, its consumer loop turned, and
PostgreSQL and Kafka both answered, each within ``stale_seconds``. A worker past the
partition count holds none and reports not ready (it has nothing to do).

Both answer ``200`` or ``503`` with a small JSON body saying why.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

DEPENDENCIES = ("postgresql", "kafka")
"""What must have answered recently for a worker to be ready."""


class Health:
    """The health state of one worker. Written by the worker's event loop, read by the
    metrics server's threads; every field is one number, so no lock is needed."""

    def __init__(self, stale_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.stale_seconds = stale_seconds
        self._clock = clock
        self.started_at = clock()
        self.ticked_at: float | None = None
        """The event loop's last tick."""
        self.turned_at: float | None = None
        """The consumer loop's last turn (a fetch and what follows it)."""
        self.answered_at: dict[str, float | None] = dict.fromkeys(DEPENDENCIES)
        """When each dependency last answered."""
        self.partitions = 0
        """Partitions the worker holds now."""

    def tick(self) -> None:
        self.ticked_at = self._clock()

    def answered(self, dependency: str, at: float | None = None) -> None:
        """``dependency`` answered at ``at`` (now when omitted); an older time changes nothing."""
        at = self._clock() if at is None else at
        previous = self.answered_at.get(dependency)
        if previous is None or at > previous:
            self.answered_at[dependency] = at

    def _age(self, at: float | None, now: float) -> float | None:
        return None if at is None else round(max(0.0, now - at), 3)

    def live(self) -> tuple[bool, bytes]:
        """Liveness and its JSON body. A worker still starting counts as alive until its
        first ``stale_seconds`` are over."""
        now = self._clock()
        since = self.ticked_at if self.ticked_at is not None else self.started_at
        ok = now - since <= self.stale_seconds
        return ok, orjson.dumps({"status": "ok" if ok else "stalled",
                                 "event_loop_tick_age_s": self._age(self.ticked_at, now)})

    def ready(self) -> tuple[bool, bytes]:
        """Readiness and its JSON body, with the reasons when not ready."""
        now = self._clock()
        reasons: list[str] = []
        if not self.live()[0]:
            reasons.append("event loop stalled")
        if self.partitions <= 0:
            reasons.append("no partitions assigned")
        if self.turned_at is None or now - self.turned_at > self.stale_seconds:
            reasons.append("consumer loop not turning")
        for dependency in DEPENDENCIES:
            at = self.answered_at.get(dependency)
            if at is None or now - at > self.stale_seconds:
                reasons.append(f"{dependency} has not answered")
        body = {
            "status": "not ready" if reasons else "ready",
            "reasons": reasons,
            "partitions": self.partitions,
            "consumer_loop_age_s": self._age(self.turned_at, now),
            **{f"{d}_answered_age_s": self._age(self.answered_at.get(d), now) for d in DEPENDENCIES},
            "stale_after_s": self.stale_seconds,
        }
        return not reasons, orjson.dumps(body)
