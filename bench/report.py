"""The benchmark's arithmetic and its report: pure functions over measured numbers.

A report is one JSON-able dict (``--json-out`` writes it as is); :func:`render` prints
the same numbers as a table. Latency quantiles come from the worker's
``fleet_ingest_latency_seconds`` histogram, interpolated inside buckets the way
PromQL's ``histogram_quantile`` does, so they are only as fine as its buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.breakdown import ORDER

# Targets the numbers are held against: (key, readable goal).
GOALS = (
    ("pipeline_vs_ceiling", "pipeline (1 worker)/ceiling throughput >= 0.5"),
    ("pipeline_x2_vs_ceiling", "pipeline x2 (--workers 2)/ceiling throughput >= 0.8"),
    ("pipeline_cpu", "pipeline (1 worker) client CPU per reading <= 10 us"),
    ("pipeline_vs_peer", "pipeline/peer throughput >= 4"),
    ("latency_p99", "p99 latency at half load <= 250 ms"),
    ("consumer_rss", "consumer peak RSS (largest worker of the pipeline runs) <= 150 MB"),
    ("preload_drop", "throughput with the preload within 10% of the empty table"),
)
LABELS = {"pipeline-arrays": "pipeline (arrays of 50)", "pipeline-x2": "pipeline x2"}
"""How the table names the contestants whose key is not what a reader should see."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``(upper bound, count)`` ending with ``+Inf``, plus count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def minus(self, earlier: "Histogram") -> "Histogram":
        """Observations made since ``earlier`` (same buckets)."""
        before = dict(earlier.buckets)
        return Histogram(tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
                         self.count - earlier.count, self.total - earlier.total)


def histogram(texts: list[str], name: str) -> Histogram:
    """The histogram ``name`` summed over several ``/metrics`` texts (one per worker)."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == name + "_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name == name + "_count":
                    count += sample.value
                elif sample.name == name + "_sum":
                    total += sample.value
    return Histogram(tuple(sorted(buckets.items())), count, total)


def quantile(h: Histogram, q: float) -> float | None:
    """The ``q`` quantile, linear inside its bucket; ``None`` without observations.

    A quantile in the ``+Inf`` bucket is reported as the largest finite bound (a lower
    bound of the truth).
    """
    if h.count <= 0 or not h.buckets:
        return None
    rank = q * h.count
    lower, below = 0.0, 0.0
    for le, cumulative in h.buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            if cumulative == below:
                return le
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def sample_value(texts: list[str], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` with ``labels`` over several ``/metrics`` texts."""
    total = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
    return total


def pipeline_internals(texts: list[str]) -> dict[str, float]:
    """Where the worker says its time went (seconds summed over batches), from its metrics."""
    if not texts:
        return {}
    batches = sample_value(texts, "fleet_batch_size_count")
    stored = sample_value(texts, "fleet_batch_size_sum")
    return {
        "batches": batches,
        "mean_batch": round(stored / batches, 1) if batches else 0.0,
        "postgres_write_s": round(sample_value(texts, "fleet_copy_duration_seconds_sum"), 3),
        "redis_status_s": round(sample_value(texts, "fleet_status_update_duration_seconds_sum"), 3),
        "offset_commit_s": round(sample_value(texts, "fleet_offset_commit_duration_seconds_sum"), 3),
        "rules_s": round(sample_value(texts, "fleet_rule_evaluation_seconds_sum"), 3),
        "geofences_active": sample_value(texts, "fleet_geofences_active"),
        "geofence_transitions": sample_value(texts, "fleet_geofence_transitions_total"),
        "alerts_raised": sample_value(texts, "fleet_alerts_total", action="raised"),
        "retries": sample_value(texts, "fleet_retries_total"),
        "dead_lettered": sample_value(texts, "fleet_readings_total", outcome="dead_lettered"),
    }


