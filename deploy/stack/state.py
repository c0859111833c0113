"""What ``fleet services up`` started, so that ``down`` stops exactly that.

Everything lives in the project-local stack folder (``FLEET_STACK_DIR``, ``.local`` by
default): ``state.json`` lists the services ``up`` started, ``tansu/``, ``redis/`` and
``seaweedfs/`` hold the pid files and logs of the processes it runs itself (and
SeaweedFS's data and its ``s3.json`` with the keys, mode 0600), ``database.url`` (mode
0600) the URL of the project's own PostgreSQL role when ``up`` had to make one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from fleet_telemetry.deploy.stack.addresses import BROKER, REDIS, STORAGE
from fleet_telemetry.deploy.stack.processes import REDIS_SERVER, TANSU, WEED, running_pid


class Stack:
    """The stack folder: the state file, the broker's, Redis's and SeaweedFS's logs and pids."""

    def __init__(self, stack_dir: str) -> None:
        self.root = Path(stack_dir).resolve()
        self.state_file = self.root / "state.json"
        self.tansu_dir = self.root / "tansu"
        self.tansu_pid = self.tansu_dir / "tansu.pid"
        self.tansu_log = self.tansu_dir / "tansu.log"
        self.redis_dir = self.root / "redis"
        self.redis_pid_file = self.redis_dir / "redis.pid"
        self.redis_log = self.redis_dir / "redis.log"
        self.database_url_file = self.root / "database.url"
        self.weed_dir = self.root / "seaweedfs"
        self.weed_data = self.weed_dir / "data"
        self.weed_pid = self.weed_dir / "weed.pid"
        self.weed_log = self.weed_dir / "weed.log"
        self.weed_config = self.weed_dir / "s3.json"

    def load(self) -> dict[str, dict[str, Any]]:
        """The services ``up`` started, by name, with what ``down`` needs to stop them."""
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("started", {}) if isinstance(data, dict) else {}

    def record(self, service: str, details: dict[str, Any]) -> None:
        started = self.load()
        started[service] = details
        self._save(started)

    def forget(self, service: str) -> None:
        started = self.load()
        started.pop(service, None)
        self._save(started)

    def _save(self, started: dict[str, dict[str, Any]]) -> None:
        """Replaces the state file atomically; removes it when nothing is started."""
        if not started:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"started": started}, indent=2) + "\n")
        tmp.replace(self.state_file)

    def stored_database_url(self) -> str | None:
        """The URL of the project's PostgreSQL role, if ``up`` made one."""
        try:
            return self.database_url_file.read_text().strip() or None
        except OSError:
            return None

    def store_weed_config(self, text: str) -> None:
        """Writes SeaweedFS's S3 identities (they hold the secret key) readable by this user
        alone, like :meth:`store_database_url`."""
        self.weed_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.weed_config.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        tmp.replace(self.weed_config)

    def store_database_url(self, url: str) -> None:
        """Keeps ``url`` (it holds a password) readable by this user alone: written to a
        new file created with mode 0600, then renamed over the old one."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.database_url_file.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(url + "\n")
        tmp.replace(self.database_url_file)

    def broker_pid(self) -> int | None:
        """The pid of the broker ``up`` started, if it still runs."""
        return running_pid(self.tansu_pid, TANSU)

    def redis_pid(self) -> int | None:
        """The pid of the redis-server ``up`` started, if it still runs."""
        if REDIS not in self.load():
            return None
        return running_pid(self.redis_pid_file, REDIS_SERVER)

    def storage_pid(self) -> int | None:
        """The pid of the SeaweedFS ``up`` started, if it still runs."""
        return running_pid(self.weed_pid, WEED)

    def started_by_us(self, service: str) -> bool:
        if service == BROKER:
            return self.broker_pid() is not None
        if service == STORAGE:
            return self.storage_pid() is not None
        if service == REDIS:
            return self.redis_pid() is not None
        return service in self.load()
