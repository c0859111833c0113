"""Where a replay stands, kept so that the same command resumes: the checkpoint file and
the rejects file it counts.

:class:`Checkpoint` is the file; :class:`RejectsFile` the rejects file; :class:`Ledger`
is what a run has applied so far (the position after the last chunk, the units and
counts, the rejects written), restored from the checkpoint when there is one and saved
into it as the run goes.

A rejects file that exists when a replay starts afresh is replaced only if it holds the
rejects of an earlier replay (or nothing); a file holding anything else is refused
(:class:`UsageError`), and a pipe or device is written to as it is. Only a file the
replay created is removed when nothing was rejected.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from typing import IO, Any, Final

import orjson
import structlog

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.replay.results import ChunkResult, Counts
from fleet_telemetry.replay.sources import Chunk

log = structlog.get_logger("fleet.replay")

_CHECKPOINT_VERSION: Final = 1
_CHECKPOINT_EVERY_S: Final = 1.0
_LONGEST_FIRST_LINE: Final = 8 << 20
"""A rejects line holds one reading's bytes (at most the broker's message size) as JSON text."""


class Checkpoint:
    """The resume point of one replay: a JSON file written atomically next to the rejects file.

    It holds the replay's fingerprint (source and mode), the position after the last
    chunk applied, the counts so far and the size of the rejects file at that moment.
    """

    def __init__(self, path: str, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        """The saved state, ``None`` if there is none; raises UsageError if it belongs elsewhere."""
        try:
            with open(self.path, "rb") as f:
                state = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise UsageError(f"checkpoint {self.path} is unreadable ({exc}); remove it or use --restart") from None
        if state.get("version") != _CHECKPOINT_VERSION or state.get("fingerprint") != self.fingerprint:
            raise UsageError(
                f"checkpoint {self.path} belongs to another replay (or the source changed);"
                " use --restart to start over, or pass another --rejects"
            )
        return dict(state)

    def save(self, state: dict[str, Any]) -> None:
        """Replaces the file atomically (write, fsync, rename)."""
        body = orjson.dumps({"version": _CHECKPOINT_VERSION, "fingerprint": self.fingerprint, **state})
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def created_rejects(self) -> bool:
        """Whether the run that saved this checkpoint, whatever replay it was, created its
        rejects file (False when the checkpoint cannot be read)."""
        try:
            with open(self.path, "rb") as f:
                state = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            return False
        return isinstance(state, dict) and bool(state.get("rejects_created", True))


class RejectsFile:
    """The rejects file of one run, opened by the rules of the module docstring.

    ``size`` is what the checkpoint of the run being resumed counts (the file is cut back
    to it), ``None`` for a fresh start; ``created`` whether that run (or the interrupted
    one a restart discards) created the file. Raises :class:`UsageError` for a directory
    that does not exist or a file that holds something other than replay rejects.
    """

    def __init__(self, path: str, *, size: int | None, created: bool) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"--rejects {path}: the directory {directory} does not exist")
        self.path = path
        self.created = created
        """The replay created it: it may go when nothing was rejected."""
        self.size = size or 0
        """Bytes in the file (for a pipe or device: written by this replay)."""
        self.regular = True
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if size:
                log.warning("the rejects file of the interrupted run is gone; earlier rejects are not in the"
                            " new one", path=path)
            self.created, self.size = True, 0
            self._file: IO[bytes] = open(path, "wb")
            return
        if not stat.S_ISREG(mode):
            self.regular, self.created = False, False
            self._file = open(path, "ab")  # never truncate a pipe or device (nor what it points to)
            return
        if size is None and not _holds_rejects(path):
            raise UsageError(f"--rejects {path} already holds something other than replay rejects;"
                             " name a file that does not exist yet, or move this one away")
        self._file = open(path, "r+b")
        self._file.truncate(self.size)
        self._file.seek(self.size)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Flushes what was written to disk."""
        self._file.flush()
        if self.regular:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def remove_if_unused(self) -> None:
        """Closes it and, if this replay created it and nothing is in it, removes it."""
        self.close()
        if self.created and self.size == 0:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
                    os.remove(self.path)


