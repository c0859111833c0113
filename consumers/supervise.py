"""Running telemetry workers: one in this process, or N worker processes side by side.

Each worker is a :class:`~fleet_telemetry.consumers.worker.Worker` with SIGTERM and
SIGINT wired to its clean stop and its metrics on ``FLEET_METRICS_PORT + index``. With
more than one, this process starts them (spawned, so no event loop or connection is
inherited), forwards SIGTERM and SIGINT to them and waits for all.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.metrics import serve
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.consumer")


def run_worker(settings: Settings, stop_when_idle: float | None, index: int) -> int:
    """Runs worker ``index`` in this process until it stops; returns its exit status."""
    async def main() -> int:
        worker = Worker(settings, stop_when_idle=stop_when_idle, worker_index=index)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if settings.metrics_port:
            serve(worker.metrics, settings.metrics_port + index, settings.metrics_address)
            log.info("metrics served", address=settings.metrics_address, port=settings.metrics_port + index,
                     path="/metrics")
        return await worker.run()

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


def run_loop(main: Coroutine[Any, Any, int], kind: str) -> int:
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


def _child(settings: Settings, stop_when_idle: float | None, index: int) -> None:
    configure_logging(settings.log_format, settings.log_level)
    try:
        code = run_worker(settings, stop_when_idle, index)
    except FleetError as exc:
        sys.stderr.write(f"fleet consume (worker {index}): {exc}\n")
        code = exc.exit_code
    sys.exit(code)


def run_workers(settings: Settings, workers: int, stop_when_idle: float | None) -> int:
    """Runs ``workers`` worker processes until all have stopped; returns the worst exit
    status (a worker killed by a signal counts as 1). With one worker, runs it here."""
    if workers == 1:
        return run_worker(settings, stop_when_idle, 0)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child, args=(settings, stop_when_idle, i), name=f"fleet-worker-{i}")
                for i in range(workers)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max((child.exitcode or 0) if (child.exitcode or 0) >= 0 else 1 for child in children)
