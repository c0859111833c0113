"""Where a replay's chunks are processed: in this process, or in worker processes.

Both executors take a chunk's payload and give back a future of its
:class:`~fleet_telemetry.replay.results.ChunkResult`; the run applies results in
source order. :func:`executor_for` picks one for a worker count.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fleet_telemetry.core.errors import FleetError, ServiceUnavailable
from fleet_telemetry.core.failures import explain
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.processors import ChunkProcessor, Plan, processor_for
from fleet_telemetry.replay.results import ChunkResult
from fleet_telemetry.replay.sources import Lines, Records


class Executor(Protocol):
    async def start(self) -> None:
        """Connects what the chunks need; raises :class:`ServiceUnavailable` if it does not answer."""
        ...

    def submit(self, payload: Lines | Records) -> asyncio.Future[ChunkResult]:
        """Starts processing a chunk; the future fails with :class:`FleetError` if it cannot be done."""
        ...

    async def close(self, force: bool = False) -> None:
        """Waits for the chunks submitted (``force``: abandons them) and releases everything."""
        ...


class LocalExecutor:
    """Processes chunks in this process, as many at once as the run keeps in flight
    (decoding one chunk while the previous one is being written)."""

    def __init__(self, processor: ChunkProcessor) -> None:
        self._processor = processor
        self._tasks: set[asyncio.Task[ChunkResult]] = set()

    async def start(self) -> None:
        await self._processor.start()

    def submit(self, payload: Lines | Records) -> asyncio.Future[ChunkResult]:
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
    explained: bool = False
    """``message`` is the operator's line for it (:func:`~fleet_telemetry.core.failures.explain`)."""


def _failed(exc: Exception, settings: Settings) -> _Failed:
    failure = explain(exc, settings)
    if failure is not None:
        return _Failed(type(exc).__name__, str(failure), isinstance(failure, ServiceUnavailable), explained=True)
    return _Failed(type(exc).__name__, str(exc)[:500], False)


def _worker_main(settings: Settings, plan: Plan, inbox: Any, outbox: Any) -> None:
    """A worker process: chunks from ``inbox``, results to ``outbox``, ``None`` ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from fleet_telemetry.core.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(_worker_loop(settings, plan, inbox, outbox))


async def _worker_loop(settings: Settings, plan: Plan, inbox: Any, outbox: Any) -> None:
    """Two chunks at a time: one is decoded while the other one's COPY is in flight."""
    processor = processor_for(settings, plan)
    try:
        await processor.start()
    except Exception as exc:
        outbox.put((-1, _failed(exc, settings)))
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
            outbox.put((seq, _failed(exc, settings)))
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

    def submit(self, payload: Lines | Records) -> asyncio.Future[ChunkResult]:
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
                             else FleetError(failure.message) if failure.explained
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


def executor_for(settings: Settings, plan: Plan, workers: int) -> Executor:
    """Worker processes for more than one worker, this process otherwise."""
    if workers > 1:
        return ProcessExecutor(settings, plan, workers)
    return LocalExecutor(processor_for(settings, plan))
