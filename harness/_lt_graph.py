"""``loadtest --graph SPEC``: the load test on a service's own tables, described by a graph spec.

The tables must exist (a team's schema is theirs; the load test invents none of it). Before anything is
written, `prepare` checks the spec against the catalog, samples ``--roots`` root keys from the root table
and picks, per table, the column its writers may set; `confirm` then asks (or wants ``--yes``), since the
writes land in those tables and stay there. Each strategy run installs the spec's change tracking into its
fresh store schema (`install_tracking`: triggers on the tables, functions in that schema) and drops the
schema afterwards; the triggers depend on its functions, so ``DROP SCHEMA ... CASCADE`` takes them along.

Every write is plain SQL in one READ COMMITTED transaction, as the service itself would write:

  UPDATE one row of one table of the root        one column set to a new value, or ``SET key = key``
  the spec store's loader statement, same conn   the root's version (the trigger's bump) and its graph
  COMMIT                                         then an ``ok`` event: version + graph_hash, no ops

The trigger keeps the root's version row locked from the UPDATE to COMMIT, and any change to a row of the
root needs that lock, so the graph read inside the transaction is exactly the committed graph at that
version: the checker judges reads against these hashes (``_checker.py``). Deadlocks (40P01) and
serialization failures (40001) are retried; an error before COMMIT records ``fail`` (nothing committed),
one during COMMIT ``info`` (outcome unknown: the checker stops judging that root past it).

Writable columns: not the key, not ``parent_key``, not generated, in no constraint (check, foreign key,
unique, exclusion) and no unique index, of a type the writers can generate (text, varchar, smallint,
integer, bigint, numeric, real, double precision, boolean, jsonb); a table's cached ``columns`` are
preferred. A table without one gets ``SET key = key``, which still bumps the version.
"""

# ruff: noqa: S608  (identifiers come from the checked spec or the catalog and are quoted; values are bound)
from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import anyio
import asyncpg
import msgspec

from .._cli import CommandError, UsageError, redact
from ..storage import (
    Graph,
    GraphSpec,
    GraphStore,
    Node,
    PostgresStore,
    SpecError,
    StoreError,
    prepare_connection,
    track_graph,
)
from ._history import Event, HistoryWriter, graph_hash
from ._strategies import Tally
from ._workload import Lane

__all__ = (
    "PLAN_FILE",
    "GraphRun",
    "GraphWorkload",
    "TableWrites",
    "WritableColumn",
    "WritableTable",
    "confirm",
    "describe_writes",
    "install_tracking",
    "loader_statement",
    "new_value",
    "prepare",
    "read_plan",
    "seed_roots",
    "writer_pool",
)

logger = logging.getLogger(__name__)

PLAN_FILE = "graph-plan.json"
"""In a strategy's output folder: the spec, the sampled roots and their rows, for the worker processes."""
WRITE_POOL_SIZE = 10
"""Connections per writer process for the plain-SQL writes: the store's own default pool size, so the
writers of a --graph run hold as many transactions open at once as those of a built-in run."""
STATEMENT_TIMEOUT = 10.0
"""Seconds one statement of a write may take (a lock wait on a hot root included)."""
MAX_ATTEMPTS = 10
"""Tries of one write that PostgreSQL refused as a deadlock or serialization failure."""
SEED_CONCURRENCY = 16

Kind = Literal["text", "integer", "numeric", "float", "boolean", "jsonb"]
_KINDS: dict[str, Kind] = {
    "text": "text",
    "varchar": "text",
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "numeric": "numeric",
    "float4": "float",
    "float8": "float",
    "bool": "boolean",
    "jsonb": "jsonb",
}
_INTEGER_RANGE = {"int2": 2**15, "int4": 2**31, "int8": 2**31}
_KEY_TYPES = frozenset({"int2", "int4", "int8", "text", "varchar", "uuid"})  # what the spec check accepts
_VARHDRSZ = 4  # atttypmod of varchar(n) is n + 4; of numeric(p, s) it is (p << 16 | s) + 4
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_FAILED = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class WritableColumn(msgspec.Struct, frozen=True):
    """A column the writers set: its name, PostgreSQL type and type modifier (length, precision)."""

    name: str
    type: str
    typmod: int = -1


