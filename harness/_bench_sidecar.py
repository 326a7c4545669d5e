"""bench sidecar: GET /v1/graphs/ID through a real sidecar vs raw redis-py HGET + msgpack decode.

Both sides read the same cached 50-node graph: through ``graphcache serve`` (one HTTP GET, the JSON
body decoded with msgspec), and straight from Redis (one HGET of the bytes the sidecar stored there,
decoded with msgspec's msgpack). One client, one request at a time, each side on one kept-alive
connection; phases alternate over several rounds (order flipped every round) and the medians over
rounds are reported: ops/s, the ratio of the two (taken within each round), p50 and p99 latency.

The sidecar is a spawned ``graphcache serve`` process (static membership, its own key namespace and
schema), not uvicorn inside this process: a service reaches its sidecar over a socket from another
process, and an in-process server would share this process's interpreter lock and event loop with the
client, charging each side's work to the other. The HTTP client is the standard library's
``http.client`` (keep-alive, no extra dependency, and thin, so the figure is the sidecar's cost more
than a client library's); the raw side is redis-py's blocking client with hiredis. Both clients run in
one worker thread, one after the other. The namespace and schema are removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import anyio
import msgspec
import redis

from .._cli import CommandError, UsageError, count, number_or_zero, postgres_dsn, redact, redis_url, seconds
from ..actors import graph_key
from ..cache import RedisCache
from ..storage import PostgresStore, Upsert
from ._procs import Child, spawn
from ._servers import reach, removed_afterwards

__all__ = ("add_arguments", "run")

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = "graph50"
CHILDREN = 49
"""The root and 49 children: a 50-node graph, as ``bench store`` loads."""
WARMUP = 200
"""Untimed operations of each side before the first round."""
READY_PATIENCE = 60.0
"""Seconds the sidecar gets to connect to the servers and print its ready line."""
SIDECAR = "GET /v1/graphs/ID (sidecar)"
RAW = "raw HGET + msgpack decode"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis", type=redis_url, default=DEFAULT_REDIS, metavar="URL",
        help="Redis URL (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres", type=postgres_dsn, default=DEFAULT_DSN, metavar="DSN",
        help="PostgreSQL URL (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=seconds, default=1.0, help="seconds per phase and round (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=count, default=7, help="alternating rounds; medians reported (default: %(default)s)"
    )
    parser.add_argument(
        "--target", type=number_or_zero, default=0.5, help="throughput ratio to meet (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("prometheus_client") is None:
        raise UsageError(
            "bench sidecar runs graphcache serve, which needs the 'sidecar' extra:"
            " pip install 'graphcache-pg[sidecar]'"
        )
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    await reach(args.redis, args.postgres)
    suffix = uuid.uuid4().hex[:8]
    namespace, schema = f"gcbench-sidecar-{suffix}", f"bench_sidecar_{suffix}"
    async with removed_afterwards(
        redis_url=args.redis, namespace=namespace, postgres=args.postgres, schema=schema
    ):
        async with await PostgresStore.connect(args.postgres, schema) as store:
            await store.create_root(ROOT, {"bench": True})
            await store.apply(ROOT, [Upsert(f"n{index}", ROOT, _payload(index)) for index in range(CHILDREN)])
        async with RedisCache.from_url(args.redis, namespace=namespace) as cache:
            entry = cache.redis_keys(graph_key(ROOT))[0]
        argv = _serve_argv(args, namespace, schema, f"bench-{suffix}")
        async with _sidecar(argv) as base_url:
            # Abandoned on Ctrl-C: the sidecar is stopped at once, and the thread's next request fails.
            results = await anyio.to_thread.run_sync(_measure, args, base_url, entry, abandon_on_cancel=True)
    _report(args, results)
    return 0


def _payload(index: int) -> dict[str, Any]:
    return {"index": index, "name": f"node {index}", "tags": ["a", "b"], "price": index * 1.5}


def _serve_argv(args: argparse.Namespace, namespace: str, schema: str, node_id: str) -> list[str]:
    return [
        sys.executable, "-m", "graphcache", "serve", "--redis", args.redis, "--postgres", args.postgres,
        "--namespace", namespace, "--schema", schema, "--node-id", node_id, "--membership", "static",
        "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def _sidecar(argv: list[str]) -> AsyncIterator[str]:
    """A running ``graphcache serve``: its base URL from the ready line; stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="gcbench-sidecar-") as logs:
        log = Path(logs) / "serve.log"
        child = await spawn("sidecar", argv, log=log, ready_marker=" ready http://")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(child.pump)
                with anyio.move_on_after(READY_PATIENCE):
                    await child.ready.wait()
                if not child.ready_line:
                    why = "ended" if child.done.is_set() else f"was not ready within {READY_PATIENCE:g}s"
                    raise CommandError(f"graphcache serve {why}: {_last_line(log)}")
                yield child.ready_line.rpartition(" ready ")[2].strip()
                tg.cancel_scope.cancel()
        finally:
            await _stop(child)


