"""What to do with a failure: retry it with backoff, or let it crash.

Transient trouble (a connection lost, a server restarting, a serialization failure, a
broker that is not answering) is retried; everything else is a bug or bad input and
is raised. Classification is by exception class (asyncpg's SQLSTATE classes,
aiokafka's ``retriable``), never by message text.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import redis.exceptions
from aiokafka.errors import KafkaError

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10.0
"""How long a first connection may take before the service counts as not answering."""

_TRANSIENT_POSTGRES = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08: connection exceptions
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization failure, deadlock
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same operation later may well succeed."""
    if isinstance(exc, _TRANSIENT_POSTGRES):
        return True
    # A plain InterfaceError is asyncpg saying the connection is closed; its
    # subclasses (DataError, ...) are bad input and must not be retried.
    if type(exc) is asyncpg.exceptions.InterfaceError:
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False)) or type(exc).__name__ == "KafkaConnectionError"
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return True
    if type(exc).__module__.startswith("botocore"):  # the S3 client's own classes
        from fleet_telemetry.core.s3_client import is_s3_transient

        return is_s3_transient(exc)
    return isinstance(exc, (OSError, asyncio.TimeoutError, ConnectionError))


@dataclass
class Backoff:
    """Exponential backoff with full jitter: ``initial * 2**n``, capped at ``maximum``."""

    initial: float = 0.2
    maximum: float = 10.0
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)


class GaveUp(Exception):
    """Retrying stopped because ``give_up`` was set while the operation still failed.

    ``cause`` (also ``__cause__``) is the last transient failure.
    """

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what} still failing when asked to stop ({type(cause).__name__})")
        self.what = what
        self.cause = cause


OnRetry = Callable[[BaseException, float, int], None]
"""Called before each wait with the failure, the delay in seconds and the attempt number."""


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff | None = None,
    on_retry: OnRetry | None = None,
    give_up: asyncio.Event | None = None,
) -> T:
    """Runs ``operation`` until it returns; the one retry loop of the project.

    A transient failure (:func:`is_transient`) is retried after ``backoff``'s next
    delay; any other exception is raised at once. When ``give_up`` is set (before an
    attempt fails or during a wait), the last transient failure is raised as
    :class:`GaveUp`. Blocks for as long as the failures last.
    """
    backoff = backoff if backoff is not None else Backoff()
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if give_up is not None and give_up.is_set():
                raise GaveUp(what, exc) from exc
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(exc, delay, backoff.attempts)
            if give_up is None:
                await asyncio.sleep(delay)
                continue
            try:
                await asyncio.wait_for(give_up.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
