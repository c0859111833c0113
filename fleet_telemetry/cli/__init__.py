"""The ``fleet`` command line: one module per command group, imported by nothing else.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``handler``
to ``handler(args, settings) -> int`` (or a coroutine). :mod:`.main` builds the parser,
reads the settings once and turns errors into exit statuses with one line on stderr.
"""
