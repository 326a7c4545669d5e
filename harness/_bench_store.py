"""bench store: PostgresStore vs the same work in raw asyncpg, same server, same pool size, same run.

  apply     one Upsert per transaction on distinct roots, N concurrent tasks. graphcache: lock the root,
            read the structure, one statement for delete/upsert/version/outbox/NOTIFY. raw: BEGIN, lock
            the root, upsert the node, bump the version, write the outbox row, NOTIFY, COMMIT.
  load      a 50-node graph in a REPEATABLE READ READ ONLY transaction; raw reads the version and the
            nodes in two statements and decodes each row's JSON with msgspec (graphcache: one statement)
  load_many 20 such graphs per call, in one statement, against the same 20 loaded by concurrent
            ``load`` calls (what a node's actors did before they batched); both through PostgresStore
  feed      delivery latency through ``changes()`` at a steady commit rate (default 500/s): commit ->
            delivery runs from the writer receiving its COMMIT acknowledgement (negative: the feed was
            first); write -> delivery from the outbox row's clock_timestamp(), so it also holds the
            COMMIT itself (WAL flush on a busy server)

Rounds alternate graphcache / raw (order flipped every round); rates are medians, the ratio is the median
of the per-round ratios, which a machine whose load changes from second to second disturbs least. The
bench schema is dropped afterwards.
"""

# ruff: noqa: S608  (the schema name is generated here; values are bind parameters)
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
import asyncpg
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream

from .._cli import UsageError, count, number, postgres_dsn, redact, seconds, seconds_or_zero
from ..storage import PostgresStore, Upsert
from ._servers import reach_postgres, removed_afterwards

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

