"""What a replay yields: its two modes, the counts, each chunk's result and the lines of
the rejects file. Pure: no I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

from fleet_telemetry.core.reading import Rejection

DIRECT: Final = "direct"
"""``--direct``: written into PostgreSQL through the consumer's sink."""
VIA_KAFKA: Final = "via-kafka"
"""``--via-kafka``: published to the telemetry topic for the running consumers."""


@dataclass
class Counts:
    """Readings read, and what became of them."""

    read: int = 0
    stored: int = 0
    """``--direct``: new rows in ``vehicle_telemetry``."""
    duplicates: int = 0
    """``--direct``: already stored (or already in the rollups), skipped."""
    folded: int = 0
    """``--direct``: older than the raw retention, merged into the rollups only."""
    published: int = 0
    """``--via-kafka``: sent to the telemetry topic."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected readings by reason."""

    def add(self, other: Counts) -> None:
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.folded += other.folded
        self.published += other.published
        self.rejected.update(other.rejected)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rejected"] = dict(self.rejected)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counts:
        return cls(data["read"], data["stored"], data["duplicates"], data["folded"], data["published"],
                   Counter(data["rejected"]))


@dataclass
class ChunkResult:
    """What one chunk became (sent back from a worker process)."""

    counts: Counts = field(default_factory=Counts)
    rejects: bytes = b""
    """Lines for the rejects file, in source order."""


def reject_line(rejection: Rejection, dead_letter: dict[str, str] | None, from_file: bool) -> bytes:
    """One line of the rejects file: where the reading was, why it was rejected, its bytes."""
    source = rejection.source
    where: dict[str, Any] = (
        {"line": source.offset} if from_file
        else {"topic": source.topic, "partition": source.partition, "offset": source.offset}
    )
    if source.index is not None:
        where["index"] = source.index
    where["reason"] = rejection.reason
    where["detail"] = rejection.detail
    where["value"] = rejection.value.decode("utf-8", "replace")
    if dead_letter:
        where["dead_letter"] = dead_letter
    return orjson.dumps(where) + b"\n"
