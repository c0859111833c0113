"""Logging in to the local PostgreSQL: the project's own role when the configured login
is refused.

A PostgreSQL installed by Debian's packages lets the ``postgres`` role in only through
the local socket as the ``postgres`` OS user (peer authentication) and asks every TCP
login for a password, so the default ``FLEET_DATABASE_URL`` (user ``postgres``, no
password) is refused. ``up`` then creates the role ``fleet`` with a generated password
through that socket login and keeps its URL in the stack folder (``database.url``, mode
0600); ``FLEET_DATABASE_URL`` should name it from then on. The role is a superuser
because the migrations create the PostGIS extension, which only a superuser may do.

pg_hba.conf is left as it is when its rules let the role in over loopback with its
password (Debian's default rules do). Otherwise two rules for this role alone, on
127.0.0.1 and ::1 with ``scram-sha-256``, are put first; the file is replaced atomically
with its owner and mode, the server reloaded, and the rules checked in
``pg_hba_file_rules`` (the old file is put back if they do not parse). Every change is
printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.deploy.stack.addresses import Target, first_line, last_line, telling_line
from fleet_telemetry.deploy.stack.install import Machine, as_os_user
from fleet_telemetry.deploy.stack.probe import PostgresProbe, probe_postgres, wait_until
from fleet_telemetry.deploy.stack.reports import say
from fleet_telemetry.deploy.stack.state import Stack

PROJECT_ROLE = "fleet"
ROLE_COMMENT = "the project's own role, created by 'fleet services up'"
HBA_MARK = (
    f"# Put first by 'fleet services up': password logins on loopback for the role {PROJECT_ROLE} only."
)
SCRAM_ITERATIONS = 4096
RELOAD_WAIT_SECONDS = 5.0


# --- pure decisions -----------------------------------------------------------------


def login_refused(probe: PostgresProbe) -> bool:
    """Whether the server answered and turned the login down (SQLSTATE class 28)."""
    import asyncpg

    return probe.answers and isinstance(probe.failure, asyncpg.InvalidAuthorizationSpecificationError)


def own_role_may_help(url: str, target: Target, probe: PostgresProbe) -> bool:
    """A refused login without a password, on this machine: a role of the project's own
    with a password can be made. A refused password is the user's to fix."""
    return target.is_local and urlsplit(url).password is None and login_refused(probe)


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """What PostgreSQL stores for a ``scram-sha-256`` password (RFC 5803 form), so that
    the password itself never reaches the server, its logs or ``password_encryption``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def project_url(url: str, password: str) -> str:
    """``url`` logging in as the project's role with ``password`` (host, port, database
    and options kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{PROJECT_ROLE}:{password}@{host}"))


def hba_rules(role: str = PROJECT_ROLE) -> list[str]:
    """The pg_hba.conf lines that let ``role`` alone in over loopback with its password.
    Every database: the test suite creates databases of its own."""
    return [f"host all {role} {address} scram-sha-256" for address in ("127.0.0.1/32", "::1/128")]


def with_rules_first(hba_text: str, rules: Sequence[str]) -> str:
    """``hba_text`` with ``rules`` (under a comment saying who put them) before any other
    line, since the first matching rule decides."""
    return "\n".join([HBA_MARK, *rules]) + "\n\n" + hba_text


def role_sql(existing_comment: str | None, verifier: str) -> str:
    """Creates the role, or gives the role an earlier ``up`` created a new password.
    ``existing_comment`` is None when there is no such role."""
    options = f"LOGIN SUPERUSER PASSWORD {sql_literal(verifier)}"
    if existing_comment is None:
        return (f"CREATE ROLE {PROJECT_ROLE} {options};\n"
                f"COMMENT ON ROLE {PROJECT_ROLE} IS {sql_literal(ROLE_COMMENT)};\n")
    return f"ALTER ROLE {PROJECT_ROLE} {options};\n"


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- the superuser, through the local socket --------------------------------------------