_decoder = msgspec.json.Decoder(dict[str, Any])
_BATCH = 20
"""Graphs per load_many call: about what one feed poll hands a node in the uniform loadtest."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres", type=postgres_dsn, default=DEFAULT_DSN, metavar="DSN",
        help="PostgreSQL URL (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=count, default=8, help="concurrent tasks (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=seconds, default=0.75, help="seconds per round (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=count, default=10, help="alternating rounds per side (default: %(default)s)"
    )
    parser.add_argument(
        "--feed-rate", type=number, default=500.0, help="commits/s for the feed (default: %(default)s)"
    )
    parser.add_argument(
        "--feed-writers", type=count, default=24, help="concurrent feed writers (default: %(default)s)"
    )
    parser.add_argument(
        "--feed-seconds", type=seconds, default=5.0, help="feed run length (default: %(default)s)"
    )
    parser.add_argument(
        "--min-poll-interval",
        type=seconds_or_zero,
        default=None,
        help="the feed's minimum seconds between polls (default: the store's, 0.01; 0: one poll per wake-up)",
    )


def run(args: argparse.Namespace) -> int:
    if args.feed_rate * args.feed_seconds < 1:
        raise UsageError(
            f"--feed-rate {args.feed_rate:g} x --feed-seconds {args.feed_seconds:g} is less than one commit"
        )
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    await reach_postgres(args.postgres)
    schema = f"bench_store_{uuid.uuid4().hex[:8]}"
    options = {} if args.min_poll_interval is None else {"min_poll_interval": args.min_poll_interval}
    async with contextlib.AsyncExitStack() as stack:
        # Entered first, so left last: the schema goes after every connection to it has closed.
        await stack.enter_async_context(removed_afterwards(postgres=args.postgres, schema=schema))
        store = await PostgresStore.connect(args.postgres, schema, pool_size=args.concurrency, **options)
        stack.push_async_callback(_shielded, store.aclose)
        raw = await asyncpg.create_pool(args.postgres, min_size=args.concurrency, max_size=args.concurrency)
        stack.push_async_callback(_shielded, raw.close)
        rows = await _measure(args, store, raw, schema)
    _print_table(rows, args)
    return 0


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope(shield=True):
        await close()


async def _measure(
    args: argparse.Namespace, store: PostgresStore, raw: asyncpg.Pool, schema: str
) -> list[Row]:
    roots = [f"bench{index}" for index in range(args.concurrency)]
    for root in roots:
        await store.create_root(root, {"bench": True})
    await store.create_root("graph50", {"bench": True})
    await store.apply("graph50", [Upsert(f"n{index}", "graph50", _payload(index)) for index in range(49)])
    apply = await _alternate(
        args,
        lambda worker: _store_apply(store, roots[worker]),
        lambda worker: _raw_apply(raw, schema, roots[worker]),
    )
    load = await _alternate(args, lambda worker: _store_load(store), lambda worker: _raw_load(raw, schema))
    batch = [f"graph50-{index}" for index in range(_BATCH)]
    for root in batch:
        await store.create_root(root, {"bench": True})
        await store.apply(root, [Upsert(f"n{index}", root, _payload(index)) for index in range(49)])
    many = await _alternate(
        args, lambda worker: _store_load_many(store, batch), lambda worker: _store_load_each(store, batch)
    )
    async with await PostgresStore.connect(
        args.postgres, schema, pool_size=args.feed_writers
    ) as writer_store:
        feed = await _feed_latency(writer_store, roots, args)
    rate = f"{feed.achieved:.0f}/s"
    return [
        ("apply, transactions/s", *apply, "ratio >= 0.8"),
        ("load 50-node graph, loads/s", *load, "ratio >= 0.8"),
        (f"load_many x{_BATCH}, calls/s (raw: {_BATCH} loads)", *many, "batching gain"),
        (f"feed commit->delivery p50 ms @ {rate}", _percentile(feed.from_ack, 50), None, None, ""),
        (f"feed commit->delivery p99 ms @ {rate}", _percentile(feed.from_ack, 99), None, None, "<= 20 ms"),
        (
            f"feed write->delivery p50 ms @ {rate}",
            _percentile(feed.from_write, 50),
            None,
            None,
            "incl. COMMIT",
        ),
        (
            f"feed write->delivery p99 ms @ {rate}",
            _percentile(feed.from_write, 99),
            None,
            None,
            "incl. COMMIT",
        ),
    ]


def _payload(index: int) -> dict[str, Any]:
    return {"index": index, "name": f"node {index}", "tags": ["a", "b"], "price": index * 1.5}


async def _store_apply(store: PostgresStore, root: str) -> None:
    await store.apply(root, [Upsert("child", root, {"at": time.time()})])


async def _raw_apply(pool: asyncpg.Pool, schema: str, root: str) -> None:
    s = f'"{schema}"'
    async with pool.acquire() as conn, conn.transaction():
        version = await conn.fetchval(f"SELECT version FROM {s}.roots WHERE root_id = $1 FOR UPDATE", root)
        await conn.execute(
            f"INSERT INTO {s}.nodes (root_id, id, parent_id, data, row_version)"
            " VALUES ($1, 'child', $1, $2, 1) ON CONFLICT (root_id, id)"
            " DO UPDATE SET data = excluded.data, row_version = nodes.row_version + 1",
            root,
            msgspec.json.encode({"at": time.time()}).decode(),
        )
        await conn.execute(f"UPDATE {s}.roots SET version = $2 WHERE root_id = $1", root, version + 1)
        await conn.execute(f"INSERT INTO {s}.outbox (root_id, version) VALUES ($1, $2)", root, version + 1)
        await conn.execute("SELECT pg_notify($1, '')", f"graphcache_{schema}")


async def _store_load(store: PostgresStore) -> None:
    await store.load("graph50")


async def _store_load_many(store: PostgresStore, roots: list[str]) -> None:
    await store.load_many(roots)


async def _store_load_each(store: PostgresStore, roots: list[str]) -> None:
    async with anyio.create_task_group() as tg:
        for root in roots:
            tg.start_soon(store.load, root)


async def _raw_load(pool: asyncpg.Pool, schema: str) -> None:
    s = f'"{schema}"'
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.fetchval(f"SELECT version FROM {s}.roots WHERE root_id = 'graph50'")
        rows = await conn.fetch(
            f"SELECT id, parent_id, data, row_version FROM {s}.nodes WHERE root_id = 'graph50'"
        )
        nodes = {
            row["id"]: (row["parent_id"], _decoder.decode(row["data"]), row["row_version"]) for row in rows
        }
        del nodes


async def _alternate(
    args: argparse.Namespace,
    ours: Callable[[int], Awaitable[None]],
    theirs: Callable[[int], Awaitable[None]],
) -> tuple[float, float, float]:
    """Median rate of each side and the median of the per-round ratios (robust to a loaded machine)."""
    ours_rates, theirs_rates = [], []
    for round_number in range(args.rounds):
        first, second = (ours, theirs) if round_number % 2 == 0 else (theirs, ours)
        first_rate = await _throughput(first, args.concurrency, args.seconds)
        second_rate = await _throughput(second, args.concurrency, args.seconds)
        ours_rates.append(first_rate if first is ours else second_rate)
        theirs_rates.append(second_rate if first is ours else first_rate)
    ratios = [mine / raw for mine, raw in zip(ours_rates, theirs_rates, strict=True)]
    return statistics.median(ours_rates), statistics.median(theirs_rates), statistics.median(ratios)


async def _throughput(
    operation: Callable[[int], Awaitable[None]], concurrency: int, duration: float
) -> float:
    done = 0
    deadline = time.perf_counter() + duration

    async def worker(index: int) -> None:
        nonlocal done
        while True:  # at least one operation each, so a rate is never 0 and a ratio never 0 / 0
            await operation(index)
            done += 1
            if time.perf_counter() >= deadline:
                break

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for index in range(concurrency):
            group.start_soon(worker, index)
    return done / (time.perf_counter() - started)


class _FeedRun(NamedTuple):
    achieved: float  # commits/s actually reached
    from_ack: list[
        float
    ]  # seconds from the writer seeing its commit acknowledged until delivery (< 0: earlier)
    from_write: list[float]  # seconds from the outbox row's clock_timestamp() (before COMMIT) until delivery


async def _feed_latency(store: PostgresStore, roots: list[str], args: argparse.Namespace) -> _FeedRun:
    """Commit at a steady rate (paced starts, many in flight) and time each change's delivery."""
    rate: float = args.feed_rate
    acked: dict[tuple[str, int], float] = {}
    delivered: dict[tuple[str, int], float] = {}
    from_write: list[float] = []
    latest: dict[str, int] = {}
    final: dict[str, int] = {}
    caught_up = anyio.Event()
    total = int(rate * args.feed_seconds)
    send, receive = anyio.create_memory_object_stream[int](total)
    feed = store.changes(after=await store.cursor())

    def check_caught_up() -> None:
        if final and all(latest.get(root, 0) >= version for root, version in final.items()):
            caught_up.set()

    async def pacer(started: float) -> None:
        async with send:
            for index in range(total):
                await anyio.sleep(max(0.0, started + index / rate - time.perf_counter()))
                await send.send(index)

    async def writer(jobs: MemoryObjectReceiveStream[int]) -> None:
        async with jobs:
            async for index in jobs:
                root = roots[index % len(roots)]
                version = await store.apply(root, [Upsert("child", root, {"n": index})])
                acked[(root, version)] = time.perf_counter()

    async def consumer() -> None:
        async for change in feed:
            delivered[(change.root_id, change.version)] = time.perf_counter()
            from_write.append(time.time() - change.committed_at)
            latest[change.root_id] = change.version
            check_caught_up()

    async with feed, anyio.create_task_group() as group:
        group.start_soon(consumer)
        started = time.perf_counter()
        async with anyio.create_task_group() as writers:
            writers.start_soon(pacer, started)
            for _ in range(args.feed_writers):
                writers.start_soon(writer, receive.clone())
            receive.close()
        elapsed = time.perf_counter() - started
        final.update({root: await store.version(root) for root in roots})
        check_caught_up()
        with anyio.move_on_after(10):
            await caught_up.wait()
        group.cancel_scope.cancel()
    # The commit completes between the outbox write and the acknowledgement.
    from_ack = [at - acked[key] for key, at in delivered.items() if key in acked]
    return _FeedRun(total / elapsed, from_ack, from_write)


def _percentile(samples: list[float], percent: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))] * 1000


Row = tuple[str, float, float | None, float | None, str]  # measure, graphcache, raw, ratio, target


def _print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"bench store: {args.concurrency} tasks, {args.rounds} alternating rounds of {args.seconds:g}s"
        " (medians; ratio = median of per-round ratios),"
        f" {redact(args.postgres)}"
    )
    print(f"{'measure':<40} {'graphcache':>12} {'raw asyncpg':>12} {'ratio':>7}  target")
    for name, ours, theirs, ratio, target in rows:
        raw_text = "-" if theirs is None else f"{theirs:12.1f}"
        ratio_text = "-" if ratio is None else f"{ratio:7.2f}"
        print(f"{name:<40} {ours:12.1f} {raw_text:>12} {ratio_text:>7}  {target}")
