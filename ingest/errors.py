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
