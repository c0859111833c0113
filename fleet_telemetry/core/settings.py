"""The one settings model, read once at start-up from ``FLEET_*`` variables and ``.env``.

Nothing else in the project reads ``os.environ``: commands build a :class:`Settings`
at the edge and pass it (or the parts they need) to constructors.

Secrets never show in the settings' text form (``repr``, ``str``), their dumps or their
validation errors: the URLs are :class:`SecretUrl` (the password in the user part or the
query string masked), the SASL password a ``SecretStr``. The code that connects reads
the fields as usual and gets the real values.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import AfterValidator, Field, PlainSerializer, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.redis_client import is_cluster_url
from fleet_telemetry.core.redis_keys import RedisKeys


_SECRET_PARAMETERS = ("password", "secret", "token")
"""A query parameter whose name holds one of these is a secret (``password``,
``sslpassword``, ...)."""


def mask_url(url: str) -> str:
    """``url`` with every password (in the user part, or a query parameter such as
    ``?password=``) replaced by ``***``, the rest as written; safe for logs and errors."""
    try:
        parts = urlsplit(str(url))
        if parts.password is not None:
            userinfo, _, host = parts.netloc.rpartition("@")
            parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
        if parts.query:
            parts = parts._replace(query="&".join(_mask_parameter(p) for p in parts.query.split("&")))
        return urlunsplit(parts)
    except ValueError:
        return "<unparseable url>"


def _mask_parameter(parameter: str) -> str:
    name, equals, _value = parameter.partition("=")
    key = unquote(name).lower()
    if equals and (any(word in key for word in _SECRET_PARAMETERS) or key in ("pass", "passwd", "pwd")):
        return f"{name}=***"
    return parameter


class SecretUrl(str):
    """A URL whose text form hides its passwords: ``repr()`` shows it masked
    (:func:`mask_url`); the string itself (``str()``, f-strings, what clients parse) is
    the URL, password included, for connecting."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_url(str(self)))


SecretUrlField = Annotated[str, AfterValidator(SecretUrl), PlainSerializer(mask_url, return_type=str)]
"""A settings field holding a URL that may carry a password: a :class:`SecretUrl`, dumped masked."""
_URL_FIELDS = frozenset({"database_url", "database_replica_urls", "redis_url"})


def _secret_urls(value: Any) -> Any:
    """``value`` (a URL or a tuple of them) as :class:`SecretUrl`, whatever put it there."""
    if isinstance(value, str):
        return SecretUrl(value)
    if isinstance(value, tuple):
        return tuple(_secret_urls(v) for v in value)
    return value