class WritableTable(msgspec.Struct, frozen=True):
    """A table of the spec as the writers see it: its key (and the key's type), the columns they set
    (none: ``SET key = key``)."""

    name: str
    key: str
    key_type: str
    columns: tuple[WritableColumn, ...] = ()


class GraphWorkload(msgspec.Struct, frozen=True, kw_only=True):
    """``--graph``: the spec (read and checked at parse time) and, after `prepare`, what the run writes."""

    path: str
    spec: GraphSpec
    roots: tuple[str, ...] = ()
    tables: tuple[WritableTable, ...] = ()


class GraphRun(msgspec.Struct, frozen=True):
    """What the worker processes of one strategy run need (``PLAN_FILE``): the workload, and each root's
    rows as ``(table, key)``, read from the graph its seed transaction committed."""

    workload: GraphWorkload
    rows: dict[str, list[tuple[str, str]]]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---- before the run: check, sample, confirm ---------------------------------------------------------------

_COLUMNS = """
SELECT c.relname AS table_name, a.attname AS column_name, t.typname, a.atttypmod AS typmod,
       a.attgenerated <> '' OR a.attidentity = 'a' AS generated,
       EXISTS (SELECT FROM pg_constraint AS k
               WHERE k.conrelid = c.oid AND k.contype <> 'n' AND a.attnum = ANY (k.conkey)) AS constrained,
       EXISTS (SELECT FROM pg_index AS i
               WHERE i.indrelid = c.oid AND i.indisunique AND a.attnum = ANY (i.indkey::int2[])) AS unique_key
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type AS t ON t.oid = a.atttypid
WHERE n.nspname = $1 AND c.relname = ANY ($2::text[])
ORDER BY c.relname, a.attnum
"""


async def prepare(dsn: str, workload: GraphWorkload, roots: int, seed: int) -> GraphWorkload:
    """Check the spec against the catalog, sample up to ``roots`` root keys and find each table's writable
    columns; nothing is written. `UsageError` (exit 2) for a spec that does not fit the database or an
    empty root table."""
    spec = workload.spec
    async with _connection(dsn) as conn:
        try:
            # A dry run in a schema that need not exist: the catalog check (tables, columns, key types).
            await track_graph(conn, spec, schema="gclt_preflight", dry_run=True)
        except SpecError as exc:
            raise UsageError(str(exc)) from exc
        catalog = await _query(conn, _COLUMNS, spec.schema, [t.name for t in spec.tables])
        tables = _writable_tables(spec, catalog)
        root = spec.table(spec.root)
        sample = (
            f"SELECT {_q(root.key)}::text AS key FROM {_q(spec.schema)}.{_q(root.name)}"
            f" ORDER BY hashtextextended({_q(root.key)}::text, $1) LIMIT $2"
        )
        keys = [row["key"] for row in await _query(conn, sample, seed % 2**63, roots)]
    if not keys:
        raise UsageError(
            f"--graph {workload.path}: the root table {spec.schema}.{spec.root} has no rows to write to"
        )
    return msgspec.structs.replace(workload, roots=tuple(keys), tables=tables)


def _writable_tables(spec: GraphSpec, catalog: Sequence[Any]) -> tuple[WritableTable, ...]:
    by_table: dict[str, list[Any]] = {}
    for row in catalog:
        by_table.setdefault(row["table_name"], []).append(row)
    found = []
    for table in spec.tables:
        rows = by_table.get(table.name, [])
        key_type = next((r["typname"] for r in rows if r["column_name"] == table.key), None)
        if key_type not in _KEY_TYPES:  # the dry run checked it; a table changed since
            raise UsageError(f"graph spec {spec.source}: {spec.schema}.{table.name}.{table.key} is not a key")
        candidates = [
            WritableColumn(r["column_name"], r["typname"], r["typmod"])
            for r in rows
            if r["column_name"] not in (table.key, table.parent_key)
            and not (r["generated"] or r["constrained"] or r["unique_key"])
            and _can_generate(r["typname"], r["typmod"])
        ]
        cached = [c for c in candidates if table.columns is None or c.name in table.columns]
        found.append(WritableTable(table.name, table.key, key_type, tuple(cached or candidates)))
    return tuple(found)


