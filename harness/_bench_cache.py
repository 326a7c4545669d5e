"""RedisCache vs raw redis-py on the same Redis: put_if_newer (plain and with a lease, as a node's rebuilds
put) vs SET, get vs GET and HGET.

Both sides share one redis-py client (same pool, same parser), the same concurrency and the same 4 KiB
value. Phases alternate over several rounds; each ratio is taken within a round (adjacent phases share
the machine's load) and the median over rounds is reported, with the client's CPU time per operation as
a second, load-insensitive view. Only this run's own namespace is written, and it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
import msgspec
from redis.asyncio import BlockingConnectionPool, Redis

from .._cli import UsageError, count, namespace, number_or_zero, redact, redis_url, seconds
from ..cache import RedisCache
from ._servers import reach_redis, removed_afterwards

__all__ = ("add_arguments", "run")

KEYS = 1024
"""Distinct keys each phase cycles over."""

Op = Callable[[int, int], Awaitable[Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis", type=redis_url, default="redis://127.0.0.1:6379/0", metavar="URL",
        help="Redis URL (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=count, default=32, help="concurrent tasks (default: %(default)s)"
    )
    parser.add_argument(
        "--value-bytes", type=_value_bytes, default=4096,
        help=f"value size, at most {MAX_VALUE_BYTES} (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=seconds, default=1.0, help="seconds per phase and round (default: 1)"
    )
    parser.add_argument(
        "--ops", type=count, default=None, help="ops per phase and round instead of --seconds"
    )
    parser.add_argument(
        "--rounds", type=count, default=7, help="alternating rounds; medians reported (default: 7)"
    )
    parser.add_argument(
        "--namespace", type=namespace, default=None,
        help="key namespace, one that holds no keys: it is deleted afterwards (default: a new gcbench<hex>)",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=number_or_zero, default=0.8, help="ratio to meet (default: %(default)s)"
    )


MAX_VALUE_BYTES = 1 << 20
"""The largest --value-bytes: each phase writes it under 1024 keys, on what may be a shared server."""


def _value_bytes(text: str) -> int:
    value = count(text)
    if value > MAX_VALUE_BYTES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_VALUE_BYTES}, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    await reach_redis(args.redis)
    space = args.namespace or f"gcbench{uuid.uuid4().hex[:8]}"
    pool = BlockingConnectionPool.from_url(args.redis, max_connections=args.concurrency, timeout=30)
    client = Redis.from_pool(pool)
    cache = RedisCache(client, namespace=space, max_value_bytes=args.value_bytes + 64)
    try:
        if args.namespace is not None and await _holds_keys(client, space):
            # The run deletes its namespace afterwards: never someone else's keys.
            raise UsageError(f"--namespace {space!r} already holds keys; name an unused one")
        async with removed_afterwards(redis_url=args.redis, namespace=space):
            results = await _measure(args, client, cache, space)
    finally:
        with anyio.CancelScope(shield=True):
            await cache.aclose()
            await client.aclose()
    _report(args, results)
    return 0


async def _holds_keys(client: Redis, namespace: str) -> bool:
    async for _ in client.scan_iter(match=f"{namespace}:*".encode(), count=1000):
        return True
    return False


async def _measure(
    args: argparse.Namespace, client: Redis, cache: RedisCache, namespace: str
) -> dict[str, list[_Sample]]:
    value = b"x" * args.value_bytes
    encoded = msgspec.msgpack.encode(value)
    raw_keys = [f"{namespace}:raw:{i}".encode() for i in range(KEYS)]
    cache_keys = [f"k{i}" for i in range(KEYS)]
    item_keys = [cache.redis_keys(key)[0] for key in cache_keys]

    async def raw_set(i: int, n: int) -> Any:
        return await client.set(raw_keys[i % KEYS], encoded)

    async def put_if_newer(i: int, n: int) -> Any:
        return await cache.put_if_newer(cache_keys[i % KEYS], value, n)

    leases: list[int] = []

    async def leased_put(i: int, n: int) -> Any:
        # A node holds each root's lease from one rebuild to the next: the lease costs no round trip.
        return await cache.put_if_newer(cache_keys[i % KEYS], value, n, lease=leases[i % KEYS])

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
        "put, leased": leased_put,
        "raw GET": raw_get,
        "raw HGET": raw_hget,
        "get": get,
    }
    versions = [0]
    for i in range(KEYS):  # every key exists before any read phase
        versions[0] += 1
        await raw_set(i, versions[0])
        await put_if_newer(i, versions[0])
    leases.extend(await cache.lease_many(cache_keys))
    results: dict[str, list[_Sample]] = {name: [] for name in phases}
    for _ in range(args.rounds):
        for name, op in phases.items():
            results[name].append(await _phase(args, op, versions))
    return results


class _Sample(NamedTuple):
    rate: float
    """Operations per second."""
    cpu_us: float
    """This process's CPU time per operation, in microseconds."""


async def _phase(args: argparse.Namespace, op: Op, versions: list[int]) -> _Sample:
    """Run ``op`` from ``concurrency`` tasks. Versions only grow, so every put stores."""
    done = [0]
    deadline = time.perf_counter() + args.seconds
    budget = args.ops

    async def worker(task: int) -> None:
        i = task
        while True:  # at least one operation each, so a rate is never 0 ops / 0 s
            done[0] += 1
            versions[0] += 1
            await op(i, versions[0])
            i += args.concurrency
            if budget is None and time.perf_counter() >= deadline:
                break
            if budget is not None and done[0] >= budget:
                break

    start, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for task in range(args.concurrency):
            tg.start_soon(worker, task)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _Sample(done[0] / elapsed, cpu / done[0] * 1e6)


PAIRS = (("put_if_newer", "raw SET"), ("put, leased", "raw SET"), ("get", "raw GET"), ("get", "raw HGET"))


def _ratio(a: float, b: float) -> float:
    """``a / b``; NaN when ``b`` is 0 (a phase too short for the CPU clock to tick)."""
    return a / b if b else math.nan


def _report(args: argparse.Namespace, results: dict[str, list[_Sample]]) -> None:
    how = f"{args.ops} ops" if args.ops is not None else f"{args.seconds:g} s"
    print(
        f"bench cache: {redact(args.redis)}, concurrency {args.concurrency}, {args.value_bytes} B values, "
        f"{args.rounds} alternating rounds of {how} per phase (medians)"
    )
    print(f"{'operation':<14}{'ops/s':>10}{'CPU us/op':>11}")
    for name, samples in results.items():
        rate = statistics.median(s.rate for s in samples)
        cpu = statistics.median(s.cpu_us for s in samples)
        print(f"{name:<14}{rate:>10.0f}{cpu:>11.0f}")
    for ours, raw in PAIRS:
        ratios = [a.rate / b.rate for a, b in zip(results[ours], results[raw], strict=True)]
        cpu = statistics.median(
            _ratio(b.cpu_us, a.cpu_us) for a, b in zip(results[ours], results[raw], strict=True)
        )
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio >= args.target else f"BELOW TARGET {args.target:g}"
        print(
            f"{ours} / {raw}: throughput {ratio:.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f}), "
            f"CPU {cpu:.2f}  {verdict}"
        )
