"""What a ``fleet consume`` run did, read from its workers' metrics when they stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import REASONS


@dataclass
class RunSummary:
    """Readings stored, duplicates dropped and dead letters by reason, over ``seconds``."""

    stored: int = 0
    duplicates: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0

    @classmethod
    def of(cls, metrics: PipelineMetrics, seconds: float) -> "RunSummary":
        """One worker's numbers."""
        letters = {reason: int(metrics.value("fleet_dead_letters_total", reason=reason)) for reason in REASONS}
        return cls(
            stored=int(metrics.value("fleet_readings_total", outcome="stored")),
            duplicates=int(metrics.value("fleet_readings_total", outcome="duplicate")),
            dead_letters={reason: n for reason, n in letters.items() if n},
            seconds=seconds, workers=1,
        )

    def add(self, other: "RunSummary") -> None:
        """Adds another worker's numbers (the run lasted as long as the longest worker)."""
        self.stored += other.stored
        self.duplicates += other.duplicates
        for reason, n in other.dead_letters.items():
            self.dead_letters[reason] = self.dead_letters.get(reason, 0) + n
        self.seconds = max(self.seconds, other.seconds)
        self.workers += other.workers

    def to_json(self) -> dict[str, Any]:
        return {"stored": self.stored, "duplicates": self.duplicates,
                "dead_letters": sum(self.dead_letters.values()), "dead_letters_by_reason": dict(self.dead_letters),
                "seconds": round(self.seconds, 3), "workers": self.workers}

    def text(self) -> str:
        """``consume: stored 1,200 readings, 3 duplicates, dead letters: malformed_json 2; 12.5 s``."""
        letters = ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.dead_letters.items())) or "none"
        return (f"consume: stored {self.stored:,} readings, {self.duplicates:,} duplicates, "
                f"dead letters: {letters}; {self.seconds:.1f} s")