def contestant_result(
    name: str, description: str, *, readings: int, rows: int | None, expected_rows: int,
    wall_s: float | None, startup_s: float | None, cpu_s: float | None, peak_rss_mb: float | None,
    db_cpu_s: float | None, exit_code: int | None, failure: str | None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One contestant's numbers, with ``status`` ok/failed and ``reason`` when it failed.

    A run fails when its process did not exit 0, did not finish, or the table holds a
    different number of rows than ``expected_rows``.
    """
    reason = failure
    if reason is None and exit_code not in (0, None):
        reason = f"exited with status {exit_code}"
    if reason is None and rows != expected_rows:
        reason = f"stored {rows} rows, expected {expected_rows}"
    if reason is None and wall_s is None:
        reason = "never finished"
    rate = readings / wall_s if wall_s else None
    return {
        "name": name,
        "description": description,
        "status": "ok" if reason is None else "failed",
        "reason": reason,
        "readings": readings,
        "rows_expected": expected_rows,
        "rows_stored": rows,
        "readings_per_s": None if rate is None else round(rate, 1),
        "wall_s": None if wall_s is None else round(wall_s, 3),
        "startup_s": None if startup_s is None else round(startup_s, 3),
        "cpu_s": None if cpu_s is None else round(cpu_s, 3),
        "cpu_us_per_reading": None if cpu_s is None or not readings else round(cpu_s / readings * 1e6, 1),
        "db_cpu_s": None if db_cpu_s is None else round(db_cpu_s, 3),
        "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb, 1),
        "exit_code": exit_code,
        **(extra or {}),
    }


def skipped(name: str, description: str, reason: str) -> dict[str, Any]:
    return {"name": name, "description": description, "status": "skipped", "reason": reason}


def _rate(result: dict[str, Any] | None) -> float | None:
    if not result or result.get("status") != "ok":
        return None
    rate = result.get("readings_per_s")
    return float(rate) if rate else None


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Throughput of ``a`` over that of ``b``; ``None`` unless both ran fine."""
    ra, rb = _rate(a), _rate(b)
    return None if ra is None or rb is None else round(ra / rb, 3)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured value and whether it is met (``None``: not measured)."""
    c = report.get("contestants", {})
    ratios = report.get("ratios", {})
    latency = report.get("latency", {})
    preload = report.get("preload", {})
    pipeline = c.get("pipeline", {})
    cpu = pipeline.get("cpu_us_per_reading") if pipeline.get("status") == "ok" else None
    sizes = [r["peak_rss_mb"] for name, r in c.items()
             if name.startswith("pipeline") and r.get("status") == "ok" and r.get("peak_rss_mb") is not None]
    rss = max(sizes) if sizes else None
    p99 = latency.get("p99_s") if latency.get("status") == "ok" else None
    drop = preload.get("throughput_change") if preload.get("status") == "ok" else None
    measured: dict[str, tuple[Any, bool | None]] = {
        "pipeline_vs_ceiling": (ratios.get("pipeline/ceiling"), _at_least(ratios.get("pipeline/ceiling"), 0.5)),
        "pipeline_x2_vs_ceiling": (ratios.get("pipeline-x2/ceiling"),
                                   _at_least(ratios.get("pipeline-x2/ceiling"), 0.8)),
        "pipeline_cpu": (cpu, None if cpu is None else cpu <= 10),
        "pipeline_vs_peer": (ratios.get("pipeline/peer"), _at_least(ratios.get("pipeline/peer"), 4)),
        "latency_p99": (p99, None if p99 is None else p99 <= 0.25),
        "consumer_rss": (rss, None if rss is None else rss <= 150),
        "preload_drop": (drop, None if drop is None else drop >= -0.10),
    }
    return [{"goal": key, "text": text, "measured": measured[key][0], "met": measured[key][1]}
            for key, text in GOALS]


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


_COLUMNS = (
    ("contestant", 24, None), ("readings/s", 11, ",.0f"), ("wall s", 8, ".2f"), ("start s", 8, ".2f"),
    ("CPU s", 8, ".2f"), ("CPU us/rdg", 10, ".1f"), ("DB CPU s", 9, ".2f"), ("RSS MB", 8, ".1f"),
    ("rows", 11, ",d"), ("status", 8, None),
)


def _row(label: str, r: dict[str, Any]) -> str:
    values = [label, r.get("readings_per_s"), r.get("wall_s"), r.get("startup_s"), r.get("cpu_s"),
              r.get("cpu_us_per_reading"), r.get("db_cpu_s"), r.get("peak_rss_mb"), r.get("rows_stored"),
              r.get("status")]
    cells = []
    for (title, width, spec), value in zip(_COLUMNS, values):
        text = _fmt(value, spec) if spec else str(value)
        cells.append(text.ljust(width) if spec is None else text.rjust(width))
    return "  ".join(cells)


def render(report: dict[str, Any]) -> str:
    """The report as a readable table with ratios, latency, preload and goals below it."""
    out: list[str] = []
    d = report.get("dataset", {})
    cond = report.get("conditions", {})
    out.append(f"fleet ingestion benchmark: {d.get('readings', 0):,} readings from {d.get('vehicles', 0):,} vehicles,"
               f" {d.get('partitions')} partitions, seed {d.get('seed')}")
    out.append(f"machine: {cond.get('cpu_model', '?')}, {cond.get('cpus')} CPUs, {cond.get('memory_gb')} GB,"
               f" {cond.get('postgresql', '?')}, Python {cond.get('python')};"
               f" load average at start {cond.get('load_average_start')}")
    out.append("")
    out.append("  ".join(title.ljust(w) if spec is None else title.rjust(w) for title, w, spec in _COLUMNS))
    for name, r in report.get("contestants", {}).items():
        out.append(_row(LABELS.get(name, name), r))
    preload = report.get("preload", {})
    for name, r in preload.get("runs", {}).items():
        out.append(_row(f"{name} +{preload.get('rows', 0) / 1e6:g}M rows", r))
    out.append("")
    for name, r in list(report.get("contestants", {}).items()) + [
            (f"{k} (preloaded)", v) for k, v in preload.get("runs", {}).items()]:
        if r.get("status") != "ok":
            out.append(f"{name}: {r.get('status')}: {r.get('reason')}")
    ratios = report.get("ratios", {})
    out.append("ratios (throughput): " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in ratios.items()))
    lat = report.get("latency", {})
    if lat:
        if lat.get("status") == "ok":
            out.append(
                f"latency at {lat['offered_rate']:,.0f} readings/s offered ({lat['achieved_rate']:,.0f} achieved,"
                f" {lat['readings']:,} readings over {lat['duration_s']:.0f} s): p50 {_ms(lat['p50_s'])},"
                f" p95 {_ms(lat['p95_s'])}, p99 {_ms(lat['p99_s'])}, mean {_ms(lat['mean_s'])}"
                f" (histogram buckets {lat['buckets_s']})")
        else:
            out.append(f"latency: {lat.get('status')}: {lat.get('reason')}")
    if preload:
        if preload.get("status") == "ok":
            out.append(f"preload: {preload['rows']:,} rows in {preload['preload_s']:.0f} s; pipeline throughput"
                       f" change vs empty table {preload['throughput_change'] * 100:+.1f}%"
                       + (f", ceiling {preload['ceiling_change'] * 100:+.1f}%"
                          if preload.get("ceiling_change") is not None else ""))
        else:
            out.append(f"preload: {preload.get('status')}: {preload.get('reason')}")
    out.extend(render_breakdowns(report))
    out.extend(render_codecs(report.get("codecs", {}), report.get("settings", {}).get("producer_compression")))
    out.append("")
    out.append("goals:")
    for g in report.get("goals", []):
        mark = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        out.append(f"  {g['text']}: {_fmt(g['measured'], '.3f')} -> {mark}")
    if report.get("failures"):
        out.append("")
        out.append("FAILED: " + "; ".join(report["failures"]))
    return "\n".join(out)


def render_breakdowns(report: dict[str, Any]) -> list[str]:
    """The per-stage CPU table of the pipeline runs that have a breakdown (or why none has)."""
    runs = {name: r["breakdown"] for name, r in report.get("contestants", {}).items() if "breakdown" in r}
    if report.get("breakdown_skipped"):
        return ["", f"per-stage breakdown: skipped: {report['breakdown_skipped']}"]
    done = {name: b for name, b in runs.items() if b.get("status") == "ok"}
    out = [f"per-stage breakdown of {name}: {b.get('status')}: {b.get('reason')}"
           for name, b in runs.items() if b.get("status") != "ok"]
    if not done:
        return [""] + out if out else []
    labels = [LABELS.get(name, name) for name in done]
    width = max(14, *(len(label) for label in labels))
    out = ["", "client CPU per reading by stage, us (py-spy samples scaled to the measured CPU us/reading):",
           "  ".join(["stage".ljust(14)] + [label.rjust(width) for label in labels])] + out
    for stage in ORDER:
        cells = [_stage_cell(b["stages"].get(stage, {})).rjust(width) for b in done.values()]
        out.append("  ".join([stage.ljust(14)] + cells))
    out.append("  ".join(["total".ljust(14)] + [_fmt(b.get("cpu_us_per_reading"), ".1f").rjust(width)
                                                 for b in done.values()]))
    out.append("  ".join(["samples".ljust(14)] + [
        f"{b['samples']:,} ({_fmt(b.get('profiler_cpu_s'), '.1f')} s py-spy)".rjust(width) for b in done.values()]))
    for name, b in done.items():
        top = ", ".join(f"{f['frame'].split(' (')[0]} {f['share'] * 100:.0f}%" for f in b["top_self_frames"][:5])
        out.append(f"top self frames of {LABELS.get(name, name)}: {top}")
    return out


def _stage_cell(stage: dict[str, Any]) -> str:
    us = stage.get("us_per_reading")
    return f"{_fmt(us, '.1f')} ({stage.get('share', 0) * 100:.0f}%)"


def render_codecs(codecs: dict[str, Any], default: str | None) -> list[str]:
    """What each producer codec costs: bytes on the wire, producer CPU and the consumer's fetch CPU,
    in the dataset's big batches and with one reading per batch."""
    if not codecs:
        return []
    out = ["", f"producer codecs (the producer's default: {default}); per reading: bytes on the wire,"
               " producer CPU us, consumer fetch CPU us (fetch, decompress, parse):",
           f"  {'codec':7s}  {'big batches (16 KiB on the wire)':>36s}  {'one reading per batch':>36s}"]
    for codec, r in codecs.items():
        if r.get("status") == "skipped":
            out.append(f"  {codec:7s}  {r.get('status')}: {r.get('reason')}")
            continue
        cells = [_codec_cell(r.get(regime, {})) for regime in ("dataset", "one_per_batch")]
        out.append(f"  {codec:7s}  " + "  ".join(cell.rjust(36) for cell in cells))
        if r.get("status") != "ok":
            out.append(f"  {codec:7s}  {r.get('status')}: {r.get('reason')}")
    return out


def _codec_cell(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return str(r.get("status", "-"))
    return (f"{r['wire_bytes_per_reading']:.0f} B, producer {r['producer_cpu_us_per_reading']:.1f},"
            f" fetch {r['fetch_cpu_us_per_reading']:.1f}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
