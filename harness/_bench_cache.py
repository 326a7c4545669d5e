"""RedisCache vs raw redis-py on the same Redis: put_if_newer vs SET, get vs GET and HGET.

Both sides share one redis-py client (same pool, same parser), the same concurrency and the same 4 KiB
value; phases alternate over several rounds and the median is reported, so load from elsewhere on the
machine hits both sides alike. Only this run's own namespace is written, and it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from redis.asyncio import BlockingConnectionPool, Redis

from cache import RedisCache

__all__ = ("add_arguments", "run")

KEYS = 1024
"""Distinct keys each phase cycles over."""

Op = Callable[[int, int], Awaitable[Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (default: %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent tasks (default: %(default)s)")
    parser.add_argument("--value-bytes", type=int, default=4096, help="value size (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per phase and round (default: 2)")
    parser.add_argument("--ops", type=int, default=None, help="ops per phase and round instead of --seconds")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; median wins (default: 3)")
    parser.add_argument("--target", type=float, default=0.8, help="ratio to meet (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.rounds < 1 or args.value_bytes < 1:
        raise SystemExit("--concurrency, --rounds and --value-bytes must be positive")
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    namespace = f"gcbench{uuid.uuid4().hex[:8]}"
    pool = BlockingConnectionPool.from_url(args.redis, max_connections=args.concurrency, timeout=30)
    client = Redis.from_pool(pool)
    cache = RedisCache(client, namespace=namespace, max_value_bytes=args.value_bytes + 64)
    try:
        results = await _measure(args, client, cache, namespace)
    finally:
        await _clean(client, namespace)
        await cache.aclose()
        await client.aclose()
    _report(args, results)
    return 0


async def _measure(
    args: argparse.Namespace, client: Redis, cache: RedisCache, namespace: str
) -> dict[str, list[float]]:
    value = b"x" * args.value_bytes
    encoded = msgspec.msgpack.encode(value)
    raw_keys = [f"{namespace}:raw:{i}".encode() for i in range(KEYS)]
    cache_keys = [f"k{i}" for i in range(KEYS)]
    item_keys = [cache.redis_keys(key)[0] for key in cache_keys]

    async def raw_set(i: int, n: int) -> Any:
        return await client.set(raw_keys[i % KEYS], encoded)

    async def put_if_newer(i: int, n: int) -> Any:
        return await cache.put_if_newer(cache_keys[i % KEYS], value, n)

    async def raw_get(i: int, n: int) -> Any:
        data: bytes = await client.get(raw_keys[i % KEYS])  # type: ignore[assignment]
        return msgspec.msgpack.decode(data)

    async def raw_hget(i: int, n: int) -> Any:
        data: bytes = await client.hget(item_keys[i % KEYS], b"d")  # type: ignore[assignment]
        return msgspec.msgpack.decode(data)

    async def get(i: int, n: int) -> Any:
        return await cache.get(cache_keys[i % KEYS])

    phases: dict[str, Op] = {
        "raw SET": raw_set,
        "put_if_newer": put_if_newer,
        "raw GET": raw_get,
        "raw HGET": raw_hget,
        "get": get,
    }
    versions = [0]
    for i in range(KEYS):  # every key exists before any read phase
        versions[0] += 1
        await raw_set(i, versions[0])
        await put_if_newer(i, versions[0])
    results: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(args.rounds):
        for name, op in phases.items():
            results[name].append(await _phase(args, op, versions))
    return results


async def _phase(args: argparse.Namespace, op: Op, versions: list[int]) -> float:
    """Run ``op`` from ``concurrency`` tasks; ops per second. Versions only grow, so every put stores."""
    count = [0]
    deadline = time.perf_counter() + args.seconds
    budget = args.ops

    async def worker(task: int) -> None:
        i = task
        while (budget is None and time.perf_counter() < deadline) or (
            budget is not None and count[0] < budget
        ):
            count[0] += 1
            versions[0] += 1
            await op(i, versions[0])
            i += args.concurrency

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for task in range(args.concurrency):
            tg.start_soon(worker, task)
    return count[0] / (time.perf_counter() - start)


async def _clean(client: Redis, namespace: str) -> None:
    """Delete this run's keys only."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*".encode(), count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


def _report(args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in results.items()}
    how = f"{args.ops} ops" if args.ops is not None else f"{args.seconds:g} s"
    print(
        f"bench cache: {args.redis}, concurrency {args.concurrency}, {args.value_bytes} B values, "
        f"{args.rounds} alternating rounds of {how} per phase (median)"
    )
    print(f"{'operation':<14}{'ops/s':>10}")
    for name, rate in median.items():
        print(f"{name:<14}{rate:>10.0f}")
    for ours, raw in (("put_if_newer", "raw SET"), ("get", "raw GET"), ("get", "raw HGET")):
        ratio = median[ours] / median[raw]
        verdict = "ok" if ratio >= args.target else f"BELOW TARGET {args.target:g}"
        print(f"{ours} / {raw}: {ratio:.2f}  {verdict}")