def _checked_url(value: str, schemes: tuple[str, ...], expected: str) -> str:
    """``value`` if it is a URL of one of ``schemes`` with a valid port; the error never shows a password."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"{mask_url(value)} is not a valid URL; expected {expected}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"{mask_url(value)} is not {expected}")
    return value


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
"""What ``FLEET_METRICS_ADDRESS`` may be when it is not an IP address: a host name."""


class Settings(BaseSettings):
    """Every knob of the pipeline. Frozen: read once, passed down."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_", env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # --- docs/interface.md ----------------------------------------------------
    database_url: SecretUrlField = SecretUrl("postgresql://postgres@127.0.0.1:5432/fleet")
    database_replica_urls: Annotated[tuple[SecretUrlField, ...], NoDecode] = ()
    redis_url: SecretUrlField = SecretUrl("redis://127.0.0.1:6379/0")
    redis_key_prefix: str = Field(default="", max_length=100)
    """Put before every Redis key the project writes or reads (``fleet-a:``), so deployments
    sharing one Redis keep apart; empty by default."""
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""
    """With a SASL protocol: the mechanism for the user name and password (empty: PLAIN)."""
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: str = ""
    telemetry_topic: str = "fleet.telemetry.v1"
    dlq_topic: str = "fleet.telemetry.dlq.v1"
    dlq_max_message_bytes: int = Field(default=1_000_000, ge=16_384, le=100_000_000)
    """The largest dead letter sent (record batch included); bigger ones are cut to fit,
    with headers giving the original size and SHA-256. At most the dead-letter topics'
    ``max.message.bytes``."""
    consumer_group: str = "fleet-telemetry"
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"
    """Where every ``/metrics`` endpoint listens: all interfaces by default (containers);
    ``127.0.0.1`` keeps them on this host."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """``auto``: readable console lines when stderr is a terminal, JSON lines otherwise."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- validation rules ----------------------------------------------------
    max_future_seconds: float = Field(default=300.0, ge=0)
    """A reading may be at most this far ahead of the consumer's clock."""
    raw_retention_days: int = Field(default=30, ge=1)
    """Raw readings older than this are dead-lettered as ``outside_retention``."""

    # --- consumer tuning -------------------------------------------------------
    gc_threshold: int = Field(default=20_000, ge=0)
    """Allocations between two collections of the workers' garbage collector (Python's
    default is 700); 0 keeps Python's defaults."""
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    """The workers' event loop: ``uvloop`` (libuv, cheaper per I/O event) or the standard
    ``asyncio`` loop; ``uvloop`` falls back to ``asyncio`` where it is not installed."""
    batch_max_readings: int = Field(default=5000, ge=1)
    batch_max_age_ms: int = Field(default=100, ge=1)
    max_batches_in_flight: int = Field(default=2, ge=1)
    status_ttl_seconds: int = Field(default=300, ge=1)
    vehicle_cache_seconds: float = Field(default=60.0, ge=0)
    dashboard_cache_seconds: int = Field(default=3600, ge=1)
    retry_initial_seconds: float = Field(default=0.2, gt=0)
    retry_max_seconds: float = Field(default=10.0, gt=0)
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0)
    health_stale_seconds: float = Field(default=30.0, gt=0)
    """A worker's ``/readyz`` fails when PostgreSQL or Kafka has not answered, or its
    consumer loop has not turned, for this long; ``/healthz`` when its event loop has not
    ticked for this long."""

    # --- fleet operations (small writers, commands, read replicas) -----------
    commands_topic: str = "fleet.commands.v1"
    """Command events for the small writers (docs/commands.md)."""
    commands_dlq_topic: str = "fleet.commands.dlq.v1"
    """Rejected commands, with their reason in the headers."""
    commands_group: str = "fleet-commands"
    replica_retry_seconds: float = Field(default=30.0, gt=0)
    """A read replica that failed to answer is skipped for this long."""

    # --- users, roles and authenticated commands (README, "Users and roles") ---
    actor: str = Field(default="", max_length=320)
    """Who a ``fleet`` write acts as (a user's e-mail or id) when ``--actor`` is not given."""
    jwt_secret: SecretStr = SecretStr("")
    """HS256 key that signs and verifies command tokens (at least 32 bytes)."""
    jwt_private_key: SecretStr = SecretStr("")
    """RS256 instead: the PEM private key (or a file holding it) that signs tokens."""
    jwt_public_key: str = ""
    """RS256: the PEM public key (or a file holding it) that verifies tokens."""
    jwt_issuer: str = Field(default="fleet-telemetry", min_length=1)
    jwt_audience: str = Field(default="fleet-commands", min_length=1)
    jwt_max_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    """The longest lifetime of a token; a revocation is kept this long."""
    commands_allow_unsigned: bool = False
    """Transitional: apply v1 commands without a token as their ``actor`` field's user."""

    # --- geofences and alert rules (schema/README.md, "Geofences and alerts") ---
    rules_enabled: bool = True
    """Evaluate geofences and alert rules in the consumer workers."""
    geofence_refresh_seconds: float = Field(default=2.0, gt=0)
    """How often a worker looks for added, changed or removed geofences."""
    geofence_dwell_seconds: float = Field(default=20.0, ge=0)
    """Minimum dwell: an enter or exit counts once the new side held this long (a
    geofence's own ``dwell_seconds`` overrides it)."""
    alert_timer_seconds: float = Field(default=10.0, gt=0)
    """How often the offline and maintenance-due checks run."""
    alert_overspeed_kmh: float = Field(default=120.0, gt=0)
    alert_overspeed_min_seconds: float = Field(default=20.0, ge=0)
    """Speed must stay above the limit this long before an overspeed alert."""
    alert_low_fuel_percent: float = Field(default=10.0, ge=0, le=100)
    alert_fuel_hysteresis_percent: float = Field(default=5.0, ge=0)
    """Low fuel resolves at the threshold plus this; a rise of this much is a refuel."""
    alert_fuel_drop_percent: float = Field(default=8.0, gt=0)
    """A fall of this many points while stationary is a sudden fuel drop (theft)..."""
    alert_fuel_drop_seconds: float = Field(default=900.0, gt=0)
    """...within this long."""
    alert_stationary_kmh: float = Field(default=3.0, ge=0)
    alert_overheat_c: float = Field(default=105.0)
    alert_overheat_hysteresis_c: float = Field(default=5.0, ge=0)
    alert_offline_seconds: float = Field(default=900.0, ge=0)
    """No reading for this long raises ``offline``; 0 turns the check off."""
    alert_max_gps_speed_kmh: float = Field(default=300.0, gt=0)
    """A move implying more than this speed is an implausible GPS jump."""

    # --- driver behaviour (README, "Driver behaviour") -------------------------
    behaviour_harsh_braking_mps2: float = Field(default=3.5, gt=0)
    """A deceleration of at least this many m/s² between two readings is harsh braking."""
    behaviour_harsh_acceleration_mps2: float = Field(default=3.0, gt=0)
    """An acceleration of at least this many m/s² between two readings is harsh acceleration."""
    behaviour_max_gap_seconds: float = Field(default=5.0, gt=0)
    """Readings further apart than this are never compared for harsh braking or acceleration."""
    behaviour_penalty_harsh_braking: float = Field(default=5.0, ge=0)
    """Penalty points of one harsh braking episode in the driver scores."""
    behaviour_penalty_harsh_acceleration: float = Field(default=3.0, ge=0)
    """Penalty points of one harsh acceleration episode."""
    behaviour_penalty_overspeed: float = Field(default=5.0, ge=0)
    """Penalty points of one overspeed episode (global limit or a geofence's)."""
    # --- outbound events and webhooks (docs/interface.md, "Outbound events") -------
    events_topic: str = "fleet.events.v1"
    """Alerts raised and resolved, geofences entered and exited, trips and stops started
    and ended, keyed by vehicle id."""
    events_topic_partitions: int = Field(default=8, ge=1)
    """Partitions the events topic is created with when a worker finds it missing."""
    events_publish_batch: int = Field(default=500, ge=1)
    """Outbox rows published per round trip (a round waits for the broker's acks)."""
    events_drain_seconds: float = Field(default=5.0, gt=0)
    """How often a worker publishes outbox rows left by others (command-line writers, a
    worker that died after its commit) and updates the backlog gauge."""
    events_retention_days: int = Field(default=90, ge=0)
    """Published events older than this leave the ``fleet_events`` outbox at the next
    ``fleet maintain`` pass (``0`` keeps them); unpublished ones always stay."""
    notify_group: str = "fleet-notify"
    """The consumer group of ``fleet notify`` (one per receiving endpoint)."""
    notify_dlq_topic: str = "fleet.events.notify.dlq.v1"
    """Events ``fleet notify`` gave up delivering, with the reason in the headers."""
    notify_max_attempts: int = Field(default=8, ge=1)
    """Delivery attempts of one event before it is dead-lettered."""
    notify_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest one webhook request may take; a timeout is a failed attempt."""
    notify_remember_seconds: int = Field(default=7 * 86_400, ge=60)
    """How long ``fleet notify`` remembers a delivered event id to drop repeats (Redis)."""
    notify_metrics_port: int = Field(default=9120, ge=0, le=65535)
    """``fleet notify`` serves its metrics here; ``0`` turns it off."""
    # --- trips, stops and idling (schema/README.md, "Trips and stops") ---------
    trips_enabled: bool = True
    """Detect trips, stops and idling, and keep the odometer and engine hours, in the workers."""
    trips_moving_kmh: float = Field(default=5.0, ge=0)
    """At or above this speed a vehicle is moving; below it, halted."""
    trips_min_duration_seconds: float = Field(default=300.0, ge=0)
    """A movement shorter than this and than ``trips_min_distance_km`` is not a trip."""
    trips_min_distance_km: float = Field(default=0.5, ge=0)
    trips_min_stop_seconds: float = Field(default=300.0, ge=0)
    """Halted this long ends the trip (at the halt) and starts a stop."""
    trips_gap_seconds: float = Field(default=3600.0, gt=0)
    """No reading for this long ends the trip at the last reading before the gap."""
    trips_use_ignition: bool = False
    """Trips run while the ignition is on (readings without ignition fall back to speed)."""
    trips_idle_min_seconds: float = Field(default=180.0, ge=0)
    """Ignition on and halted this long raises ``idling``."""

    # --- time-series lifecycle (schema/README.md, "Lifecycle") -----------------
    hourly_retention_days: int = Field(default=365, ge=1)
    """Hourly rollups older than this are removed (whole UTC days); at least the raw retention."""
    daily_retention_days: int = Field(default=0, ge=0)
    """Daily rollups older than this are removed; 0 keeps them forever."""
    partitions_ahead_days: int = Field(default=7, ge=1)
    """``fleet maintain`` keeps daily telemetry partitions this many days ahead."""
    audit_partitions_ahead_months: int = Field(default=2, ge=1)
    """...and monthly audit-log partitions this many months ahead."""
    stats_refresh_hour: int = Field(default=3, ge=0, le=23)
    """UTC hour of the nightly refresh of ``monthly_vehicle_stats`` and ``monthly_vehicle_revenue``
    (the first pass after it)."""
    maintain_lock_timeout_seconds: float = Field(default=0.5, gt=0)
    """Longest a maintenance step waits in a lock queue that also holds up ingestion; it retries later."""
    maintain_metrics_port: int = Field(default=9119, ge=0, le=65535)
    """``fleet maintain --every`` serves its metrics here; ``0`` turns it off."""

    # --- documents in S3-compatible object storage (README, "Documents") -------
    s3_endpoint: str = "http://127.0.0.1:8333"
    """The S3 API's URL (SeaweedFS, MinIO, AWS S3...); ``fleet services up`` starts
    SeaweedFS here when nothing answers on loopback."""
    s3_bucket: str = Field(default="fleet-documents", min_length=3, max_length=63,
                           pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr = SecretStr("fleet-local")
    s3_secret_key: SecretStr = SecretStr("fleet-local-secret")
    """The local stack's keys by default; set both for any other storage."""
    document_url_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    """How long a presigned URL (``fleet documents url``) stays valid."""
    document_orphan_grace_hours: float = Field(default=24.0, gt=0)
    """``fleet maintain`` removes objects no document refers to, and aborts multipart
    uploads, once they are this old (an upload in progress or a presigned PUT awaiting
    ``document.attach`` is younger). Keep it well above ``FLEET_DOCUMENT_URL_SECONDS``."""
    document_deleted_grace_days: float = Field(default=30.0, ge=0)
    """``fleet maintain`` removes the object of a deleted document this long after the delete."""
    document_expiry_days: int = Field(default=30, ge=0)
    """A licence, registration or insurance expiring within this many days raises
    ``document_expiring`` for its owner."""

    # --- local stack ---------------------------------------------------------
    stack_dir: str = ".local"
    """Project-local folder for the local broker's data and logs (git-ignored)."""

    @field_validator("s3_endpoint")
    @classmethod
    def _check_s3_endpoint(cls, value: str) -> str:
        value = _checked_url(value, ("http", "https"), "an http:// or https:// URL")
        if urlsplit(value).password is not None or "@" in urlsplit(value).netloc:
            raise ValueError("put the S3 keys in FLEET_S3_ACCESS_KEY and FLEET_S3_SECRET_KEY, not in the URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return _checked_url(value, ("postgresql", "postgres"), "a postgresql:// URL")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        value = _checked_url(value, ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"),
                             "a redis:// URL (redis+cluster:// for a Redis Cluster)")
        if is_cluster_url(value) and urlsplit(value).path.strip("/") not in ("", "0"):
            raise ValueError(f"{mask_url(value)}: a Redis Cluster has only database 0")
        return value

    @field_validator("redis_key_prefix")
    @classmethod
    def _check_redis_key_prefix(cls, value: str) -> str:
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"{value!r} has a space or a control character; use letters, digits and ':-_.'")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _check_metrics_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOST_NAME.fullmatch(value):
                raise ValueError(f"{value!r} is not an IP address or host name") from None
        return value

    @field_validator("database_replica_urls")
    @classmethod
    def _check_replica_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_checked_url(url, ("postgresql", "postgres"), "postgresql:// URLs") for url in value)

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _split_replicas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # A copy made with ``model_copy(update=...)`` holds whatever it was given: mask that too.
        for name, value in super().__repr_args__():
            yield name, _secret_urls(value) if name in _URL_FIELDS else value

    @property
    def database_url_masked(self) -> str:
        return mask_url(self.database_url)

    @property
    def redis_url_masked(self) -> str:
        return mask_url(self.redis_url)

    @property
    def redis_keys(self) -> RedisKeys:
        """The Redis key names of this deployment (``FLEET_REDIS_KEY_PREFIX``; hash-tagged
        where keys go together when ``FLEET_REDIS_URL`` is a Redis Cluster)."""
        return RedisKeys(self.redis_key_prefix, hash_tags=is_cluster_url(self.redis_url))

    def kafka_client_options(self) -> dict[str, object]:
        """Connection options shared by every aiokafka client of the project."""
        options: dict[str, object] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            options["sasl_mechanism"] = self.kafka_sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            from aiokafka.helpers import create_ssl_context

            try:
                options["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile or None)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"invalid configuration FLEET_KAFKA_SSL_CAFILE: cannot load {self.kafka_ssl_cafile}"
                                 f" ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        return options
