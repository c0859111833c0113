"""What an exception that reached the top of a command means to an operator.

The command line (and each worker process of ``fleet consume --workers N``) hands any
exception nobody handled to :func:`explain`, which sorts it by class (asyncpg's SQLSTATE
classes, aiokafka's and redis-py's exception classes, never the message text) into a
:class:`~fleet_telemetry.core.errors.FleetError` with one line that says what is wrong
and what to do: ``database "fleet" does not exist``, ``... is not migrated: run fleet
migrate``, ``Kafka at ... is not answering``. Addresses are shown masked; the text of a
library's exception is shown only where it is the server's own sentence about a name
(a database, a relation, a user), never a URL or a password.

An exception it does not know is a bug: :func:`explain` returns ``None`` and the caller
says so in one line, with the traceback in the log at debug level.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from types import TracebackType

import asyncpg
import redis.exceptions
import structlog
from aiokafka import errors as kafka_errors

from fleet_telemetry.core.errors import FleetError, UsageError, unavailable
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.core.settings import Settings

_PG = asyncpg.exceptions
_NOT_MIGRATED = (_PG.UndefinedTableError, _PG.UndefinedColumnError, _PG.UndefinedFunctionError,
                 _PG.UndefinedObjectError, _PG.InvalidSchemaNameError)
"""The schema is missing or older than the code: a relation, column, function, type or
schema it needs does not exist."""

_KAFKA_LOGIN = (kafka_errors.SaslAuthenticationFailed, kafka_errors.AuthenticationFailedError,
                kafka_errors.UnsupportedSaslMechanismError, kafka_errors.AuthenticationMethodNotSupported)
_KAFKA_REFUSED = (kafka_errors.TopicAuthorizationFailedError, kafka_errors.GroupAuthorizationFailedError,
                  kafka_errors.ClusterAuthorizationFailedError)

_UNSENDABLE = asyncpg.exceptions._base.DataError
"""A Python value asyncpg cannot send as its parameter's type (an integer out of range):
not exported under its name, which the SQLSTATE class 22 ``DataError`` takes."""

# Which library a frame belongs to, for failures every library raises alike (OSError, timeouts).
_LIBRARIES = (("asyncpg", "PostgreSQL"), ("aiokafka", "Kafka"), ("redis", "Redis"))


def explain(exc: BaseException, settings: Settings | None) -> FleetError | None:
    """``exc`` as a :class:`FleetError` with one printable line, or ``None`` when it is
    not a failure an operator can cause or meet (a bug)."""
    if isinstance(exc, FleetError):
        return exc
    database = settings.database_url_masked if settings is not None else "FLEET_DATABASE_URL"
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return _postgres(exc, database)
    if isinstance(exc, kafka_errors.KafkaError):
        return _kafka(exc, settings.kafka_bootstrap if settings is not None else "FLEET_KAFKA_BOOTSTRAP")
    if isinstance(exc, redis.exceptions.RedisError):
        return _redis(exc, settings.redis_url_masked if settings is not None else "FLEET_REDIS_URL")
    if type(exc).__module__.startswith("botocore"):  # the S3 client of the documents
        return _storage(exc, settings.s3_endpoint if settings is not None else "FLEET_S3_ENDPOINT")
    if isinstance(exc, OSError) and exc.filename is not None:
        return FleetError(f"cannot use {exc.filename}: {exc.strerror or type(exc).__name__}")
    if isinstance(exc, (OSError, asyncio.TimeoutError, ssl.SSLError)):
        service = _service_of(exc.__traceback__)
        if service == "PostgreSQL":
            return unavailable(service, database, exc)
        if service == "Kafka" and settings is not None:
            return unavailable(service, settings.kafka_bootstrap, exc)
        if service == "Redis" and settings is not None:
            return unavailable(service, settings.redis_url_masked, exc)
    return None


def _storage(exc: BaseException, endpoint: str) -> FleetError | None:
    from fleet_telemetry.core.s3_client import error_code, is_s3_transient

    if is_s3_transient(exc):
        return unavailable("Object storage", endpoint, exc)
    code = error_code(exc)
    if code:
        return FleetError(f"object storage at {endpoint} refused the request ({code}); check FLEET_S3_BUCKET"
                          " and the FLEET_S3_* keys")
    return None


def report(exc: BaseException, settings: Settings | None, prefix: str) -> int:
    """Writes ``prefix: what went wrong`` to stderr as one line; returns the exit status.

    An exception :func:`explain` does not know is reported as a bug, its traceback
    logged at debug level (``FLEET_LOG_LEVEL=debug``) once logging is configured.
    """
    failure = explain(exc, settings)
    if failure is None:
        if settings is not None:
            structlog.get_logger("fleet").debug("unexpected failure", exc_info=exc)
        failure = FleetError(f"unexpected {type(exc).__name__}, a bug: FLEET_LOG_LEVEL=debug logs where it happened")
    sys.stderr.write(f"{prefix}: {failure}\n")
    return failure.exit_code


def _sentence(exc: BaseException) -> str:
    """The first line of a server's message, or the class name when there is none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _postgres(exc: BaseException, database: str) -> FleetError:
    if isinstance(exc, _PG.InvalidCatalogNameError):
        return FleetError(f"{_sentence(exc)} (FLEET_DATABASE_URL {database}): create it or run fleet migrate")
    if isinstance(exc, _NOT_MIGRATED):
        return FleetError(f"the database at {database} is not migrated ({_sentence(exc)}): run fleet migrate")
    if isinstance(exc, _PG.InvalidAuthorizationSpecificationError):
        # The server's sentence names the user, never the password.
        return FleetError(f"PostgreSQL at {database} refused the login ({_sentence(exc)}):"
                          " check the user and password in FLEET_DATABASE_URL")
    if isinstance(exc, _PG.InsufficientPrivilegeError):
        return FleetError(f"PostgreSQL at {database} refused ({_sentence(exc)}):"
                          " the user of FLEET_DATABASE_URL lacks a privilege")
    if isinstance(exc, _PG.ReadOnlySQLTransactionError):
        return FleetError(f"PostgreSQL at {database} is read-only: FLEET_DATABASE_URL must name the primary")
    if isinstance(exc, (_PG.DataError, _PG.IntegrityConstraintViolationError, _UNSENDABLE)):
        # SQLSTATE classes 22 and 23, or a value asyncpg cannot send: input that broke a rule.
        return UsageError(f"refused by PostgreSQL: {_sentence(exc)}")
    if isinstance(exc, _PG.ClientConfigurationError):
        return UsageError(f"invalid configuration FLEET_DATABASE_URL ({type(exc).__name__})")
    if is_transient(exc):
        return unavailable("PostgreSQL", database, exc)
    sqlstate = getattr(exc, "sqlstate", None)
    return FleetError(f"PostgreSQL at {database} refused: {_sentence(exc)}"
                      + (f" (SQLSTATE {sqlstate})" if sqlstate else ""))


