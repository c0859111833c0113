"""``fleet dead-letters list|show``: the dead-letter topic read without a consumer group.

What is read and how: :mod:`fleet_telemetry.views.dead_letters`. Text output cuts each
value to the terminal's width (``list``) or to a screenful (``show`` on a terminal);
``--json`` gives the whole value.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

import orjson

from fleet_telemetry.cli.fleetops_table import count_arg, since_arg
from fleet_telemetry.cli.parsing import add_actions, add_command
from fleet_telemetry.core.reading import REASONS
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.views import dead_letters
from fleet_telemetry.views.dead_letters import DeadLetter, cut

_SCREEN = 2_000
"""``show`` on a terminal prints at most this much of the value."""


def register(sub: Any) -> None:
    parser = add_command(sub, "dead-letters", "read the dead-letter topic (no consumer group, nothing written)",
                         "Read FLEET_DLQ_TOPIC: reason, detail, where each reading came from and its value. "
                         "The topic is read without a consumer group and nothing is committed or written.")
    actions = add_actions(parser)
    lst = actions.add_parser("list", help="the newest dead letters",
                             description="The newest dead letters, newest first: where each is on the topic "
                             "(PARTITION:OFFSET, for 'show'), when, reason, source and the value, cut to one line.")
    lst.add_argument("--reason", action="append", choices=REASONS, help="only this reason (repeatable)")
    lst.add_argument("--since", type=since_arg, metavar="TIME",
                     help="dead-lettered since: RFC 3339, or a time ago (30m, 2h, 7d); by each record's timestamp")
    lst.add_argument("--limit", type=count_arg, default=20, help="how many of the newest to show (default 20)")
    lst.add_argument("--json", action="store_true", help="print JSON, values whole")
    lst.set_defaults(handler=_list)
    show = actions.add_parser("show", help="one dead letter, with its whole value",
                              description="One dead letter by its place on the dead-letter topic.")
    show.add_argument("at", metavar="PARTITION:OFFSET", help="where the dead letter is, as fleet dead-letters list shows it")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    letters, matched = await dead_letters.newest(settings, reasons=tuple(args.reason or ()), since=args.since,
                                                 limit=args.limit)
    if args.json:
        print(orjson.dumps({"matched": matched, "dead_letters": [d.as_json() for d in letters]},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if not letters:
        print(f"no dead letters on {settings.dlq_topic}" + (" matching" if args.reason or args.since else ""))
        return 0
    width = shutil.get_terminal_size().columns
    for d in letters:
        print(f"{d.at:>10}  {d.time.isoformat(timespec='seconds')}  {d.reason:18} {d.source}")
        print(f"{'':10}  {cut(d.detail, width - 12)}")
        print(f"{'':10}  {_value(d, width - 12)}")
    shown = len(letters)
    print(f"{matched} dead letter{'' if matched == 1 else 's'}" + (f", newest {shown} shown" if shown < matched else "")
          + ("; 'fleet dead-letters show PARTITION:OFFSET' for one whole"))
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    letter = await dead_letters.one(settings, *dead_letters.parse_at(args.at))
    if args.json:
        print(orjson.dumps(letter.as_json(), option=orjson.OPT_INDENT_2).decode())
        return 0
    limit = _SCREEN if sys.stdout.isatty() else None
    shown = letter.as_json(value_limit=limit)
    for name in ("at", "time", "reason", "detail", "failed_at"):
        print(f"{name + ':':11}{shown[name]}")
    print(f"{'source:':11}{letter.source}")
    print(f"{'key:':11}{shown['key'] if shown['key'] is not None else '-'}")
    if shown["truncated"]:
        t = shown["truncated"]
        print(f"{'truncated:':11}{t['what']} cut to fit the topic; original value {t['value_size']} bytes,"
              f" SHA-256 {t['value_sha256']}")
    value = shown.get("value")
    if value is None:
        print(f"{'value:':11}{len(letter.value)} bytes, not UTF-8 (--json gives them in base64)")
    else:
        print(f"{'value:':11}{value}")
        if limit is not None and len(value) < len(letter.value.decode('utf-8')):
            print(f"{'':11}({len(letter.value)} bytes; --json prints the whole value)")
    return 0


def _value(letter: DeadLetter, width: int) -> str:
    try:
        text = letter.value.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(letter.value)} bytes, not UTF-8)"
    return cut(" ".join(text.split()), max(width, 20))
