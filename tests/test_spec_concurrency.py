# ruff: noqa: S608  (schema names come from fixtures; values are bind parameters)
"""A graph spec under concurrency: two ``serve --graph`` sidecars, plain-SQL writer processes, checked by
history (G1, G2, G3), on three levels of the service's own tables."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import httpx
import msgspec
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from graphcache.actors import graph_key
from graphcache.cache import RedisCache
from graphcache.harness import CheckReport, Event, HistoryWriter, check, read_history
from graphcache.storage import GraphSpec, track_graph
from tests._sidecar_procs import READY, ROOT_DIR, Servers, Sidecar, serve_command, tail
from tests._spec_writer import Figures, Shop, committed_graphs, ddl, read_graph, seed, spec_toml

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NODES = ["spec-a", "spec-b"]
MEMBERSHIP = ["--membership", "redis", "--heartbeat", "0.3", "--ttl", "1.2"]
WRITERS, WRITER_TASKS = 4, 4  # 16 writers, in four processes so that commits interleave across them
READERS, READER_TASKS = 2, 3
SECONDS = 20.0
SEED_ORDERS = 24


class Worker:
    """A ``tests._spec_writer`` process: ready line, stop time on stdin, figures on its last line."""

    def __init__(self, process: anyio.abc.Process, log: Path) -> None:
        assert process.stdout is not None
        self.process = process
        self.log = log
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def line(self, within: float) -> str:
        with anyio.fail_after(within):
            try:
                return (await self.stdout.receive_until(b"\n", 1 << 20)).decode()
            except anyio.EndOfStream:
                raise AssertionError(f"{self.log.stem} ended early: {tail(self.log)}") from None

    async def start(self, until: float) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{until!r}\n".encode())

    async def figures(self, within: float) -> Figures:
        line = await self.line(within)
        with anyio.fail_after(10):
            code = await self.process.wait()
        assert code == 0, f"{self.log.stem} exited {code}: {tail(self.log)}"
        return msgspec.json.decode(line, type=Figures)


@asynccontextmanager
async def process_group(command: list[str], log: Path) -> AsyncIterator[anyio.abc.Process]:
    """Run ``command`` in a process group of its own; SIGKILL the group on the way out if it still runs."""
    with log.open("wb") as stderr:
        process = await anyio.open_process(command, stderr=stderr, cwd=ROOT_DIR, start_new_session=True)
        try:
            yield process
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)  # the leader is not reaped yet: still ours
                await process.wait()
                await process.aclose()


@asynccontextmanager
async def spec_sidecar(node_id: str, servers: Servers, spec: Path, log: Path) -> AsyncIterator[Sidecar]:
    """A ``serve --graph SPEC`` process, once it printed its ready line."""
    command = serve_command(node_id, servers, ["--graph", str(spec), *MEMBERSHIP])
    async with process_group(command, log) as process:
        assert process.stdout is not None
        stdout = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(30):
            while (match := READY.search(await _line(stdout, log))) is None:
                pass
        yield Sidecar(process, match.group(1).decode(), match.group(2).decode(), log)


async def _line(stream: BufferedByteReceiveStream, log: Path) -> bytes:
    try:
        return await stream.receive_until(b"\n", 1 << 20)
    except anyio.EndOfStream:
        raise AssertionError(f"no ready line from {log.stem}: {tail(log)}") from None


@asynccontextmanager
async def worker(
    mode: str, shop: Shop, dsn: str, name: str, *, tasks: int, tmp: Path, urls: tuple[str, ...] = ()
) -> AsyncIterator[Worker]:
    command = [
        sys.executable, "-m", "tests._spec_writer", mode, dsn, shop.shop, shop.store,
        str(tmp / f"{name}.jsonl"), name, str(tasks), *urls,
    ]  # fmt: skip
    async with process_group(command, tmp / f"{name}.log") as process:
        yield Worker(process, tmp / f"{name}.log")


async def wait_members(nodes: list[Sidecar], count: int, within: float) -> None:
    with anyio.fail_after(within):
        for node in nodes:
            while (await node.metrics()).get("graphcache_members") != count:  # noqa: ASYNC110  (another process)
                await anyio.sleep(0.05)


@pytest.fixture
async def shop(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Shop]:
    """The service's own tables in a schema of this test's (dropped afterwards); the store in pg_schema."""
    shop = Shop(f"{pg_schema}_shop", pg_schema)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(ddl(shop.shop))
        yield shop
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{shop.shop}" CASCADE')
        await conn.close()


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str) -> Servers:
    return Servers(redis_url, postgres_dsn, namespace, pg_schema)


async def converge(cache: RedisCache, final: dict[str, int], deleted: list[str], *, within: float) -> None:
    """Poll the cache until every live root holds its final version and no deleted root holds anything."""
    keys = [graph_key(root_id) for root_id in [*final, *deleted]]
    wanted: list[int | None] = [*final.values(), *(None for _ in deleted)]
    deadline = time.monotonic() + within
    while (cached := await cache.versions(keys)) != wanted:
        if time.monotonic() > deadline:
            behind = {
                key: (have, want)
                for key, have, want in zip(keys, cached, wanted, strict=True)
                if have != want
            }
            raise AssertionError(f"G3: not converged within {within}s (cached, committed): {behind}")
        await anyio.sleep(0.05)


class Final:
    """The end state: each live root's committed version, and the roots whose order is gone."""

    def __init__(self, live: dict[str, int], deleted: list[str]) -> None:
        self.live = live
        self.deleted = deleted

    @classmethod
    async def read(cls, conn: Any, shop: Shop) -> Final:
        rows = await conn.fetch(
            f'SELECT r.root_id, r.version, o.id IS NOT NULL AS live FROM "{shop.store}".roots AS r'
            f' LEFT JOIN "{shop.shop}".orders AS o ON o.id::text = r.root_id ORDER BY 1'
        )
        live = {row["root_id"]: row["version"] for row in rows if row["live"]}
        return cls(live, [row["root_id"] for row in rows if not row["live"]])