async def _stop(child: Child) -> None:
    with anyio.CancelScope(shield=True):
        await child.stop()


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output (see graphcache serve --help)"


class _Round(NamedTuple):
    rate: float
    """Operations per second."""
    latencies: list[float]
    """Each operation's seconds, sorted."""


def _measure(args: argparse.Namespace, base_url: str, entry: bytes) -> dict[str, list[_Round]]:
    """Alternate the two sides for ``--rounds`` rounds of ``--seconds`` each (blocking: in a thread)."""
    where = urlsplit(base_url)
    host, port = where.hostname, where.port
    if host is None or port is None:
        raise CommandError(f"graphcache serve printed no address: {base_url!r}")
    path = f"/v1/graphs/{quote(ROOT, safe='')}"
    web = http.client.HTTPConnection(host, port, timeout=30)
    raw = redis.Redis.from_url(args.redis, socket_timeout=30)
    try:

        def sidecar_get() -> None:
            web.request("GET", path)
            response = web.getresponse()
            body = response.read()
            if response.status != 200:
                raise CommandError(f"GET {path}: {response.status} {body[:200]!r}")
            msgspec.json.decode(body)

        def raw_hget() -> None:
            data: bytes | None = raw.hget(entry, b"d")  # type: ignore[assignment]
            if data is None:
                raise CommandError(f"the sidecar's cached graph is gone from Redis ({entry!r})")
            msgspec.msgpack.decode(data)

        sidecar_get()  # a read-through: the sidecar caches the graph before it answers
        sides: dict[str, Callable[[], None]] = {SIDECAR: sidecar_get, RAW: raw_hget}
        for side in sides.values():
            for _ in range(WARMUP):
                side()
        results: dict[str, list[_Round]] = {name: [] for name in sides}
        for number in range(args.rounds):
            order = list(sides) if number % 2 == 0 else list(reversed(sides))
            for name in order:
                results[name].append(_phase(sides[name], args.seconds))
        return results
    finally:
        web.close()
        raw.close()


def _phase(operation: Callable[[], None], duration: float) -> _Round:
    latencies = []
    started = time.perf_counter()
    deadline = started + duration
    now = started
    while True:  # at least one operation, so a rate is never 0 ops / 0 s
        before = now
        operation()
        now = time.perf_counter()
        latencies.append(now - before)
        if now >= deadline:
            break
    latencies.sort()
    return _Round(len(latencies) / (now - started), latencies)


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted ``ordered``, in microseconds."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))] * 1e6


def _report(args: argparse.Namespace, results: dict[str, list[_Round]]) -> None:
    print(
        f"bench sidecar: one client, one request at a time, a {CHILDREN + 1}-node graph, {args.rounds}"
        f" alternating rounds of {args.seconds:g} s per phase (medians);"
        f" {redact(args.redis)}, {redact(args.postgres)}"
    )
    print(f"{'operation':<30}{'ops/s':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, rounds in results.items():
        rate = statistics.median(r.rate for r in rounds)
        p50 = statistics.median(_percentile(r.latencies, 50) for r in rounds)
        p99 = statistics.median(_percentile(r.latencies, 99) for r in rounds)
        print(f"{name:<30}{rate:>10.0f}{p50:>10.0f}{p99:>10.0f}")
    ratios = [a.rate / b.rate for a, b in zip(results[SIDECAR], results[RAW], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "ok" if ratio >= args.target else f"BELOW TARGET {args.target:g}"
    print(
        f"sidecar / raw: throughput {ratio:.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f}),"
        f" target {args.target:g}  {verdict}"
    )
