"""The processes the stack manager runs itself: their command lines, starting one in a
session of its own, pid files, and stopping one (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from fleet_telemetry.deploy.stack.addresses import Endpoint, bind_address
from fleet_telemetry.deploy.stack.probe import wait_until

STOP_TIMEOUT_SECONDS = 10.0
TANSU = "tansu"
REDIS_SERVER = "redis-server"
WEED = "weed"
WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")
"""The ports a single-process SeaweedFS needs besides its S3 port (all on loopback)."""


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


def weed_command(binary: str, endpoint: Endpoint, data_dir: Path, s3_config: Path,
                 ports: dict[str, int]) -> list[str]:
    """``weed server`` with a master, a volume server, a filer and the S3 gateway at
    ``endpoint`` in one process, data in ``data_dir``, the S3 identities of ``s3_config``
    and the other ports of ``ports`` (keys :data:`WEED_PORTS`); nothing else listens."""
    host = bind_address(endpoint.host)
    return [
        binary, "server",
        f"-dir={data_dir}", f"-ip={host}", f"-ip.bind={host}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3", f"-s3.port={endpoint.port}", f"-s3.port.grpc={ports['s3.grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={s3_config}",
    ]


def s3_identities(access_key: str, secret_key: str) -> str:
    """The JSON of ``-s3.config``: one identity with these keys, allowed everything."""
    return json.dumps({"identities": [{
        "name": "fleet",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}, indent=2) + "\n"


def free_ports(count: int, *, avoid: Sequence[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports below Linux's ephemeral range (32768 and up),
    so that no outgoing connection takes one before the service binds it."""
    found: list[int] = []
    for port in random.sample(range(20000, 32768), 2000):
        if port in avoid or port in found:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free loopback ports below the ephemeral range")


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


def cluster_command(version: str, cluster: str, action: str) -> list[str]:
    """``pg_ctlcluster`` for a Debian PostgreSQL cluster (``start``, ``stop``, ``status``...)."""
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, action]


def spawn_detached(command: Sequence[str], log: Path) -> int:
    """Starts ``command`` in a session of its own, so it outlives this CLI, with its
    output appended to ``log``; returns its pid without waiting. The process gets no
    other descriptor of this one: a pipe it held open would keep whoever reads the
    other end waiting for as long as the service runs."""
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
                *((os.POSIX_SPAWN_CLOSE, inherited) for inherited in _inheritable_descriptors()),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _inheritable_descriptors() -> list[int]:
    """This process's open descriptors above stderr that a child would inherit."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the descriptor listdir itself used, closed again
            continue
    return found


def process_alive(pid: int, name: str) -> bool:
    """Whether ``pid`` runs and is a ``name`` process (guards against reused pids).

    A child of this process that has not been reaped keeps its pid, so a child whose
    command line is still empty counts as running: ``posix_spawn`` returns while the
    child is inside ``execve``, before the new program's arguments are in place."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own exited child
    except ChildProcessError:
        own_child = False
    else:
        if reaped:
            return False
        own_child = True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    if own_child and not cmdline:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return state not in ("Z", "X") and name in cmdline


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(pid_file: Path, name: str) -> int | None:
    """The pid in ``pid_file`` if that process still runs and is a ``name`` process."""
    pid = read_pid(pid_file)
    return pid if pid is not None and process_alive(pid, name) else None


async def stop_process(pid: int, name: str) -> bool:
    """SIGTERM, then SIGKILL after a grace period; blocks until it has gone or been
    killed. False if it was not running."""
    if not process_alive(pid, name):
        return False
    os.kill(pid, signal.SIGTERM)

    async def alive() -> bool:
        return process_alive(pid, name)

    if await wait_until(alive, lambda running: not running, STOP_TIMEOUT_SECONDS, interval=0.1):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


async def stop_pid_file(pid_file: Path, name: str) -> int | None:
    """Stops the ``name`` process ``pid_file`` names and removes the file; returns the
    pid if a process was stopped."""
    pid = read_pid(pid_file)
    stopped = pid is not None and await stop_process(pid, name)
    pid_file.unlink(missing_ok=True)
    return pid if stopped else None

