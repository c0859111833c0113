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
    big = {**_result(1000), "peak_rss_mb": 160.0}
    goals = {g["goal"]: g for g in report.goals({
        "contestants": {"pipeline": fast, "pipeline-x2": big},
        "ratios": {"pipeline/ceiling": 0.6, "pipeline-x2/ceiling": 0.7, "pipeline/peer": 3.0},
        "latency": {"status": "ok", "p99_s": 0.2}, "preload": {"status": "ok", "throughput_change": -0.05},
    })}
    assert [g["goal"] for g in report.goals({})] == [key for key, _ in report.GOALS]
    assert goals["pipeline_vs_ceiling"]["met"] is True
    assert goals["pipeline_x2_vs_ceiling"]["met"] is False
    assert (goals["pipeline_cpu"]["measured"], goals["pipeline_cpu"]["met"]) == (1500.0, False)
    assert goals["pipeline_vs_peer"]["met"] is False
    assert goals["latency_p99"]["met"] is True
    assert (goals["consumer_rss"]["measured"], goals["consumer_rss"]["met"]) == (160.0, False)
    assert goals["preload_drop"]["met"] is True
    low = {g["goal"]: g["met"] for g in report.goals({
        "contestants": {"pipeline": {**fast, "cpu_us_per_reading": 9.5}},
        "ratios": {"pipeline/ceiling": 0.4, "pipeline-x2/ceiling": 0.85, "pipeline/peer": 4.2},
        "latency": {"status": "ok", "p99_s": 0.3}})}
    assert low == {"pipeline_vs_ceiling": False, "pipeline_x2_vs_ceiling": True, "pipeline_cpu": True,
                   "pipeline_vs_peer": True, "latency_p99": False, "consumer_rss": True, "preload_drop": None}


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
    ("--codecs", "gzip,brotli"),
    ("--profile", "flame.svg"),
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
    assert o.breakdown is True and o.codecs == ("gzip", "lz4", "zstd", "none")
    default = options_from(_options())
    assert default.contestants == ("ceiling", "peer", "naive", "pipeline", "pipeline-arrays", "pipeline-x2")
    quiet = options_from(_options("--breakdown", "off", "--codecs", ""))
    assert (quiet.breakdown, quiet.codecs) == (False, ())


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


# --- the per-stage breakdown ------------------------------------------------------

_ROOT = ('process 7:"python -m fleet_telemetry.cli consume";<module> (fleet_telemetry/cli/__main__.py:7);'
         "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80);"
         "KafkaLoop._iterate (fleet_telemetry/consumers/kafka_loop.py:261)")
_STORE = ("DecodeStep.submit (fleet_telemetry/consumers/stages.py:84);"
          "StoreStep.submit (fleet_telemetry/consumers/stages.py:105);Retrier.__call__ (fleet_telemetry/consumers/chain.py:64)")


