"""``fleet consume --workers N`` as a subprocess the fault soak can kill and restart.

``fleet consume --workers N`` starts N worker processes (spawned children) and waits
for all of them; it does not replace one that dies: the survivors take over its
partitions when the group rebalances, and the command exits only when every worker
has. :class:`ConsumeCommand` plays the operator (or health check) that restarts the
command after a worker died: :meth:`~ConsumeCommand.kill_worker` SIGKILLs one child,
lets the survivors carry on alone for a while, stops the command with SIGTERM (the
survivors finish their batches, commit and leave the group) and starts it again.

A worker or command that dies without being killed is a crash: it is counted, its log
lines kept, and the command is restarted (as ``Restart=on-failure`` would).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from fleet_telemetry.deploy.stack.probe import wait_until

STOP_GRACE_SECONDS = 60.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_children(parent: int) -> set[int]:
    """The live worker processes ``parent`` spawned (not multiprocessing's resource tracker)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[0] == parent and stat[1] != "Z" and "spawn_main" in _cmdline(int(entry.name)):
            found.add(int(entry.name))
    return found


@dataclass
class Crash:
    at_s: float
    what: str
    log_tail: list[str]


@dataclass
class ConsumeStats:
    starts: int = 0
    kills: int = 0
    crashes: list[Crash] = field(default_factory=list)
    stop_codes: list[int] = field(default_factory=list)
    """Exit status of each SIGTERM-stopped command (1 after a kill: a child was killed)."""


class ConsumeCommand:
    """One ``fleet consume --workers N`` at a time, with the settings in ``env``."""

    def __init__(self, env: Mapping[str, str], workers: int, log: Path, clock: Callable[[], float]) -> None:
        self.env = dict(env)
        self.workers = workers
        self.log = log
        self.stats = ConsumeStats()
        self._clock = clock
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._seen: set[int] = set()
        self._killed: set[int] = set()
        self._watch: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        """Starts the command and waits until its N workers are running."""
        with self.log.open("ab") as out:
            out.write(f"--- start {self.stats.starts + 1} at {self._clock():.1f} s\n".encode())
            out.flush()
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fleet_telemetry.cli", "consume", "--workers", str(self.workers),
                env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        self.stats.starts += 1
        self._stopping = False
        self._seen, self._killed = set(), set()
        proc = self._proc

        async def running() -> int:
            return len(worker_children(proc.pid))

        await wait_until(running, lambda n: n >= self.workers, 30.0, interval=0.1,
                         still_running=lambda: proc.returncode is None)
        self._seen = worker_children(proc.pid)
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_for_crashes())

    async def stop(self) -> int | None:
        """SIGTERM to the command (it forwards it to its workers); SIGKILL to the whole
        group after the grace period. Returns the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        self._stopping = True
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        code = proc.returncode if proc.returncode is not None else -1
        self.stats.stop_codes.append(code)
        return code

    async def kill_worker(self, rng: Random, alone_seconds: float) -> int | None:
        """SIGKILLs one worker (chosen by ``rng``); after ``alone_seconds`` with the
        survivors, restarts the command. Returns the killed pid, None when no worker
        was running (the command is restarted all the same)."""
        async with self._busy:
            live = sorted(worker_children(self._proc.pid)) if self._proc is not None else []
            if not live:
                await self.stop()
                await self.start()
                return None
            pid = rng.choice(live)
            self._killed.add(pid)
            os.kill(pid, signal.SIGKILL)
            self.stats.kills += 1
            await asyncio.sleep(alone_seconds)
            await self.stop()
            await self.start()
            return pid

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.stop()

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    async def _watch_for_crashes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._busy.locked() or self._stopping or self._proc is None:
                continue
            proc = self._proc
            live = worker_children(proc.pid) if proc.returncode is None else set()
            died = self._seen - live - self._killed
            if proc.returncode is None and not died:
                continue
            what = (f"fleet consume exited with {proc.returncode}" if proc.returncode is not None
                    else f"worker {sorted(died)} died on its own")
            async with self._busy:
                self.stats.crashes.append(Crash(round(self._clock(), 1), what, self.log_tail()))
                await self.stop()
                await asyncio.sleep(1.0)
                await self.start()

