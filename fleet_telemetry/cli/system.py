"""``fleet status``: the whole system on one screen; exit 1 when something needs attention.

What is asked and what needs attention: :mod:`fleet_telemetry.views.system`.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from fleet_telemetry.cli.fleetops_table import seconds_arg
from fleet_telemetry.cli.parsing import add_command
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.lifecycle.policy import parse_every
from fleet_telemetry.views.system import Limits, Report, collect


def _duration(text: str) -> float:
    try:
        return parse_every(text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"not a duration such as 30m or 2h: {text!r}") from None


def register(sub: Any) -> None:
    parser = add_command(
        sub, "status", "the whole system on one screen; exit 1 when something needs attention",
        "Each service and whether it answers, the schema version, the telemetry consumer group (members, lag per "
        "partition in records and seconds), dead letters of the last hour by reason, open alerts by type, the last "
        "'fleet maintain' pass, rollup lag and partitions ahead. Exit 0 when healthy, 1 when something needs "
        "attention (listed last), so it serves as a health check.", run)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--max-lag-seconds", type=seconds_arg, default=300.0, metavar="SECONDS",
                        help="the oldest unconsumed reading may wait this long (default 300)")
    parser.add_argument("--max-maintain-age", type=_duration, default=3600.0, metavar="DURATION",
                        help="the last 'fleet maintain' pass may be this old (default 1h)")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    report = await collect(settings, Limits(args.max_lag_seconds, args.max_maintain_age))
    if args.json:
        print(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(report))
    return 0 if report.healthy else 1


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def render(report: Report) -> str:
    """The report as text: one block per part, what needs attention last."""
    lines = [f"fleet status at {report.checked_at.isoformat(timespec='seconds')}", "services"]
    for name, s in report.services.items():
        state = "answers" if s["answers"] else f"NOT ANSWERING ({s['error']})"
        lines.append(f"  {name:11} {s['address']:40} {state}")
    schema = report.schema
    lines.append("schema        " + (schema["error"] if "error" in schema else
                                     f"{schema['version'] or 'not applied'} ({schema['applied']} applied, "
                                     f"{len(schema['pending']) or 'none'} pending)"))
    c = report.consumer
    if "error" in c:
        lines.append(f"consumer      {c['error']}")
    else:
        members = ", ".join(c["members"]) or "no member"
        lines.append(f"consumer      group {c['group']} on {c['topic']} ({c['state']}): {members};"
                     f" lag {c['lag']} records, {c['lag_seconds']:g} s")
        lines += [f"  partition {p['partition']}: committed {'-' if p['committed'] is None else p['committed']},"
                  f" end {p['end']}, lag {p['lag']} ({p['lag_seconds']:g} s)" for p in c["partitions"]]
    d = report.dead_letters
    lines.append("dead letters  " + (d["error"] if "error" in d else
                                     f"last hour: {d['total']}" + (f" ({_counts(d['by_reason'])})" if d["total"] else "")))
    a = report.alerts
    lines.append("open alerts   " + (a["error"] if "error" in a else
                                     f"{a['total']}" + (f" ({_counts(a['by_type'])})" if a["total"] else "")))
    m = report.maintenance
    if "error" in m:
        lines.append(f"maintenance   {m['error']}")
    else:
        last = "never" if m["last_pass"] is None else f"{m['last_pass']} ({m['last_pass_age_seconds'] / 60:.0f} min ago)"
        lines.append(f"maintenance   last pass {last}; rollups {m['rollup_pending_hours']} hours pending"
                     f" ({m['rollup_lag_seconds']:.0f} s); partitions ready {max(m['partitions_ready_days_ahead'], 0)}"
                     " days ahead")
    if report.attention:
        lines.append("needs attention")
        lines += [f"  - {line}" for line in report.attention]
    else:
        lines.append("healthy")
    return "\n".join(lines)
