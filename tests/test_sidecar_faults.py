"""``run.py serve`` on a bad day: PostgreSQL and Redis stopped and started under it. The process keeps
running (G6), /healthz stays alive, /readyz says what is down and recovers, and it caches again after."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from graphcache.actors import graph_key
from graphcache.cache import CacheUnavailable, RedisCache
from graphcache.storage import Graph, PostgresStore, Upsert
from tests._pg_servers import PrivatePostgres
from tests._redis_servers import PrivateRedis
from tests._sidecar_procs import Servers, serve_command, sidecar

pytestmark = [pytest.mark.anyio, pytest.mark.fault]


async def http_status(url: str) -> tuple[int, str]:
    """(status, body) of a GET, also for error statuses."""

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own localhost server)
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await anyio.to_thread.run_sync(fetch)


async def until_status(url: str, status: int, within: float = 20.0) -> str:
    """Poll ``url`` until it answers ``status``; its body."""
    deadline = time.monotonic() + within
    while True:
        code, body = await http_status(url)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"{url} still answers {code} {body!r} after {within}s"
        await anyio.sleep(0.1)


async def cached_version(cache: RedisCache, root_id: str) -> int | None:
    try:
        item = await cache.get(graph_key(root_id), type=Graph)
    except CacheUnavailable:  # the test's own connection, cut by a restart: the next call reconnects
        return None
    return None if item is None else item.version


async def until_cached(cache: RedisCache, root_id: str, version: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while (await cached_version(cache, root_id) or 0) < version:
        assert time.monotonic() < deadline, f"{root_id} not cached at {version} after {within}s"
        await anyio.sleep(0.05)


@pytest.mark.parametrize("down", ["postgres", "redis"])
async def test_the_sidecar_outlives_a_server_stopped_and_started_under_it(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, tmp_path: Path, down: str
) -> None:
    """With PostgreSQL (or Redis) stopped, the sidecar keeps running: /healthz 200, /readyz 503 naming
    what is down; once it is back, /readyz is 200 again and a new commit is cached."""
    schema = f"sf_{down}"
    servers = Servers(private_redis.url, private_postgres.dsn, "gc", schema)
    store = await PostgresStore.connect(private_postgres.dsn, schema, command_timeout=3)
    try:
        await store.create_root("s", {})
        command = serve_command(
            "survivor", servers, ["--membership", "redis", "--heartbeat", "0.2", "--ttl", "1"]
        )
        async with (
            sidecar(command, tmp_path / "survivor.log") as node,
            RedisCache.from_url(private_redis.url, namespace="gc", socket_timeout=1) as cache,
        ):
            base = node.metrics_url.removesuffix("/metrics")
            await until_status(f"{base}/readyz", 200)
            await until_cached(cache, "s", await store.apply("s", [Upsert("a", "s", {})]))

            server = private_postgres if down == "postgres" else private_redis
            await anyio.to_thread.run_sync(server.stop)
            try:
                reason = await until_status(f"{base}/readyz", 503)
                assert await http_status(f"{base}/healthz") == (200, "ok\n")
            finally:
                await anyio.to_thread.run_sync(server.start)
            assert ("postgresql" if down == "postgres" else "redis") in reason  # the fault was seen
            await until_status(f"{base}/readyz", 200)
            if down == "postgres":  # the store's pool was cut: reconnect the test's own
                await store.aclose()
                store = await PostgresStore.connect(private_postgres.dsn, schema, command_timeout=3)
            version = await store.apply("s", [Upsert("b", "s", {})])
            await until_cached(cache, "s", version)
            assert node.process.returncode is None  # still running, never restarted
            code = await node.stop(signal.SIGTERM)
        assert code == 0
        assert "Traceback" not in (tmp_path / "survivor.log").read_text()
    finally:
        await store.aclose()
