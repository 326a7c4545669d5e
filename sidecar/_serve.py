"""Run one graphcache node (the sidecar): it follows the PostgreSQL change feed, keeps the graphs of the
roots it owns cached in Redis, and serves an HTTP API (Starlette on uvicorn): GET /v1/graphs/ROOT_ID,
POST /v1/graphs/ROOT_ID/refresh, Prometheus /metrics, /healthz (alive), /readyz (following the feed,
membership joined, Redis and PostgreSQL reachable: 200, or 503 with the reasons) and /openapi.json.
Nodes find each other through heartbeats in Redis (--membership redis). Every option can also come from
the environment variable shown in brackets.

The graphs are the store's own tables in --schema, or, with --graph SPEC, rows of your own tables
described by a graph spec (TOML) whose change tracking `graphcache track` installed in --schema; the
nodes of such a graph are named "<table>:<key>".

It keeps running through outages: PostgreSQL or Redis down, restarted or failing over is retried with
capped backoff and shown by /readyz and /metrics. Only SIGTERM/SIGINT (exit 0), a bad option or a graph
spec that does not fit the database or is not tracked (exit 2), servers still unreachable
--startup-timeout seconds after start-up or an HTTP address that cannot be bound (exit 1, one line
naming the flag) end it. Once the node runs, it writes one line to stdout:
"graphcache node NODE_ID ready http://HOST:PORT".
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import uvicorn

from .._cli import (
    EXIT_USAGE,
    UsageError,
    choice,
    env_checked,
    env_default,
    env_option,
    identifier,
    log_level,
    namespace,
    non_blank,
    one_line,
    optional_graph_spec,
    port,
    postgres_dsn,
    redis_url,
    seconds,
    seconds_or_zero,
)
from ..actors import (
    DEFAULT_MIN_REBUILD_INTERVAL,
    DEFAULT_SWEEP_INTERVAL,
    Membership,
    Node,
    RedisMembership,
    RetryPolicy,
    StaticMembership,
    graph_key,
    is_transient,
)
from ..cache import CacheError, RedisCache
from ..storage import InvalidOperation, PostgresStore, SpecError, StoreError
from ._api import build_app

__all__ = ("add_arguments", "run")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options; each defaults to its GRAPHCACHE_* environment variable."""
    env_option(
        parser, "--redis", "REDIS", "redis://127.0.0.1:6379/0", "Redis URL of the cache and membership",
        convert=redis_url, secret=True, metavar="URL",
    )  # fmt: skip
    env_option(
        parser, "--postgres", "POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres", "PostgreSQL URL",
        convert=postgres_dsn, secret=True, metavar="DSN",
    )  # fmt: skip
    env_option(
        parser, "--node-id", "NODE_ID", socket.gethostname(),
        "this node's unique id; a node restarted under the same id resumes the change feed from its"
        " durable checkpoint (set one per sidecar when several run on one host)",
        convert=non_blank, metavar="ID",
    )  # fmt: skip
    env_option(
        parser, "--namespace", "NAMESPACE", "gc",
        "Redis key namespace of the cache and the members set (letters, digits, _ . -)", convert=namespace,
    )  # fmt: skip
    env_option(
        parser, "--schema", "SCHEMA", "graphcache", "PostgreSQL schema of the graphs and the outbox",
        convert=identifier,
    )  # fmt: skip
    env_option(
        parser, "--graph", "GRAPH", "",
        "graph spec (TOML) of graphs kept in your own tables; its change tracking must be installed in"
        " --schema first (graphcache track)",
        convert=optional_graph_spec, metavar="SPEC", shown="none: the built-in tables",
    )  # fmt: skip
    env_option(
        parser, "--membership", "MEMBERSHIP", "redis", "redis: find siblings by heartbeats; static: alone",
        convert=choice("redis", "static"), metavar="{redis,static}",
    )  # fmt: skip
    env_option(
        parser, "--heartbeat", "HEARTBEAT", "1.0", "seconds between membership heartbeats (less than --ttl)",
        convert=seconds, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--ttl", "TTL", "3.0", "seconds after its last heartbeat a node drops out",
        convert=seconds, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--consistency", "CONSISTENCY", "bounded",
        "bounded: serve the previous graph until the rebuild lands; strict: invalidate first",
        convert=choice("bounded", "strict"), metavar="{bounded,strict}",
    )  # fmt: skip
    env_option(
        parser, "--idle-timeout", "IDLE_TIMEOUT", "30.0", "seconds before an idle actor passivates",
        convert=seconds, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--min-rebuild-interval", "MIN_REBUILD_INTERVAL", str(DEFAULT_MIN_REBUILD_INTERVAL),
        "seconds between the starts of two snapshot loads of one root (0: no pacing); rebuilds patched"
        " from the feed's row images are not paced",
        convert=seconds_or_zero, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--feed-interval", "FEED_INTERVAL", str(DEFAULT_FEED_INTERVAL),
        "seconds between the starts of two reads of the change feed (0: one per NOTIFY): the freshness"
        " of patched rebuilds, against one put per root per read under a stream of commits",
        convert=seconds_or_zero, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--sweep-interval", "SWEEP_INTERVAL", str(DEFAULT_SWEEP_INTERVAL),
        "seconds between reconcile sweeps (cached against committed versions of the owned roots)",
        convert=seconds, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--startup-timeout", "STARTUP_TIMEOUT", "30",
        "seconds to keep retrying PostgreSQL and Redis at start-up before exiting 1 (0: forever)",
        convert=seconds_or_zero, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, ("--host", "--metrics-host"), "HOST", "127.0.0.1",
        "address of the HTTP API, /metrics, /healthz, /readyz (not loopback: needs --api-token);"
        " --metrics-host is a deprecated alias",
        convert=non_blank, metavar="HOST",
    )  # fmt: skip
    env_option(
        parser, ("--port", "--metrics-port"), "PORT", "9464",
        "port of the HTTP API (0: any); --metrics-port is a deprecated alias", convert=port, metavar="PORT",
    )  # fmt: skip
    parser.add_argument(
        "--api-token",
        default=env_default("API_TOKEN", ""),
        type=env_checked(_token),
        metavar="TOKEN",
        help="bearer token every /v1/ request must carry (default: none; never printed)"
        " [env GRAPHCACHE_API_TOKEN]",
    )
    env_option(
        parser, "--read-timeout", "READ_TIMEOUT", "10",
        "seconds a GET /v1/graphs/ROOT_ID may take before it answers 504", convert=seconds, metavar="SECONDS",
    )  # fmt: skip
    env_option(
        parser, "--log-level", "LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR",
        convert=log_level, metavar="LEVEL",
    )  # fmt: skip
    env_option(
        parser, "--log-format", "LOG_FORMAT", "text", "text or json (one object per line)",
        convert=choice("text", "json"), metavar="{text,json}",
    )  # fmt: skip
    # The load test's measuring hook, not an operator's option: append one JSON line per put the cache
    # acknowledged as stored, in the load-test history format (graphcache.harness reads it).
    parser.add_argument("--record-puts", metavar="PATH", help=argparse.SUPPRESS)


