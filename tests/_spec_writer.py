# ruff: noqa: S608  (schema names come from fixtures; values are bind parameters)
"""Workers of the graph-spec concurrency test: plain-SQL writers and HTTP readers, each its own process.

    python -m tests._spec_writer write DSN SHOP STORE HISTORY NAME TASKS
    python -m tests._spec_writer read DSN SHOP STORE HISTORY NAME TASKS URL...

A worker connects, prints ``ready``, reads one line from stdin (the ``time.monotonic()`` to stop at: one
clock for every process of the machine), works until then, and prints one JSON line of figures.

Writers use raw asyncpg connections and plain SQL only, on three tables ``orders`` -> ``order_lines`` ->
``line_notes``: inserts, updates, deletes (cascading), re-parenting (a line with its notes to another
order, a note to another line) and key changes, one to four of them per transaction.

Their oracle for G2: inside its transaction, after its writes, a writer reads the version of every root it
touched from the store's ``roots`` and the root's whole graph with its own statement. The trigger bumped
each of those roots in this transaction, so their version rows stay locked until COMMIT: every other
transaction that changes one of these graphs bumps the root too and waits for that lock, so what the read
sees is exactly the graph as committed at the version it read. Once COMMIT succeeded, it records a write
ok carrying that version and the graph's hash (no ops). A root whose order is gone was deleted by this
transaction: its version has no graph, nothing is recorded for it. The same statement lists every root
this transaction bumped; a writer whose own account of the roots it touched differs reports an anomaly (a
missed or a stray bump would leave G2 judging the wrong thing, or nothing).
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import asyncpg
import httpx
import msgspec

from graphcache.harness import Event, HistoryWriter, graph_hash
from graphcache.storage import Graph, Node
from tests._spec_shop import spec_toml as shop_spec_toml

__all__ = (
    "Figures",
    "Shop",
    "committed_graphs",
    "ddl",
    "read_graph",
    "rows_digest",
    "seed",
    "spec_toml",
)

Row = tuple[str, str | None, dict[str, Any]]  # (node id, parent id, data)

MIN_ORDERS = 12  # below it, no order is deleted
TARGET_ORDERS = 24  # below it, new orders are likelier
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# A row picked at random may be deleted before the transaction references it: roll back, try anew.
GONE = (asyncpg.ForeignKeyViolationError,)
# Writers that lock roots in random order deadlock often; PostgreSQL looks for a deadlock only after
# deadlock_timeout (1 s by default), a stall that would dominate the run. This session's own setting.
SESSION = {"deadlock_timeout": "20ms"}


def ddl(shop: str) -> str:
    """The test's own tables: orders -> order_lines -> line_notes, cascading deletes, one id sequence."""
    s = f'"{shop}"'
    return f"""
CREATE SCHEMA {s};
CREATE SEQUENCE {s}.ids;
CREATE TABLE {s}.orders (id bigint PRIMARY KEY, customer text, note text);
CREATE TABLE {s}.order_lines (
    id bigint PRIMARY KEY,
    order_id bigint REFERENCES {s}.orders ON DELETE CASCADE,
    sku text,
    qty int
);
CREATE INDEX ON {s}.order_lines (order_id);
CREATE TABLE {s}.line_notes (
    id bigint PRIMARY KEY,
    line_id bigint REFERENCES {s}.order_lines ON DELETE CASCADE,
    body text
);
CREATE INDEX ON {s}.line_notes (line_id);
"""


def spec_toml(shop: str) -> str:
    """The graph spec of the test's tables: the shop's, every column of each table cached."""
    return shop_spec_toml(shop, notes="")


def rows_digest(rows: Iterable[Row]) -> str:
    """``graph_hash`` of a graph given as rows, as a reader computes it from the served graph."""
    return graph_hash(Graph("-", 0, {nid: Node(nid, parent, data, 0) for nid, parent, data in rows}))


