"""The benchmark keeps working: a tiny run of every contestant, end to end.

No speed is asserted (speed belongs in the benchmark's own output); the run must
exit 0, store exactly the readings it was given for every contestant, and report
them all in the JSON, with the pipeline runs' per-stage breakdowns (where py-spy is
installed) and each producer codec aiokafka can use here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.breakdown import ORDER
from bench.measure import py_spy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_benchmark_reports_every_contestant(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--readings", "2000", "--vehicles", "50", "--partitions", "4",
         "--preload", "3000", "--latency-seconds", "3", "--latency-warmup", "1", "--idle-seconds", "1",
         "--geofence-count", "50", "--json-out", str(out), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    has_quix = importlib.util.find_spec("quixstreams") is not None and importlib.util.find_spec("psycopg2") is not None
    contestants = result["contestants"]
    pipelines = ["pipeline", "pipeline-arrays", "pipeline-x2"]
    assert set(contestants) == {"ceiling", "peer", "naive", *pipelines}
    ran = ["ceiling", "naive", *pipelines] + (["peer"] if has_quix else [])
    for name in ran:
        c = contestants[name]
        assert (c["status"], c["rows_stored"]) == ("ok", 2000), c
        assert c["readings_per_s"] > 0 and c["peak_rss_mb"] > 0 and c["cpu_s"] >= 0
    if not has_quix:
        assert contestants["peer"]["status"] == "skipped"
    assert set(result["ratios"]) == {"pipeline/ceiling", "pipeline/peer", "pipeline/naive",
                                     "pipeline-arrays/ceiling", "pipeline-x2/ceiling"}
    assert contestants["pipeline-x2"]["workers"] == 2 and result["dataset"]["array_messages"] == 40
    for name in pipelines:
        b = contestants[name]["breakdown"]
        if py_spy() is None:
            assert b["status"] == "skipped" and "py-spy" in result["breakdown_skipped"]
            continue
        assert b["status"] == "ok", b
        assert list(b["stages"]) == list(ORDER) and b["top_self_frames"]
        total = sum(stage["us_per_reading"] for stage in b["stages"].values())
        assert total == pytest.approx(contestants[name]["cpu_us_per_reading"], rel=0.01, abs=0.1)
    codecs = result["codecs"]
    assert codecs["gzip"]["status"] == codecs["none"]["status"] == "ok"
    for regime in ("dataset", "one_per_batch"):
        assert codecs["gzip"][regime]["wire_bytes_per_reading"] < codecs["none"][regime]["wire_bytes_per_reading"]
        assert codecs["none"][regime]["readings"] == 2000 and codecs["none"][regime]["fetch_cpu_us_per_reading"] > 0
    assert {codecs[c]["status"] for c in ("lz4", "zstd")} <= {"ok", "skipped"}
    assert result["latency"]["status"] == "ok" and result["latency"]["p99_s"] is not None
    assert result["latency"]["rows_stored"] == result["latency"]["readings_sent"]
    assert result["preload"]["status"] == "ok"
    assert result["preload"]["runs"]["pipeline"]["rows_stored"] == 5000
    assert result["ok"] is True and result["failures"] == []
    assert "pipeline (arrays of 50)" in proc.stdout and "pipeline x2" in proc.stdout and "goals:" in proc.stdout
    assert "producer codecs" in proc.stdout