def _token(text: str) -> str:
    """An API token: empty (none) or printable ASCII without spaces."""
    if text and not (text.isascii() and text.isprintable() and " " not in text):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    """Serve until SIGTERM/SIGINT: 0 after a clean stop; 1 if the store or the cache is still unreachable
    ``--startup-timeout`` seconds after start-up, or the metrics address cannot be bound; 2 if the
    ``--graph`` spec does not fit the database or its change tracking is not installed (never retried:
    waiting does not fix it). Each flag was checked as it was parsed (a bad one, a spec file that cannot
    work included, is exit 2 before this runs)."""
    if not args.ttl > args.heartbeat:
        # A member would drop out of its siblings' views between two of its own heartbeats.
        raise UsageError(f"--ttl ({args.ttl:g}s) must be longer than --heartbeat ({args.heartbeat:g}s)")
    if not args.api_token and not _is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} is not a loopback address: set --api-token (GRAPHCACHE_API_TOKEN) so the"
            " graphs are not open to the network"
        )
    _configure_logging(args.log_level, args.log_format, args.node_id)
    try:
        anyio.run(_serve, args)
    except SpecError as exc:  # the spec does not fit the database, or tracking is missing: configuration
        logger.error("cannot serve: %s (--graph)", one_line(str(exc)))
        return EXIT_USAGE
    except (StoreError, CacheError, OSError) as exc:
        logger.error("cannot serve: %s (%s)", one_line(str(exc)), _blamed_flags(exc))
        return 1
    return 0