async def final_reads(
    nodes: list[Sidecar], final: Final, conn: Any, shop: Shop, history: HistoryWriter
) -> list[str]:
    """Read every root from every sidecar (recorded; several at a time, one per root and sidecar): each
    live root at its final version holding exactly its committed rows, each deleted order a 404. Returns
    what differed."""
    committed = await committed_graphs(conn, shop, sorted(final.live))
    wrong: list[str] = []
    limit = anyio.CapacityLimiter(16)

    async def one(client: httpx.AsyncClient, node: Sidecar, root_id: str) -> None:
        async with limit:
            status, body = await read_graph(client, node.base_url, root_id, history, f"final-{node.node_id}")
        where = f"{node.node_id}: GET {root_id}"
        if root_id not in final.live:
            if status != "404":
                wrong.append(f"{where} (a deleted order) -> {status}")
        elif body is None:
            wrong.append(f"{where} -> {status}")
        elif body["version"] != final.live[root_id]:
            wrong.append(f"{where} -> v{body['version']}, committed v{final.live[root_id]}")
        elif sorted(_rows(body)) != sorted(committed[root_id].rows):
            wrong.append(f"{where} -> v{body['version']} whose nodes are not the committed rows")

    async with httpx.AsyncClient(timeout=15) as client, anyio.create_task_group() as tg:
        for node in nodes:
            for root_id in [*final.live, *final.deleted]:
                tg.start_soon(one, client, node, root_id)
    return wrong


def _rows(body: dict[str, Any]) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [(n["id"], n["parent_id"], n["data"]) for n in body["nodes"].values()]


def judge(directory: Path) -> CheckReport:
    """The checker over every history the test's processes wrote."""
    return check(read_history(*sorted(directory.glob("*.jsonl"))))


def judged(report: CheckReport) -> int:
    """Reads whose graph G2 compared with the committed one."""
    return report.reads - report.absent_reads - report.unjudged


def summary(
    writers: Figures, readers: Figures, report: CheckReport, final: Final, seconds: dict[str, float]
) -> str:
    """One paragraph of figures, printed with -s: what the run exercised and how long each phase took."""
    ops = writers.ops
    phases = ", ".join(f"{name} {value:.1f}" for name, value in seconds.items())
    lags = f"p50 {report.lag_p50 or 0:.3f}s, p99 {report.lag_p99 or 0:.3f}s"
    return (
        f"spec concurrency: {writers.commits} commits ({writers.multi} multi-op; rolled back:"
        f" {writers.retries} deadlocks, {writers.gone} vanished rows) in {seconds['load']:.1f}s;"
        f" re-parented {ops.get('move_line', 0)} lines ({ops.get('move_line_with_notes', 0)} with notes),"
        f" {ops.get('move_note', 0)} notes; new keys for {ops.get('rekey_order', 0)} orders,"
        f" {ops.get('rekey_line', 0)} lines, {ops.get('rekey_note', 0)} notes;"
        f" {ops.get('delete_order', 0)} orders deleted ({len(final.deleted)}"
        f" gone, {len(final.live)} live at the end); {report.writes} writes recorded; {report.reads} reads"
        f" ({judged(report)} judged for G2, {report.absent_reads} absent, {report.unjudged} unjudged), by"
        f" sidecar and status {readers.reads}; commit-to-visible lag {lags}; seconds: {phases}"
    )


