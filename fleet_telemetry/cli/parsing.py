"""How every ``fleet`` command is declared: one readable line and exit status 2 on bad
usage, and one call per command instead of the same ``add_parser`` block in each module.

Every number on the command line is a count, a size, a duration, a port, an offset or an
id: an option declared with ``type=int`` or ``type=float`` refuses negative numbers,
NaN and infinity when it is parsed. Options that must be above 0 use :func:`count_arg`
or :func:`seconds_arg`, ports :func:`port_arg`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn


def _not_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind`` (int or float) refusing negative numbers, NaN and infinity."""

    def convert(text: str) -> Any:
        value = kind(text)  # a ValueError reads "invalid int value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _checked(text: str, kind: Callable[[str], Any], noun: str, valid: Callable[[Any], bool], rule: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value


def count_arg(text: str) -> int:
    """A whole number, 1 or more."""
    return int(_checked(text, int, "a whole number", lambda n: n >= 1, "must be 1 or more"))


def seconds_arg(text: str) -> float:
    """A number of seconds above 0."""
    return float(_checked(text, float, "a number of seconds", lambda n: n > 0 and math.isfinite(n),
                          "must be more than 0"))


def port_arg(text: str) -> int:
    """A TCP port, 0 to 65535 (0: off)."""
    return int(_checked(text, int, "a port number", lambda n: 0 <= n <= 65535, "must be a port from 0 to 65535"))


class Parser(argparse.ArgumentParser):
    """argparse with one readable line and exit status 2 on bad usage, and no negative numbers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse looks an option's ``type`` up in this registry before calling it.
        self.register("type", int, _not_negative(int))
        self.register("type", float, _not_negative(float))

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # A sub-command takes every word after its name, so what it does not know is an
        # error of its own: said with its name and its --help, not the top command's.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

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
