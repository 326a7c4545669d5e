"""Many tasks and several OS processes on one key: versions only go up, and no transfer is lost."""

from __future__ import annotations

import random
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import Process

from graphcache.cache import CacheItem, VersionedCache
from tests._bank_worker import run_tasks
from tests._cache_backends import Backend, open_backend

pytestmark = pytest.mark.anyio

WRITERS = 200
READERS = 8


async def test_racing_put_if_newer_keeps_the_max_and_readers_never_go_back(backend: Backend) -> None:
    """200 tasks put random versions while readers watch: the final item is the max, reads never decrease."""
    cache = backend.cache
    rng = random.Random(20260101)
    plans = [[rng.randint(1, 10_000) for _ in range(5)] for _ in range(WRITERS)]
    done = anyio.Event()
    seen: list[list[int]] = [[] for _ in range(READERS)]

    async def writer(versions: list[int], delays: random.Random) -> None:
        for version in versions:
            await anyio.sleep(delays.uniform(0, 0.002))  # injected delay: new interleavings each run
            await cache.put_if_newer("k", f"value-{version}", version)

    async def reader(log: list[int]) -> None:
        while not done.is_set():
            item = await cache.get("k")
            if item is not None:
                assert item.value == f"value-{item.version}"  # never a torn item
                log.append(item.version)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as readers:
        for log in seen:
            readers.start_soon(reader, log)
        async with anyio.create_task_group() as writers:
            for index, versions in enumerate(plans):
                writers.start_soon(writer, versions, random.Random(index))
        done.set()
    top = max(max(versions) for versions in plans)
    assert await cache.get("k") == CacheItem("k", f"value-{top}", top)
    for log in seen:
        assert log == sorted(log)
    assert sum(len(log) for log in seen) > 0


async def _start_account(cache: VersionedCache) -> None:
    assert await cache.add("account", 10_000) == 1


async def test_bank_account_in_tasks_keeps_the_exact_balance(backend: Backend) -> None:
    """24 tasks (optimistic insert loops and get_and_lock writers) move money; the balance is exact."""
    await _start_account(backend.cache)
    applied = await run_tasks(backend.cache, "account", tasks=24, ops=8, seed=7)
    item = await backend.cache.get("account")
    assert item is not None
    assert item.value == 10_000 + applied
    assert item.version == 1 + 24 * 8


@pytest.fixture
async def shared_redis(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Backend]:
    async for opened in open_backend("redis", request, namespace):
        yield opened


async def test_bank_account_across_processes_keeps_the_exact_balance(
    shared_redis: Backend, redis_url: str
) -> None:
    """3 OS processes and the test's own tasks, all on the shared Redis, end with the exact balance."""
    processes, tasks, ops = 3, 8, 6
    cache = shared_redis.cache
    await _start_account(cache)
    workers = [await _spawn(redis_url, shared_redis.namespace, tasks, ops, seed) for seed in range(processes)]
    try:
        for worker in workers:
            assert await _read_line(worker) == "ready"
        for worker in workers:  # release them together, then join in with this process's tasks
            assert worker.stdin is not None
            await worker.stdin.send(b"go\n")
        own = await run_tasks(cache, "account", tasks=tasks, ops=ops, seed=99)
        totals = [int(await _read_line(worker)) for worker in workers]
        for worker in workers:
            assert await worker.wait() == 0
    finally:
        for worker in workers:
            if worker.returncode is None:  # a failed test must not leave a worker behind
                worker.kill()
            await worker.aclose()
    item = await cache.get("account")
    assert item is not None
    assert item.value == 10_000 + own + sum(totals)
    assert item.version == 1 + (processes + 1) * tasks * ops


async def _spawn(url: str, namespace: str, tasks: int, ops: int, seed: int) -> Process:
    args = [
        sys.executable,
        "-m",
        "tests._bank_worker",
        url,
        namespace,
        "account",
        str(tasks),
        str(ops),
        str(seed),
    ]
    return await anyio.open_process(args)


async def _read_line(process: Process) -> str:
    assert process.stdout is not None
    buffer = b""
    with anyio.fail_after(120):  # a hang guard for a dead worker, not a timing assertion
        while not buffer.endswith(b"\n"):
            buffer += await process.stdout.receive(1)
    return buffer.decode().strip()
