"""A SeaweedFS of the test session's own: ``weed server`` with its S3 API on free loopback
ports, data in a temporary folder, stopped and removed at the end.

It is started with the same command line and binary as ``fleet services up`` uses
(:mod:`fleet_telemetry.deploy.stack`), and waited for until a signed request to its S3 API
answers, not just until a port is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import SecretStr

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.addresses import Endpoint
from fleet_telemetry.deploy.stack.install import Machine, weed_binary
from fleet_telemetry.deploy.stack.probe import create_bucket, probe_storage, wait_until
from fleet_telemetry.deploy.stack.processes import (
    WEED,
    WEED_PORTS,
    free_ports,
    process_alive,
    s3_identities,
    spawn_detached,
    weed_command,
)

START_TIMEOUT_SECONDS = 60.0


@contextlib.contextmanager
def private_seaweedfs(settings: Settings) -> Iterator[Settings]:
    """``settings`` pointing at a SeaweedFS started here, with fresh keys and the bucket made."""
    binary = weed_binary(Machine())
    with tempfile.TemporaryDirectory(prefix="fleet-seaweedfs-") as folder:
        root = Path(folder)
        s3_port, *others = free_ports(1 + len(WEED_PORTS))
        access, secret = f"test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        config = root / "s3.json"
        config.write_text(s3_identities(access, secret))
        (root / "data").mkdir()
        command = weed_command(binary, Endpoint("127.0.0.1", s3_port), root / "data", config,
                               dict(zip(WEED_PORTS, others)))
        pid = spawn_detached(command, root / "weed.log")
        try:
            ours = settings.model_copy(update={
                "s3_endpoint": f"http://127.0.0.1:{s3_port}",
                "s3_access_key": SecretStr(access), "s3_secret_key": SecretStr(secret),
                "s3_bucket": f"fleet-test-{uuid.uuid4().hex[:8]}",
            })
            probe = asyncio.run(wait_until(lambda: probe_storage(ours), lambda p: p.answers and not p.error,
                                           START_TIMEOUT_SECONDS, still_running=lambda: process_alive(pid, WEED)))
            if not probe.answers or probe.error:
                log = (root / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS did not answer within {START_TIMEOUT_SECONDS:g} s"
                                   f" ({probe.error}); its log ends:\n{log}")
            asyncio.run(create_bucket(ours))
            yield ours
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not process_alive(pid, WEED):
                    break
                asyncio.run(asyncio.sleep(0.1))
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
