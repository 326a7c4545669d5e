"""The bank-account workload (after NCache's optimistic/pessimistic locking article), in tasks or a process.

Many tasks move money in and out of one cached balance, half by optimistic ``insert(version=...)`` retry
loops and half by ``get_and_lock(wait=...)`` / ``put_and_unlock``. Each task returns the sum of the
amounts it really applied; the final balance must equal the sum over every task in every process.

As a process: ``python -m tests._bank_worker REDIS_URL NAMESPACE KEY TASKS OPS SEED`` prints ``ready``,
waits for a line on stdin (so every process starts together), runs, then prints the applied sum.
"""

from __future__ import annotations

import random
import sys

import anyio

from graphcache.cache import CacheItem, ObjectLocked, RedisCache, VersionedCache, VersionMismatch

__all__ = ("run_tasks",)

LOCK_TIMEOUT = 30.0
LOCK_WAIT = 120.0


def _amount(rng: random.Random, balance: int) -> int:
    """A deposit, or a withdrawal no larger than the balance (it never goes negative)."""
    amount = rng.randint(1, 100)
    return -amount if rng.random() < 0.5 and balance >= amount else amount


async def _optimistic(cache: VersionedCache, key: str, ops: int, rng: random.Random) -> int:
    applied = 0
    for _ in range(ops):
        while True:
            item = await cache.get(key)
            assert item is not None
            amount = _amount(rng, item.value)
            try:
                await cache.insert(key, item.value + amount, version=item.version)
            except (VersionMismatch, ObjectLocked):
                await anyio.sleep(rng.uniform(0, 0.005))  # back off, then re-read
                continue
            applied += amount
            break
    return applied


async def _pessimistic(cache: VersionedCache, key: str, ops: int, rng: random.Random) -> int:
    applied = 0
    for _ in range(ops):
        item, lock = await cache.get_and_lock(key, lock_timeout=LOCK_TIMEOUT, wait=LOCK_WAIT)
        assert isinstance(item, CacheItem)
        amount = _amount(rng, item.value)
        await anyio.sleep(rng.uniform(0, 0.002))  # work done while holding the lock
        await cache.put_and_unlock(key, item.value + amount, lock)
        applied += amount
    return applied


async def run_tasks(cache: VersionedCache, key: str, *, tasks: int, ops: int, seed: int) -> int:
    """Run ``tasks`` tasks (alternating optimistic and pessimistic) of ``ops`` transfers; the applied sum."""
    results: list[int] = []

    async def one(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        worker = _optimistic if index % 2 == 0 else _pessimistic
        results.append(await worker(cache, key, ops, rng))

    async with anyio.create_task_group() as tg:
        for index in range(tasks):
            tg.start_soon(one, index)
    return sum(results)


async def _main(argv: list[str]) -> None:
    url, namespace, key, tasks, ops, seed = argv
    async with RedisCache.from_url(url, namespace=namespace, socket_timeout=30) as cache:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        print(await run_tasks(cache, key, tasks=int(tasks), ops=int(ops), seed=int(seed)), flush=True)


if __name__ == "__main__":
    anyio.run(_main, sys.argv[1:7])
