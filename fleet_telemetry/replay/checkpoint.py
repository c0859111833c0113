"""Where a replay stands, kept so that the same command resumes: the checkpoint file and
the rejects file it counts.

:class:`Checkpoint` is the file; :class:`Ledger` is what a run has applied so far (the
position after the last chunk, the units and counts, the rejects written), restored
from the checkpoint when there is one and saved into it as the run goes.
"""

from __future__ import annotations

import contextlib
import os
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


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.getsize(path) == 0:
            os.remove(path)


def _open_rejects(path: str, size: int) -> IO[bytes]:
    """The rejects file, cut back to ``size`` bytes (what the checkpoint counts) or new."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"--rejects {path}: the directory {directory} does not exist")
    if size and os.path.exists(path):
        f = open(path, "r+b")
        f.truncate(size)
        f.seek(size)
        return f
    if size:
        log.warning("the rejects file of the interrupted run is gone; earlier rejects are not in the new one",
                    path=path)
    return open(path, "wb")


class Ledger:
    """What a run has applied so far, kept in the rejects file and the checkpoint.

    Opening it loads the checkpoint (unless ``restart`` or ``dry_run``) and opens the
    rejects file where the checkpoint left it; raises :class:`UsageError` for a
    checkpoint of another replay, a rejects directory that does not exist, or a dry run
    whose rejects file belongs to an interrupted replay. A dry run saves no checkpoint.
    """

    def __init__(self, checkpoint: Checkpoint, rejects_path: str, *, dry_run: bool, restart: bool) -> None:
        self._started = time.monotonic()
        if dry_run and os.path.exists(checkpoint.path):
            raise UsageError(f"{rejects_path} belongs to an interrupted replay (checkpoint "
                             f"{checkpoint.path}); give the dry run another --rejects")
        state = None if (dry_run or restart) else checkpoint.load()
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
        self._rejects = _open_rejects(rejects_path, int(state["rejects_size"]) if state else 0)
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
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        self.checkpoint.save({
            "position": self.position, "units": self.units, "counts": self.counts.to_json(),
            "rejects_size": self._rejects.tell(), "seconds": self.seconds(),
        })

    def complete(self) -> None:
        """The replay is done: the checkpoint goes, and the rejects file unless something was rejected."""
        self.checkpoint.remove()
        self._rejects.close()
        if not self.counts.rejected:
            _remove_if_empty(self.rejects_path)

    def suspend(self) -> None:
        """The replay stops before its end: saved so that the same command resumes."""
        self.save(force=True)
        self._rejects.close()

    def abandon(self) -> None:
        """The run failed: saved as far as it got, or, if nothing was ever done, nothing left behind."""
        if self.resumed or self.units:
            self.suspend()
        else:
            self._rejects.close()
            _remove_if_empty(self.rejects_path)
