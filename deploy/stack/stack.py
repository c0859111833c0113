"""``fleet services up`` and ``down``: start what does not answer, stop what ``up`` started.

``up`` uses every service that already answers as it is and starts only the missing
ones on loopback, installing them first when needed; it then waits until each answers.
``down`` reads the state file and stops exactly what ``up`` recorded there.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fleet_telemetry.core.errors import ServiceUnavailable, unavailable
from fleet_telemetry.core.settings import Settings, mask_url
from fleet_telemetry.deploy.stack.access import SocketSuperuser, own_role_login, own_role_may_help
from fleet_telemetry.deploy.stack.addresses import (
    BROKER,
    LABELS,
    POSTGRESQL,
    REDIS,
    STORAGE,
    Target,
    broker_target,
    last_line,
    postgres_target,
    redis_target,
    storage_target,
    telling_line,
)
from fleet_telemetry.deploy.stack.install import (
    Machine,
    install_postgres,
    install_redis_server,
    pick_cluster,
    postgis_package,
    postgres_clusters,
    postgres_major,
    tansu_binary,
    weed_binary,
)
from fleet_telemetry.deploy.stack.probe import (
    PostgresProbe,
    Probe,
    StorageProbe,
    create_bucket,
    probe_broker,
    probe_postgres,
    probe_redis,
    probe_storage,
    wait_until,
)
from fleet_telemetry.deploy.stack.processes import (
    REDIS_SERVER,
    TANSU,
    WEED,
    WEED_PORTS,
    cluster_command,
    free_ports,
    process_alive,
    redis_command,
    spawn_detached,
    stop_pid_file,
    stop_process,
    s3_identities,
    tansu_command,
    weed_command,
)
from fleet_telemetry.deploy.stack.reports import (
    TANSU_MEMORY_NOTE,
    answers_at,
    not_answering_at,
    print_reports,
    say,
    using_as_is,
    waiting_for,
)
from fleet_telemetry.deploy.stack.state import Stack
from fleet_telemetry.deploy.stack.status import check, collect
from fleet_telemetry.schema.migrate import create_database, database_name

P = TypeVar("P", bound=Probe)


async def up(settings: Settings, timeout: float) -> int:
    """Makes PostgreSQL with PostGIS, Redis, a broker and an S3 storage with the bucket
    answer at the configured addresses, waiting up to ``timeout`` seconds for each one it starts, then prints the
    status table. Returns 0; raises :class:`ServiceUnavailable` with one line when a
    service cannot be made usable. What it started is recorded for ``down``."""
    stack = Stack(settings.stack_dir)
    machine = Machine()
    database_url = await ensure_postgres(settings, stack, machine, timeout)
    if database_url != settings.database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    await ensure_redis(settings, stack, machine, timeout)
    await ensure_broker(settings, stack, machine, timeout)
    await ensure_storage(settings, stack, machine, timeout)
    reports = await collect(settings, stack)
    print_reports(reports, as_json=False)
    check(reports)
    return 0


# --- the four services --------------------------------------------------------------


async def ensure_postgres(
    settings: Settings, stack: Stack, machine: Machine, timeout: float, *, socket_dir: str | None = None
) -> str:
    """PostgreSQL answering with PostGIS available and the database created; returns
    the URL that logs in: the configured one, or the project's own role's when the
    configured login without a password is refused on this machine (see
    :mod:`~fleet_telemetry.deploy.stack.access`; ``socket_dir`` is where the server's
    Unix socket is, psql's default when None)."""
    url = settings.database_url
    target = postgres_target(settings)
    probe = await probe_postgres(url)
    if not probe.answers:
        probe = await _start_postgres(url, target, stack, machine, timeout, probe)
    if probe.error and own_role_may_help(url, target, probe):
        superuser = SocketSuperuser(machine, target, socket_dir)
        url = await own_role_login(url, target, stack, superuser, probe.error)
        target = dataclasses.replace(target, address=mask_url(url))
        probe = await probe_postgres(url)
    if probe.error:
        raise ServiceUnavailable(
            f"{target.label} at {target.address} answers but {probe.error}; fix "
            "FLEET_DATABASE_URL (user, password) or the server's pg_hba.conf"
        )
    if probe.postgis is None:
        probe = await _install_postgis(url, target, machine, probe)
    if not probe.database_exists:
        await create_database(url)
        say(f"created database {database_name(url)!r}")
    say(answers_at(target.label, target.address) + f", PostGIS {probe.postgis} available")
    return url


async def _start_postgres(
    url: str, target: Target, stack: Stack, machine: Machine, timeout: float, probe: PostgresProbe
) -> PostgresProbe:
    """Installs PostgreSQL if there is no cluster, starts (or reloads) the cluster
    serving the port and waits until it answers."""
    if not target.is_local:
        raise _elsewhere(target, probe)
    say(not_answering_at(target.label, target.address) + "; starting it")
    installed_now = install_postgres(machine, target)
    version = pick_cluster(postgres_clusters(), target.endpoint.port)
    if version is None:
        raise ServiceUnavailable(
            f"{target.label} at {target.address}: no cluster found under /etc/postgresql; create "
            "one with 'pg_createcluster <version> main', then run 'fleet services up' again"
        )
    action = _start_cluster(machine, target, version)
    if action == "start" or installed_now:
        stack.record(POSTGRESQL, {"version": version, "cluster": "main"})
    probe = await _wait_for(target, lambda: probe_postgres(url), timeout)
    if not probe.answers:
        raise _silent(
            target, probe, f"cluster {version}/main", timeout,
            f"check its port in /etc/postgresql/{version}/main/postgresql.conf and /var/log/postgresql/",
        )
    return probe


def _start_cluster(machine: Machine, target: Target, version: str) -> str:
    """Starts the ``main`` cluster of ``version``, or reloads it if it runs; returns
    which of the two it did."""
    running = machine.run(machine.as_root(cluster_command(version, "main", "status"), target))
    action = "reload" if running.returncode == 0 else "start"
    result = machine.run(machine.as_root(cluster_command(version, "main", action), target))
    if result.returncode != 0:
        raise ServiceUnavailable(
            f"{target.label} at {target.address}: 'pg_ctlcluster {version} main {action}' failed "
            f"({last_line(result.stdout)}); see /var/log/postgresql/"
        )
    return action


async def _install_postgis(url: str, target: Target, machine: Machine, probe: PostgresProbe) -> PostgresProbe:
    package = postgis_package(postgres_major(probe.server_version_num or 0))
    if not target.is_local:
        raise ServiceUnavailable(
            f"{target.label} at {target.address} has no PostGIS; install {package} on that server"
        )
    say(f"{target.label} at {target.address} answers but PostGIS is missing")
    machine.apt_install([package], target)
    probe = await probe_postgres(url)
    if probe.postgis is None:
        raise ServiceUnavailable(
            f"{target.label} at {target.address}: {package} was installed but the server still "
            "lists no postgis extension; is it the server apt-get installs into?"
        )
    return probe


async def ensure_redis(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    """Redis answering PING; starts a persistence-free redis-server if none does."""
    url = settings.redis_url
    target = redis_target(settings)
    probe = await probe_redis(url)
    if probe.answers:
        if probe.error:
            raise ServiceUnavailable(
                f"{target.label} at {target.address} answers but {probe.error}; fix FLEET_REDIS_URL"
            )
        say(using_as_is(target.label, target.address))
        return
    if not target.is_local:
        raise _elsewhere(target, probe)
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        binary = install_redis_server(machine, target)
        probe = await probe_redis(url)  # the package may have started one itself
        if probe.answers and not probe.error:
            say(answers_at(target.label, target.address, "started by its package"))
            return
    stack.redis_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting redis-server at {target.endpoint}")
    result = machine.run(redis_command(binary, target.endpoint, stack.redis_dir))
    if result.returncode != 0:
        raise ServiceUnavailable(
            f"{target.label} at {target.address}: redis-server did not start "
            f"({last_line(result.stdout)}); see {stack.redis_log}"
        )
    stack.record(REDIS, {"pid_file": str(stack.redis_pid_file), "port": target.endpoint.port})
    probe = await _wait_for(target, lambda: probe_redis(url), timeout)
    if not probe.answers:
        raise _silent(target, probe, "redis-server", timeout, f"see {stack.redis_log}")
    say(answers_at(target.label, target.address))


async def ensure_broker(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    """A broker answering a metadata request; runs Tansu (memory only) if none does."""
    target = broker_target(settings)
    probe = await probe_broker(settings)
    if probe.answers:
        say(using_as_is(target.label, target.address))
        return
    if not target.is_local or settings.kafka_security_protocol != "PLAINTEXT":
        raise _elsewhere(target, probe, kind="a plaintext broker ")
    stale = stack.broker_pid()
    if stale is not None:
        say(f"the Tansu broker started earlier (pid {stale}) does not answer; restarting it")
        await stop_process(stale, TANSU)
    binary = tansu_binary(machine)
    stack.tansu_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting Tansu at {target.endpoint}; log in {stack.tansu_log}")
    pid = spawn_detached(tansu_command(binary, target.endpoint), stack.tansu_log)
    stack.tansu_pid.write_text(f"{pid}\n")
    stack.record(BROKER, {"pid_file": str(stack.tansu_pid), "bootstrap": str(target.endpoint)})
    probe = await _wait_for(
        target, lambda: probe_broker(settings), timeout, still_running=lambda: process_alive(pid, TANSU)
    )
    if not probe.answers:
        exited = not process_alive(pid, TANSU)
        await stop_pid_file(stack.tansu_pid, TANSU)
        stack.forget(BROKER)
        try:
            said = telling_line(stack.tansu_log.read_text(errors="replace"))
        except OSError:
            said = ""
        raise _silent(
            target, probe, "Tansu", timeout,
            (f"its log says: {said}; " if said else "")
            + f"see {stack.tansu_log} and check that the port is free",
            exited=exited,
        )
    say(answers_at(target.label, target.address) + f" (Tansu, pid {pid}); {TANSU_MEMORY_NOTE}")


async def ensure_storage(settings: Settings, stack: Stack, machine: Machine, timeout: float) -> None:
    """An S3 storage answering with the configured keys and ``FLEET_S3_BUCKET`` created;
    runs SeaweedFS (its data in the stack folder) on loopback if none answers."""
    target = storage_target(settings)
    probe = await probe_storage(settings)
    if probe.answers:
        if probe.error:
            raise ServiceUnavailable(f"{target.label} at {target.address} answers but {probe.error}")
        say(using_as_is(target.label, target.address))
    else:
        if not target.is_local:
            raise _elsewhere(target, probe)
        probe = await _start_seaweedfs(settings, stack, machine, timeout, target)
    if not probe.bucket_exists:
        await create_bucket(settings)
        say(f"created bucket {settings.s3_bucket!r} at {target.address}")


async def _start_seaweedfs(settings: Settings, stack: Stack, machine: Machine, timeout: float,
                           target: Target) -> StorageProbe:
    stale = stack.storage_pid()
    if stale is not None:
        say(f"the SeaweedFS started earlier (pid {stale}) does not answer; restarting it")
        await stop_process(stale, WEED)
    binary = weed_binary(machine)
    stack.weed_data.mkdir(parents=True, exist_ok=True)
    stack.store_weed_config(s3_identities(settings.s3_access_key.get_secret_value(),
                                          settings.s3_secret_key.get_secret_value()))
    ports = dict(zip(WEED_PORTS, free_ports(len(WEED_PORTS), avoid=[target.endpoint.port])))
    say(f"starting SeaweedFS with its S3 API at {target.endpoint}; data and log in {stack.weed_dir}")
    pid = spawn_detached(weed_command(binary, target.endpoint, stack.weed_data, stack.weed_config, ports),
                         stack.weed_log)
    stack.weed_pid.write_text(f"{pid}\n")
    stack.record(STORAGE, {"pid_file": str(stack.weed_pid), "endpoint": settings.s3_endpoint, "ports": ports})
    probe = await _wait_for(target, lambda: probe_storage(settings), timeout,
                            still_running=lambda: process_alive(pid, WEED))
    if not probe.answers or probe.error:
        exited = not process_alive(pid, WEED)
        await stop_pid_file(stack.weed_pid, WEED)
        stack.forget(STORAGE)
        try:
            said = telling_line(stack.weed_log.read_text(errors="replace"))
        except OSError:
            said = ""
        raise _silent(target, probe, "SeaweedFS", timeout,
                      (f"its log says: {said}; " if said else "") + f"see {stack.weed_log} and check that the"
                      " port is free", exited=exited)
    say(answers_at(target.label, target.address) + f" (SeaweedFS, pid {pid})")
    return probe


async def _wait_for(
    target: Target,
    probe: Callable[[], Awaitable[P]],
    timeout: float,
    *,
    still_running: Callable[[], bool] = lambda: True,
) -> P:
    """The last probe of a service just started, once it answers or ``timeout`` is over."""
    say(waiting_for(target.label, target.address, timeout))
    return await wait_until(probe, lambda p: p.answers, timeout, still_running=still_running)


def _elsewhere(target: Target, probe: Probe, kind: str = "") -> ServiceUnavailable:
    """A service that does not answer and that ``up`` may not start."""
    return unavailable(
        target.label, target.address, probe.failure_or_error(),
        hint=f"it is not {kind}on this machine, so check {target.setting} and that it runs",
    )


def _silent(
    target: Target, probe: Probe, started: str, timeout: float, advice: str, *, exited: bool = False
) -> ServiceUnavailable:
    """A service ``up`` started that exited, or did not answer in time."""
    what = (
        f"{started} exited before it answered" if exited
        else f"{started} was started but did not answer within {timeout:g} s"
    )
    return unavailable(target.label, target.address, probe.failure_or_error(), hint=f"{what}; {advice}")


# --- down ----------------------------------------------------------------------------


async def down(settings: Settings) -> int:
    """Stops what ``up`` recorded in the state file (SeaweedFS, the broker, Redis, the
    PostgreSQL cluster), waiting for each to exit, and forgets it. Returns 0, also when nothing was
    started; services this machine runs on its own are never touched."""
    stack = Stack(settings.stack_dir)
    started = stack.load()
    stopped = []

    pid = await stop_pid_file(stack.weed_pid, WEED)
    if pid is not None:
        stopped.append(f"{LABELS[STORAGE]} (SeaweedFS, pid {pid}; its data stays in {stack.weed_dir})")
    stack.forget(STORAGE)

    pid = await stop_pid_file(stack.tansu_pid, TANSU)
    if pid is not None:
        stopped.append(f"{LABELS[BROKER]} (Tansu, pid {pid}; its in-memory data is gone)")
    stack.forget(BROKER)

    if REDIS in started:
        pid = await stop_pid_file(stack.redis_pid_file, REDIS_SERVER)
        if pid is not None:
            stopped.append(f"{LABELS[REDIS]} (pid {pid})")
        stack.forget(REDIS)

    if POSTGRESQL in started:
        version = str(started[POSTGRESQL].get("version", ""))
        cluster = str(started[POSTGRESQL].get("cluster", "main"))
        machine = Machine()
        stop = machine.as_root(cluster_command(version, cluster, "stop"), postgres_target(settings))
        if machine.run(stop).returncode == 0:
            stopped.append(f"{LABELS[POSTGRESQL]} (cluster {version}/{cluster})")
        stack.forget(POSTGRESQL)

    for item in stopped:
        say(f"stopped {item}")
    if not stopped:
        say("nothing to stop: no service started by 'fleet services up' is running")
    say("services this machine runs on its own are left alone")
    return 0