def _can_generate(type_name: str, typmod: int) -> bool:
    if type_name == "numeric" and typmod >= _VARHDRSZ:
        # numeric(p, s) with 0 <= s <= p; PostgreSQL 15+ also allows s < 0 (rounds to tens...) and s > p
        return 0 <= _numeric_scale(typmod) <= _numeric_precision(typmod)
    return type_name in _KINDS


def _numeric_precision(typmod: int) -> int:
    return ((typmod - _VARHDRSZ) >> 16) & 0xFFFF


def _numeric_scale(typmod: int) -> int:
    return (((typmod - _VARHDRSZ) & 0x7FF) ^ 1024) - 1024  # a signed 11-bit field since PostgreSQL 15


def describe_writes(dsn: str, workload: GraphWorkload) -> str:
    """What a --graph run is about to write, in one line."""
    schema = workload.spec.schema
    tables = ", ".join(
        f"{schema}.{t.name} ({', '.join(c.name for c in t.columns) or 'no-op updates'})"
        for t in workload.tables
    )
    return (
        f"--graph writes to {redact(dsn)}: it updates rows of {tables} belonging to "
        f"{len(workload.roots)} sampled roots, and the new values stay (meant for a staging copy)"
    )


def confirm(
    dsn: str,
    workload: GraphWorkload,
    *,
    yes: bool,
    interactive: Callable[[], bool] | None = None,
    ask: Callable[[str], str] = input,
) -> None:
    """Go ahead with ``--yes``, or after "yes" typed at a terminal (``interactive``: default, whether
    stdin is one); `UsageError` (exit 2) otherwise."""
    if yes:
        return
    what = describe_writes(dsn, workload)
    if not (sys.stdin.isatty() if interactive is None else interactive()):
        raise UsageError(f"{what}: add --yes to go ahead")
    sys.stderr.write(what + "\n")
    try:
        answer = ask("Type yes to go ahead: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise UsageError("not confirmed: nothing was written")


# ---- each strategy run: tracking, seeds, the plan --------------------------------------------------------


async def install_tracking(dsn: str, spec: GraphSpec, schema: str) -> None:
    """The spec's change tracking in the fresh store schema ``schema`` (dropped, with the triggers on the
    tables, by ``removed_afterwards``)."""
    async with _connection(dsn) as conn:
        await track_graph(conn, spec, schema=schema)


def loader_statement(store: GraphStore) -> str:
    """The spec store's one-statement snapshot loader (``$1`` is a text[] of root ids), which the writers
    run inside their own transaction."""
    statement = store.snapshot_statement if isinstance(store, PostgresStore) else None
    if statement is None:
        raise CommandError("a --graph run needs a PostgresStore serving the graph spec")
    return statement


@contextlib.asynccontextmanager
async def writer_pool(dsn: str, size: int = WRITE_POOL_SIZE) -> AsyncIterator[asyncpg.Pool]:
    """Connections for the plain-SQL writes, decoding jsonb as the store does (so hashes agree)."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=size, init=prepare_connection, command_timeout=STATEMENT_TIMEOUT
        )
    except _FAILED as exc:
        raise CommandError(f"cannot connect to PostgreSQL ({redact(dsn)}): {exc}") from exc
    try:
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()


async def seed_roots(
    pool: asyncpg.Pool, store: GraphStore, workload: GraphWorkload, history: HistoryWriter, plan: Path
) -> GraphRun:
    """Give each sampled root its first version in this run's store schema (``SET key = key`` on its row,
    recorded as its ``create``: version + hash), and write ``plan`` with each root's rows."""
    writes = TableWrites(pool, GraphRun(workload, {}), loader_statement(store), seed=0, tally=Tally())
    rows: dict[str, list[tuple[str, str]]] = {}
    pending = iter(workload.roots)

    async def seeder() -> None:
        for root_id in pending:
            graph = await writes.seed(root_id, history)
            rows[root_id] = sorted(_rows_of(graph))

    async with anyio.create_task_group() as tg:
        for _ in range(min(SEED_CONCURRENCY, len(workload.roots))):
            tg.start_soon(seeder)
    run = GraphRun(workload, {root_id: rows[root_id] for root_id in workload.roots})
    await anyio.Path(plan).write_bytes(msgspec.json.encode(run))
    return run


