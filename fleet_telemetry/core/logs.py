"""structlog set-up: a readable console format on a terminal, JSON lines otherwise.

``FLEET_LOG_FORMAT`` is ``auto`` by default: ``console`` when stderr is a terminal (a
person is reading), ``json`` when it is not (a service manager, a container, a pipe);
``json`` or ``console`` fix it.

Library loggers (aiokafka, asyncpg, asyncio) speak through the stdlib ``logging``; their
records, Python warnings and the traceback of an exception nobody caught go through the
same renderer, so with ``FLEET_LOG_FORMAT=json`` every line on stderr is one JSON object
(a traceback is the ``exception`` field of its line). Every line has the same common
fields: ``event``, ``level``, ``timestamp`` (ISO 8601, UTC) and ``logger`` (the name the
line was logged under), plus what the context binds (the pipeline's ``trace_id`` of the
batch at hand, :func:`structlog.contextvars.bound_contextvars`).
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType

import structlog
from structlog.typing import EventDict

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stderr:
    """Whatever ``sys.stderr`` is at the moment of writing (tests and tools swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _Stderr()


class _NamedLogger(structlog.PrintLogger):
    """Prints to stderr and knows the name it was asked for (the ``logger`` field)."""

    def __init__(self, name: str) -> None:
        super().__init__(_STDERR)  # type: ignore[arg-type]
        self.name = name


def _named_logger(*args: object) -> _NamedLogger:
    return _NamedLogger(str(args[0]) if args else "fleet")


def _add_logger_name(logger: object, method_name: str, event_dict: EventDict) -> EventDict:
    """The ``logger`` field of the project's lines ("fleet" from a logger without a name:
    a test may swap the logger factory)."""
    event_dict.setdefault("logger", getattr(logger, "name", "fleet"))
    return event_dict


class _LibraryHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (and replaces when configured again)."""


class _QuietBootstrap(logging.Filter):
    """Drops aiokafka's error line for a bootstrap server that did not answer: the
    project reports that itself (a retry warning, or the command's one line), with the
    address and what to do. Kept at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "aiokafka" and record.msg == _AIOKAFKA_BOOTSTRAP_FAILED)


_AIOKAFKA_BOOTSTRAP_FAILED = 'Unable connect to "%s:%s": %s'


def resolve_format(fmt: str) -> str:
    """``auto`` as ``console`` when stderr is a terminal, else ``json``; others as given."""
    if fmt != "auto":
        return fmt
    try:
        return "console" if sys.stderr.isatty() else "json"
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return "json"


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog and stdlib logging to stderr in ``fmt`` ("json", "console" or "auto").

    The stdlib's root logger gets a handler rendering like structlog, at ``warning`` or
    above, unless something else (a test runner) already handles it; with that handler
    come hooks that log uncaught exceptions (main thread and others) as one event.
    """
    numeric = _LEVELS.get(level, logging.INFO)
    renderer: structlog.types.Processor
    if resolve_format(fmt) == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, _add_logger_name, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_named_logger,
        # Not cached: a logger then follows a later configure() (a second set-up, a
        # test capturing logs) wherever it was first used. Logging is per batch, never
        # per reading, so the lookup costs nothing that counts.
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _LibraryHandler)]
    if len(ours) != len(root.handlers):
        return  # someone else handles the stdlib's records
    for handler in ours:
        root.removeHandler(handler)
    handler = _LibraryHandler(_STDERR)  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    if numeric > logging.DEBUG:
        handler.addFilter(_QuietBootstrap())
    root.addHandler(handler)
    # Library loggers keep quiet unless something is wrong.
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    structlog.get_logger("fleet").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("fleet").critical(
        "uncaught exception in a thread", thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )
