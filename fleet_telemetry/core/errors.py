"""Errors a command turns into an exit status and one line on stderr.

``UsageError`` means the caller asked for something wrong (exit 2); ``FleetError`` means
the work could not be done, usually because a service is unreachable (exit 1). Both
carry a message that is safe to print: no secrets, and where it helps, what to try.
"""

from __future__ import annotations


class FleetError(Exception):
    """The work failed; exit status 1."""

    exit_code = 1


class UsageError(FleetError):
    """Bad usage or bad input; exit status 2."""

    exit_code = 2


class ServiceUnavailable(FleetError):
    """A dependency (PostgreSQL, Redis, Kafka) did not answer at its configured address."""


# What to do when a dependency does not answer, by the setting that names its address.
_HINTS = {
    "PostgreSQL": "start it (fleet services up) or set FLEET_DATABASE_URL",
    "Redis": "start it (fleet services up) or set FLEET_REDIS_URL",
    "Kafka": "start it (fleet services up) or set FLEET_KAFKA_BOOTSTRAP",
    "Object storage": "start it (fleet services up) or set FLEET_S3_ENDPOINT and the FLEET_S3_* keys",
}


def unavailable(service: str, address: str, exc: BaseException, hint: str | None = None) -> ServiceUnavailable:
    """The one wording of "a dependency is not answering": service, masked address, error
    class (never its text, which may hold a secret) and what to do."""
    what_to_do = hint if hint is not None else _HINTS.get(service, "check that it is running")
    return ServiceUnavailable(f"{service} at {address} is not answering ({type(exc).__name__}); {what_to_do}")