def read_plan(path: str | Path) -> GraphRun:
    return msgspec.json.decode(Path(path).read_bytes(), type=GraphRun)


def _rows_of(graph: Graph) -> list[tuple[str, str]]:
    """``(table, key)`` of every node: node ids are ``"<table>:<key>"`` and a table name has no colon."""
    found = []
    for node_id in graph.nodes:
        table, _, key = node_id.partition(":")
        found.append((table, key))
    return found


# ---- the writes -------------------------------------------------------------------------------------------


class _RowGone(Exception):
    """The UPDATE found no row (someone else deleted it): nothing to commit."""


_Change = tuple[str, list[Any]]
"""An UPDATE statement and its arguments."""


class _Statements:
    """One table's UPDATE statements: ``$1`` is the row's key as text, ``$2`` the new value."""

    def __init__(self, schema: str, table: WritableTable) -> None:
        target = f"{_q(schema)}.{_q(table.name)}"
        where = f"WHERE {_q(table.key)} = $1::text::{table.key_type}"
        self.noop = f"UPDATE {target} SET {_q(table.key)} = {_q(table.key)} {where}"
        self.columns = table.columns
        self.sets = {
            c.name: (
                f"UPDATE {target} SET {_q(c.name)} = NOT coalesce({_q(c.name)}, false) {where}"
                if _KINDS[c.type] == "boolean"
                else f"UPDATE {target} SET {_q(c.name)} = $2 {where}"
            )
            for c in table.columns
        }

    def change(self, key: str, rng: random.Random, writer: int, seq: int) -> _Change:
        """A statement and its arguments: one column of the row ``key`` set to a new value."""
        if not self.columns:
            return self.noop, [key]
        column = rng.choice(self.columns)
        if _KINDS[column.type] == "boolean":  # flipped in SQL: always a new value
            return self.sets[column.name], [key]
        return self.sets[column.name], [key, new_value(column, rng, writer, seq)]


def new_value(column: WritableColumn, rng: random.Random, writer: int, seq: int) -> Any:
    """A value of the column's type that fits its length or precision (text names the writer and the
    write, so it differs from every earlier one)."""
    kind = _KINDS[column.type]
    if kind == "text":
        text = f"w{writer}.{seq}"
        limit = column.typmod - _VARHDRSZ if column.typmod >= _VARHDRSZ else len(text)
        return text[-limit:]
    if kind == "integer":
        bound = _INTEGER_RANGE[column.type]
        return rng.randrange(-bound, bound)
    if kind == "numeric":
        return _numeric(column.typmod, rng)
    if kind == "float":
        return round(rng.uniform(0, 1000), 3)
    return {"writer": writer, "seq": seq}  # jsonb


def _numeric(typmod: int, rng: random.Random) -> Decimal:
    if typmod < _VARHDRSZ:
        return Decimal(rng.randrange(10**8)).scaleb(-2)
    precision, scale = _numeric_precision(typmod), _numeric_scale(typmod)
    whole_digits, fraction_digits = min(precision - scale, 6), min(scale, 4)
    whole = Decimal(rng.randrange(10**whole_digits)) if whole_digits > 0 else Decimal(0)
    return whole + Decimal(rng.randrange(10**fraction_digits)).scaleb(-fraction_digits)


