"""The pure parts of the project's own PostgreSQL login: the SCRAM verifier, the URL,
the pg_hba.conf rules and where they go, and running a command as another OS user."""

from __future__ import annotations

import base64
import hashlib
import hmac

import asyncpg
import pytest

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.access import (
    HBA_MARK,
    hba_rules,
    own_role_may_help,
    project_url,
    role_sql,
    scram_verifier,
    with_rules_first,
)
from fleet_telemetry.deploy.stack.addresses import postgres_target
from fleet_telemetry.deploy.stack.install import as_os_user
from fleet_telemetry.deploy.stack.probe import PostgresProbe


def test_scram_verifier_matches_the_rfc_7677_exchange() -> None:
    """The stored and server keys of RFC 7677's example (user "user", password "pencil")
    verify the client proof and produce the server signature printed there."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    scheme, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    stored_key, server_key = (base64.b64decode(part) for part in keys.split(":"))
    assert (scheme, iterations_salt) == ("SCRAM-SHA-256", "4096:W22ZaJ0SNY7soEsUEjb6gQ==")

    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
                    f"c=biws,r={nonce}").encode()
    server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    assert base64.b64encode(server_signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature))
    assert hashlib.sha256(client_key).digest() == stored_key


def test_scram_verifier_salts_every_password_afresh() -> None:
    assert scram_verifier("same") != scram_verifier("same")


def test_project_url_keeps_host_port_database_and_options() -> None:
    assert project_url("postgresql://postgres@127.0.0.1:5433/fleet?sslmode=disable", "s3cret") == (
        "postgresql://fleet:s3cret@127.0.0.1:5433/fleet?sslmode=disable"
    )
    assert project_url("postgresql://127.0.0.1/fleet", "pw") == "postgresql://fleet:pw@127.0.0.1/fleet"


def test_the_rules_name_the_role_alone_on_loopback_with_a_password_and_come_first() -> None:
    rules = hba_rules()
    assert rules == ["host all fleet 127.0.0.1/32 scram-sha-256", "host all fleet ::1/128 scram-sha-256"]
    old = "# comment\nlocal all postgres peer\nhost all all 127.0.0.1/32 reject\n"
    new = with_rules_first(old, rules)
    assert new.endswith(old)
    assert new.splitlines()[:3] == [HBA_MARK, *rules]


def test_role_sql_creates_or_renews_and_quotes_literals() -> None:
    created = role_sql(None, "SCRAM-SHA-256$4096:c2FsdA==$a:b")
    assert created.startswith("CREATE ROLE fleet LOGIN SUPERUSER PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b';")
    assert "COMMENT ON ROLE fleet IS 'the project''s own role, created by ''fleet services up''';" in created
    assert role_sql("the project's own role, created by 'fleet services up'", "v") == (
        "ALTER ROLE fleet LOGIN SUPERUSER PASSWORD 'v';\n"
    )


def _settings(url: str) -> Settings:
    return Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("url", "failure", "helps"),
    [
        ("postgresql://postgres@127.0.0.1:5432/fleet", asyncpg.InvalidPasswordError("password failed"), True),
        ("postgresql://postgres@localhost/fleet", asyncpg.InvalidAuthorizationSpecificationError("no entry"), True),
        ("postgresql://postgres:typo@127.0.0.1/fleet", asyncpg.InvalidPasswordError("password failed"), False),
        ("postgresql://postgres@db.example.com/fleet", asyncpg.InvalidPasswordError("password failed"), False),
        ("postgresql://postgres@127.0.0.1/fleet", asyncpg.InsufficientPrivilegeError("no"), False),
    ],
)
def test_own_role_only_for_a_refused_login_without_password_on_this_machine(
    url: str, failure: Exception, helps: bool
) -> None:
    probe = PostgresProbe(answers=True, error="refused the connection", failure=failure)
    assert own_role_may_help(url, postgres_target(_settings(url)), probe) is helps


def test_as_os_user() -> None:
    command = ["psql", "-c", "SELECT 1"]
    assert as_os_user("postgres", command, current_user="postgres", is_root=False, has_sudo=False) == command
    assert as_os_user("postgres", command, current_user="root", is_root=True, has_sudo=True) == [
        "runuser", "-u", "postgres", "--", *command]
    assert as_os_user("postgres", command, current_user="dev", is_root=False, has_sudo=True) == [
        "sudo", "-u", "postgres", *command]
    assert as_os_user("postgres", command, current_user="dev", is_root=False, has_sudo=False) is None
