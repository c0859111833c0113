"""Running telemetry workers: one in this process, or N worker processes side by side.

Each worker is a :class:`~fleet_telemetry.consumers.worker.Worker` with SIGTERM and
SIGINT wired to its clean stop and its metrics, ``/healthz`` and ``/readyz`` on
``FLEET_METRICS_PORT + index``. With more than one, this process starts them (spawned,
so no event loop or connection is inherited, and with SIGINT ignored: a Ctrl-C reaches
them as the SIGTERM this process forwards), waits for all and adds up their
:class:`~fleet_telemetry.consumers.summary.RunSummary`.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from fleet_telemetry.consumers.summary import RunSummary
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.failures import report
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.metrics import serve
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.core.stopping import EXIT_INTERRUPTED, StopSignals

log = structlog.get_logger("fleet.consumer")


@dataclass
class Outcome:
    """How a run ended: the exit status (130 after a Ctrl-C) and what the workers did."""

    status: int
    summary: RunSummary
    interrupted: bool = False


def run_worker(settings: Settings, stop_when_idle: float | None, index: int, *, sigint: bool = True) -> Outcome:
    """Runs worker ``index`` in this process until it stops. Raises ``FleetError`` when
    it cannot start (a service away, the metrics port taken); with ``sigint=False``
    SIGINT is left to the parent process."""
    async def main() -> Outcome:
        worker = Worker(settings, stop_when_idle=stop_when_idle, worker_index=index)
        signals = StopSignals(worker.stop).install(sigint=sigint)
        started = time.monotonic()
        if settings.metrics_port:
            serve(worker.metrics, settings.metrics_port + index, settings.metrics_address,
                  health=worker.health)
            log.info("metrics served", address=settings.metrics_address, port=settings.metrics_port + index,
                     path="/metrics", health=["/healthz", "/readyz"])
        status = await signals.run(worker.run())
        return Outcome(status, RunSummary.of(worker.metrics, time.monotonic() - started), signals.interrupted)

    tune_gc(settings.gc_threshold)
    return run_loop(main(), settings.event_loop)


def tune_gc(threshold: int) -> None:
    """Fewer collections for a process that allocates readings by the thousand: the
    objects of start-up are moved out of the collector's sight (``gc.freeze``) and a
    collection runs after ``threshold`` allocations instead of 700. Readings are freed
    by reference counting either way; the collector only looks for cycles, and scanning
    every batch in flight each time was a third of the decoder's CPU. 0 leaves Python's
    defaults."""
    if threshold:
        gc.freeze()
        gc.set_threshold(threshold, 10, 10)


def run_loop(main: Coroutine[Any, Any, Outcome], kind: str) -> Outcome:
    """Runs ``main`` to completion on a new event loop of ``kind`` (``uvloop`` when it is
    installed, else the standard loop)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; the standard event loop runs the worker")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _child(settings: Settings, stop_when_idle: float | None, index: int,
           results: "multiprocessing.SimpleQueue[RunSummary]") -> None:
    configure_logging(settings.log_format, settings.log_level)
    try:
        outcome = run_worker(settings, stop_when_idle, index, sigint=False)
    except Exception as exc:
        sys.exit(report(exc, settings, f"fleet consume (worker {index})"))
    results.put(outcome.summary)
    sys.exit(outcome.status)


def run_workers(settings: Settings, workers: int, stop_when_idle: float | None) -> Outcome:
    """Runs ``workers`` worker processes until all have stopped: the worst exit status (a
    worker killed by a signal counts as 1; 130 after a Ctrl-C) and the sum of what they
    did. With one worker, runs it here."""
    if workers == 1:
        return run_worker(settings, stop_when_idle, 0)
    context = multiprocessing.get_context("spawn")
    results: "multiprocessing.SimpleQueue[RunSummary]" = context.SimpleQueue()
    children = [context.Process(target=_child, args=(settings, stop_when_idle, i, results),
                                name=f"fleet-worker-{i}")
                for i in range(workers)]
    interrupted = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = interrupted or signum == signal.SIGINT
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    # Started with SIGINT ignored, which they keep: a Ctrl-C at the terminal reaches the
    # whole process group, and a worker still starting would die of it mid-import.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for child in children:
            child.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    summary = RunSummary()
    while not results.empty():
        summary.add(results.get())
    status = max((child.exitcode or 0) if (child.exitcode or 0) >= 0 else 1 for child in children)
    return Outcome(EXIT_INTERRUPTED if interrupted else status, summary, interrupted)
