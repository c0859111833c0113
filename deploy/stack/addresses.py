"""The four services of the local stack: their names, where the settings put them, and
how their error text is cut to one line. Pure functions, no I/O."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from urllib.parse import urlsplit

from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.settings import Settings, mask_url

POSTGRESQL = "postgresql"
REDIS = "redis"
BROKER = "broker"
STORAGE = "storage"
LABELS = {POSTGRESQL: "PostgreSQL", REDIS: "Redis", BROKER: "Kafka broker", STORAGE: "Object storage"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Target:
    """One service as the settings name it: ``address`` is what reports show (no
    password), ``endpoint`` its (first) host and port, ``setting`` the variable that
    sets it."""

    service: str
    address: str
    endpoint: Endpoint
    setting: str

    @property
    def label(self) -> str:
        return LABELS[self.service]

    @property
    def is_local(self) -> bool:
        return is_loopback(self.endpoint.host)


def postgres_target(settings: Settings) -> Target:
    url = settings.database_url
    return Target(POSTGRESQL, mask_url(url), url_endpoint(url, 5432), "FLEET_DATABASE_URL")


def redis_target(settings: Settings) -> Target:
    url = settings.redis_url
    return Target(REDIS, mask_url(url), url_endpoint(url, 6379), "FLEET_REDIS_URL")


def broker_target(settings: Settings) -> Target:
    """The broker at the first bootstrap address. Raises :class:`ServiceUnavailable`
    when the bootstrap list is empty."""
    endpoints = bootstrap_endpoints(settings.kafka_bootstrap)
    if not endpoints:
        raise ServiceUnavailable(f"{LABELS[BROKER]}: FLEET_KAFKA_BOOTSTRAP is empty; set it to host:port")
    return Target(BROKER, settings.kafka_bootstrap, endpoints[0], "FLEET_KAFKA_BOOTSTRAP")


def storage_target(settings: Settings) -> Target:
    url = settings.s3_endpoint
    default_port = 443 if url.startswith("https") else 80
    return Target(STORAGE, url, url_endpoint(url, default_port), "FLEET_S3_ENDPOINT")


def url_endpoint(url: str, default_port: int) -> Endpoint:
    """Host and port of a service URL such as ``postgresql://user@host:5432/db``."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return Endpoint(parts.hostname or "127.0.0.1", port or default_port)


def bootstrap_endpoints(bootstrap: str) -> list[Endpoint]:
    """The ``host:port`` entries of a comma-separated Kafka bootstrap list."""
    endpoints = []
    for entry in bootstrap.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "://" not in entry:
            entry = f"kafka://{entry}"
        endpoints.append(url_endpoint(entry, 9092))
    return endpoints


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(host: str) -> str:
    """The address a local server listens on for ``host`` (``localhost`` -> 127.0.0.1)."""
    return "127.0.0.1" if host.lower().startswith("localhost") else host


def scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url``, should an error message repeat it."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def first_line(text: str, limit: int = 200) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters."""
    return _clip(_lines(text)[:1], limit)


def last_line(text: str, limit: int = 200) -> str:
    """The last non-blank line of ``text`` (a tool's final word), cut to ``limit``."""
    return _clip(_lines(text)[-1:], limit)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TROUBLE = re.compile(r"error|\berr\b|panicked|fatal", re.IGNORECASE)


def telling_line(text: str, limit: int = 200) -> str:
    """Of a service's log, the last line naming an error (colours removed), else its
    last line: what to quote when the service did not come up."""
    lines = _lines(_ANSI_ESCAPE.sub("", text))
    trouble = [line for line in lines if _TROUBLE.search(line)]
    return _clip((trouble or lines)[-1:], limit)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _clip(lines: list[str], limit: int) -> str:
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
