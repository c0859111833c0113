"""The fault soak keeps working: a tiny run of ``python -m bench.faults``, end to end.

One worker kill, a 3 s PostgreSQL outage (a proxy cut) and Redis unresponsive for 2 s
while 3,000 messages stream in: the run must exit 0, and its table and JSON must say
that nothing was lost or duplicated and every status is right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_soak_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--readings", "3000", "--rate", "100", "--vehicles", "200",
         "--kills", "1", "--alone-seconds", "2", "--postgres", "proxy", "--postgres-outage", "3",
         "--redis-fault", "freeze", "--redis-outage", "2", "--geofences", "50", "--json", str(out), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    found = result["found"]
    assert (found["lost"], found["duplicated"], found["misrouted"]) == (0, 0, 0), found
    assert found["stored"] == result["sent"]["readings"] > 2500
    assert found["dead_lettered"] == result["sent"]["broken"] > 0
    assert found["statuses_right"] == found["statuses_checked"] == 200
    assert sorted(f["fault"] for f in result["faults"]) == ["PostgreSQL outage", "Redis outage", "worker kill"]
    assert result["workers"]["kills"] == 1 and result["workers"]["crashes"] == []
    assert "| lost | 0 |" in proc.stdout and "| duplicated | 0 |" in proc.stdout
    assert "result: ok" in proc.stdout