@pytest.mark.parametrize(("tail", "stage"), [
    ("TelemetryPipeline.submit (fleet_telemetry/consumers/pipeline.py:93);"
     "DecodeStep.submit (fleet_telemetry/consumers/stages.py:78);decode_message (fleet_telemetry/consumers/decode.py:90)",
     "decode"),
    (_STORE + ";TelemetrySink.write (fleet_telemetry/consumers/sink.py:150);"
     "Connection.copy_records_to_table (asyncpg/connection.py:1150)", "sink"),
    (_STORE + ";DeadLetters.publish (fleet_telemetry/consumers/deadletter.py:80);"
     "AIOKafkaProducer.send (aiokafka/producer/producer.py:470);"
     "DefaultRecordBatchBuilder.append (aiokafka/record/default_records.py:430)", "dead letters"),
    (_STORE + ";StatusStep.submit (fleet_telemetry/consumers/stages.py:150);"
     "StatusWriter.update (fleet_telemetry/consumers/status.py:60)", "status"),
    (_STORE + ";StatusStep.submit (fleet_telemetry/consumers/stages.py:150);"
     "RulesStep.submit (fleet_telemetry/consumers/stages.py:226);Retrier.__call__ (fleet_telemetry/consumers/chain.py:64);"
     "GeofenceIndex.near_segment (fleet_telemetry/consumers/rules/index.py:116)", "rules"),
    (_STORE + ";StatusStep.submit (fleet_telemetry/consumers/stages.py:150);"
     "RulesStep.submit (fleet_telemetry/consumers/stages.py:226);TripsStep.submit (fleet_telemetry/consumers/stages.py:280);"
     "TripTracker.after_write (fleet_telemetry/trips/tracker.py:90);advance (fleet_telemetry/trips/machine.py:80);"
     "plausible_move (fleet_telemetry/core/geodesy.py:40)", "trips"),
    (_STORE + ";CommitStep.submit (fleet_telemetry/consumers/stages.py:240)", "commit"),
    ("KafkaLoop.commit.<locals>.send (fleet_telemetry/consumers/kafka_loop.py:344);"
     "AIOKafkaConsumer.commit (aiokafka/consumer/consumer.py:560)", "commit"),
    ("AIOKafkaConsumer.getmany (aiokafka/consumer/consumer.py:1197);"
     "PartitionRecords._unpack_records (aiokafka/consumer/fetcher.py:256);gzip_decode (aiokafka/codec.py:60);"
     "_GzipReader.read (gzip.py:507)", "fetch"),
    ("Batch.note_offset (fleet_telemetry/consumers/batch.py:40)", "batching"),
])
def test_a_sample_belongs_to_the_innermost_stage_on_its_stack(tail: str, stage: str) -> None:
    from bench import breakdown

    assert breakdown.classify((_ROOT + ";" + tail).split(";")) == stage


@pytest.mark.parametrize(("stack", "stage"), [
    ("BaseEventLoop._run_once (asyncio/base_events.py:1884);EpollSelector.select (selectors.py:468)", "event loop"),
    ("Sender._sender_routine (aiokafka/producer/sender.py:90);MessageAccumulator.drain_by_nodes"
     " (aiokafka/producer/message_accumulator.py:400)", "dead letters"),
    ("Task.__step (asyncio/tasks.py:1);lz4_decode (aiokafka/codec.py:185)", "fetch"),
    ("Worker.run (fleet_telemetry/consumers/worker.py:128);_find_and_load (<frozen importlib._bootstrap>:1176)",
     "start-up"),
    ("MetricsHandler.do_GET (prometheus_client/exposition.py:300)", "other"),
    ('process 7:"python -m fleet_telemetry.cli consume"', "other"),
    ("KafkaLoop.committed (fleet_telemetry/consumers/kafka_loop.py:224)", "other"),
])
def test_samples_without_a_stage_frame_go_by_what_runs(stack: str, stage: str) -> None:
    from bench import breakdown

    assert breakdown.classify(stack.split(";")) == stage


def test_frames_parse_with_and_without_a_line() -> None:
    from bench.breakdown import Frame, parse_frame

    assert parse_frame("Connection.copy_records_to_table (asyncpg/connection.py:1150)") == Frame(
        "Connection.copy_records_to_table", "asyncpg/connection.py")
    assert parse_frame("__create_fn__.<locals>.__hash__ (<string>:3)").label == "__create_fn__.<locals>.__hash__ (<string>)"
    assert parse_frame('process 7:"python -m x (y)"').file == ""


def test_the_breakdown_scales_shares_to_the_measured_cpu_and_leaves_start_up_out() -> None:
    from bench import breakdown

    decode = _ROOT + ";DecodeStep.submit (fleet_telemetry/consumers/stages.py:78);decode_message (x/consumers/decode.py:90)"
    text = "\n".join([
        decode + " 30",
        decode.replace(":90)", ":95)") + " 10",  # same function, other line: one self frame
        _ROOT + ";" + _STORE + ";TelemetrySink.write (fleet_telemetry/consumers/sink.py:150) 40",
        "BaseEventLoop._run_once (asyncio/base_events.py:1884);EpollSelector.select (selectors.py:468) 20",
        "<module> (m.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 50",
        "not a stack line",
    ])
    out = breakdown.breakdown(breakdown.parse_collapsed(text), 20.0, top=2)
    assert (out["samples"], out["startup_samples"]) == (100, 50)
    assert list(out["stages"]) == list(breakdown.ORDER)
    assert out["stages"]["decode"] == {"samples": 40, "share": 0.4, "us_per_reading": 8.0}
    assert out["stages"]["sink"]["us_per_reading"] == 8.0
    assert out["stages"]["event loop"]["us_per_reading"] == 4.0
    assert out["stages"]["rules"] == {"samples": 0, "share": 0.0, "us_per_reading": 0.0}
    assert out["top_self_frames"] == [
        {"frame": "decode_message (x/consumers/decode.py)", "stage": "decode", "samples": 40, "share": 0.4},
        {"frame": "TelemetrySink.write (fleet_telemetry/consumers/sink.py)", "stage": "sink", "samples": 40,
         "share": 0.4},
    ]
    empty = breakdown.breakdown([], None)
    assert empty["samples"] == 0 and empty["stages"]["decode"]["us_per_reading"] is None