class TableWrites:
    """``write_loop``'s ``commit`` for a --graph run: each call updates one random row (of a random table)
    of the root and records the write with the version and hash of the graph it committed."""

    def __init__(self, pool: asyncpg.Pool, run: GraphRun, loader: str, *, seed: int, tally: Tally) -> None:
        self._pool = pool
        self._loader = loader
        self._spec = run.workload.spec
        self._seed = seed
        self._tally = tally
        self._statements = {t.name: _Statements(self._spec.schema, t) for t in run.workload.tables}
        self._rows: dict[str, dict[str, list[str]]] = {}
        for root_id, rows in run.rows.items():
            for table, key in rows:
                self._rows.setdefault(root_id, {}).setdefault(table, []).append(key)
        self._rngs: dict[int, random.Random] = {}

    def __repr__(self) -> str:
        return f"<TableWrites {self._spec.schema}.{self._spec.root}: {len(self._rows)} roots>"

    async def __call__(self, lane: Lane, root_id: str, seq: int) -> int | None:
        rng = self._rngs.get(lane.index)
        if rng is None:
            rng = self._rngs[lane.index] = random.Random(f"{self._seed}:graph-writer:{lane.index}")
        tables = self._rows[root_id]
        table = rng.choice(sorted(tables))
        change = self._statements[table].change(rng.choice(tables[table]), rng, lane.index, seq)
        graph = await self._recorded(lane.process, lane.history, "write", root_id, change)
        return None if graph is None else graph.version

    async def seed(self, root_id: str, history: HistoryWriter) -> Graph:
        """The root's first version in a fresh store schema: a no-op update of its own row."""
        change = (self._statements[self._spec.root].noop, [root_id])
        graph = await self._recorded("setup", history, "create", root_id, change)
        if graph is None:
            raise CommandError(f"could not give root {root_id!r} its first version; see the log")
        return graph

    async def _recorded(
        self,
        process: str,
        history: HistoryWriter,
        op: Literal["create", "write"],
        root_id: str,
        change: _Change,
    ) -> Graph | None:
        """One write: the statement ``change`` and what the loader then reads, committed and recorded."""
        statement, args = change
        history.record(Event(process, "invoke", op, root_id, time.monotonic()))
        outcome: Literal["fail", "info"] = "fail"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            committing = False
            try:
                async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
                    if await conn.execute(statement, *args) == "UPDATE 0":
                        raise _RowGone
                    rows = await conn.fetch(self._loader, [root_id])
                    committing = True  # from here on, a failure may have come after the commit
            except _RETRYABLE as exc:  # rolled back, also when reported at COMMIT: try again
                if attempt == MAX_ATTEMPTS:
                    logger.warning("%s of %s gave up after %d tries: %r", op, root_id, attempt, exc)
                    break
                await anyio.sleep(random.uniform(0, 0.005 * attempt))  # let the other transaction finish
                continue
            except _RowGone:
                logger.warning("%s of %s: the row is gone (deleted by someone else)", op, root_id)
                break
            except _FAILED as exc:
                outcome = "info" if committing else "fail"
                logger.warning("%s of %s failed (%s): %r", op, root_id, outcome, exc)
                break
            graph = self._graph(root_id, rows)
            if graph is None:  # committed, but the root's row is gone: no graph to judge reads by
                outcome = "info"
                break
            version, digest = graph.version, graph_hash(graph)
            history.record(Event(process, "ok", op, root_id, time.monotonic(), version=version, hash=digest))
            return graph
        self._tally.failures += 1
        history.record(Event(process, outcome, op, root_id, time.monotonic()))
        return None

    def _graph(self, root_id: str, rows: Sequence[Any]) -> Graph | None:
        """The loader's rows as the store builds its Graph (version from the first row, then the nodes)."""
        version: int | None = None
        nodes: dict[str, Node] = {}
        for row in rows:
            if row["id"] is None:
                version = row["version"]
            else:
                nodes[row["id"]] = Node(row["id"], row["parent_id"], row["data"], 0)
        if version is None or self._spec.node_id(self._spec.root, root_id) not in nodes:
            return None
        return Graph(root_id, version, nodes)


# ---- connections ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connection(dsn: str) -> AsyncIterator[Any]:
    try:
        conn = await asyncpg.connect(dsn, timeout=STATEMENT_TIMEOUT, command_timeout=STATEMENT_TIMEOUT)
    except _FAILED as exc:
        raise CommandError(f"cannot connect to PostgreSQL ({redact(dsn)}): {exc}") from exc
    try:
        yield conn
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def _query(conn: Any, statement: str, *args: Any) -> list[Any]:
    """``conn.fetch``, a failure as one line (exit 1): e.g. no privilege to read the team's tables."""
    try:
        rows: list[Any] = await conn.fetch(statement, *args)
    except (*_FAILED, StoreError) as exc:
        raise CommandError(f"PostgreSQL: {exc}") from exc
    return rows
