"""How a long-running command stops: SIGTERM and SIGINT (Ctrl-C) both ask it to finish cleanly.

After the same clean finish, a stop asked by SIGTERM (a service manager, ``docker stop``)
ends with the command's own exit status and one asked by Ctrl-C with 130, the shell's
status for an interrupted command.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Final

from fleet_telemetry.core.errors import ServiceUnavailable

EXIT_INTERRUPTED: Final = 130


class StopSignals:
    """SIGTERM and SIGINT wired to ``stop`` on the running event loop; remembers a Ctrl-C."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.interrupted = False
        """True once SIGINT arrived."""

    def install(self, *, sigint: bool = True) -> "StopSignals":
        """Wires the signals on the running loop; ``sigint=False`` leaves SIGINT alone (a
        worker process whose parent turns Ctrl-C into SIGTERM for it)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop)
        if sigint:
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
        return self

    def interrupt(self) -> None:
        self.interrupted = True
        self._stop()

    def status(self, status: int) -> int:
        """The exit status of a command that ended with ``status``: 130 after a Ctrl-C."""
        return EXIT_INTERRUPTED if self.interrupted else status

    async def run(self, work: Awaitable[int]) -> int:
        """Awaits ``work`` (a run that stops when told); returns :meth:`status` of its exit
        status. A service still away when a Ctrl-C asked it to stop is no failure to
        report then: the run was interrupted."""
        try:
            status = await work
        except ServiceUnavailable:
            if not self.interrupted:
                raise
            status = 1
        return self.status(status)