def test_the_report_prints_the_breakdown_of_each_pipeline_run_and_the_codecs() -> None:
    from bench import breakdown

    stages = breakdown.breakdown(breakdown.parse_collapsed(
        _ROOT + ";DecodeStep.submit (fleet_telemetry/consumers/stages.py:78) 3\n" + _ROOT + ";" + _STORE + " 1"), 40.0)
    one = {**_result(1000), "breakdown": {"status": "ok", "profiler_cpu_s": 0.4, **stages}}
    arrays = {**_result(1000), "breakdown": {"status": "skipped", "reason": "py-spy recorded no samples"}}
    probe = {"status": "ok", "wire_bytes_per_reading": 80.0, "producer_cpu_us_per_reading": 40.0,
             "fetch_cpu_us_per_reading": 9.5, "fetch_readings_per_s": 100000.0}
    codecs = {"gzip": {"status": "ok", "dataset": probe, "one_per_batch": {**probe, "fetch_cpu_us_per_reading": 18.25}},
              "lz4": {"status": "skipped", "reason": "aiokafka needs cramjam for lz4"}}
    text = report.render({"contestants": {"pipeline": one, "pipeline-arrays": arrays}, "codecs": codecs,
                          "settings": {"producer_compression": "gzip"}, "goals": report.goals({})})
    assert "pipeline (arrays of 50)" in text
    assert "decode" in text and "30.0 (75%)" in text and "10.0 (25%)" in text
    assert "per-stage breakdown of pipeline-arrays: skipped: py-spy recorded no samples" in text
    assert "top self frames of pipeline: DecodeStep.submit 75%" in text
    gzip = next(line for line in text.splitlines() if line.startswith("  gzip"))
    assert "80 B, producer 40.0, fetch 9.5" in gzip and "fetch 18.2" in gzip
    assert "lz4      skipped: aiokafka needs cramjam for lz4" in text
    skipped = report.render({"contestants": {"pipeline": _result(1000)}, "breakdown_skipped": "py-spy is not installed"})
    assert "per-stage breakdown: skipped: py-spy is not installed" in skipped


# --- gateway arrays, codecs, profiler ------------------------------------------------


def test_gateway_arrays_hold_the_same_readings_in_order_keyed_by_gateway() -> None:
    spec = _spec(readings=600, vehicles=70)
    values = list(dataset.generate(spec))
    messages = list(dataset.gateway_arrays(values, 70, size=50))
    assert messages[0] == (b"gateway-00000", b"[" + b",".join(values[:50]) + b"]")
    def identity(r: dict) -> tuple[str, str]:
        return r["vehicle_id"], r["time"]

    assert sorted((r for _, v in messages for r in orjson.loads(v)), key=identity) == sorted(
        (orjson.loads(v) for v in values), key=identity)
    # Gateway 0 serves vehicles 0-49 (440 readings), gateway 1 vehicles 50-69 (160): full
    # arrays as they fill, then what is left of each, gateway by gateway.
    assert [len(orjson.loads(v)) for _, v in messages[-2:]] == [40, 10]
    assert [k for k, _ in messages[-2:]] == [b"gateway-00000", b"gateway-00001"]
    assert all(len(orjson.loads(v)) == 50 for _, v in messages[:-2]) and len(messages) == 13
    fleet = dataset.fleet_ids(spec)
    per_vehicle: dict[str, list[str]] = {}
    for key, value in messages:
        gateway = int(key.decode().rsplit("-", 1)[1])
        for r in orjson.loads(value):
            assert fleet.index(UUID(r["vehicle_id"])) // 50 == gateway
            per_vehicle.setdefault(r["vehicle_id"], []).append(r["time"])
    assert all(times == sorted(times) for times in per_vehicle.values())


