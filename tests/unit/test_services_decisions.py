"""The pure decisions behind ``fleet services``: addresses, command lines, packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_telemetry.deploy.stack.addresses import (
    Endpoint,
    bind_address,
    bootstrap_endpoints,
    is_loopback,
    scrub,
    telling_line,
    url_endpoint,
)
from fleet_telemetry.deploy.stack.install import (
    conf_port,
    default_postgres_major,
    pick_cluster,
    postgis_package,
    postgres_major,
    privileged,
)
from fleet_telemetry.deploy.stack.processes import redis_command, tansu_command
from fleet_telemetry.schema.migrate import database_name, quote_identifier, with_database


@pytest.mark.parametrize(
    ("url", "default", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/fleet", 5432, Endpoint("127.0.0.1", 5432)),
        ("postgresql://u:p%40ss@db.example.com/fleet", 5432, Endpoint("db.example.com", 5432)),
        ("postgresql:///fleet", 5432, Endpoint("127.0.0.1", 5432)),
        ("redis://127.0.0.1:6380/0", 6379, Endpoint("127.0.0.1", 6380)),
        ("redis://:secret@localhost/0", 6379, Endpoint("localhost", 6379)),
        ("redis://[::1]:6379/0", 6379, Endpoint("::1", 6379)),
    ],
)
def test_url_endpoint(url: str, default: int, expected: Endpoint) -> None:
    assert url_endpoint(url, default) == expected


def test_bootstrap_endpoints_reads_every_entry() -> None:
    assert bootstrap_endpoints("127.0.0.1:9092, kafka-2:19092,broker") == [
        Endpoint("127.0.0.1", 9092),
        Endpoint("kafka-2", 19092),
        Endpoint("broker", 9092),
    ]
    assert bootstrap_endpoints("") == []


def test_endpoint_text_brackets_ipv6() -> None:
    assert str(Endpoint("127.0.0.1", 9092)) == "127.0.0.1:9092"
    assert str(Endpoint("::1", 9092)) == "[::1]:9092"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("10.0.0.5", False),
        ("kafka", False),
        ("db.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_bind_address_turns_localhost_into_an_address() -> None:
    assert bind_address("localhost") == "127.0.0.1"
    assert bind_address("127.0.0.1") == "127.0.0.1"


def test_tansu_command_listens_and_advertises_the_bootstrap_address() -> None:
    assert tansu_command("/opt/tansu", Endpoint("127.0.0.1", 9092)) == [
        "/opt/tansu",
        "broker",
        "--listener-url",
        "tcp://127.0.0.1:9092",
        "--advertised-listener-url",
        "tcp://127.0.0.1:9092",
        "--storage-engine",
        "memory://tansu/",
    ]
    command = tansu_command("tansu", Endpoint("localhost", 19092))
    assert command[command.index("--listener-url") + 1] == "tcp://127.0.0.1:19092"


def test_redis_command_binds_loopback_without_persistence(tmp_path: Path) -> None:
    command = redis_command("/usr/bin/redis-server", Endpoint("127.0.0.1", 6380), tmp_path)
    options = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "/usr/bin/redis-server"
    assert options["--daemonize"] == "yes"
    assert options["--bind"] == "127.0.0.1"
    assert options["--port"] == "6380"
    assert options["--save"] == ""
    assert options["--appendonly"] == "no"
    assert options["--pidfile"] == str(tmp_path / "redis.pid")


@pytest.mark.parametrize(
    ("num", "major"), [(150020, "15"), (160004, "16"), (100023, "10"), (90624, "9.6")]
)
def test_postgres_major_from_server_version_num(num: int, major: str) -> None:
    assert postgres_major(num) == major


def test_postgis_package_name() -> None:
    assert postgis_package("15") == "postgresql-15-postgis-3"


def test_default_postgres_major_from_apt_cache_depends() -> None:
    output = "postgresql\n  Depends: postgresql-15\n  Suggests: postgresql-doc\n"
    assert default_postgres_major(output) == "15"
    assert default_postgres_major("postgresql\n  Suggests: postgresql-doc\n") is None
    assert default_postgres_major("") is None


def test_conf_port() -> None:
    assert conf_port("listen_addresses = 'localhost'\nport = 5433\t\t# (change requires restart)\n") == 5433
    assert conf_port("#port = 5433\n") == 5432
    assert conf_port("port = '5434'\n") == 5434


def test_pick_cluster_prefers_the_configured_port_then_the_newest() -> None:
    clusters = [("13", 5433), ("15", 5432), ("9.6", 5434)]
    assert pick_cluster(clusters, 5433) == "13"
    assert pick_cluster(clusters, 5432) == "15"
    assert pick_cluster(clusters, 6000) == "15"
    assert pick_cluster([], 5432) is None


def test_privileged_uses_sudo_only_when_not_root() -> None:
    assert privileged(["apt-get", "update"], is_root=True, has_sudo=True) == ["apt-get", "update"]
    assert privileged(["apt-get", "update"], is_root=False, has_sudo=True) == [
        "sudo",
        "apt-get",
        "update",
    ]
    assert privileged(["apt-get", "update"], is_root=False, has_sudo=False) is None


def test_database_name_and_maintenance_url() -> None:
    assert database_name("postgresql://postgres@127.0.0.1:5432/fleet") == "fleet"
    assert database_name("postgresql://alice@127.0.0.1:5432") == "alice"
    assert (
        with_database("postgresql://u:p@127.0.0.1:5432/fleet?sslmode=disable", "postgres")
        == "postgresql://u:p@127.0.0.1:5432/postgres?sslmode=disable"
    )
    assert quote_identifier('we"ird') == '"we""ird"'


def test_scrub_removes_the_password_from_error_text() -> None:
    url = "postgresql://fleet:hunter2@127.0.0.1:5432/fleet"
    assert scrub("could not log in with hunter2", url) == "could not log in with ***"
    assert scrub("refused", "postgresql://fleet@127.0.0.1/fleet") == "refused"


def test_telling_line_quotes_the_last_error_of_a_log_without_colours() -> None:
    log = (
        "tansu broker 0.6.0\n"
        "\x1b[2m2026-11-29T15:33:48Z\x1b[0m \x1b[31mERROR\x1b[0m broker: err=AddrInUse\n"
        "thread 'tokio-rt-worker' panicked at tansu-broker/src/broker.rs:139:18:\n"
        "called `Result::unwrap()` on an `Err` value: Io(Os { code: 98, message: \"Address in use\" })\n"
        "stack backtrace:\n"
        "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.\n"
    )
    assert telling_line(log) == (
        "called `Result::unwrap()` on an `Err` value: Io(Os { code: 98, message: \"Address in use\" })"
    )
    assert telling_line("tansu broker 0.6.0\nready in 0ms\n") == "ready in 0ms"
    assert telling_line("") == ""
