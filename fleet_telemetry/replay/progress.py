"""What a replay shows while it runs and when it ends: a progress bar with rate and ETA
on a terminal (log lines otherwise), the pacing of ``--rate``, and the summary."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

import structlog

from fleet_telemetry.replay.results import DIRECT, Counts

log = structlog.get_logger("fleet.replay")

_LOG_EVERY_S: Final = 10.0
_BAR_EVERY_S: Final = 0.25


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A progress bar with rate and ETA on a terminal, a log line every 10 s otherwise."""

    def __init__(self, stream: IO[str], *, tty: bool, total: Callable[[], int | None], done: int, read: int) -> None:
        self._stream = stream
        self._tty = tty
        self._total = total
        self._started = time.monotonic()
        self._units0 = done
        self._read0 = read
        self._shown = 0.0
        self._width = 0

    def update(self, units: int, counts: Counts, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._shown < (_BAR_EVERY_S if self._tty else _LOG_EVERY_S):
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-6)
        rate = (counts.read - self._read0) / elapsed
        total = self._total()
        fraction = min(1.0, units / total) if total else None
        eta = None
        if fraction is not None and units > self._units0 and total:
            eta = (total - units) / ((units - self._units0) / elapsed)
        rejected = sum(counts.rejected.values())
        if self._tty:
            width = 24
            filled = int(width * (fraction or 0.0))
            bar = "#" * filled + "-" * (width - filled)
            pct = f"{fraction * 100:5.1f}%" if fraction is not None else "  ?  "
            text = (f"\r[{bar}] {pct} {counts.read:,} read, {rejected:,} rejected, {rate:,.0f}/s"
                    f", ETA {_duration(eta) if eta is not None else '?'}")
            self._stream.write(text.ljust(self._width))
            self._width = len(text)
            if final:
                self._stream.write("\n")
            self._stream.flush()
        elif not final:
            log.info("replay progress", read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                     folded=counts.folded, published=counts.published, rejected=rejected,
                     percent=None if fraction is None else round(fraction * 100, 1),
                     rate_per_s=round(rate), eta_s=None if eta is None else round(eta))


class Pacer:
    """``--rate``: releases chunks so that at most ``rate`` lines or records go per second.

    :meth:`wait` blocks until the next chunk may go, or until ``stop`` is set.
    """

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._started: float | None = None
        self._sent = 0

    async def wait(self, count: int, stop: asyncio.Event) -> None:
        if not self._rate:
            return
        if self._started is None:
            self._started = time.monotonic()
        delay = self._started + self._sent / self._rate - time.monotonic()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        self._sent += count


@dataclass
class Summary:
    """How a replay ended, as the command prints it (:meth:`text`, or :meth:`to_json` with ``--json``)."""

    status: str
    source: str
    mode: str
    dry_run: bool
    counts: Counts
    seconds: float
    rejects_file: str | None
    checkpoint: str | None
    resumed_from: dict[str, Any] | None
    rollups: dict[str, Any] | None = None
    """``--direct``: what the final :func:`fleet_telemetry.lifecycle.rollups.refresh_dirty_rollups` did."""

    def to_json(self) -> dict[str, Any]:
        counts = self.counts.to_json()
        return {
            "status": self.status, "source": self.source, "mode": self.mode, "dry_run": self.dry_run,
            **counts, "rejected_total": sum(self.counts.rejected.values()),
            "seconds": round(self.seconds, 3), "rejects_file": self.rejects_file,
            "checkpoint": self.checkpoint, "resumed_from": self.resumed_from, "rollups": self.rollups,
        }

    def text(self) -> str:
        c = self.counts
        would = "would be " if self.dry_run else ""
        rate = c.read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"replay of {self.source} (--{self.mode}{', dry run' if self.dry_run else ''}): {self.status}",
            f"  read        {c.read:>12,}  readings in {self.seconds:.1f} s ({rate:,.0f}/s)",
        ]
        if self.mode == DIRECT:
            lines += [
                f"  stored      {c.stored:>12,}  {would}new rows in vehicle_telemetry",
                f"  duplicates  {c.duplicates:>12,}  already stored, {would}skipped",
                f"  folded      {c.folded:>12,}  older than the raw retention, {would}handed to the rollups",
            ]
            if self.rollups is not None:
                lines.append(f"  rollups: {self.rollups.get('hours', 0):,} hour(s) and {self.rollups.get('days', 0):,}"
                             " day(s) recomputed" + ("; some hours left for fleet maintain (lock busy)"
                                                   if self.rollups.get("claim_deferred") else ""))
        else:
            lines.append(f"  published   {c.published:>12,}  {would}sent to the telemetry topic")
        rejected = sum(c.rejected.values())
        by_reason = ", ".join(f"{reason} {n:,}" for reason, n in sorted(c.rejected.items()))
        lines.append(f"  rejected    {rejected:>12,}" + (f"  {by_reason}" if rejected else ""))
        if rejected and self.rejects_file:
            lines.append(f"  rejects file: {self.rejects_file} (line or offset, reason, detail, value)")
        if self.checkpoint:
            lines.append(f"  checkpoint: {self.checkpoint} (run the same command again to resume)")
        return "\n".join(lines)
