"""The replay's file reading and command line, without any service: chunks, positions,
CSV conversion, rejects lines, checkpoints and the ledger, dead-letter headers and usage
errors; Kafka ranges over a fake broker."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition

from fleet_telemetry.cli.main import main
from fleet_telemetry.consumers.kafka_loop import KafkaLoop
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.reading import INVALID_READING, Rejection, Source
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.checkpoint import Checkpoint, Ledger
from fleet_telemetry.replay.kafka_source import KafkaRange, KafkaSource, dead_letter_headers
from fleet_telemetry.replay.results import ChunkResult, Counts, reject_line
from fleet_telemetry.replay.sources import CSV, NDJSON, Chunk, FileSource, Lines, Records, csv_row_to_reading, messages
from tests.unit.test_kafka_loop import FakeLog, TimedRec


async def read_all(source: FileSource, resume: dict | None = None) -> list[Chunk]:
    return [chunk async for chunk in source.chunks(resume)]


def lines_of(chunks: list[Chunk]) -> list[tuple[int, bytes]]:
    out = []
    for chunk in chunks:
        assert isinstance(chunk.payload, Lines)
        out += [(source.offset, value) for _, value, source, _ in messages(chunk.payload, [])]
    return out


@pytest.mark.parametrize("compress", [False, True])
async def test_a_file_is_read_in_chunks_and_resumes_after_the_last_one(tmp_path: Path, compress: bool) -> None:
    body = b"".join(b'{"n": %d}\n' % i if i % 4 else b"\n" for i in range(1, 24))
    path = tmp_path / ("in.ndjson.gz" if compress else "in.ndjson")
    path.write_bytes(gzip.compress(body) if compress else body)
    source = FileSource(str(path), None, chunk_lines=5)
    assert (source.fmt, source.gzip) == (NDJSON, compress)

    chunks = await read_all(source)
    assert [c.count for c in chunks] == [5, 5, 5, 5, 3]
    expected = [(i, b'{"n": %d}' % i) for i in range(1, 24) if i % 4]  # blank lines skipped, numbers kept
    assert lines_of(chunks) == expected
    assert chunks[-1].position["line"] == 23 and chunks[-1].position["offset"] == len(body)
    assert sum(c.units for c in chunks) == source.total

    resumed = await read_all(source, chunks[1].position)
    assert lines_of(resumed) == [(n, v) for n, v in expected if n > 10]


async def test_csv_cells_become_reading_fields_with_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "time,vehicle_id,lat,lon,speed,engine_status,note\n"
        '2026-11-01T10:00:00Z,v1,52.5,13.4,50,"{""rpm"": 900,\n ""ignition"": true}",x\n'
        "1793527200000,v2,52.5,13.4,,,\n"
        "2026-11-01T10:00:00Z,v3,north,13.4,1,{oops,\n"
        "2026-11-01T10:00:00Z,v4,52.5,13.4,1,,x,too,many\n"
    )
    source = FileSource(str(path), None, chunk_lines=2)
    chunks = await read_all(source)
    rejections: list[Rejection] = []
    got = [(src.offset, orjson.loads(value)) for c in chunks for _, value, src, _ in messages(c.payload, rejections)]
    assert got == [
        (2, {"time": "2026-11-01T10:00:00Z", "vehicle_id": "v1", "lat": 52.5, "lon": 13.4, "speed": 50.0,
             "engine_status": {"rpm": 900, "ignition": True}, "note": "x"}),
        (4, {"time": 1793527200000, "vehicle_id": "v2", "lat": 52.5, "lon": 13.4}),
        (5, {"time": "2026-11-01T10:00:00Z", "vehicle_id": "v3", "lat": "north", "lon": 13.4, "speed": 1.0,
             "engine_status": "{oops"}),
    ]
    assert [(r.source.offset, r.reason) for r in rejections] == [(6, INVALID_READING)]
    assert "9 cells" in rejections[0].detail


def test_a_byte_order_mark_and_crlf_line_ends_are_not_part_of_the_first_reading() -> None:
    payload = Lines("in.ndjson", NDJSON, 1, b'\xef\xbb\xbf{"n": 1}\r\n{"n": 2}\r\n')
    assert [(src.offset, orjson.loads(value)) for _, value, src, _ in messages(payload, [])] == [
        (1, {"n": 1}), (2, {"n": 2})]


def test_csv_row_conversion_leaves_what_does_not_convert_to_the_decoder() -> None:
    columns = ("vehicle_id", "time", "lat", "lon", "heading")
    row = csv_row_to_reading(columns, ["v", "-5", "1e1", "nan", "east"])
    assert math.isnan(row.pop("lon"))  # a number; the decoder rejects it as not finite
    assert row == {"vehicle_id": "v", "time": -5, "lat": 10.0, "heading": "east"}
    assert csv_row_to_reading(columns, ["", "", "", "", ""]) == {}


async def test_a_csv_header_without_the_required_columns_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("vehicle_id,time,latitude,lon\n")
    with pytest.raises(UsageError, match="lacks column.*lat"):
        await read_all(FileSource(str(path), None, 10))


def test_a_file_name_without_a_known_extension_needs_format(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_text("")
    with pytest.raises(UsageError, match="--format"):
        FileSource(str(path), None, 10)
    assert FileSource(str(path), CSV, 10).fmt == CSV


def test_a_rejects_line_says_where_why_and_what() -> None:
    rejection = Rejection(INVALID_READING, "field 'lat' is 95, must be between -90 and 90",
                          Source("in.ndjson", 0, 12, 3), None, b'{"lat": 95}')
    assert orjson.loads(reject_line(rejection, None, from_file=True)) == {
        "line": 12, "index": 3, "reason": "invalid_reading",
        "detail": "field 'lat' is 95, must be between -90 and 90", "value": '{"lat": 95}',
    }
    kafka = orjson.loads(reject_line(rejection, {"reason": "unknown_vehicle"}, from_file=False))
    assert (kafka["topic"], kafka["partition"], kafka["offset"], kafka["dead_letter"]) == (
        "in.ndjson", 0, 12, {"reason": "unknown_vehicle"})


def test_a_checkpoint_of_another_replay_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "r.checkpoint")
    Checkpoint(path, {"source": "a"}).save({"position": {"line": 3}})
    assert Checkpoint(path, {"source": "a"}).load()["position"] == {"line": 3}  # type: ignore[index]
    with pytest.raises(UsageError, match="--restart"):
        Checkpoint(path, {"source": "b"}).load()
    Checkpoint(path, {"source": "a"}).remove()
    assert Checkpoint(path, {"source": "a"}).load() is None


def test_a_ledger_resumes_where_its_checkpoint_left_the_rejects_and_counts(tmp_path: Path) -> None:
    rejects = str(tmp_path / "r.ndjson")
    checkpoint = Checkpoint(rejects + ".checkpoint", {"source": "a"})
    ledger = Ledger(checkpoint, rejects, dry_run=False, restart=False)
    assert not ledger.resumed and ledger.position is None
    ledger.apply(Chunk(Lines("in", NDJSON, 1, b""), {"line": 2}, 10, 2),
                 ChunkResult(Counts(read=2, stored=1, rejected=Counter(invalid_reading=1)), b'{"line": 2}\n'))
    ledger.save(force=True)
    ledger.apply(Chunk(Lines("in", NDJSON, 3, b""), {"line": 4}, 10, 2),
                 ChunkResult(Counts(read=2, rejected=Counter(invalid_reading=2)), b'{"line": 3}\n{"line": 4}\n'))
    ledger.abandon()  # a failed run saves all it applied

    resumed = Ledger(checkpoint, rejects, dry_run=False, restart=False)
    assert resumed.resumed and resumed.position == resumed.resumed_from == {"line": 4}
    assert (resumed.units, resumed.counts.read, resumed.counts.rejected) == (20, 4, Counter(invalid_reading=3))
    resumed.complete()
    assert not Path(checkpoint.path).exists()
    assert Path(rejects).read_bytes() == b'{"line": 2}\n{"line": 3}\n{"line": 4}\n'


def test_a_ledger_cuts_the_rejects_back_to_what_its_checkpoint_counts(tmp_path: Path) -> None:
    rejects = tmp_path / "r.ndjson"
    checkpoint = Checkpoint(str(rejects) + ".checkpoint", {"source": "a"})
    ledger = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    ledger.apply(Chunk(Lines("in", NDJSON, 1, b""), {"line": 1}, 5, 1),
                 ChunkResult(Counts(read=1, rejected=Counter(malformed_json=1)), b'{"line": 1}\n'))
    ledger.suspend()
    with open(rejects, "ab") as f:  # written after the last checkpoint by a run that then died
        f.write(b'{"line": 2}\n')

    resumed = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    assert resumed.position == {"line": 1} and rejects.read_bytes() == b'{"line": 1}\n'
    resumed.suspend()


def test_a_ledger_that_did_nothing_leaves_nothing_behind(tmp_path: Path) -> None:
    rejects = tmp_path / "r.ndjson"
    checkpoint = Checkpoint(str(rejects) + ".checkpoint", {"source": "a"})
    Ledger(checkpoint, str(rejects), dry_run=False, restart=False).abandon()
    assert not rejects.exists() and not Path(checkpoint.path).exists()


def test_dead_letter_headers_name_where_the_reading_came_from_and_filter_by_reason() -> None:
    headers = {"fleet.error.reason": "unknown_vehicle", "fleet.error.detail": "vehicle v is not registered",
               "fleet.source.topic": "t", "fleet.source.partition": "1", "fleet.source.offset": "7"}
    assert dead_letter_headers(headers, ()) == {"reason": "unknown_vehicle", "topic": "t", "partition": "1",
                                               "offset": "7"}
    assert dead_letter_headers(headers, ("unknown_vehicle", "future_time")) == dead_letter_headers(headers, ())
    assert dead_letter_headers(headers, ("invalid_reading",)) is None
    assert dead_letter_headers({}, ()) == {}


def fake_broker(monkeypatch: pytest.MonkeyPatch, logs: dict[TopicPartition, list[TimedRec]],
                ends: dict[TopicPartition, int] | None = None) -> None:
    """Every Kafka read of the test goes to a fresh fake broker holding ``logs``."""
    monkeypatch.setattr(KafkaLoop, "_aiokafka_consumer", lambda self: FakeLog(copy.deepcopy(logs), ends))


async def kafka_chunks(source: KafkaSource, resume: dict | None = None) -> list[Chunk]:
    return await asyncio.wait_for(_all(source.chunks(resume)), 5)


async def _all(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


def offsets_in(chunks: list[Chunk]) -> list[tuple[int, int]]:
    out = []
    for chunk in chunks:
        assert isinstance(chunk.payload, Records)
        out += [(source.partition, source.offset) for _, _, source, _ in chunk.payload.items]
    return out


async def test_a_kafka_range_is_read_in_chunks_filtered_by_record_time_and_resumes_from_a_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    # Partition 0: records at 0..5 s, then offset 6 without a record (a transaction marker).
    fake_broker(monkeypatch, {p0: [TimedRec(o, 1000 * o) for o in range(6)],
                              p1: [TimedRec(o, 1000 * o + 500) for o in range(4)]}, ends={p0: 7})
    spec = KafkaRange("t", since=datetime.fromtimestamp(1, timezone.utc), until=datetime.fromtimestamp(4, timezone.utc))
    source = KafkaSource(Settings(_env_file=None), spec, chunk_records=3)  # type: ignore[call-arg]
    chunks = await kafka_chunks(source)
    assert offsets_in(chunks) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [chunk.units for chunk in chunks] == [3, 3, 3, 1] and source.total == 11
    assert chunks[-1].position == {"next": {"0": 7, "1": 4}, "stop": {"0": 7, "1": 4}}

    resumed = KafkaSource(Settings(_env_file=None), spec, chunk_records=3)  # type: ignore[call-arg]
    rest = await kafka_chunks(resumed, chunks[0].position)
    assert offsets_in(chunks[:1] + rest) == offsets_in(chunks)
    assert resumed.total == 11 and rest[-1].position == chunks[-1].position


async def test_a_kafka_range_by_offsets_and_dead_letters_by_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    p0, p1 = TopicPartition("dlq", 0), TopicPartition("dlq", 1)
    reasons = ["unknown_vehicle", "invalid_reading", "unknown_vehicle", "future_time", "unknown_vehicle"]
    fake_broker(monkeypatch, {p0: [], p1: [TimedRec(o, headers=(("fleet.error.reason", r.encode()),
                                                                 ("fleet.source.offset", str(o).encode())))
                                           for o, r in enumerate(reasons)]})
    spec = KafkaRange("dlq", partitions=(1,), from_offset=1, to_offset=5, reasons=("unknown_vehicle",),
                      dead_letters=True)
    chunks = await kafka_chunks(KafkaSource(Settings(_env_file=None), spec, chunk_records=10))  # type: ignore[call-arg]
    assert offsets_in(chunks) == [(1, 2), (1, 4)]
    [chunk] = chunks
    assert isinstance(chunk.payload, Records) and chunk.payload.items[0][3] == {"reason": "unknown_vehicle",
                                                                                "offset": "2"}
    assert chunk.units == 4 and chunk.position == {"next": {"1": 5}, "stop": {"1": 5}}

    whole = KafkaRange("dlq", dead_letters=True)
    assert offsets_in(await kafka_chunks(KafkaSource(Settings(_env_file=None), whole, 10))) == [  # type: ignore[call-arg]
        (1, o) for o in range(5)]


async def test_a_kafka_range_of_a_missing_topic_or_partition_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_broker(monkeypatch, {TopicPartition("t", 0): [], TopicPartition("t", 1): []})
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match=r"topic 't' has no partition 5 \(it has 0, 1\)"):
        await kafka_chunks(KafkaSource(settings, KafkaRange("t", partitions=(5,)), 10))
    with pytest.raises(UsageError, match="topic 'nope' does not exist"):
        await kafka_chunks(KafkaSource(settings, KafkaRange("nope"), 10))


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``fleet_telemetry.cli.main.main`` without its logging set-up, which would bind the loggers to this
    test's captured stderr (closed after the test) for the rest of the session."""
    monkeypatch.setattr("fleet_telemetry.core.logs.configure_logging", lambda *args, **kwargs: None)
    return main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "--direct"], "exactly one source"),
        (["replay", "x.ndjson", "--topic", "t", "--direct"], "exactly one source"),
        (["replay", "x.ndjson", "--direct", "--partition", "1"], "--partition"),
        (["replay", "--topic", "t", "--direct", "--reason", "unknown_vehicle"], "--reason only"),
        (["replay", "--dead-letters", "--direct", "--reason", "bogus"], "not one of"),
        (["replay", "--topic", "t", "--direct", "--since", "2026-01-01T00:00:00"], "no UTC offset"),
        (["replay", "--topic", "t", "--direct", "--from-offset", "5", "--to-offset", "5"], "greater"),
        (["replay", "--topic", "t", "--via-kafka", "--workers", "2"], "one process"),
        (["replay", "--topic", "t", "--direct", "--rate", "0"], "--rate"),
        (["replay", "does-not-exist.ndjson", "--direct"], "no such file"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    argv: list[str], message: str, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fleet replay: ") and message in err


def test_a_missing_mode_is_an_argparse_error(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["replay", "x.ndjson"])
    assert exited.value.code == 2
    assert "--direct" in capsys.readouterr().err


def test_summary_json_is_stable(tmp_path: Path) -> None:
    from fleet_telemetry.replay.progress import Summary

    summary = Summary("complete", "x", "direct", False, Counts(3, 1, 1, 0, 0, Counter(invalid_reading=1)),
                      1.0, "r.ndjson", None, None)
    data = json.loads(json.dumps(summary.to_json()))
    assert (data["read"], data["stored"], data["rejected"], data["rejected_total"]) == (
        3, 1, {"invalid_reading": 1}, 1)
    assert "invalid_reading 1" in summary.text() and "r.ndjson" in summary.text()


async def test_a_dry_run_never_overwrites_the_rejects_of_an_interrupted_replay(tmp_path: Path) -> None:
    from fleet_telemetry.replay.results import DIRECT
    from fleet_telemetry.replay.run import Replay, ReplayOptions

    path = tmp_path / "in.ndjson"
    path.write_text("{}\n")
    rejects = tmp_path / "rejects.ndjson"
    rejects.write_text('{"line": 1}\n')
    Path(str(rejects) + ".checkpoint").write_text("{}")
    options = ReplayOptions(mode=DIRECT, file=str(path), dry_run=True, rejects=str(rejects), workers=1)
    with pytest.raises(UsageError, match="interrupted replay"):
        await Replay(options, Settings(_env_file=None)).run()  # type: ignore[call-arg]
    assert rejects.read_text() == '{"line": 1}\n'


_REJECT = (b'{"line": 4, "reason": "malformed_json", "detail": "not JSON at byte 9",'
           b' "value": "{\\"vehicle_id\\""}\n')


def _one_reject(ledger: Ledger, line: int = 1) -> None:
    ledger.apply(Chunk(Lines("in", NDJSON, line, b""), {"line": line}, 5, 1),
                 ChunkResult(Counts(read=1, rejected=Counter(malformed_json=1)), _REJECT))


def _nothing_rejected(ledger: Ledger, line: int = 1) -> None:
    ledger.apply(Chunk(Lines("in", NDJSON, line, b""), {"line": line}, 5, 1), ChunkResult(Counts(read=1, stored=1)))


@pytest.mark.parametrize(("dry_run", "restart"), [(False, False), (True, False), (False, True)])
def test_a_fresh_run_refuses_a_named_file_that_holds_something_else(
    tmp_path: Path, dry_run: bool, restart: bool
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(UsageError) as refused:
        Ledger(Checkpoint(str(notes) + ".checkpoint", {"source": "a"}), str(notes), dry_run=dry_run, restart=restart)
    assert str(refused.value) == (
        f"--rejects {notes} already holds something other than replay rejects;"
        " name a file that does not exist yet, or move this one away")
    assert notes.read_text() == "my notes\n"


def test_an_existing_empty_file_is_used_and_never_removed(tmp_path: Path) -> None:
    given = tmp_path / "given.ndjson"
    given.touch()
    checkpoint = Checkpoint(str(given) + ".checkpoint", {"source": "a"})
    ledger = Ledger(checkpoint, str(given), dry_run=False, restart=False)
    _nothing_rejected(ledger)
    ledger.complete()
    assert given.exists() and given.read_bytes() == b""

    Ledger(checkpoint, str(given), dry_run=False, restart=False).abandon()
    assert given.exists()

    interrupted = Ledger(checkpoint, str(given), dry_run=False, restart=False)
    _nothing_rejected(interrupted)
    interrupted.suspend()
    resumed = Ledger(checkpoint, str(given), dry_run=False, restart=False)
    assert resumed.resumed
    _nothing_rejected(resumed, 2)
    resumed.complete()
    assert given.exists() and not Path(checkpoint.path).exists()


def test_a_rerun_replaces_the_rejects_of_an_earlier_run_and_keeps_the_file(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.ndjson"
    rejects.write_bytes(_REJECT + _REJECT)
    checkpoint = Checkpoint(str(rejects) + ".checkpoint", {"source": "a"})
    ledger = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    _one_reject(ledger)
    ledger.complete()
    assert rejects.read_bytes() == _REJECT

    clean = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    _nothing_rejected(clean)
    clean.complete()
    assert rejects.exists() and rejects.read_bytes() == b""  # emptied: the earlier rejects are stale


def test_a_file_the_run_created_goes_when_nothing_was_rejected_even_after_a_resume(tmp_path: Path) -> None:
    rejects = tmp_path / "new.ndjson"
    checkpoint = Checkpoint(str(rejects) + ".checkpoint", {"source": "a"})
    ledger = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    _nothing_rejected(ledger)
    ledger.suspend()
    resumed = Ledger(checkpoint, str(rejects), dry_run=False, restart=False)
    _nothing_rejected(resumed, 2)
    resumed.complete()
    assert not rejects.exists()


def test_a_pipe_is_written_to_without_truncating_or_removing_it(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "rejects.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ledger = Ledger(Checkpoint(str(tmp_path / "c.checkpoint"), {"source": "a"}), str(fifo), dry_run=False,
                        restart=False)
        _one_reject(ledger)
        ledger.save(force=True)
        _nothing_rejected(ledger, 2)
        ledger.complete()
        assert os.read(reader, 4096) == _REJECT
    finally:
        os.close(reader)
    assert fifo.is_fifo()


async def test_fleet_replay_refuses_a_rejects_file_of_something_else_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "in.ndjson"
    path.write_text("{}\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    monkeypatch.setenv("FLEET_METRICS_PORT", "0")
    code = await asyncio.to_thread(main, ["replay", str(path), "--direct", "--rejects", str(notes)])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fleet replay: --rejects {notes} already holds something other than replay rejects;"
        " name a file that does not exist yet, or move this one away"]
    assert notes.read_text() == "my notes\n"


def test_the_checkpoint_of_a_replay_writing_rejects_to_a_pipe_lives_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from fleet_telemetry.core.settings import Settings
    from fleet_telemetry.replay.results import DIRECT
    from fleet_telemetry.replay.run import Replay, ReplayOptions

    path = tmp_path / "in.ndjson"
    path.write_text("{}\n")
    fifo = tmp_path / "rejects.fifo"
    os.mkfifo(fifo)
    monkeypatch.chdir(tmp_path / ".")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    piped = Replay(ReplayOptions(mode=DIRECT, file=str(path), rejects=str(fifo)), settings)
    assert piped.checkpoint.path == f"fleet-replay-{piped.id}.checkpoint"
    filed = Replay(ReplayOptions(mode=DIRECT, file=str(path), rejects=str(tmp_path / "r.ndjson")), settings)
    assert filed.checkpoint.path == str(tmp_path / "r.ndjson") + ".checkpoint"