def _holds_rejects(path: str) -> bool:
    """Whether the file is empty or its first line is a rejects line (of an earlier replay)."""
    with open(path, "rb") as f:
        first = f.readline(_LONGEST_FIRST_LINE)
    if not first:
        return True
    try:
        line = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(line, dict) and "reason" in line and "detail" in line


class Ledger:
    """What a run has applied so far, kept in the rejects file and the checkpoint.

    Opening it loads the checkpoint (unless ``restart`` or ``dry_run``) and opens the
    rejects file where the checkpoint left it (:class:`RejectsFile`); raises
    :class:`UsageError` for a checkpoint of another replay, a rejects file that holds
    something else or whose directory does not exist, or a dry run whose rejects file
    belongs to an interrupted replay. A dry run saves no checkpoint.
    """

    def __init__(self, checkpoint: Checkpoint, rejects_path: str, *, dry_run: bool, restart: bool) -> None:
        self._started = time.monotonic()
        if dry_run and os.path.exists(checkpoint.path):
            raise UsageError(f"{rejects_path} belongs to an interrupted replay (checkpoint "
                             f"{checkpoint.path}); give the dry run another --rejects")
        state = None if (dry_run or restart) else checkpoint.load()
        if state is not None:
            rejects = RejectsFile(rejects_path, size=int(state["rejects_size"]),
                                  created=bool(state.get("rejects_created", True)))
        else:
            rejects = RejectsFile(rejects_path, size=None, created=restart and checkpoint.created_rejects())
        if restart and not dry_run:
            checkpoint.remove()
        self.checkpoint = checkpoint
        self.rejects_path = rejects_path
        self._dry_run = dry_run
        self.resumed = state is not None
        self.counts = Counts.from_json(state["counts"]) if state else Counts()
        self.position: dict[str, Any] | None = state["position"] if state else None
        """Where the source stands after the last chunk applied (``None``: at its start)."""
        self.resumed_from = self.position
        self.units: int = int(state["units"]) if state else 0
        self._seconds_before = float(state["seconds"]) if state else 0.0
        self._rejects = rejects
        self._saved = time.monotonic()

    def seconds(self) -> float:
        """Time spent on this replay, the interrupted runs before this one included."""
        return self._seconds_before + time.monotonic() - self._started

    def apply(self, chunk: Chunk, result: ChunkResult) -> None:
        """Appends the chunk's rejects and counts and moves the position past it."""
        if result.rejects:
            self._rejects.write(result.rejects)
        self.counts.add(result.counts)
        self.position = chunk.position
        self.units += chunk.units

    def save(self, force: bool = False) -> None:
        """Rejects flushed to disk first, then the checkpoint that counts them (at most
        once a second unless ``force``)."""
        if self._dry_run or (not force and time.monotonic() - self._saved < _CHECKPOINT_EVERY_S):
            return
        self._saved = time.monotonic()
        self._rejects.sync()
        self.checkpoint.save({
            "position": self.position, "units": self.units, "counts": self.counts.to_json(),
            "rejects_size": self._rejects.size, "rejects_created": self._rejects.created, "seconds": self.seconds(),
        })

    def complete(self) -> None:
        """The replay is done: the checkpoint goes, and the rejects file if the replay
        created it and nothing was rejected."""
        self.checkpoint.remove()
        self._rejects.remove_if_unused()

    def suspend(self) -> None:
        """The replay stops before its end: saved so that the same command resumes."""
        self.save(force=True)
        self._rejects.close()

    def abandon(self) -> None:
        """The run failed: saved as far as it got, or, if nothing was ever done, nothing left behind."""
        if self.resumed or self.units:
            self.suspend()
        else:
            self._rejects.remove_if_unused()
