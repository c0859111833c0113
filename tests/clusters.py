"""PostgreSQL servers of a test's own, so that no test changes the machine's server.

A :class:`Cluster` lives in a temporary folder: its data, its log and its Unix socket
are there, it listens on 127.0.0.1 at a free port, and it is removed with the folder.
It runs as the ``postgres`` OS user when the tests run as root (the server refuses to
run as root), as the test's own user otherwise. It uses the machine's PostgreSQL
binaries and extensions, so PostGIS is there when the machine has it.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POSTGRESQL_LIB = Path("/usr/lib/postgresql")
POSTGRESQL_SHARE = Path("/usr/share/postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _major_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def postgres_bindir(*, with_postgis: bool = True) -> Path | None:
    """The newest PostgreSQL bin folder with initdb (and PostGIS installed, if asked)."""
    majors = sorted(POSTGRESQL_LIB.glob("*"), key=_major_key, reverse=True) if POSTGRESQL_LIB.is_dir() else []
    for major in majors:
        if not (major / "bin" / "initdb").exists():
            continue
        if with_postgis and not (POSTGRESQL_SHARE / major.name / "extension" / "postgis.control").exists():
            continue
        return major / "bin"
    return None


def _owner() -> pwd.struct_passwd | None:
    """The OS user the servers run as: ``postgres`` when this is root, else None (self)."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


@dataclass
class Cluster:
    """One server: ``data`` under ``folder``, the socket in ``folder``, ``port`` on 127.0.0.1."""

    folder: Path
    data: Path
    port: int
    password: str
    bindir: Path

    @property
    def log(self) -> Path:
        return self.folder / f"{self.data.name}.log"

    @property
    def os_user(self) -> str:
        owner = _owner()
        return owner.pw_name if owner is not None else pwd.getpwuid(os.geteuid()).pw_name

    def url(self, database: str = "postgres", *, user: str | None = None) -> str:
        """A TCP URL as the cluster's superuser (named after the OS user that made it)."""
        return f"postgresql://{user or self.os_user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``tool`` of the cluster's PostgreSQL as its OS user; raises if it fails."""
        result = subprocess.run(
            [*as_owner(), str(self.bindir / tool), *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.folder,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}\n{self.log_tail()}")
        return result

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")

    def running(self) -> bool:
        status = subprocess.run([*as_owner(), str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                                capture_output=True, text=True, cwd=self.folder)
        return status.returncode == 0

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def write(self, name: str, text: str) -> None:
        """Replaces a configuration file of the data folder, keeping it the server's."""
        path = self.data / name
        path.write_text(text)
        chown_to_owner(path)


def as_owner() -> list[str]:
    owner = _owner()
    return ["runuser", "-u", owner.pw_name, "--"] if owner is not None else []


def chown_to_owner(path: Path) -> None:
    owner = _owner()
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _settings(port: int, folder: Path, extra: Sequence[str]) -> str:
    return "\n".join([
        f"port = {port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{folder}'",
        "fsync = off", "synchronous_commit = off", "full_page_writes = off", "logging_collector = off",
        "ssl = off", "shared_buffers = 32MB", *extra,
    ]) + "\n"


class Clusters:
    """The servers of one test, in one temporary folder its OS user owns."""

    def __init__(self, folder: Path, bindir: Path) -> None:
        self.folder = folder
        self.bindir = bindir
        self.started: list[Cluster] = []

    def primary(self, *, name: str = "primary", auth_local: str = "peer", auth_host: str = "scram-sha-256",
                settings: Sequence[str] = ()) -> Cluster:
        """initdb into ``folder/name`` (superuser password generated, ``auth_*`` the
        pg_hba methods), then starts it on a free port with its socket in ``folder``."""
        password = secrets.token_urlsafe(16)
        pwfile = self.folder / f"{name}.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        chown_to_owner(pwfile)
        cluster = Cluster(self.folder, self.folder / name, free_port(), password, self.bindir)
        try:
            cluster.run("initdb", "-D", str(cluster.data), "-U", cluster.os_user, f"--pwfile={pwfile}",
                        f"--auth-local={auth_local}", f"--auth-host={auth_host}", "-E", "UTF8",
                        "--locale=C", "--no-sync")
        finally:
            pwfile.unlink()
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write(_settings(cluster.port, self.folder, settings))
        return self._start(cluster)

    def replica_of(self, primary: Cluster, *, name: str = "replica", slot: str = "replica") -> Cluster:
        """A streaming replica of ``primary`` (``pg_basebackup -R`` through a physical
        slot, so the primary keeps the WAL it still needs), started on a free port."""
        replica = Cluster(self.folder, self.folder / name, free_port(), primary.password, self.bindir)
        conninfo = f"host=127.0.0.1 port={primary.port} user={primary.os_user} password={primary.password}"
        replica.run("pg_basebackup", "-d", conninfo, "-D", str(replica.data), "-R", "-X", "stream",
                    "-c", "fast", "--no-sync", "-C", "-S", slot)
        with (replica.data / "postgresql.conf").open("a") as conf:
            conf.write(_settings(replica.port, self.folder, ["hot_standby = on"]))
        return self._start(replica)

    def _start(self, cluster: Cluster) -> Cluster:
        self.started.append(cluster)
        cluster.start()
        return cluster


@contextmanager
def private_clusters(bindir: Path) -> Iterator[Clusters]:
    """Servers of a test's own; all of them stopped and their folder removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    chown_to_owner(folder)
    clusters = Clusters(folder, bindir)
    try:
        yield clusters
    finally:
        for cluster in reversed(clusters.started):
            if (cluster.data / "postmaster.pid").exists():
                subprocess.run([*as_owner(), str(bindir / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate",
                                "-w", "stop"], capture_output=True, timeout=120, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)