@dataclass(frozen=True)
class Shop:
    """Where the tables (``shop``) and the store's own tables (``store``) live."""

    shop: str
    store: str

    @property
    def s(self) -> str:
        return f'"{self.shop}"'

    def oracle(self) -> str:
        """Each root's version (and whether this transaction bumped it), then every row of its graph, by
        the test's own joins: one statement, so one snapshot."""
        s, g = self.s, f'"{self.store}"'
        return f"""
SELECT r.root_id, r.version,
       coalesce(r.last_xid = pg_current_xact_id_if_assigned()::text::bigint, false) AS mine,
       NULL::text AS id, NULL::text AS parent_id, NULL::text AS data
FROM {g}.roots AS r
WHERE r.root_id = ANY($1::text[]) OR r.last_xid = pg_current_xact_id_if_assigned()::text::bigint
UNION ALL
SELECT o.id::text, NULL, NULL, 'orders:' || o.id, NULL, to_jsonb(o)::text
FROM {s}.orders AS o WHERE o.id = ANY($2::bigint[])
UNION ALL
SELECT l.order_id::text, NULL, NULL, 'order_lines:' || l.id, 'orders:' || l.order_id, to_jsonb(l)::text
FROM {s}.order_lines AS l WHERE l.order_id = ANY($2::bigint[])
UNION ALL
SELECT l.order_id::text, NULL, NULL, 'line_notes:' || n.id, 'order_lines:' || n.line_id, to_jsonb(n)::text
FROM {s}.line_notes AS n JOIN {s}.order_lines AS l ON l.id = n.line_id
WHERE l.order_id = ANY($2::bigint[])
"""


@dataclass
class Committed:
    """One root as a statement of ``Shop.oracle`` saw it."""

    version: int
    mine: bool
    rows: list[Row] = field(default_factory=list)
    exists: bool = False


async def committed_graphs(conn: Any, shop: Shop, root_ids: Sequence[str]) -> dict[str, Committed]:
    """``Shop.oracle`` for ``root_ids``, plus every root the current transaction bumped."""
    keys = [int(root_id) for root_id in root_ids]
    found: dict[str, Committed] = {}
    rows: list[tuple[str, Row]] = []
    for record in await conn.fetch(shop.oracle(), list(root_ids), keys):
        if record["id"] is None:
            found[record["root_id"]] = Committed(record["version"], record["mine"])
        else:
            rows.append((record["root_id"], (record["id"], record["parent_id"], json.loads(record["data"]))))
    for root_id, row in rows:
        committed = found.setdefault(root_id, Committed(0, mine=False))  # no roots row: an anomaly
        committed.rows.append(row)
        committed.exists = committed.exists or row[0] == f"orders:{root_id}"
    return found


