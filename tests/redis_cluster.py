"""A Redis Cluster of a test's own: three masters on loopback, free ports, no replicas.

Each node runs ``redis-server --cluster-enabled yes`` in the foreground with its
configuration, data and log in a private temporary folder; ``redis-cli --cluster
create`` joins them and spreads the 16,384 slots. Stopped (and the folder removed) at
the end of the block.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BUS_PORT_OFFSET = 10_000
"""A cluster node also listens on its port + 10,000 (the cluster bus)."""


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_PORT_OFFSET < 65_536 and port not in taken and _bindable(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _cli(cli: str, port: int, *args: str) -> str:
    return subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30).stdout


@contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[int]]:
    """Starts the cluster and yields its nodes' ports; stops it on exit."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed (Debian packages redis-server, redis-tools)")
    ports: list[int] = []
    for _ in range(masters):
        ports.append(free_cluster_port(set(ports)))
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-redis-cluster-") as folder:
        try:
            for port in ports:
                home = Path(folder, str(port))
                home.mkdir()
                processes.append(subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", str(home / "nodes.conf"), "--dir", str(home),
                     "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(home / "redis.log")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in ports:
                _wait(lambda: _cli(cli, port, "ping").strip() == "PONG", 20, f"redis-server on port {port}")
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                 "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            for port in ports:
                _wait(lambda: "cluster_state:ok" in _cli(cli, port, "cluster", "info"), 30,
                      f"the cluster to be ok on port {port}")
            yield ports
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