class SocketSuperuser:
    """``psql`` as the ``postgres`` OS user through the server's Unix socket (in
    ``socket_dir``, else psql's default), where peer authentication lets it in."""

    def __init__(self, machine: Machine, target: Target, socket_dir: str | None = None) -> None:
        self.machine = machine
        self.target = target
        self.socket_dir = socket_dir

    def run(self, sql: str, what: str) -> str:
        """Runs ``sql`` in the ``postgres`` database; returns psql's unaligned output.
        Raises :class:`ServiceUnavailable` naming ``what`` if psql fails."""
        command = [_psql(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        command += ["-p", str(self.target.endpoint.port)]
        if self.socket_dir:
            command += ["-h", self.socket_dir]
        command += ["-d", "postgres", "-f", "-"]
        as_postgres = as_os_user(
            "postgres", command, current_user=pwd.getpwuid(os.geteuid()).pw_name,
            is_root=os.geteuid() == 0, has_sudo=shutil.which("sudo") is not None,
        )
        if as_postgres is None:
            raise self._failed(what, "it needs root or sudo to run psql as the postgres OS user")
        result = self.machine.run(as_postgres, input=sql, cwd="/")
        if result.returncode != 0:
            why = telling_line(result.stdout) or f"psql exited with {result.returncode}"
            raise self._failed(what, why)
        return result.stdout

    def _failed(self, what: str, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"{self.target.label} at {self.target.address}: could not {what} as the postgres OS "
            f"user through the local socket ({why}); create a role with a password yourself and "
            "put it in FLEET_DATABASE_URL"
        )


def _psql() -> str:
    """psql on the PATH (Debian's version-picking wrapper), else one of the server's."""
    found = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if found is None:
        raise ServiceUnavailable(
            "psql is not installed; install postgresql-client, then run 'fleet services up' again"
        )
    return str(found)


# --- the role, its URL and the rules that let it in -------------------------------------


async def own_role_login(
    url: str, target: Target, stack: Stack, admin: SocketSuperuser, refusal: str
) -> str:
    """A URL that logs in as the project's role: the one kept in the stack folder if it
    still works, else a new password for the role (created if missing), kept there.
    ``refusal`` says how the configured login was refused.
    Puts rules for the role first in pg_hba.conf when none lets it in. Raises
    :class:`ServiceUnavailable` when that does not make the login work, or when a role
    of that name exists that ``up`` did not create."""
    say(f"{target.label} at {target.address} {refusal}")
    kept = stack.stored_database_url()
    if kept is not None and not (await probe_postgres(kept)).error:
        say(f"using the role '{PROJECT_ROLE}' from {stack.database_url_file}")
        _how_to_use(stack)
        return kept
    password = secrets.token_urlsafe(24)
    comment = _role_comment(admin)
    if comment is not None and comment != ROLE_COMMENT:
        raise ServiceUnavailable(
            f"{target.label} at {target.address}: a role '{PROJECT_ROLE}' exists that 'fleet services "
            f"up' did not create; put its password in FLEET_DATABASE_URL "
            f"(postgresql://{PROJECT_ROLE}:PASSWORD@{target.endpoint}/...)"
        )
    admin.run(role_sql(comment, scram_verifier(password)), "create the project's role")
    new_url = project_url(url, password)
    stack.store_database_url(new_url)
    done = "created the role" if comment is None else "gave a new password to the role"
    say(f"{done} '{PROJECT_ROLE}' (superuser: the migrations create PostGIS; password login only); "
        f"its URL is in {stack.database_url_file} (mode 0600)")
    probe = await probe_postgres(new_url)
    hba = Path(admin.run("SHOW hba_file;\n", "find pg_hba.conf").strip())
    if probe.error and login_refused(probe):
        await allow_role(admin, target, hba)
        probe = await _login_soon(new_url)
    elif not probe.error:
        say(f"{hba} not changed: its rules let the role in over loopback with its password")
    if probe.error:
        raise ServiceUnavailable(
            f"{target.label} at {target.address} still refuses the role '{PROJECT_ROLE}': {probe.error}"
        )
    _how_to_use(stack)
    return new_url


def _role_comment(admin: SocketSuperuser) -> str | None:
    """The comment on the project's role ("" if none), None when there is no such role."""
    found = admin.run(
        f"SELECT 'role:' || coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_roles "
        f"WHERE rolname = {sql_literal(PROJECT_ROLE)};\n",
        "look the project's role up",
    ).strip()
    return found.removeprefix("role:") if found.startswith("role:") else None


async def _login_soon(url: str) -> PostgresProbe:
    """The login, tried until it works or a few seconds have passed (a reload takes
    effect when the server gets to it)."""
    return await wait_until(
        lambda: probe_postgres(url), lambda p: not p.error, RELOAD_WAIT_SECONDS, interval=0.2
    )


def _how_to_use(stack: Stack) -> None:
    say(f'export FLEET_DATABASE_URL="$(cat {stack.database_url_file})" to use it '
        "(deploy/dev.sh does this itself)")


async def allow_role(admin: SocketSuperuser, target: Target, hba: Path) -> None:
    """Puts :func:`hba_rules` first in the server's pg_hba.conf ``hba`` (atomically,
    owner and mode kept), reloads it and checks the result in ``pg_hba_file_rules``; puts
    the old file back and raises :class:`ServiceUnavailable` if the rules do not parse."""
    machine = admin.machine
    current = machine.run(machine.as_root(["cat", str(hba)], target))
    if current.returncode != 0:
        raise ServiceUnavailable(f"{target.label}: could not read {hba} ({last_line(current.stdout)})")
    rules = hba_rules()
    if all(rule in current.stdout.splitlines() for rule in rules):
        say(f"{hba} already lets the role '{PROJECT_ROLE}' in; not changing it")
        return
    replace_as_root(machine, target, hba, with_rules_first(current.stdout, rules))
    admin.run("SELECT pg_reload_conf();\n", "reload the server")
    errors = admin.run(
        "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL;\n",
        "check pg_hba.conf",
    ).strip()
    if errors:
        replace_as_root(machine, target, hba, current.stdout)
        admin.run("SELECT pg_reload_conf();\n", "reload the server")
        raise ServiceUnavailable(
            f"{target.label}: {hba} did not parse with the project's rules ({first_line(errors)}); "
            "it is back as it was"
        )
    say(f"put these lines first in {hba} (owner and mode kept) and reloaded the server:")
    for line in [HBA_MARK, *rules]:
        say(f"    {line}")
    say("to undo: delete those lines and run SELECT pg_reload_conf() as a superuser")


def replace_as_root(machine: Machine, target: Target, path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically: a private temporary file beside it
    given the file's owner and mode, renamed over it. Raises :class:`ServiceUnavailable`
    (the temporary file removed) if a step fails."""
    temporary = path.with_name(f".{path.name}.fleet-{os.getpid()}")
    steps: list[tuple[list[str], str | None]] = [
        (["install", "-m", "600", "/dev/null", str(temporary)], None),
        (["tee", str(temporary)], text),
        (["chown", f"--reference={path}", str(temporary)], None),
        (["chmod", f"--reference={path}", str(temporary)], None),
        (["mv", "-f", str(temporary), str(path)], None),
    ]
    for command, given in steps:
        result = machine.run(machine.as_root(command, target), input=given)
        if result.returncode != 0:
            machine.run(machine.as_root(["rm", "-f", str(temporary)], target))
            raise ServiceUnavailable(
                f"{target.label}: could not replace {path} ('{command[0]}' failed: "
                f"{last_line(result.stdout)}); it is unchanged"
            )
