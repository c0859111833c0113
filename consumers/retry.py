"""What to do with a failure: retry it with backoff, or let it crash.

Transient trouble (a connection lost, a server restarting, a serialization failure, a
broker that is not answering) is retried; everything else is a bug or bad input and
is raised. Classification is by exception class (asyncpg's SQLSTATE classes,
aiokafka's ``retriable``), never by message text.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import asyncpg
import redis.exceptions
from aiokafka.errors import KafkaError

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