# -- writers ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a worker did, printed as its last line (JSON)."""

    commits: int = 0
    recorded: int = 0  # write/create ok events
    retries: int = 0  # deadlock or serialization failure: rolled back, nothing recorded
    gone: int = 0  # a row picked was deleted meanwhile: rolled back, nothing recorded
    ops: dict[str, int] = field(default_factory=dict)
    multi: int = 0  # committed transactions of more than one operation
    anomalies: list[str] = field(default_factory=list)
    reads: dict[str, int] = field(default_factory=dict)  # readers: per sidecar and status

    def merge(self, other: Figures) -> None:
        self.commits += other.commits
        self.recorded += other.recorded
        self.retries += other.retries
        self.gone += other.gone
        self.multi += other.multi
        self.anomalies += other.anomalies
        for mine, theirs in ((self.ops, other.ops), (self.reads, other.reads)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count


class Txn:
    """One transaction's operations: each picks its rows at random and notes every root it touches."""

    def __init__(self, conn: Any, shop: Shop, rng: random.Random) -> None:
        self.conn = conn
        self.shop = shop
        self.rng = rng
        self.touched: set[str] = set()
        self.ops: list[str] = []  # the operations that changed something
        self.notes: list[str] = []  # what else they did worth counting

    async def run(self, name: str) -> None:
        op: Callable[[], Awaitable[bool]] = getattr(self, name)
        if await op():
            self.ops.append(name)

    def word(self) -> str:
        return "".join(self.rng.choice("abcdefghij") for _ in range(self.rng.randint(1, 8)))

    async def root_of_lines(self, *line_ids: int) -> None:
        # The trigger locked these lines FOR SHARE in this transaction: nobody moves them before COMMIT.
        rows = await self.conn.fetch(
            f"SELECT order_id FROM {self.shop.s}.order_lines WHERE id = ANY($1::bigint[])", list(line_ids)
        )
        self.touched.update(str(row["order_id"]) for row in rows)

    async def new_order(self) -> bool:
        s = self.shop.s
        order = await self.conn.fetchval(
            f"INSERT INTO {s}.orders (id, customer, note) VALUES (nextval('{s}.ids'), $1, $2) RETURNING id",
            self.word(),
            self.word(),
        )
        for _ in range(self.rng.randint(1, 3)):
            line = await self.conn.fetchval(
                f"INSERT INTO {s}.order_lines (id, order_id, sku, qty)"
                f" VALUES (nextval('{s}.ids'), $1, $2, $3) RETURNING id",
                order,
                self.word(),
                self.rng.randint(1, 9),
            )
            for _ in range(self.rng.randint(0, 2)):
                await self.conn.execute(
                    f"INSERT INTO {s}.line_notes (id, line_id, body) VALUES (nextval('{s}.ids'), $1, $2)",
                    line,
                    self.word(),
                )
        self.touched.add(str(order))
        return True

    async def update_order(self) -> bool:
        s = self.shop.s
        order = await self.conn.fetchval(
            f"UPDATE {s}.orders SET note = $1"
            f" WHERE id = (SELECT id FROM {s}.orders ORDER BY random() LIMIT 1) RETURNING id",
            self.word(),
        )
        return self._touch(order)

    async def delete_order(self) -> bool:
        s = self.shop.s
        if await self.conn.fetchval(f"SELECT count(*) FROM {s}.orders") <= MIN_ORDERS:
            return False
        order = await self.conn.fetchval(
            f"DELETE FROM {s}.orders WHERE id = (SELECT id FROM {s}.orders ORDER BY random() LIMIT 1)"
            " RETURNING id"
        )
        return self._touch(order)

    async def add_line(self) -> bool:
        s = self.shop.s
        order = await self.conn.fetchval(
            f"INSERT INTO {s}.order_lines (id, order_id, sku, qty)"
            f" SELECT nextval('{s}.ids'), o.id, $1, $2"
            f" FROM (SELECT id FROM {s}.orders ORDER BY random() LIMIT 1) AS o RETURNING order_id",
            self.word(),
            self.rng.randint(1, 9),
        )
        return self._touch(order)

    async def update_line(self) -> bool:
        s = self.shop.s
        order = await self.conn.fetchval(
            f"UPDATE {s}.order_lines SET qty = qty + 1, sku = $1"
            f" WHERE id = (SELECT id FROM {s}.order_lines ORDER BY random() LIMIT 1) RETURNING order_id",
            self.word(),
        )
        return self._touch(order)

    async def delete_line(self) -> bool:
        s = self.shop.s
        order = await self.conn.fetchval(
            f"DELETE FROM {s}.order_lines"
            f" WHERE id = (SELECT id FROM {s}.order_lines ORDER BY random() LIMIT 1) RETURNING order_id"
        )
        return self._touch(order)

    async def move_line(self) -> bool:
        """Re-parent a line (its notes go with it) to another order: both orders change."""
        s = self.shop.s
        line = await self.conn.fetchrow(
            f"SELECT id, order_id FROM {s}.order_lines"
            f" WHERE id = (SELECT id FROM {s}.order_lines ORDER BY random() LIMIT 1) FOR NO KEY UPDATE"
        )
        if line is None:
            return False
        target = await self.conn.fetchval(
            f"SELECT id FROM {s}.orders WHERE id <> $1 ORDER BY random() LIMIT 1", line["order_id"]
        )
        if target is None:
            return False
        await self.conn.execute(f"UPDATE {s}.order_lines SET order_id = $2 WHERE id = $1", line["id"], target)
        notes = await self.conn.fetchval(
            f"SELECT count(*) FROM {s}.line_notes WHERE line_id = $1", line["id"]
        )
        if notes:
            self.notes.append("move_line_with_notes")
        self.touched.update((str(line["order_id"]), str(target)))
        return True

    async def add_note(self) -> bool:
        s = self.shop.s
        line = await self.conn.fetchval(
            f"INSERT INTO {s}.line_notes (id, line_id, body) SELECT nextval('{s}.ids'), l.id, $1"
            f" FROM (SELECT id FROM {s}.order_lines ORDER BY random() LIMIT 1) AS l RETURNING line_id",
            self.word(),
        )
        return await self._touch_line(line)

    async def update_note(self) -> bool:
        s = self.shop.s
        line = await self.conn.fetchval(
            f"UPDATE {s}.line_notes SET body = $1"
            f" WHERE id = (SELECT id FROM {s}.line_notes ORDER BY random() LIMIT 1) RETURNING line_id",
            self.word(),
        )
        return await self._touch_line(line)

    async def delete_note(self) -> bool:
        s = self.shop.s
        line = await self.conn.fetchval(
            f"DELETE FROM {s}.line_notes"
            f" WHERE id = (SELECT id FROM {s}.line_notes ORDER BY random() LIMIT 1) RETURNING line_id"
        )
        return await self._touch_line(line)

    async def move_note(self) -> bool:
        """Re-parent a note to another line, often of another order."""
        s = self.shop.s
        note = await self.conn.fetchrow(
            f"SELECT id, line_id FROM {s}.line_notes"
            f" WHERE id = (SELECT id FROM {s}.line_notes ORDER BY random() LIMIT 1) FOR NO KEY UPDATE"
        )
        if note is None:
            return False
        target = await self.conn.fetchval(
            f"SELECT id FROM {s}.order_lines WHERE id <> $1 ORDER BY random() LIMIT 1", note["line_id"]
        )
        if target is None:
            return False
        await self.conn.execute(f"UPDATE {s}.line_notes SET line_id = $2 WHERE id = $1", note["id"], target)
        await self.root_of_lines(note["line_id"], target)
        return True

    async def rekey_order(self) -> bool:
        """Change an order's key (one without lines: they would still name the old key): the old root is
        gone, a new one is created."""
        s = self.shop.s
        order = await self.conn.fetchval(
            f"SELECT id FROM {s}.orders WHERE id = (SELECT o.id FROM {s}.orders AS o WHERE NOT EXISTS"
            f" (SELECT FROM {s}.order_lines AS l WHERE l.order_id = o.id) ORDER BY random() LIMIT 1)"
            " FOR UPDATE"
        )
        if order is None:
            return False
        rekeyed = await self.conn.fetchval(
            f"UPDATE {s}.orders SET id = nextval('{s}.ids') WHERE id = $1 RETURNING id", order
        )
        self.touched.update((str(order), str(rekeyed)))
        return True

    async def rekey_line(self) -> bool:
        """Change the key of a line without notes (notes would still name the old key)."""
        s = self.shop.s
        order = await self.conn.fetchval(
            f"UPDATE {s}.order_lines SET id = nextval('{s}.ids') WHERE id = (SELECT l.id FROM {s}.order_lines"
            f" AS l WHERE NOT EXISTS (SELECT FROM {s}.line_notes AS n WHERE n.line_id = l.id)"
            " ORDER BY random() LIMIT 1) RETURNING order_id"
        )
        return self._touch(order)

    async def rekey_note(self) -> bool:
        """Change a note's key: the node of the old key leaves the graph, one of the new key enters."""
        s = self.shop.s
        line = await self.conn.fetchval(
            f"UPDATE {s}.line_notes SET id = nextval('{s}.ids')"
            f" WHERE id = (SELECT id FROM {s}.line_notes ORDER BY random() LIMIT 1) RETURNING line_id"
        )
        return await self._touch_line(line)

    def _touch(self, order: int | None) -> bool:
        if order is None:
            return False
        self.touched.add(str(order))
        return True

    async def _touch_line(self, line: int | None) -> bool:
        if line is None:
            return False
        await self.root_of_lines(line)
        return True


# Few orders come and go, so that most live long and take many commits from many writers at once.
WEIGHTS = {
    "new_order": 0.4,
    "update_order": 2.0,
    "delete_order": 0.3,
    "add_line": 3.0,
    "update_line": 3.0,
    "delete_line": 1.5,
    "move_line": 2.5,
    "add_note": 3.0,
    "update_note": 2.0,
    "delete_note": 1.5,
    "move_note": 1.5,
    "rekey_order": 0.3,
    "rekey_line": 0.5,
    "rekey_note": 0.5,
}


class Writer:
    """One writer task: transactions of one to four operations until ``until``."""

    def __init__(self, conn: Any, shop: Shop, history: HistoryWriter, name: str, figures: Figures) -> None:
        self.conn = conn
        self.shop = shop
        self.history = history
        self.name = name
        self.figures = figures
        self.rng = random.Random(name)

    def plan(self, orders: int) -> list[str]:
        weights = dict(WEIGHTS)
        weights["new_order"] *= 3 if orders < TARGET_ORDERS else 0.3
        count = self.rng.choice((1, 1, 2, 3, 4))
        return self.rng.choices(list(weights), weights=list(weights.values()), k=count)

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            orders = await self.conn.fetchval(f"SELECT count(*) FROM {self.shop.s}.orders")
            await self.transaction(self.plan(orders))

    async def transaction(self, plan: list[str]) -> None:
        """Run ``plan`` in one transaction; after COMMIT, record each surviving root it touched."""
        txn = Txn(self.conn, self.shop, self.rng)
        try:
            async with self.conn.transaction():
                for name in plan:
                    await txn.run(name)
                seen = await committed_graphs(self.conn, self.shop, sorted(txn.touched))
        except RETRYABLE:
            self.figures.retries += 1
            return
        except GONE:
            self.figures.gone += 1
            return
        done = time.monotonic()
        self.check(txn, seen)
        if not txn.ops:
            return
        self.figures.commits += 1
        for name in txn.ops + txn.notes:
            self.figures.ops[name] = self.figures.ops.get(name, 0) + 1
        self.figures.multi += len(txn.ops) > 1
        for root_id, committed in sorted(seen.items()):
            if committed.mine and committed.exists:
                op: Literal["create", "write"] = "create" if committed.version == 1 else "write"
                digest = rows_digest(committed.rows)
                self.history.record(
                    Event(self.name, "ok", op, root_id, done, version=committed.version, hash=digest)
                )
                self.figures.recorded += 1

    def check(self, txn: Txn, seen: dict[str, Committed]) -> None:
        bumped = {root_id for root_id, committed in seen.items() if committed.mine}
        if bumped != txn.touched:
            self.figures.anomalies.append(
                f"{self.name}: ops {txn.ops} touched roots {sorted(txn.touched)}, the triggers bumped"
                f" {sorted(bumped)}"
            )


async def seed(dsn: str, shop: Shop, history: HistoryWriter, orders: int) -> Figures:
    """Create ``orders`` orders (with lines and notes) the way the writers do, recorded."""
    figures = Figures()
    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, shop, history, "seed", figures)
        while figures.commits < orders:
            await writer.transaction(["new_order"])
    finally:
        await conn.close()
    return figures


