"""How the pipeline's steps are joined: each hands its output to a named next step.

A step is anything with ``async submit(item)``; a test drives one step with a fake next
step. :class:`InTask` runs its next step in a task of its own behind a bounded queue, so
one batch's later steps overlap the next batch's earlier ones and the steps before it see
when it is full (backpressure). :class:`Traced` binds an item's trace id to the log
context while its next step handles it. :class:`Retrier` is the retry policy of the steps that
write: transient failures are retried with backoff until they succeed or the work is
abandoned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import structlog
from prometheus_client import Counter

from fleet_telemetry.core.retry import Backoff, GaveUp, retry

log = structlog.get_logger("fleet.consumer")
T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Step(Protocol[T_contra]):
    """One step of a chain: takes an item and hands what it makes to its next step."""

    async def submit(self, item: T_contra) -> None:
        """Blocks until the item is handed on; raises what the step cannot handle."""


class Traced(Generic[T]):
    """Hands each item to its next step with the item's trace id bound to the log context
    (structlog contextvars, ``trace_id``), so every line logged meanwhile in this task,
    the libraries' too, carries it. Binds once per item."""

    def __init__(self, next_step: Step[T], trace_id: Callable[[T], str]) -> None:
        self.next_step = next_step
        self._trace_id = trace_id

    async def submit(self, item: T) -> None:
        with structlog.contextvars.bound_contextvars(trace_id=self._trace_id(item)):
            await self.next_step.submit(item)


class Abandoned(Exception):
    """The work was given up while a dependency was still failing; nothing of it was committed."""


class Retrier:
    """Runs an operation until it succeeds, retrying transient failures with backoff.

    Each retry is counted in ``retries`` (by dependency) and logged. Once ``give_up`` is
    set (by :meth:`abandon`, or by whoever shares the event), the operation still failing
    raises :class:`Abandoned`; any other failure is raised at once.
    """

    def __init__(self, retries: Counter, backoff: Callable[[], Backoff] = Backoff,
                 give_up: asyncio.Event | None = None) -> None:
        self._retries = retries
        self._backoff = backoff
        self._give_up = give_up if give_up is not None else asyncio.Event()

    def abandon(self) -> None:
        """Stop retrying: the operation under retry raises :class:`Abandoned`."""
        self._give_up.set()

    async def __call__(self, dependency: str, operation: Callable[[], Awaitable[T]]) -> T:
        def count(exc: BaseException, delay: float, attempt: int) -> None:
            self._retries.labels(dependency=dependency).inc()
            log.warning("retrying after a transient failure", dependency=dependency,
                        error=type(exc).__name__, detail=str(exc)[:200], retry_in_s=round(delay, 2),
                        attempt=attempt)

        try:
            return await retry(operation, what=dependency, backoff=self._backoff(), on_retry=count,
                               give_up=self._give_up)
        except GaveUp as exc:
            raise Abandoned(f"{dependency} still failing at shutdown: {type(exc.cause).__name__}") from exc.cause


class InTask(Generic[T]):
    """A step that runs its next step in a task of its own, one item at a time, in order.

    :meth:`submit` puts the item in a queue of ``maxsize`` and blocks only while it is
    full. :attr:`pending` (queued plus the one being handed on) is read off the queue and
    the task, never counted by hand. A failure of the next step ends the task; the
    owner sees it through :meth:`check`.
    """

    def __init__(self, next_step: Step[T], *, maxsize: int, name: str) -> None:
        self.next_step = next_step
        self.name = name
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=maxsize)
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        return self._queue.full()

    @property
    def pending(self) -> int:
        """Items submitted and not yet handed on by the next step."""
        return self._queue.qsize() + (1 if self._busy else 0)

    async def submit(self, item: T) -> None:
        await self._queue.put(item)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def join(self) -> None:
        """Blocks until every item submitted so far has been handed on."""
        await self._queue.join()

    def check(self) -> None:
        """Raises the failure that ended the task (a bug in a later step)."""
        task = self._task
        if task is not None and task.done():
            task.result()
            raise RuntimeError(f"the {self.name} task stopped")

    async def stop(self) -> None:
        """Cancels the task; items still queued are dropped (their offsets were never committed)."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            self._busy = True
            try:
                await self.next_step.submit(item)
            finally:
                self._busy = False
                self._queue.task_done()