def _kafka(exc: kafka_errors.KafkaError, bootstrap: str) -> FleetError:
    if isinstance(exc, _KAFKA_LOGIN):
        return FleetError(f"Kafka at {bootstrap} refused the login ({type(exc).__name__}): check"
                          " FLEET_KAFKA_SECURITY_PROTOCOL, FLEET_KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD")
    if isinstance(exc, _KAFKA_REFUSED):
        return FleetError(f"Kafka at {bootstrap} refused access ({type(exc).__name__}): the user needs"
                          " rights on the topic and group")
    if is_transient(exc):
        return unavailable("Kafka", bootstrap, exc)
    return FleetError(f"Kafka at {bootstrap} refused ({type(exc).__name__})")


def _redis(exc: redis.exceptions.RedisError, address: str) -> FleetError:
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
        return FleetError(f"Redis at {address} refused the login: check the password in FLEET_REDIS_URL")
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return unavailable("Redis", address, exc)
    if isinstance(exc, redis.exceptions.ResponseError):
        # The server's own sentence ("ERR DB index is out of range"); it never echoes a password.
        return FleetError(f"Redis at {address} refused: {_sentence(exc)}")
    return FleetError(f"Redis at {address} refused ({type(exc).__name__})")


def _service_of(tb: TracebackType | None) -> str | None:
    """The service whose client library raised (the innermost of its frames), if any."""
    found = None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        for prefix, service in _LIBRARIES:
            if module == prefix or module.startswith(prefix + "."):
                found = service
        tb = tb.tb_next
    return found

