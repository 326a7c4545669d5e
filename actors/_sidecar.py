"""Run one graphcache node (the sidecar): it follows the PostgreSQL change feed, keeps the graphs of the
roots it owns cached in Redis, and serves Prometheus /metrics and /healthz. Nodes find each other
through heartbeats in Redis (--membership redis); SIGTERM or SIGINT stops it cleanly. Every option can
also come from the environment variable shown in brackets.

Once serving, it writes one line to stdout: "graphcache node NODE_ID ready metrics=http://HOST:PORT/metrics".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import anyio

from cache import CacheError, RedisCache
from storage import PostgresStore, StoreError

from ._actor import DEFAULT_MIN_REBUILD_INTERVAL
from ._http import serve_http
from ._keys import graph_key
from ._membership import Membership, RedisMembership, StaticMembership
from ._metrics import metrics_registry, render_metrics
from ._node import Node

__all__ = ("add_arguments", "run")

logger = logging.getLogger(__name__)

_TEXT = "text/plain; charset=utf-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GRAPHCACHE_{name}", default)


def _option(
    parser: argparse.ArgumentParser, flag: str, env: str, default: str, help_text: str, **kw: Any
) -> None:
    parser.add_argument(
        flag,
        default=_env(env, default),
        help=f"{help_text} (default: %(default)s) [env GRAPHCACHE_{env}]",
        **kw,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options; each defaults to its GRAPHCACHE_* environment variable."""
    _option(parser, "--redis", "REDIS", "redis://127.0.0.1:6379/0", "Redis URL of the cache and membership")
    _option(
        parser, "--postgres", "POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres", "PostgreSQL DSN"
    )
    _option(parser, "--node-id", "NODE_ID", f"{socket.gethostname()}-{os.getpid()}", "this node's unique id")
    _option(parser, "--namespace", "NAMESPACE", "gc", "Redis key namespace of the cache and the members set")
    _option(parser, "--schema", "SCHEMA", "graphcache", "PostgreSQL schema of the graphs and the outbox")
    _option(
        parser, "--membership", "MEMBERSHIP", "redis", "redis: find siblings by heartbeats; static: alone",
        choices=("redis", "static"),
    )  # fmt: skip
    _option(parser, "--heartbeat", "HEARTBEAT", "1.0", "seconds between membership heartbeats", type=float)
    _option(parser, "--ttl", "TTL", "3.0", "seconds after its last heartbeat a node drops out", type=float)
    _option(
        parser, "--consistency", "CONSISTENCY", "bounded",
        "bounded: serve the previous graph until the rebuild lands; strict: invalidate first",
        choices=("bounded", "strict"),
    )  # fmt: skip
    _option(
        parser,
        "--idle-timeout",
        "IDLE_TIMEOUT",
        "30.0",
        "seconds before an idle actor passivates",
        type=float,
    )
    _option(
        parser,
        "--min-rebuild-interval",
        "MIN_REBUILD_INTERVAL",
        str(DEFAULT_MIN_REBUILD_INTERVAL),
        "seconds between the starts of two rebuilds of one root (0: no pacing); the change feed is"
        " then read at most every half of it",
        type=float,
    )
    _option(parser, "--metrics-host", "METRICS_HOST", "127.0.0.1", "address of /metrics and /healthz")
    _option(
        parser, "--metrics-port", "METRICS_PORT", "9464", "port of /metrics and /healthz (0: any)", type=int
    )
    _option(parser, "--log-level", "LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")
    _option(
        parser,
        "--log-format",
        "LOG_FORMAT",
        "text",
        "text or json (one object per line)",
        choices=("text", "json"),
    )


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, node, logger, message (and the exception, if any)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self._node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "node": self._node_id,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, fmt: str, node_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(node_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 if the store or cache cannot be reached."""
    _configure_logging(args.log_level, args.log_format, args.node_id)
    try:
        anyio.run(_serve, args)
    except (StoreError, CacheError) as exc:
        logger.error("cannot serve: %s", exc)
        return 1
    return 0


def _membership(args: argparse.Namespace) -> Membership:
    if args.membership == "static":
        return StaticMembership([args.node_id])
    return RedisMembership(args.redis, namespace=args.namespace, heartbeat=args.heartbeat, ttl=args.ttl)


def _routes(node: Node, membership: Membership) -> dict[str, Callable[[], Any]]:
    registry = metrics_registry(node, membership=membership)

    async def metrics() -> tuple[int, str, bytes]:
        return 200, _PROMETHEUS, render_metrics(registry)

    async def healthz() -> tuple[int, str, bytes]:
        stats = getattr(membership, "statistics", None)
        if stats is not None and not stats().connected:
            return 503, _TEXT, b"membership: heartbeats do not reach Redis\n"
        return 200, _TEXT, b"ok\n"

    return {"/metrics": metrics, "/healthz": healthz}


_FEED_POLL_FLOOR = 0.01
_FEED_POLL_CEILING = 0.25
"""The sidecar's feed polls start between 10 ms and 250 ms (the store's idle poll interval) apart."""


def _feed_min_poll_interval(min_rebuild_interval: float) -> float:
    """How far apart the sidecar's change-feed polls start: half the rebuild pacing, within the bounds.

    A rebuild loads the graph as committed when it runs, not as of the change that triggered it, so under
    a stream of commits the feed only has to say "something changed" once per paced rebuild; polling more
    often costs each node (and the server) CPU and wake-ups for no fresher graph. Half the pacing keeps a
    quiet root's first change from waiting much longer than before.
    """
    return min(_FEED_POLL_CEILING, max(_FEED_POLL_FLOOR, min_rebuild_interval / 2))


async def _serve(args: argparse.Namespace) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        store = await PostgresStore.connect(
            args.postgres,
            schema=args.schema,
            min_poll_interval=_feed_min_poll_interval(args.min_rebuild_interval),
        )
        try:
            async with RedisCache.from_url(args.redis, namespace=args.namespace) as cache:
                await cache.get(graph_key("-"))  # fail fast (CacheUnavailable, exit 1) if Redis is away
                await _serve_node(args, store, cache, signals)
        finally:
            with anyio.CancelScope(shield=True):
                await store.aclose()


async def _serve_node(
    args: argparse.Namespace, store: PostgresStore, cache: RedisCache, signals: Any
) -> None:
    membership = _membership(args)
    node = Node(
        store=store,
        cache=cache,
        node_id=args.node_id,
        membership=membership,
        consistency=args.consistency,
        idle_timeout=args.idle_timeout,
        min_rebuild_interval=args.min_rebuild_interval,
        handoff=args.ttl + 2 * args.heartbeat,  # a dead member's changes are re-read by its successor
    )
    async with node, anyio.create_task_group() as tg:
        port = await tg.start(serve_http, args.metrics_host, args.metrics_port, _routes(node, membership))
        sys.stdout.write(
            f"graphcache node {args.node_id} ready metrics=http://{args.metrics_host}:{port}/metrics\n"
        )
        sys.stdout.flush()
        async for signum in signals:
            logger.info("node %s: %s received, stopping", args.node_id, signal.Signals(signum).name)
            break
        tg.cancel_scope.cancel()
