"""Where a pipeline run's CPU went, stage by stage, from py-spy's collapsed stacks.

py-spy (``record --format raw``) writes one line per distinct stack: the frames from the
outermost to the innermost, separated by ``;``, then a space and the number of samples.
Each frame reads ``function (file:line)``; with ``--subprocesses`` the first one names the
process.

A sample belongs to the stage of the innermost frame on its stack that belongs to a stage
(:data:`STAGES`): a reading's COPY runs inside the store step, which runs inside the decode
step, so the innermost stage is the one doing the work. Samples with no stage frame are
placed by what is running: record parsing and decompression are fetch, the dead-letter
producer's background sender is dead letters, the event loop's own frames (waiting for and
dispatching I/O) are the event loop; imports are start-up, which the benchmark's CPU figure
leaves out too, so they are left out of the shares. Everything else is other.

Each stage's share of the samples, times the run's measured client CPU per reading, is
the stage's CPU per reading. Pure: no I/O here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# (stage, keys): a key with a "/" or ending in ".py" is a path and matches a frame whose
# file contains it; any other key is a dotted name and matches a frame whose function
# name holds those components in a row ("KafkaLoop.commit" matches
# "KafkaLoop.commit.<locals>.send", not "KafkaLoop.committed").
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode", ("consumers/decode.py", "DecodeStep")),
    ("sink", ("consumers/sink.py", "StoreStep")),
    ("dead letters", ("consumers/deadletter.py",)),
    ("status", ("consumers/status.py", "StatusStep")),
    ("rules", ("consumers/rules/", "RulesStep")),
    ("trips", ("fleet_telemetry/trips/", "TripsStep")),
    ("commit", ("CommitStep", "KafkaLoop.commit", "KafkaLoop._commit")),
    ("fetch", ("aiokafka/consumer/fetcher.py", "getmany")),
    ("batching", ("consumers/batch.py",)),
)
# Frames that mean a stage only when no stage frame is on the stack.
_DETACHED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fetch", ("aiokafka/record/", "aiokafka/codec.py", "gzip.py", "_compression.py", "zlib", "/lz4/",
               "cramjam", "zstandard")),
    ("dead letters", ("aiokafka/producer/",)),
)
_EVENT_LOOP = ("asyncio/", "selectors.py", "uvloop/")
_STARTUP = ("<frozen importlib._bootstrap",)

EVENT_LOOP = "event loop"
OTHER = "other"
STARTUP = "start-up"
ORDER: tuple[str, ...] = ("fetch", "batching", "decode", "sink", "dead letters", "status", "rules", "trips", "commit",
                          EVENT_LOOP, OTHER)
"""The stages in the order a reading meets them, as the report lists them (start-up is not among them)."""

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    name: str
    file: str

    @property
    def label(self) -> str:
        """``function (file)``: the frame without its line, as the report lists it."""
        return f"{self.name} ({self.file})" if self.file else self.name


def parse_frame(text: str) -> Frame:
    """``"f (a/b.py:12)"`` -> ``Frame("f", "a/b.py")``; a process or thread frame keeps its text as name."""
    if text.startswith("process ") or text.startswith("thread "):
        return Frame(text, "")
    m = _FRAME.match(text)
    return Frame(m["name"], m["file"]) if m else Frame(text, "")


def parse_collapsed(text: str) -> Iterator[tuple[list[str], int]]:
    """Each ``(frames, samples)`` of py-spy's raw output; lines that are not stacks are skipped."""
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _matches(frame: Frame, key: str) -> bool:
    if "/" in key or key.endswith(".py"):
        return key in frame.file
    parts, wanted = frame.name.split("."), key.split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def _stage_of(frame: Frame, table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    return next((name for name, keys in table if any(_matches(frame, k) for k in keys)), None)


def classify(frames: Sequence[str]) -> str:
    """The stage of one sample, given its frames from the outermost to the innermost."""
    parsed = [parse_frame(f) for f in frames]
    if any(f.file.startswith(_STARTUP) for f in parsed):
        return STARTUP
    for frame in reversed(parsed):
        stage = _stage_of(frame, STAGES)
        if stage is not None:
            return stage
    for frame in reversed(parsed):
        stage = _stage_of(frame, _DETACHED)
        if stage is not None:
            return stage
    if parsed and any(part in parsed[-1].file for part in _EVENT_LOOP):
        return EVENT_LOOP
    return OTHER


def _self_label(frames: Sequence[str]) -> str:
    leaf = parse_frame(frames[-1]) if frames else Frame("", "")
    return "(no Python frame)" if not leaf.file else leaf.label


def breakdown(stacks: Iterable[tuple[Sequence[str], int]], cpu_us_per_reading: float | None, *,
              top: int = 15) -> dict[str, Any]:
    """Samples, share and CPU microseconds per reading of every stage, plus the top self frames.

    ``stages`` lists every stage of :data:`ORDER` (zeros included); shares and the top
    frames are of the samples outside start-up. ``us_per_reading`` is ``None`` when
    ``cpu_us_per_reading`` is.
    """
    per_stage: Counter[str] = Counter()
    per_leaf: Counter[tuple[str, str]] = Counter()
    for frames, count in stacks:
        stage = classify(frames)
        per_stage[stage] += count
        if stage != STARTUP:
            per_leaf[(_self_label(frames), stage)] += count
    counted = sum(n for stage, n in per_stage.items() if stage != STARTUP)

    def share(n: int) -> float:
        return round(n / counted, 4) if counted else 0.0

    stages = {
        stage: {
            "samples": per_stage[stage], "share": share(per_stage[stage]),
            "us_per_reading": None if cpu_us_per_reading is None or not counted
            else round(per_stage[stage] / counted * cpu_us_per_reading, 2),
        }
        for stage in ORDER
    }
    return {
        "samples": counted,
        "startup_samples": per_stage[STARTUP],
        "cpu_us_per_reading": cpu_us_per_reading,
        "stages": stages,
        "top_self_frames": [
            {"frame": label, "stage": stage, "samples": n, "share": share(n)}
            for (label, stage), n in per_leaf.most_common(top)
        ],
    }
