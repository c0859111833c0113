"""How every ``fleet`` command is declared: one readable line and exit status 2 on bad
usage, and one call per command instead of the same ``add_parser`` block in each module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with one readable line and exit status 2 on bad usage."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def add_command(sub: Any, name: str, summary: str, description: str | None = None,
                handler: Callable[..., Any] | None = None) -> argparse.ArgumentParser:
    """Adds ``fleet NAME``: ``summary`` in ``fleet --help``, ``description`` (default the
    summary) in ``fleet NAME --help``, and ``handler(args, settings)`` to run it."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description or summary)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def add_actions(parser: argparse.ArgumentParser, dest: str = "action") -> Any:
    """The required sub-commands of a command group (``fleet services up``, ...)."""
    actions = parser.add_subparsers(dest=dest, metavar="ACTION", parser_class=type(parser))
    actions.required = True
    return actions
