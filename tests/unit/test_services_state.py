"""What ``fleet services`` remembers and prints, without any service running."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fleet_telemetry.cli.parsing import Parser
from fleet_telemetry.cli.services import register
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.addresses import BROKER, POSTGRESQL, REDIS
from fleet_telemetry.deploy.stack.probe import PostgresProbe, Probe
from fleet_telemetry.deploy.stack.reports import format_table, problem_summary
from fleet_telemetry.deploy.stack.stack import down
from fleet_telemetry.deploy.stack.state import Stack
from fleet_telemetry.deploy.stack.status import broker_report, postgres_report, redis_report


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url="postgresql://fleet:hunter2@127.0.0.1:5432/fleet",
        redis_url="redis://127.0.0.1:6379/0",
        kafka_bootstrap="127.0.0.1:9092",
        stack_dir=str(tmp_path / "stack"),
    )


def test_state_file_records_and_forgets(tmp_path: Path) -> None:
    stack = Stack(str(tmp_path / "stack"))
    assert stack.load() == {}
    stack.record(REDIS, {"port": 6380})
    stack.record(POSTGRESQL, {"version": "15", "cluster": "main"})
    saved = json.loads(stack.state_file.read_text())
    assert saved == {"started": {"redis": {"port": 6380}, "postgresql": {"version": "15", "cluster": "main"}}}
    stack.forget(REDIS)
    assert stack.load() == {POSTGRESQL: {"version": "15", "cluster": "main"}}
    stack.forget(POSTGRESQL)
    assert not stack.state_file.exists()


def test_a_stale_pid_file_does_not_count_as_running(tmp_path: Path) -> None:
    stack = Stack(str(tmp_path / "stack"))
    stack.tansu_dir.mkdir(parents=True)
    stack.tansu_pid.write_text("999999999\n")
    assert stack.broker_pid() is None
    assert not stack.started_by_us(BROKER)


def test_down_with_nothing_started_stops_nothing(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(down(settings)) == 0
    assert asyncio.run(down(settings)) == 0
    assert "nothing to stop" in capsys.readouterr().err
    assert not Path(settings.stack_dir).exists()


def test_reports_mask_the_password_and_say_what_is_wrong(settings: Settings) -> None:
    pg = postgres_report(settings, PostgresProbe(answers=True, server_version_num=150020), False)
    assert pg.address == "postgresql://fleet:***@127.0.0.1:5432/fleet"
    assert pg.answers and not pg.ok
    assert "postgresql-15-postgis-3" in pg.detail

    ok = postgres_report(
        settings,
        PostgresProbe(answers=True, server_version_num=150020, postgis="3.3.2", database_exists=True),
        False,
    )
    assert ok.ok and ok.as_json()["postgis"] == "3.3.2"

    redis = redis_report(settings, Probe(answers=False, error="connection refused"), False)
    broker = broker_report(settings, Probe(answers=True), True)
    assert not redis.ok and broker.ok and "memory only" in broker.detail

    table = format_table([pg, redis, broker])
    assert "hunter2" not in table
    assert table.splitlines()[0].split() == ["SERVICE", "ADDRESS", "STATE"]
    summary = problem_summary([ok, redis, broker])
    assert "Redis is not answering at redis://127.0.0.1:6379/0" in summary
    assert "\n" not in summary


def test_register_adds_services_up_down_status() -> None:
    parser = Parser(prog="fleet")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    register(sub)
    args = parser.parse_args(["services", "status", "--json"])
    assert (args.action, args.json) == ("status", True)
    args = parser.parse_args(["services", "up", "--timeout", "5"])
    assert (args.action, args.timeout) == ("up", 5.0)
    assert callable(args.handler)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["services", "sideways"])
    assert exc.value.code == 2
