"""Given a PostgreSQL server of the test's own that asks for a password (SCRAM), when
``fleet`` connects with the password in the URL's user part or in ``?password=``, then it
gets in, and no output, log line or error shows the password."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.integration

_BIN = Path("/usr/lib/postgresql/15/bin")
_PASSWORD = "p@ss:w/rd?&=x"


def _as_postgres() -> list[str]:
    """Runs a server binary as ``postgres`` when the tests run as root (it refuses root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """A throwaway cluster on a port of its own: superuser ``fleet`` with a password, SCRAM on TCP."""
    if not (_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries are not installed")
    base = Path(tempfile.mkdtemp(prefix="fleet-secrets-"))
    data, password_file = base / "data", base / "password"
    password_file.write_text(_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(password_file, "postgres")
    port = _free_port()
    run = [*_as_postgres()]
    try:
        subprocess.run([*run, str(_BIN / "initdb"), "-D", str(data), "-U", "fleet", f"--pwfile={password_file}",
                        "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True)
        subprocess.run([*run, str(_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)
        yield port
    finally:
        subprocess.run([*run, str(_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _fleet(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_DATABASE_URL": url, "FLEET_LOG_LEVEL": "debug"}
    return subprocess.run([sys.executable, "-m", "fleet_telemetry.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _shows_password(result: subprocess.CompletedProcess[str]) -> bool:
    text = result.stdout + result.stderr
    return _PASSWORD in text or quote(_PASSWORD, safe="") in text


def test_the_password_gets_in_from_the_user_part_or_the_query_and_is_never_shown(server: int) -> None:
    in_user = f"postgresql://fleet:{quote(_PASSWORD, safe='')}@127.0.0.1:{server}/fleet_secrets"
    created = _fleet(in_user, "migrate")
    assert created.returncode == 0, created.stderr
    assert "migrations applied" in created.stdout and not _shows_password(created)

    in_query = f"postgresql://fleet@127.0.0.1:{server}/fleet_secrets?password={quote(_PASSWORD, safe='')}"
    again = _fleet(in_query, "migrate")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema is up to date" and not _shows_password(again)

    wrong = f"postgresql://fleet@127.0.0.1:{server}/fleet_secrets?password=wrong-{quote(_PASSWORD, safe='')}"
    for command in ("migrate", "maintain"):
        refused = _fleet(wrong, command)
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1] == (
            f"fleet {command}: PostgreSQL at postgresql://fleet@127.0.0.1:{server}/fleet_secrets?password=***"
            ' refused the login (password authentication failed for user "fleet"): check the user and password'
            " in FLEET_DATABASE_URL")
        assert not _shows_password(refused)