def rebuild_counters(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The sidecars' rebuild counters, summed (how the cache kept up: loads, patches, forgotten roots)."""
    words = ("rebuild", "patch", "snapshot", "forgot", "coalesced", "puts", "notifications")
    total: dict[str, float] = {}
    for sample in metrics:
        for name, value in sample.items():
            if name.endswith("_total") and any(word in name for word in words):
                total[name] = total.get(name, 0) + value
    return total


async def test_two_spec_sidecars_under_sixteen_plain_sql_writers_keep_g1_g2_g3(
    shop: Shop, servers: Servers, tmp_path: Path
) -> None:
    """Sixteen plain-SQL writers on orders, lines and notes (re-parenting, key changes, cascades) against
    two sidecars: no regression, no torn graph, convergence, deleted orders gone, final graphs equal rows."""
    began = time.monotonic()
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(spec_toml(shop.shop))
    writers, readers = Figures(), Figures()
    conn = await asyncpg.connect(servers.dsn)
    try:
        await track_graph(conn, GraphSpec.from_toml(spec_path), schema=shop.store)
        with HistoryWriter(tmp_path / "seed.jsonl") as history:
            seeded = await seed(servers.dsn, shop, history, SEED_ORDERS)
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    spec_sidecar(node_id, servers, spec_path, tmp_path / f"{node_id}.log")
                )
                for node_id in NODES
            ]
            await wait_members(nodes, len(NODES), within=15)
            urls = tuple(node.base_url for node in nodes)
            writing = [
                await stack.enter_async_context(
                    worker("write", shop, servers.dsn, f"writer-{i}", tasks=WRITER_TASKS, tmp=tmp_path)
                )
                for i in range(WRITERS)
            ]
            reading = [
                await stack.enter_async_context(
                    worker(
                        "read", shop, servers.dsn, f"reader-{i}", tasks=READER_TASKS, tmp=tmp_path, urls=urls
                    )
                )
                for i in range(READERS)
            ]
            for one in writing + reading:
                assert await one.line(within=30) == "ready"
            load_began = time.monotonic()
            for one in writing + reading:
                await one.start(load_began + SECONDS)
            for one in writing:
                writers.merge(await one.figures(within=SECONDS + 30))
            for one in reading:
                readers.merge(await one.figures(within=30))
            load_ended = time.monotonic()

            final = await Final.read(conn, shop)
            with HistoryWriter(tmp_path / "final.jsonl") as history:
                for root_id, version in final.live.items():
                    history.record(
                        Event("checker", "ok", "final", root_id, time.monotonic(), version=version)
                    )
                async with RedisCache.from_url(servers.redis_url, namespace=servers.namespace) as cache:
                    await converge(cache, final.live, final.deleted, within=20)
                converged = time.monotonic()
                wrong = await final_reads(nodes, final, conn, shop, history)
            read_at_end = time.monotonic()
            metrics = [await node.metrics() for node in nodes]
            codes = [await node.stop(signal.SIGTERM) for node in nodes]
            stopped = time.monotonic()
    finally:
        await conn.close()

    report = judge(tmp_path)
    seconds = {
        "start": load_began - began,
        "load": load_ended - load_began,
        "converge": converged - load_ended,
        "final": read_at_end - converged,
        "stop": stopped - read_at_end,
        "check": time.monotonic() - stopped,
        "total": time.monotonic() - began,
    }
    print("\n" + summary(writers, readers, report, final, seconds))
    print(f"sidecar counters: {rebuild_counters(metrics)}")
    assert writers.anomalies == [], writers.anomalies[:5]
    assert wrong == [], wrong[:5]
    assert (report.regressions, report.torn, report.stale) == (0, 0, 0), report.examples
    # Every version of every root is recorded (each transaction's triggers bumped exactly the roots its
    # writer touched, checked above), so every read falls inside the replay.
    assert report.unjudged == 0
    assert (report.unread_at_end, report.absent_at_end) == (0, 0)
    assert seeded.commits == SEED_ORDERS
    assert report.writes >= 1000
    assert judged(report) >= 500
    ops = writers.ops
    assert ops.get("move_line", 0) >= 20, ops
    assert ops.get("move_line_with_notes", 0) >= 5, ops
    assert ops.get("move_note", 0) >= 10, ops
    assert ops.get("delete_order", 0) >= 5, ops
    assert ops.get("rekey_note", 0) >= 10, ops
    assert ops.get("rekey_line", 0) >= 10, ops
    assert writers.multi >= 100
    for url in urls:
        assert readers.reads.get(f"{url} 200", 0) >= 100, readers.reads
    failed = {key: count for key, count in readers.reads.items() if not key.endswith((" 200", " 404"))}
    assert failed == {}, "reads that neither found a graph nor a 404"
    assert codes == [0, 0]