def _blamed_flags(exc: Exception) -> str:
    """The flags that say where the failed server or address is."""
    if isinstance(exc, StoreError):
        return "--postgres"
    if isinstance(exc, CacheError):
        return "--redis"
    return "--host, --port"


def _membership(args: argparse.Namespace) -> Membership:
    if args.membership == "static":
        return StaticMembership([args.node_id])
    return RedisMembership(args.redis, namespace=args.namespace, heartbeat=args.heartbeat, ttl=args.ttl)


class _Sidecar:
    """What the HTTP routes see: the node once it runs, and why it is not ready before."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self.node: Node | None = None
        self.store: PostgresStore | None = None
        self.cache: RedisCache | None = None
        self.starting: str | None = "starting: connecting to PostgreSQL and Redis"
        self.stop = anyio.Event()  # set by SIGTERM/SIGINT once the node runs: it then winds down gently

    async def problems(self) -> list[str]:
        """Why this sidecar is not ready (empty: ready); probes PostgreSQL and Redis live."""
        if self.node is None or self.store is None or self.cache is None:
            return [self.starting or "starting"]
        found = self.node.problems()
        with anyio.move_on_after(_PROBE_TIMEOUT) as probe:
            try:
                await self.store.cursor()
            except StoreError as exc:
                found.append(f"postgresql: {exc}")
        if probe.cancelled_caught:
            found.append(f"postgresql: no answer within {_PROBE_TIMEOUT}s")
        with anyio.move_on_after(_PROBE_TIMEOUT) as probe:
            try:
                await self.cache.versions([graph_key("-")])
            except CacheError as exc:
                found.append(f"redis: {exc}")
        if probe.cancelled_caught:
            found.append(f"redis: no answer within {_PROBE_TIMEOUT}s")
        return found


_PROBE_TIMEOUT = 2.0


DEFAULT_FEED_INTERVAL = 0.01
"""Seconds between the starts of two reads of a sidecar's change feed. An actor patches its graph from
each read's row images and puts it at once, so this interval bounds how fresh the cache is under a
stream of commits (about half of it on average), and how many puts a busy root costs (at most one per
read). A commit after a quiet spell is read at once (NOTIFY)."""


async def _serve(args: argparse.Namespace) -> None:
    membership = _membership(args)
    sidecar = _Sidecar(membership)
    failure: Exception | None = None
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, args.node_id, signals, sidecar, tg.cancel_scope)
            server: _Server | None = None
            try:
                server, port = await _start_http(args, sidecar, tg)
                host = f"[{args.host}]" if ":" in args.host else args.host
                await _run_node(args, sidecar, f"http://{host}:{port}")
            except (StoreError, CacheError) as exc:  # raised outside the task group: not as a group
                failure = exc
            except OSError as exc:  # the HTTP port is taken or the address is not this host's
                where = f"{args.host}:{args.port}"
                failure = OSError(f"cannot listen on {where}: {exc.strerror or exc}")
            finally:
                if server is not None:  # finish the requests in flight, briefly
                    server.should_exit = True
                    with anyio.move_on_after(_HTTP_GRACE + 1, shield=True):
                        await server.finished.wait()
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


_HTTP_GRACE = 5
"""Seconds the HTTP server gives requests in flight at shutdown."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the sidecar's anyio signal receiver owns SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.finished = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or OSError: bound before uvicorn starts, so
    a taken port is one clear error instead of uvicorn's exit."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets of protocol IPPROTO_TCP. Without
    # it a kept-alive client's every request after the first waited ~40 ms for a delayed ACK (uvicorn
    # writes a response's head and body separately: Nagle held the body back).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address[:2])
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, os.strerror(exc.errno) if exc.errno else str(exc)) from None
    return sock


async def _start_http(
    args: argparse.Namespace, sidecar: _Sidecar, tg: anyio.abc.TaskGroup
) -> tuple[_Server, int]:
    """Start uvicorn in ``tg``: (the server, its bound port) once it accepts connections."""
    app = build_app(sidecar, read_timeout=args.read_timeout, api_token=args.api_token or None)
    config = uvicorn.Config(
        app, log_config=None, lifespan="off", access_log=False, timeout_graceful_shutdown=_HTTP_GRACE
    )
    server = _Server(config)
    sock = _bind(args.host, args.port)

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            sock.close()
            server.finished.set()

    tg.start_soon(serve)
    while not server.started:
        if server.finished.is_set():
            raise OSError("the HTTP server stopped at start-up (see the log)")
        await anyio.sleep(0.01)
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return server, port