async def _connect_writer(dsn: str) -> Any:
    try:
        return await asyncpg.connect(dsn, server_settings=SESSION)
    except asyncpg.InsufficientPrivilegeError:  # not a superuser: slower, still correct
        return await asyncpg.connect(dsn)


async def write(dsn: str, shop: Shop, history_path: str, name: str, tasks: int) -> Figures:
    figures = Figures()
    conns = [await _connect_writer(dsn) for _ in range(tasks)]
    try:
        with HistoryWriter(history_path) as history:
            until = await _ready()
            async with anyio.create_task_group() as tg:
                for index, conn in enumerate(conns):
                    writer = Writer(conn, shop, history, f"{name}-t{index}", figures)
                    tg.start_soon(writer.run, until)
    finally:
        for conn in conns:
            await conn.close()
    return figures


# -- readers ---------------------------------------------------------------------------------------------


class Roots:
    """The root ids worth reading: live orders, and every root the store knows (deleted ones too)."""

    def __init__(self, conn: Any, shop: Shop) -> None:
        self.conn = conn
        self.shop = shop
        self.live: list[str] = []
        self.every: list[str] = []

    async def refresh(self) -> None:
        self.live = [str(row["id"]) for row in await self.conn.fetch(f"SELECT id FROM {self.shop.s}.orders")]
        self.every = [
            row["root_id"] for row in await self.conn.fetch(f'SELECT root_id FROM "{self.shop.store}".roots')
        ]

    async def follow(self, until: float) -> None:
        while time.monotonic() < until:
            await anyio.sleep(0.2)
            await self.refresh()

    def pick(self, rng: random.Random) -> str | None:
        pool = self.every if rng.random() < 0.1 or not self.live else self.live
        return rng.choice(pool) if pool else None


async def read_graph(
    client: httpx.AsyncClient, url: str, root_id: str, history: HistoryWriter, process: str
) -> tuple[str, dict[str, Any] | None]:
    """GET one graph, recorded as a read (invoke, then ok with version and hash, or absent for 404);
    returns the status ("200", "404", or what failed) and the graph's JSON."""
    history.record(Event(process, "invoke", "read", root_id, time.monotonic()))
    try:
        response = await client.get(f"{url}/v1/graphs/{root_id}")
    except httpx.HTTPError as exc:
        history.record(Event(process, "fail", "read", root_id, time.monotonic()))
        return type(exc).__name__, None
    end = time.monotonic()
    if response.status_code == 404:
        history.record(Event(process, "ok", "read", root_id, end))
        return "404", None
    if response.status_code != 200:
        history.record(Event(process, "fail", "read", root_id, end))
        return str(response.status_code), None
    body: dict[str, Any] = msgspec.json.decode(response.content)
    if body["root_id"] != root_id or response.headers["etag"] != f'"{body["version"]}"':
        raise AssertionError(f"{url}: GET {root_id} answered {body['root_id']} {response.headers['etag']}")
    digest = rows_digest((n["id"], n["parent_id"], n["data"]) for n in body["nodes"].values())
    history.record(Event(process, "ok", "read", root_id, end, version=body["version"], hash=digest))
    return "200", body


async def read(dsn: str, shop: Shop, history_path: str, name: str, *, tasks: int, urls: list[str]) -> Figures:
    figures = Figures()
    conn = await asyncpg.connect(dsn)
    try:
        roots = Roots(conn, shop)
        await roots.refresh()
        async with httpx.AsyncClient(timeout=15) as client:
            with HistoryWriter(history_path) as history:
                until = await _ready()

                async def reader(index: int) -> None:
                    rng = random.Random(f"{name}-{index}")
                    process = f"{name}-t{index}"  # one read in flight per recorded process
                    turn = index
                    while time.monotonic() < until:
                        root_id = roots.pick(rng)
                        if root_id is None:
                            await anyio.sleep(0.01)
                            continue
                        turn += 1
                        url = urls[turn % len(urls)]
                        status, _ = await read_graph(client, url, root_id, history, process)
                        key = f"{url} {status}"
                        figures.reads[key] = figures.reads.get(key, 0) + 1
                        await anyio.sleep(0.02)  # leave the two cores some room for writers and sidecars

                async with anyio.create_task_group() as tg:
                    tg.start_soon(roots.follow, until)
                    for index in range(tasks):
                        tg.start_soon(reader, index)
    finally:
        await conn.close()
    return figures


async def _ready() -> float:
    """Say ready, then wait for the stop time on stdin."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    return float(line)


def main(argv: list[str]) -> int:
    mode, dsn, shop_schema, store_schema, history, name, tasks, *urls = argv
    shop = Shop(shop_schema, store_schema)
    if mode == "write":
        figures = anyio.run(write, dsn, shop, history, name, int(tasks))
    else:
        figures = anyio.run(functools.partial(read, dsn, shop, history, name, tasks=int(tasks), urls=urls))
    sys.stdout.write(msgspec.json.encode(figures).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
