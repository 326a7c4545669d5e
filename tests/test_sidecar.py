"""run.py serve: options from flags or environment, metrics and health, clean stop, clear failure."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from graphcache import _cli as run
from graphcache.actors import graph_key
from graphcache.cache import RedisCache
from graphcache.storage import Graph, PostgresStore, Upsert
from tests._sidecar_procs import ROOT_DIR, Servers, http_get, serve_command, sidecar

OPTIONS = {
    "--redis": "REDIS",
    "--postgres": "POSTGRES",
    "--node-id": "NODE_ID",
    "--namespace": "NAMESPACE",
    "--schema": "SCHEMA",
    "--graph": "GRAPH",
    "--membership": "MEMBERSHIP",
    "--heartbeat": "HEARTBEAT",
    "--ttl": "TTL",
    "--consistency": "CONSISTENCY",
    "--idle-timeout": "IDLE_TIMEOUT",
    "--min-rebuild-interval": "MIN_REBUILD_INTERVAL",
    "--feed-interval": "FEED_INTERVAL",
    "--sweep-interval": "SWEEP_INTERVAL",
    "--startup-timeout": "STARTUP_TIMEOUT",
    "--host": "HOST",
    "--port": "PORT",
    "--api-token": "API_TOKEN",
    "--read-timeout": "READ_TIMEOUT",
    "--log-level": "LOG_LEVEL",
    "--log-format": "LOG_FORMAT",
}


def serve_parser_help() -> str:
    parser = run.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(action.choices, dict)
    serve: argparse.ArgumentParser = action.choices["serve"]
    return serve.format_help()


def test_help_names_every_option_and_its_environment_variable() -> None:
    """--help lists each flag with its GRAPHCACHE_* variable and its default."""
    text = " ".join(serve_parser_help().split())
    for flag, env in OPTIONS.items():
        assert flag in text
        assert f"[env GRAPHCACHE_{env}]" in text
    assert "(default: 3.0)" in text


def test_help_never_prints_a_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passwords in GRAPHCACHE_REDIS / GRAPHCACHE_POSTGRES are masked in --help, the rest is shown."""
    monkeypatch.setenv("GRAPHCACHE_REDIS", "redis://cache:s3cret-r@10.0.0.5:6380/2")
    monkeypatch.setenv("GRAPHCACHE_POSTGRES", "postgresql://app:s3cret-p@db:5432/shop?password=s3cret-q")
    text = serve_parser_help()
    assert "s3cret" not in text
    assert "redis://cache:***@10.0.0.5:6380/2" in " ".join(text.split())
    args = run.build_parser().parse_args(["serve"])
    assert args.redis == "redis://cache:s3cret-r@10.0.0.5:6380/2"  # the value itself is untouched


def test_the_feed_interval_is_its_own_flag() -> None:
    """--feed-interval (default 10 ms) spaces the feed's reads, whatever --min-rebuild-interval paces."""
    assert run.build_parser().parse_args(["serve"]).feed_interval == pytest.approx(0.01)
    args = run.build_parser().parse_args(["serve", "--feed-interval", "0.05", "--min-rebuild-interval", "1"])
    assert (args.feed_interval, args.min_rebuild_interval) == (0.05, 1.0)


def test_environment_variables_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRAPHCACHE_* variables set the defaults and flags still override them."""
    monkeypatch.setenv("GRAPHCACHE_TTL", "7.5")
    monkeypatch.setenv("GRAPHCACHE_MEMBERSHIP", "static")
    monkeypatch.setenv("GRAPHCACHE_NODE_ID", "from-env")
    monkeypatch.setenv("GRAPHCACHE_MIN_REBUILD_INTERVAL", "0.25")
    args = run.build_parser().parse_args(["serve", "--node-id", "from-flag"])
    assert (args.ttl, args.membership, args.node_id) == (7.5, "static", "from-flag")
    assert args.min_rebuild_interval == 0.25


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.connect(postgres_dsn, schema=pg_schema)
    yield store
    await store.aclose()


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str) -> Servers:
    return Servers(redis_url, postgres_dsn, namespace, pg_schema)


@pytest.mark.anyio
async def test_serves_metrics_and_health_and_stops_cleanly(
    store: PostgresStore, servers: Servers, tmp_path: Path
) -> None:
    """A static node caches a written graph, counts it in /metrics, is healthy, and exits 0 on SIGTERM."""
    await store.create_root("s", {})
    command = serve_command("solo", servers, ["--membership", "static", "--log-format", "json"])
    cache = RedisCache.from_url(servers.redis_url, namespace=servers.namespace)
    async with sidecar(command, tmp_path / "solo.log") as node, cache:
        version = await store.apply("s", [Upsert("c", "s", {"n": 1})])
        deadline = time.monotonic() + 20
        while (item := await cache.get(graph_key("s"), type=Graph)) is None or item.version < version:
            assert time.monotonic() < deadline, "the node never cached the write"
            await anyio.sleep(0.05)
        assert item.value == await store.load("s")
        metrics = await node.metrics()
        health = await http_get(node.metrics_url.replace("/metrics", "/healthz"))
        code = await node.stop(signal.SIGTERM)
    assert metrics["graphcache_rebuilds_total"] >= 1
    assert 1 <= metrics["graphcache_rebuild_batches_total"] <= metrics["graphcache_rebuilds_total"]
    assert metrics["graphcache_notifications_total"] >= 1
    assert metrics["graphcache_puts_total:stored"] >= 1
    assert metrics["graphcache_members"] == 1
    assert health == "ok\n"
    assert code == 0
    log = (tmp_path / "solo.log").read_text()
    assert (
        '"node": "solo", "logger": "graphcache.sidecar._serve", "message": "node solo: SIGTERM received,'
        ' stopping"' in log
    )
    assert "node solo stopped" in log


@pytest.mark.anyio
@pytest.mark.parametrize(
    "where",
    [
        ["--postgres", "postgresql://postgres@127.0.0.1:1/postgres"],
        ["--redis", "redis://127.0.0.1:1/0"],
    ],
    ids=["postgres", "redis"],
)
async def test_unreachable_server_exits_1_with_the_reason(
    where: list[str], postgres_dsn: str, pg_schema: str
) -> None:
    """With PostgreSQL or Redis unreachable, serve retries until --startup-timeout, then exits 1 naming the
    address, without a traceback."""
    command = [
        sys.executable, str(ROOT_DIR / "run.py"), "serve", "--membership", "static", "--port", "0",
        "--postgres", postgres_dsn, "--schema", pg_schema, "--startup-timeout", "1", *where,
    ]  # fmt: skip
    result = await anyio.run_process(command, check=False, cwd=ROOT_DIR)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert "is unreachable, retrying" in stderr
    assert "cannot serve:" in stderr
    assert "127.0.0.1:1" in stderr
    assert "Traceback" not in stderr


@pytest.mark.anyio
async def test_a_taken_port_exits_1_with_one_line(postgres_dsn: str, pg_schema: str) -> None:
    """A metrics port already in use is one clear line and exit 1, before anything is created."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable, str(ROOT_DIR / "run.py"), "serve", "--membership", "static",
            "--port", str(port), "--postgres", postgres_dsn, "--schema", pg_schema,
        ]  # fmt: skip
        result = await anyio.run_process(command, check=False, cwd=ROOT_DIR)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr
