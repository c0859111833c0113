"""The fault soak's result as one table, and the failures that make it exit 1."""

from __future__ import annotations

from typing import Any


def failures(result: dict[str, Any]) -> list[str]:
    """What broke the promise, in words; empty when the run passed."""
    found = result["found"]
    out = []
    for measure in ("lost", "duplicated", "misrouted", "alerts_duplicated"):
        if found[measure]:
            out.append(f"{measure.replace('_', ' ')}: {found[measure]:,}")
    if found["statuses_right"] != found["statuses_checked"]:
        out.append(f"statuses wrong: {found['statuses_checked'] - found['statuses_right']:,}"
                   f" of {found['statuses_checked']:,}")
    crashes = result["workers"]["crashes"]
    if crashes:
        out.append(f"worker crashes: {len(crashes)} ({crashes[0]['what']})")
    if not result["caught_up"]:
        out.append(f"the workers had not committed everything {result['time']['catch_up_timeout_s']:.0f} s"
                   " after the stream")
    return out


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items())


def _faults_line(result: dict[str, Any]) -> str:
    c = result["conditions"]
    parts = [f"{c['kills']} worker kills ({c['alone_seconds']:g} s alone, then a restart)"]
    for key, label in (("postgres", "PostgreSQL"), ("redis", "Redis"), ("broker", "broker")):
        seconds = c[f"{key}_outage_s"]
        if seconds:
            parts.append(f"{label} {seconds:g} s: {c['faults'][key]}")
    return "; ".join(parts)


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows of the table."""
    sent, found, t = result["sent"], result["found"], result["time"]
    catch_up = f"caught up {t['catch_up_s']:g} s after it" if result["caught_up"] else "never caught up"
    return [
        ("sent", f"{sent['messages']:,} ({sent['readings']:,} readings, {sent['broken']:,} broken)"),
        ("stored", f"{found['stored']:,}"),
        ("lost", f"{found['lost']:,}"),
        ("duplicated", f"{found['duplicated']:,}"),
        ("dead-lettered", f"{found['dead_lettered']:,} ({_by(found['dead_lettered_by_reason']) or 'none'})"),
        ("dead letters repeated", f"{found['dead_letters_repeated']:,} (at least once; not a failure)"),
        ("misrouted", f"{found['misrouted']:,}"),
        ("statuses right", f"{found['statuses_right']:,} of {found['statuses_checked']:,}"),
        ("alerts duplicated", f"{found['alerts_duplicated']:,} (of {found['alerts']:,} alerts,"
                              f" {found['transitions']:,} geofence transitions)"),
        ("worker crashes", f"{len(result['workers']['crashes']):,}"),
        ("time", f"{t['total_s']:g} s (stream {t['stream_s']:g} s, {catch_up})"),
    ]


def render(result: dict[str, Any]) -> str:
    c = result["conditions"]
    lines = [
        f"fault soak: {c['readings']:,} messages from {c['vehicles']:,} vehicles at {c['rate_per_s']:,.0f}/s"
        f" for {c['duration_s']:g} s, {c['partitions']} partitions, {c['geofences']} geofences; {c['workers']}",
        f"faults: {_faults_line(result)}",
    ]
    lines += [f"left out: {f['fault']} ({f['why']})" for f in result["faults_left_out"]]
    lines += [f"note: {note}" for note in c["notes"]]
    lines += ["", "| measure | value |", "| --- | --- |"]
    lines += [f"| {measure} | {value} |" for measure, value in rows(result)]
    lines += ["", "result: ok" if result["ok"] else "result: FAILED: " + "; ".join(result["failures"])]
    return "\n".join(lines)