def test_the_wire_size_shrinks_with_a_codec_and_none_is_always_there() -> None:
    from bench import compression

    values = list(dataset.generate(_spec(readings=400, vehicles=20)))
    messages = [(dataset.reading_key(v), v) for v in values]
    plain = compression.wire_bytes(messages, "none", batch_size=4096)
    assert plain > sum(len(v) for v in values)
    assert compression.wire_bytes(messages, "gzip", batch_size=4096) < plain / 2
    assert compression.codec_missing("none") is None and compression.codec_missing("gzip") is None
    assert compression.producer_codec("none") is None and compression.producer_codec("lz4") == "lz4"
    assert compression.producer_codec_name(None) == "none"


def test_py_spy_samples_children_without_pausing_them_in_the_format_the_name_asks_for() -> None:
    from bench.measure import py_spy_command

    cmd = py_spy_command("py-spy", 42, "stacks.txt", 250)
    assert cmd[:4] == ["py-spy", "record", "--pid", "42"]
    assert {"--subprocesses", "--nonblocking"} <= set(cmd)
    assert cmd[cmd.index("--rate") + 1] == "250" and cmd[cmd.index("--format") + 1] == "raw"
    assert py_spy_command("py-spy", 42, "x.svg", 100)[-3] == "flamegraph"


def test_profile_files_are_named_per_run() -> None:
    from bench.measure import profile_path

    assert profile_path("/tmp/p.txt", "") == "/tmp/p.txt"
    assert profile_path("/tmp/p.txt", "x2") == "/tmp/p-x2.txt"
    assert profile_path("/tmp/dir.d/p", "latency") == "/tmp/dir.d/p-latency"


def test_the_producer_default_is_lz4_where_aiokafka_has_it_and_the_dataset_uses_it() -> None:
    import inspect

    from aiokafka.codec import has_lz4

    from fleet_telemetry.ingest.producer import DEFAULT_COMPRESSION, TelemetryProducer

    assert DEFAULT_COMPRESSION == ("lz4" if has_lz4() else "gzip")
    assert inspect.signature(TelemetryProducer).parameters["compression_type"].default == DEFAULT_COMPRESSION
    for produce in (dataset.produce, dataset.produce_file):
        assert inspect.signature(produce).parameters["compression"].default == DEFAULT_COMPRESSION


def test_a_run_without_py_spy_or_samples_has_no_breakdown_and_one_with_them_keeps_its_stacks(tmp_path) -> None:
    from bench.measure import ProcessRun
    from bench.suite import Bench, Options
    from fleet_telemetry.core.settings import Settings

    bench = Bench(Settings(), Options(readings=100, vehicles=5, profile=str(tmp_path / "stacks.txt")), print)
    run = ProcessRun(exit_code=0, timed_out=False, failure=None, spawned=0.0, ready=1.0, done=2.0, cpu_total_s=1.0,
                     cpu_at_ready_s=0.0, peak_rss_mb=1.0, db_cpu_s=None, profiler_cpu_s=0.25)
    result = {"cpu_us_per_reading": 10.0}
    assert bench.stage_breakdown("pipeline", None, result, run)["status"] == "skipped"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no samples" in bench.stage_breakdown("pipeline", str(empty), result, run)["reason"]
    recorded = tmp_path / "recorded.txt"
    recorded.write_text(_ROOT + ";DecodeStep.submit (fleet_telemetry/consumers/stages.py:78) 4\n")
    out = bench.stage_breakdown("pipeline-x2", str(recorded), result, run)
    assert (out["status"], out["profiler_cpu_s"], out["rate_hz"]) == ("ok", 0.25, 250)
    assert out["stages"]["decode"]["us_per_reading"] == 10.0
    assert (tmp_path / "stacks-x2.txt").read_text() == recorded.read_text()