async def _stop_on_signal(node_id: str, signals: Any, sidecar: _Sidecar, scope: anyio.CancelScope) -> None:
    """A running node leaves ``async with`` by itself (in-flight rebuilds get their shutdown grace and the
    checkpoint is saved); before it runs there is nothing in flight, so start-up is simply cancelled.
    A second signal cancels at once."""
    async for signum in signals:
        logger.info("node %s: %s received, stopping", node_id, signal.Signals(signum).name)
        if sidecar.node is None or sidecar.stop.is_set():
            scope.cancel()
            return
        sidecar.stop.set()


async def _run_node(args: argparse.Namespace, sidecar: _Sidecar, url: str) -> None:
    store = await _connect(args, sidecar, "PostgreSQL", lambda: _open_store(args))
    try:
        sidecar.store = store
        cache = RedisCache.from_url(args.redis, namespace=args.namespace)
        async with cache:
            await _connect(args, sidecar, "Redis", lambda: cache.versions([graph_key("-")]))
            warning = await cache.eviction_warning()
            if warning is not None:
                logger.warning("%s", warning)
            sidecar.cache = cache
            sidecar.starting = "starting: the node is joining and starting its change feed"
            await _serve_node(args, store, cache, sidecar, url)
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


async def _open_store(args: argparse.Namespace) -> PostgresStore:
    return await PostgresStore.connect(
        args.postgres,
        schema=args.schema,
        graph=args.graph,
        min_poll_interval=args.feed_interval,
    )


async def _connect(args: argparse.Namespace, sidecar: _Sidecar, what: str, call: Callable[[], Any]) -> Any:
    """``await call()``, retried with backoff while it fails transiently, up to ``--startup-timeout``."""
    policy = RetryPolicy(0.1, 2.0)
    deadline = math.inf if args.startup_timeout == 0 else time.monotonic() + args.startup_timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except (StoreError, CacheError) as exc:
            if isinstance(exc, InvalidOperation) or not is_transient(exc) or time.monotonic() >= deadline:
                raise
            sidecar.starting = f"starting: {what} is unreachable ({exc})"
            pause = min(policy.maximum, policy.initial * 2**attempt, max(deadline - time.monotonic(), 0.01))
            logger.warning("%s is unreachable, retrying in %.1fs: %s", what, pause, exc)
            await anyio.sleep(pause)


class _PutLog:
    """``--record-puts PATH``: one JSON line per stored put, the fields of a load-test history event
    (``graphcache.harness.Event``: process = node id, "ok", "rebuild", root, ``time.monotonic()``,
    version). Written here rather than through the harness: the sidecar does not depend on it."""

    def __init__(self, path: str, node_id: str) -> None:
        self._file = Path(path).open("ab")  # noqa: SIM115  (closed in close())
        self._node_id = node_id

    def __call__(self, root_id: str, version: int) -> None:
        event = {"process": self._node_id, "type": "ok", "op": "rebuild", "root": root_id,
                 "time": time.monotonic(), "version": version}  # fmt: skip
        self._file.write(json.dumps(event).encode() + b"\n")  # buffered: a write(2) every few KiB

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _put_log(path: str | None, node_id: str) -> Iterator[_PutLog | None]:
    """The ``--record-puts`` recorder (None without the flag), closed after the node stopped."""
    if path is None:
        yield None
        return
    log = _PutLog(path, node_id)
    try:
        yield log
    finally:
        log.close()


async def _serve_node(
    args: argparse.Namespace, store: PostgresStore, cache: RedisCache, sidecar: _Sidecar, url: str
) -> None:
    with _put_log(args.record_puts, args.node_id) as on_stored:
        node = Node(
            store=store,
            cache=cache,
            node_id=args.node_id,
            membership=sidecar.membership,
            consistency=args.consistency,
            idle_timeout=args.idle_timeout,
            min_rebuild_interval=args.min_rebuild_interval,
            sweep_interval=args.sweep_interval,
            handoff=args.ttl + 2 * args.heartbeat,  # a dead member's changes are re-read by its successor
            on_stored=on_stored,
        )
        async with node:
            sidecar.node = node
            sys.stdout.write(f"graphcache node {args.node_id} ready {url}\n")
            sys.stdout.flush()
            await sidecar.stop.wait()
