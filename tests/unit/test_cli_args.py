"""The ``fleet`` command line itself: every subcommand refuses bad arguments with one line
and exit status 2, every option explains itself, and the small things a person notices
(``--version``, bare ``fleet``, shell completion) work. Then :func:`explain`, which turns
what a library raised into the one line an operator reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import asyncpg
import pytest
import redis.exceptions
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from fleet_telemetry.cli import main as cli
from fleet_telemetry.cli.parsing import Parser, count_arg, port_arg, seconds_arg
from fleet_telemetry.consumers.summary import RunSummary
from fleet_telemetry.core.errors import FleetError, UsageError
from fleet_telemetry.core.failures import explain, report
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.settings import Settings

CLI = (sys.executable, "-m", "fleet_telemetry.cli")

HELP_PENDING: set[str] = set()
"""Command groups whose arguments do not all have help yet."""

NUMBER_TYPES = (int, float, count_arg, seconds_arg, port_arg)


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable subcommand: its words after ``fleet`` and its parser."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, child in group.choices.items():
            yield from leaves(child, (*path, name))


LEAVES = dict(leaves(cli.build_parser()))


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def numeric_cases() -> Iterator[tuple[tuple[str, ...], str]]:
    for path, parser in LEAVES.items():
        for action in arguments(parser):
            if action.type in NUMBER_TYPES:
                yield path, action.option_strings[0] if action.option_strings else str(action.metavar or action.dest)


def choice_cases() -> Iterator[tuple[tuple[str, ...], str]]:
    for path, parser in LEAVES.items():
        for action in arguments(parser):
            if action.choices and action.option_strings:
                yield path, action.option_strings[0]


@pytest.fixture
def never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command line that passes parsing fails the test here, before any service is tried."""
    def parsed() -> Settings:
        raise AssertionError("the arguments were accepted")

    monkeypatch.setattr(cli, "load_settings", parsed)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs ``fleet ARGV`` in this process; asserts exit 2 and one line on stderr; returns it."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_the_tree_has_the_command_groups_and_one_parser_class() -> None:
    tops = {path[0] for path in LEAVES}
    assert {"consume", "simulate", "replay", "maintain", "vehicles", "geofences", "commands"} <= tops
    assert all(isinstance(parser, Parser) for parser in LEAVES.values())


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_an_unknown_option_is_refused_in_one_line(path: tuple[str, ...], never_runs: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = refused([*path, "--no-such-option"], capsys)
    # (a missing required argument may be what is said first)
    assert "unrecognized arguments: --no-such-option" in line or "required" in line
    assert line.startswith(f"fleet {' '.join(path)}: error: ")
    assert line.endswith(f"(see 'fleet {' '.join(path)} --help')")


@pytest.mark.parametrize("path", [p for p, parser in LEAVES.items()
                                  if any(a.required for a in arguments(parser))], ids=" ".join)
def test_a_missing_required_argument_is_refused_in_one_line(path: tuple[str, ...], never_runs: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(list(path), capsys)
    assert "required" in line


@pytest.mark.parametrize("group", sorted({p[0] for p in LEAVES if len(p) > 1}))
def test_a_group_without_its_action_is_refused_in_one_line(group: str, never_runs: None,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert "required: ACTION" in refused([group], capsys)


@pytest.mark.parametrize(("path", "option"), list(numeric_cases()), ids=lambda v: " ".join(v) if
                         isinstance(v, tuple) else v)
@pytest.mark.parametrize("value", ["-1", "nope", "nan", "inf"])
def test_a_number_option_refuses_negative_and_non_numbers(path: tuple[str, ...], option: str, value: str,
                                                          never_runs: None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*path, f"{option}={value}"] if option.startswith("-") else [*path, "--", value]
    assert f"argument {option}: " in refused(argv, capsys)


@pytest.mark.parametrize(("path", "option"), list(choice_cases()), ids=lambda v: " ".join(v) if
                         isinstance(v, tuple) else v)
def test_an_unknown_choice_is_refused(path: tuple[str, ...], option: str, never_runs: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'bogus'" in refused([*path, option, "bogus"], capsys).lower()


@pytest.mark.parametrize("path", [p for p in LEAVES if p[0] not in HELP_PENDING], ids=" ".join)
def test_every_argument_has_help(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    assert parser.description, path
    missing = [a.option_strings[0] if a.option_strings else a.dest
               for a in arguments(parser) if not (a.help and a.help.strip())]
    assert missing == []


@pytest.mark.parametrize(("argv", "message"), [
    (["consume", "--stop-when-idle", "-1"], "argument --stop-when-idle: must be more than 0, got -1"),
    (["consume", "--stop-when-idle", "0"], "argument --stop-when-idle: must be more than 0, got 0"),
    (["commands", "consume", "--stop-when-idle", "0"], "must be more than 0"),
    (["commands", "consume", "--metrics-port", "70000"], "must be a port from 0 to 65535, got 70000"),
    (["services", "up", "--timeout", "0"], "argument --timeout: must be more than 0"),
    (["demo", "--interval", "0"], "argument --interval: must be more than 0"),
    (["simulate", "--duration", "-5"], "argument --duration: must be 0 or more, got -5"),
    (["replay", "--topic", "t", "--direct", "--partition", "-1"], "argument --partition: must be 0 or more"),
    (["vehicles", "list", "--limit", "0"], "argument --limit: must be 1 or more, got 0"),
    (["vehicles", "list", "--status", "bogus"], "argument --status: invalid choice: 'bogus' (choose from 'active',"),
    (["drivers", "list", "--status", "away"], "invalid choice: 'away'"),
    (["jobs", "list", "--status", "lost"], "invalid choice: 'lost'"),
    (["jobs", "status", "3fa85f64-5717-4562-b3fc-2c963f66afa6", "lost"], "argument status: invalid choice: 'lost'"),
    (["maintenance", "profitability", "--from", "2026-13"], "argument --from: not a month (YYYY-MM, e.g. 2026-01):"
                                                            " '2026-13'"),
    (["maintenance", "profitability", "--from", "2026-01", "--to", "26-1"], "argument --to: not a month"),
    (["geofences", "add", "x", "--circle=1,1,5", "--dwell", "-1"], "argument --dwell: must be 0 or more, got -1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_nonsense_values_are_refused_when_parsed(argv: list[str], message: str, never_runs: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(argv, capsys)
    assert message in line
    assert line.startswith("fleet " + " ".join(a for a in argv[:2] if not a.startswith("-")) + ": error: ")


def test_a_status_filter_is_case_insensitive() -> None:
    args = cli.build_parser().parse_args(["vehicles", "list", "--status", "ACTIVE"])
    assert args.status == "active"


def test_bare_fleet_prints_the_help_and_exits_2() -> None:
    result = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout.startswith("usage: fleet") and "consume" in result.stdout and "Exit status" in result.stdout
    assert result.stderr == ""


def test_version_comes_from_the_package_metadata() -> None:
    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"fleet {version('fleet-telemetry')}"


def test_the_shell_completes_commands_options_and_choices(tmp_path: Path) -> None:
    def complete(line: str) -> set[str]:
        out = tmp_path / "completions"
        env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
        subprocess.run(CLI, env=env, capture_output=True, timeout=60, check=True)
        return {word.strip() for word in out.read_text().split("\n") if word.strip()}

    assert "vehicles" in complete("fleet veh")
    assert "--stop-when-idle" in complete("fleet consume --st")
    assert complete("fleet vehicles list --status ") == {"active", "maintenance", "inactive", "retired"}


# --- what an exception means to an operator ------------------------------------------------------

SETTINGS = Settings(_env_file=None, database_url="postgresql://fleet:s3cret@db.example:5432/fleet",
                    redis_url="redis://:s3cret@cache.example:6379/0", kafka_bootstrap="broker.example:9092")


@pytest.mark.parametrize(("exc", "line", "kind"), [
    (asyncpg.exceptions.InvalidCatalogNameError('database "fleet" does not exist'),
     'database "fleet" does not exist (FLEET_DATABASE_URL postgresql://fleet:***@db.example:5432/fleet):'
     " create it or run fleet migrate", FleetError),
    (asyncpg.exceptions.UndefinedTableError('relation "vehicles" does not exist'),
     "the database at postgresql://fleet:***@db.example:5432/fleet is not migrated"
     ' (relation "vehicles" does not exist): run fleet migrate', FleetError),
    (asyncpg.exceptions.UndefinedColumnError('column "x" does not exist'), "is not migrated", FleetError),
    (asyncpg.exceptions.InvalidPasswordError('password authentication failed for user "fleet"'),
     "refused the login (password authentication failed for user \"fleet\"): check the user and password",
     FleetError),
    (asyncpg.exceptions.NotNullViolationError("null value"), "refused by PostgreSQL: null value", UsageError),
    (asyncpg.exceptions._base.DataError("invalid input for query argument $1: 99999999999 (value out of int16 range)"),
     "refused by PostgreSQL: invalid input for query argument $1", UsageError),
    (asyncpg.exceptions.CannotConnectNowError("starting up"),
     "PostgreSQL at postgresql://fleet:***@db.example:5432/fleet is not answering (CannotConnectNowError)",
     FleetError),
    (KafkaConnectionError("Unable to bootstrap"),
     "Kafka at broker.example:9092 is not answering (KafkaConnectionError)", FleetError),
    (SaslAuthenticationFailed(), "Kafka at broker.example:9092 refused the login", FleetError),
    (redis.exceptions.ConnectionError("refused"),
     "Redis at redis://:***@cache.example:6379/0 is not answering (ConnectionError)", FleetError),
    (redis.exceptions.AuthenticationError("WRONGPASS"), "check the password in FLEET_REDIS_URL", FleetError),
    (FileNotFoundError(2, "No such file or directory", "/nowhere.ndjson"),
     "cannot use /nowhere.ndjson: No such file or directory", FleetError),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_explain_says_what_is_wrong_and_what_to_do(exc: BaseException, line: str, kind: type) -> None:
    failure = explain(exc, SETTINGS)
    assert type(failure) is kind or isinstance(failure, kind)
    assert line in str(failure)
    assert "s3cret" not in str(failure)


def test_an_exception_nobody_expects_is_a_bug_not_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert explain(KeyError("x"), SETTINGS) is None
    assert explain(ConnectionRefusedError(111, "refused"), SETTINGS) is None  # from no client library: unknown
    assert report(KeyError("x"), SETTINGS, "fleet vehicles") == 1
    assert capsys.readouterr().err == (
        "fleet vehicles: unexpected KeyError, a bug: FLEET_LOG_LEVEL=debug logs where it happened\n")


# --- the consume summary -----------------------------------------------------------------------


def test_the_consume_summary_adds_up_its_workers() -> None:
    one, two = PipelineMetrics(), PipelineMetrics()
    one.readings.labels(outcome="stored").inc(1200)
    one.dead_letters.labels(reason="malformed_json").inc(2)
    two.readings.labels(outcome="duplicate").inc(3)
    two.dead_letters.labels(reason="unknown_vehicle").inc(1)
    total = RunSummary()
    total.add(RunSummary.of(one, 12.5))
    total.add(RunSummary.of(two, 3.0))
    assert total.text() == ("consume: stored 1,200 readings, 3 duplicates, dead letters: malformed_json 2,"
                            " unknown_vehicle 1; 12.5 s")
    assert total.to_json() == {"stored": 1200, "duplicates": 3, "dead_letters": 3,
                               "dead_letters_by_reason": {"malformed_json": 2, "unknown_vehicle": 1},
                               "seconds": 12.5, "workers": 2}
    assert RunSummary().text() == "consume: stored 0 readings, 0 duplicates, dead letters: none; 0.0 s"
