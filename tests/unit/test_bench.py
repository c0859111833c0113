"""The benchmark's pure parts: dataset, histogram arithmetic, verdicts and the report."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone
from uuid import UUID

import orjson
import pytest

from bench import dataset, report
from bench.__main__ import build_parser, options_from
from fleet_telemetry.core.errors import UsageError

_END = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


def _spec(readings: int = 600, vehicles: int = 7) -> dataset.DatasetSpec:
    return dataset.DatasetSpec(readings=readings, vehicles=vehicles, seed=3, end=_END, span=timedelta(hours=1))


def test_dataset_is_seeded_valid_and_unique() -> None:
    values = list(dataset.generate(_spec()))
    assert values == list(dataset.generate(_spec()))
    assert len(values) == 600
    readings = [orjson.loads(v) for v in values]
    identities = {(r["vehicle_id"], r["time"]) for r in readings}
    assert len(identities) == 600
    assert {r["vehicle_id"] for r in readings} == {str(v) for v in dataset.fleet_ids(_spec())}
    for value, r in zip(values, readings):
        moment = datetime.fromisoformat(r["time"])
        assert _END - timedelta(hours=1) <= moment < _END
        assert moment.microsecond % 1000 == 0  # preloaded rows sit at .5 ms: never a clash
        assert value[15:51].decode() == r["vehicle_id"]  # the producer's key slice
        assert -90 <= r["lat"] <= 90 and 0 <= r["speed"] <= 400 and 0 <= r["fuel_level"] <= 100


def test_copy_row_follows_the_sink_columns() -> None:
    value = next(dataset.generate(_spec()))
    row = dataset.copy_row(value)
    r = orjson.loads(value)
    assert row[0] == datetime.fromisoformat(r["time"]) and row[1] == UUID(r["vehicle_id"])
    assert len(row) == 8 and isinstance(row[2], bytes) and row[7] == r["engine_status"]


def test_geofences_are_seeded_and_of_both_kinds() -> None:
    rows = dataset.geofence_rows(1000, 5)
    assert rows == dataset.geofence_rows(1000, 5)
    assert len(rows) == 1000
    assert {row[1] for row in rows} == {"circle", "polygon"}
    assert all(row[2].startswith("POLYGON((") for row in rows if row[1] == "polygon")


_METRICS = """# TYPE fleet_ingest_latency_seconds histogram
fleet_ingest_latency_seconds_bucket{le="0.1"} 10.0
fleet_ingest_latency_seconds_bucket{le="0.5"} 90.0
fleet_ingest_latency_seconds_bucket{le="1.0"} 100.0
fleet_ingest_latency_seconds_bucket{le="+Inf"} 100.0
fleet_ingest_latency_seconds_count 100.0
fleet_ingest_latency_seconds_sum 30.0
"""


def test_quantiles_interpolate_inside_buckets_like_promql() -> None:
    h = report.histogram([_METRICS], "fleet_ingest_latency_seconds")
    assert h.count == 100 and h.total == 30
    assert report.quantile(h, 0.5) == pytest.approx(0.1 + 0.4 * 40 / 80)
    assert report.quantile(h, 0.05) == pytest.approx(0.05)
    assert report.quantile(h, 0.99) == pytest.approx(0.5 + 0.5 * 9 / 10)
    assert report.quantile(report.Histogram((), 0, 0), 0.5) is None


def test_histograms_add_up_over_workers_and_subtract_a_warm_up() -> None:
    two = report.histogram([_METRICS, _METRICS], "fleet_ingest_latency_seconds")
    assert two.count == 200 and dict(two.buckets)[0.5] == 180
    since = two.minus(report.histogram([_METRICS], "fleet_ingest_latency_seconds"))
    assert since.count == 100 and dict(since.buckets)[0.1] == 10


def test_a_quantile_beyond_the_last_finite_bucket_is_its_lower_bound() -> None:
    text = _METRICS.replace('le="+Inf"} 100.0', 'le="+Inf"} 200.0').replace("_count 100.0", "_count 200.0")
    h = report.histogram([text], "fleet_ingest_latency_seconds")
    assert report.quantile(h, 0.99) == 1.0


def _result(rows: int, expected: int = 1000, exit_code: int | None = 0) -> dict:
    return report.contestant_result(
        "naive", "x", readings=1000, rows=rows, expected_rows=expected, wall_s=2.0, startup_s=1.0, cpu_s=1.5,
        peak_rss_mb=50.0, db_cpu_s=None, exit_code=exit_code, failure=None)


def test_a_contestant_that_stored_fewer_or_more_rows_fails() -> None:
    ok = _result(1000)
    assert ok["status"] == "ok" and ok["readings_per_s"] == 500 and ok["cpu_us_per_reading"] == 1500
    assert _result(999)["status"] == "failed"
    assert "stored 1001 rows, expected 1000" in _result(1001)["reason"]
    assert _result(1000, exit_code=1)["reason"] == "exited with status 1"


def test_ratios_and_goals() -> None:
    fast, slow = _result(1000), _result(1000)
    slow["readings_per_s"] = 100.0
    assert report.ratio(fast, slow) == 5.0
    assert report.ratio(fast, _result(999)) is None
    goals = {g["goal"]: g for g in report.goals({
        "contestants": {"pipeline": fast}, "ratios": {"pipeline/ceiling": 0.9, "pipeline/peer": 5.0},
        "latency": {"status": "ok", "p99_s": 0.7}, "preload": {"status": "ok", "throughput_change": -0.05},
    })}
    assert goals["pipeline_vs_ceiling"]["met"] is True
    assert goals["pipeline_vs_peer"]["met"] is False
    assert goals["latency_p99"]["met"] is False
    assert goals["consumer_rss"]["met"] is True
    assert goals["preload_drop"]["met"] is True


def test_the_table_names_every_contestant_and_the_failures() -> None:
    failed = _result(999)
    text = report.render({"dataset": {"readings": 1000}, "contestants": {"naive": _result(1000), "peer": failed},
                          "ratios": {"pipeline/naive": None}, "failures": ["peer: " + failed["reason"]],
                          "goals": report.goals({})})
    assert "naive" in text and "peer" in text and "FAILED: peer: stored 999 rows" in text


def _options(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ("--contestants", "ceiling,kafka-connect"),
    ("--readings", "0"),
    ("--vehicles", "10", "--readings", "5"),
    ("--latency-seconds", "5", "--latency-warmup", "5"),
    ("--pipeline-env", "BATCH=1"),
])
def test_bad_flags_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        options_from(_options(*argv))


def test_flags_become_options() -> None:
    o = options_from(_options("--readings", "2000", "--vehicles", "50", "--contestants", "ceiling,pipeline",
                              "--pipeline-env", "FLEET_BATCH_MAX_AGE_MS=100"))
    assert (o.readings, o.vehicles, o.contestants) == (2000, 50, ("ceiling", "pipeline"))
    assert o.pipeline_env == {"FLEET_BATCH_MAX_AGE_MS": "100"}


class _Admin:
    """Stands in for the admin connection: records the statements it is given."""

    def __init__(self, statements: list[str]) -> None:
        self.statements = statements

    async def execute(self, sql: str) -> str:
        self.statements.append(sql)
        return ""

    async def close(self) -> None:
        pass


_HOSTILE = 'bench" WITH (FORCE); DROP DATABASE "fleet'


async def test_database_names_from_the_command_line_are_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import fleetops_bench, replay_bench

    statements: list[str] = []

    async def connect(url: str) -> _Admin:
        return _Admin(statements)

    monkeypatch.setattr("asyncpg.connect", connect)
    await fleetops_bench.recreate("postgresql://postgres@127.0.0.1:5432/postgres", _HOSTILE)
    await replay_bench.drop("postgresql://postgres@127.0.0.1:5432/postgres", _HOSTILE)
    quoted = '"bench"" WITH (FORCE); DROP DATABASE ""fleet"'
    assert statements == [
        f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)", f"CREATE DATABASE {quoted}",
        f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)",
    ]


def test_a_database_name_is_percent_encoded_in_its_url() -> None:
    from bench import fleetops_bench

    url = fleetops_bench.with_database("postgresql://u:p@127.0.0.1:5432/fleet?sslmode=disable", "a/b?c#d e")
    assert url == "postgresql://u:p@127.0.0.1:5432/a%2Fb%3Fc%23d%20e?sslmode=disable"
