"""Running one contestant process and measuring it from outside.

:func:`run_contestant` starts the command in a session of its own and records:

- ``ready``: when the process says it is about to work (a ``BENCH`` ready line on
  stdout, or a line matching ``ready_marker`` on stderr, such as the worker's
  "partitions assigned" log); time before it is start-up (imports, connections, the
  group join) and is reported apart;
- ``done``: when the consumer group's committed offsets reach the ends of the topic
  (watched through an unsubscribed consumer of the same group), or the ``done`` line;
- CPU seconds of the process and all its descendants (``wait4`` rusage at exit, less a
  ``/proc`` sample taken at ``ready``), and the peak RSS of the largest of them;
- CPU seconds of the PostgreSQL backends serving the contestant's database, sampled
  from ``/proc`` (``None`` when PostgreSQL runs on another machine);
- with a profile asked for, py-spy's samples of the process and its children from
  ``ready`` to the exit (the window the CPU figure covers), and the CPU seconds py-spy
  itself took (it runs beside them, not inside the measured tree).

Nothing here decides what is a good number; :mod:`bench.report` does the arithmetic.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

_TICKS = os.sysconf("SC_CLK_TCK")
READY_LOG = "partitions assigned"
"""What a pipeline worker logs once it is about to work."""


@dataclass
class KafkaTarget:
    """What a Kafka contestant must consume: committed offsets reaching ``ends`` means done."""

    bootstrap: str
    topic: str
    group: str
    ends: dict[int, int]
    still_producing: bool = False
    """While true, reaching ``ends`` does not mean done (the latency phase produces live)."""

    def reached(self, offsets: dict[int, int]) -> bool:
        return not self.still_producing and all(offsets[p] >= end for p, end in self.ends.items())


@dataclass
class ProcessRun:
    exit_code: int | None
    timed_out: bool
    failure: str | None
    spawned: float
    ready: float | None
    done: float | None
    cpu_total_s: float
    cpu_at_ready_s: float
    peak_rss_mb: float
    db_cpu_s: float | None
    profiler_cpu_s: float | None = None
    metrics_text: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def startup_s(self) -> float | None:
        return None if self.ready is None else self.ready - self.spawned

    @property
    def wall_s(self) -> float | None:
        if self.ready is None or self.done is None:
            return None
        return self.done - self.ready

    @property
    def cpu_s(self) -> float:
        return max(0.0, self.cpu_total_s - self.cpu_at_ready_s)


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children) from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14..17.
    ticks = sum(int(x) for x in fields[11:15])
    return int(fields[1]), ticks / _TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and every live descendant (and their reaped children)."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None:
                stats[int(name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in stats:
            total += stats[pid][1]
        stack.extend(children.get(pid, ()))
    return total


class BackendCpu:
    """CPU of the PostgreSQL backends connected to one database, sampled every ``interval``.

    Sampled also at ``ready`` (the baseline) and at ``done``, so short runs are caught.
    """

    def __init__(self, admin_url: str, database: str, interval: float = 0.5) -> None:
        self._admin_url = admin_url
        self._database = database
        self._interval = interval
        self._last: dict[int, float] = {}
        self._baseline: dict[int, float] = {}
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self.available = True

    async def sample(self) -> None:
        async with self._lock:
            if self._conn is None:
                self._conn = await asyncpg.connect(self._admin_url)
            rows = await self._conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", self._database)
            for row in rows:
                stat = _proc_stat(row["pid"])
                if stat is None:
                    if not self._last:
                        self.available = False  # PostgreSQL is not on this machine
                    continue
                self._last[row["pid"]] = stat[1]

    async def mark_ready(self) -> None:
        await self.sample()
        self._baseline = dict(self._last)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.sample()
                try:
                    await asyncio.wait_for(stop.wait(), self._interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    def seconds(self) -> float | None:
        if not self.available:
            return None
        return sum(cpu - self._baseline.get(pid, 0.0) for pid, cpu in self._last.items())


async def committed_offsets(watcher: AIOKafkaConsumer, topic: str, partitions: list[int]) -> dict[int, int]:
    out = {}
    for p in partitions:
        offset = await watcher.committed(TopicPartition(topic, p))
        out[p] = -1 if offset is None else offset
    return out


def scrape(port: int) -> str:
    """The text of ``http://127.0.0.1:port/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def wait_for_metrics(ports: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                await asyncio.to_thread(scrape, port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def free_ports(count: int) -> int:
    """A base port such that ``base .. base + count - 1`` are free on loopback now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports on loopback")


def profile_path(profile: str, tag: str) -> str:
    """Where ``--profile FILE`` keeps the stacks of the run called ``tag``: FILE itself for
    the single-worker run (empty tag), else ``FILE-tag`` before the suffix."""
    if not tag:
        return profile
    stem, dot, suffix = profile.rpartition(".")
    return f"{stem}-{tag}.{suffix}" if dot and "/" not in suffix else f"{profile}-{tag}"


def py_spy() -> str | None:
    """Path of the ``py-spy`` profiler, beside this Python or on ``PATH``; ``None`` if absent."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else shutil.which("py-spy")


