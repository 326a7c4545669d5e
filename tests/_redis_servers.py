"""Private redis-server processes (single and 3-master Cluster) for tests that stop or flood Redis.

``private_redis`` (per test): a redis-server on a free port in a temp dir, which the test may ``stop()``
and ``start()`` again on the same port. ``redis_cluster`` (per session): three cluster-enabled masters
joined with ``redis-cli --cluster create``, torn down at the end of the run.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests._servers import redis_server_binary

__all__ = ("PrivateRedis", "RedisClusterServers", "private_redis", "redis_cluster", "running_cluster")

_START_DEADLINE = 20.0


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(*, with_bus: bool = False) -> int:
    """A free port (and, for Cluster, a free bus port at +10000)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _port_is_free(port) and (not with_bus or _port_is_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; server start-up is an "eventually" property."""
    deadline = time.monotonic() + _START_DEADLINE
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class PrivateRedis:
    """One redis-server this test owns: ``stop()`` kills it, ``start()`` brings it back on the same port."""

    def __init__(self, directory: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.port = _free_port(with_bus=bool(extra))
        self.extra = extra
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(lambda: _answers(self.port), f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Kill the server (like a crash) and wait until the process is gone."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


class RedisClusterServers:
    """Three cluster-enabled masters covering all 16384 slots."""

    def __init__(self, root: Path) -> None:
        self.nodes: list[PrivateRedis] = []
        for index in range(3):
            directory = root / f"node{index}"
            directory.mkdir()
            extra = ("--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"))
            self.nodes.append(PrivateRedis(directory, extra=extra))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(self._is_ok, "the cluster to report cluster_state:ok")

    def wait_until_ok(self) -> None:
        """Block until every node reports cluster_state:ok (after a node was stopped and started again)."""
        _wait_until(self._is_ok, "the cluster to report cluster_state:ok")

    def _is_ok(self) -> bool:
        for node in self.nodes:
            info = subprocess.run(
                ["redis-cli", "-p", str(node.port), "cluster", "info"], capture_output=True, check=False
            )
            if b"cluster_state:ok" not in info.stdout:
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own that it may stop and restart on the same port."""
    # Own temp dirs, not pytest's basetemp: concurrent pytest runs prune each other's old basetemps.
    with tempfile.TemporaryDirectory(prefix="gc-redis-") as directory:
        server = PrivateRedis(Path(directory))
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def running_cluster(prefix: str) -> Iterator[RedisClusterServers]:
    """Three cluster-enabled masters in a temp dir named ``prefix...``, stopped however the block ends."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli not found on PATH: install redis-tools", pytrace=False)
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        cluster = RedisClusterServers(Path(directory))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A private 3-master Redis Cluster for the whole run."""
    with running_cluster("gc-redis-cluster-") as cluster:
        yield cluster