def py_spy_command(executable: str, pid: int, output: str, rate: int) -> list[str]:
    """py-spy sampling ``pid`` and its children ``rate`` times a second, without pausing them, into
    ``output``: a flame graph for ``.svg``, speedscope for ``.json``, else collapsed stacks."""
    fmt = "flamegraph" if output.endswith(".svg") else "speedscope" if output.endswith(".json") else "raw"
    return [executable, "record", "--pid", str(pid), "--rate", str(rate), "--subprocesses", "--nonblocking",
            "--format", fmt, "--output", output]


class _Lines:
    """Reads a child's stdout and stderr in threads; hands each line to the event loop."""

    def __init__(self, proc: subprocess.Popen[str], loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[float, str, str]] = asyncio.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=40)
        for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            threading.Thread(target=self._pump, args=(stream, name, loop), daemon=True).start()

    def _pump(self, stream: Any, name: str, loop: asyncio.AbstractEventLoop) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if name == "stderr":
                self.stderr_tail.append(line)
            loop.call_soon_threadsafe(self.queue.put_nowait, (time.time(), name, line))


async def _terminate(pid: int, exited: "asyncio.Future[Any]") -> None:
    """SIGTERM to the session of ``pid``, then SIGKILL, each with 10 s to exit."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(asyncio.shield(exited), 10.0)
            return
        except asyncio.TimeoutError:
            continue


async def _reap(child: "subprocess.Popen[bytes]") -> float:
    """Waits for ``child`` to exit; returns the CPU seconds it took."""
    _, _, usage = await asyncio.to_thread(os.wait4, child.pid, 0)
    child.returncode = 0  # reaped here, not by Popen
    return usage.ru_utime + usage.ru_stime


async def run_contestant(
    cmd: list[str],
    env: dict[str, str],
    *,
    kafka: KafkaTarget | None = None,
    ready_marker: str | None = None,
    metrics_ports: list[int] | None = None,
    backend_cpu: BackendCpu | None = None,
    timeout: float = 600.0,
    on_ready: Any = None,
    after_done: Any = None,
    profile_out: str | None = None,
    profile_rate: int = 100,
    ready_timeout: float = 120.0,
) -> ProcessRun:
    """Run ``cmd`` to its exit and measure it (see the module docstring).

    ``on_ready`` (async, optional) is awaited once the process is ready (the latency
    phase starts its producer there); ``after_done`` (async, optional) once it is done.
    After ``timeout`` seconds (or ``ready_timeout`` without becoming ready: a broker it
    cannot talk to) the process's session is terminated (then killed), the run is
    marked ``timed_out`` and ``failure`` says why. With ``profile_out``, ``py-spy`` samples the
    process and its children ``profile_rate`` times a second from ``ready`` to the exit into
    that file (:func:`py_spy_command`; it runs beside them, so it takes CPU from the run,
    reported as ``profiler_cpu_s``). Raises
    nothing for a failing process: the exit code and the stderr tail say what happened.
    """
    loop = asyncio.get_running_loop()
    spawned = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    exited = asyncio.ensure_future(asyncio.to_thread(os.wait4, proc.pid, 0))
    profiler: subprocess.Popen[bytes] | None = None
    lines = _Lines(proc, loop)
    stop_sampling = asyncio.Event()
    sampler = asyncio.ensure_future(backend_cpu.run(stop_sampling)) if backend_cpu else None
    run = ProcessRun(exit_code=None, timed_out=False, failure=None, spawned=spawned, ready=None, done=None,
                     cpu_total_s=0.0, cpu_at_ready_s=0.0, peak_rss_mb=0.0, db_cpu_s=None)
    deadline = time.monotonic() + timeout
    ready_deadline = time.monotonic() + ready_timeout
    watcher: AIOKafkaConsumer | None = None
    if kafka is not None:
        watcher = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=kafka.group,
                                   enable_auto_commit=False)
        await watcher.start()
    partitions = sorted(kafka.ends) if kafka else []
    sampled_done = False
    try:
        next_poll = 0.0
        while not exited.done() and time.monotonic() < deadline:
            if run.ready is None and time.monotonic() > ready_deadline:
                run.failure = f"not ready (no partitions assigned, no data loaded) within {ready_timeout:.0f} s"
                break
            try:
                at, stream, line = await asyncio.wait_for(lines.queue.get(), 0.05)
            except asyncio.TimeoutError:
                at, stream, line = time.time(), "", ""
            event: dict[str, Any] | None = None
            if stream == "stdout" and line.startswith("BENCH "):
                event = orjson.loads(line[6:])
                run.events.append(event)
            if run.ready is None and (
                (event is not None and event["event"] == "ready")
                or (ready_marker is not None and stream == "stderr" and ready_marker in line)
            ):
                run.ready = float(event["t"]) if event is not None else at
                run.cpu_at_ready_s = tree_cpu_seconds(proc.pid)
                if profile_out:
                    profiler = subprocess.Popen(
                        py_spy_command(py_spy() or "py-spy", proc.pid, profile_out, profile_rate),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if backend_cpu is not None:
                    await backend_cpu.mark_ready()
                if on_ready is not None:
                    await on_ready()
            if run.done is None and event is not None and event["event"] == "done":
                run.done = float(event["t"])
            if run.done is None and watcher is not None and run.ready is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.1
                offsets = await committed_offsets(watcher, kafka.topic, partitions)  # type: ignore[union-attr]
                if kafka.reached(offsets):  # type: ignore[union-attr]
                    run.done = time.time()
            if run.done is not None and not sampled_done:
                sampled_done = True
                if backend_cpu is not None:
                    await backend_cpu.sample()
            if run.done is not None and not run.metrics_text and (metrics_ports or after_done):
                if metrics_ports:
                    run.metrics_text = [await asyncio.to_thread(scrape, p) for p in metrics_ports]
                if after_done is not None:
                    await after_done()
                    after_done = None
        if not exited.done():
            run.timed_out = True
            run.failure = run.failure or f"did not finish within {timeout:.0f} s"
            await _terminate(proc.pid, exited)
        _, status, usage = await exited
        if run.done is None and watcher is not None and run.ready is not None and not run.timed_out:
            # The last commit came with the exit, between two polls.
            offsets = await committed_offsets(watcher, kafka.topic, partitions)  # type: ignore[union-attr]
            if kafka.reached(offsets):  # type: ignore[union-attr]
                run.done = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        run.exit_code = proc.returncode
        run.cpu_total_s = usage.ru_utime + usage.ru_stime
        run.peak_rss_mb = usage.ru_maxrss / 1024
    finally:
        if profiler is not None:
            run.profiler_cpu_s = await _reap(profiler)
        if watcher is not None:
            await watcher.stop()
        stop_sampling.set()
        if sampler is not None:
            await sampler
    while not lines.queue.empty():
        lines.queue.get_nowait()
    run.stderr_tail = list(lines.stderr_tail)
    if backend_cpu is not None:
        run.db_cpu_s = backend_cpu.seconds()
    return run
