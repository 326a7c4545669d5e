"""``PostgresStore``: the source of truth on PostgreSQL (asyncpg), with a transactional outbox feed.

``apply`` runs one READ COMMITTED transaction: one round trip locks the root row (``SELECT ... FOR
UPDATE``) and reads the graph's structure *after* the lock (``lock_structure``, whose second statement
takes a fresh snapshot, so it is the latest committed one), then the expected versions and the ops are
checked here, and one statement deletes, upserts, bumps the version, writes the outbox row and NOTIFYs.
The root's lock is held from the first round trip to COMMIT: two round trips, not three.
``load`` reads the version and the nodes in one statement (one snapshot, one round trip), or runs the
service's ``loader`` inside a REPEATABLE READ READ ONLY transaction. asyncpg / OS errors become
``StoreUnavailable`` / ``StoreError`` in ``_seam`` and nowhere else (which ones are transient is decided in
``_classify.py``); a pooled connection that a client-side failure may have left in an unknown protocol
state is terminated on its way back to the pool (``_connection``). Every wait is bounded by
``command_timeout``: connecting and each statement (asyncpg's own timeouts, cheaper than a cancel scope
per call); waiting for a pooled connection is bounded by the statements of its current holder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import anyio
import asyncpg
import msgspec

from ._classify import breaks_connection, classify
from ._errors import (
    ConcurrencyConflict,
    InvalidOperation,
    RootExists,
    RootNotFound,
    StoreError,
    StoreUnavailable,
)
from ._feed import PollResult, PostgresFeed
from ._model import Checkpoint, Graph, Node, Op, RowImage
from ._schema import MAX_IMAGES, Sql, migrate, quote_table
from ._slots import SlotFilter, check_slots, slot_bitmap, slots_of_bitmap
from ._spec import GraphSpec, SpecError
from ._spec_sql import RENDERING, SpecSql, TrackAction, check_catalog, plan_tracking, track
from ._validate import (
    DEFAULT_MAX_DATA_BYTES,
    MAX_PAGE,
    Plan,
    RowInfo,
    check_count,
    check_cursor,
    check_data,
    check_expected,
    check_id,
    check_ids,
    check_ops,
    check_seconds,
    plan_apply,
)

__all__ = ("Loader", "PostgresStore", "install_change_tracking", "prepare_connection", "track_graph")

logger = logging.getLogger(__name__)

DEFAULT_MIN_POLL_INTERVAL = 0.01
"""Seconds between the starts of two polls of one feed: batches a stream of commits, adds at most this lag."""

Loader = Callable[[Any, str], Awaitable[Graph]]
"""``async fn(conn, root_id) -> Graph`` run inside the snapshot transaction; its ``version`` is replaced."""

_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(dict[str, Any])


def _encode_jsonb(value: Any) -> bytes:
    # Data usually arrives as JSON already (validated before any I/O); binary jsonb is 0x01 + the text.
    return b"\x01" + (value if isinstance(value, bytes) else _json_encoder.encode(value))


def _decode_jsonb(data: bytes) -> Any:
    return _json_decoder.decode(data[1:])


_images_decoder = msgspec.json.Decoder(tuple[RowImage, ...] | None)


def _decode_images(text: str) -> tuple[RowImage, ...] | None:
    """An outbox row's images; None (load a snapshot instead) for any that do not decode, e.g. a row of
    a spec table whose key is NULL: one bad row must never stop a feed."""
    try:
        images: tuple[RowImage, ...] | None = _images_decoder.decode(text)
    except msgspec.DecodeError:
        return None
    return images


def _images_json(plan: Plan) -> bytes | None:
    """The outbox images of an applied plan, as JSON: its writes, then its deletions (a deletion takes
    the node's subtree as it stands, so a node moved out from under a deleted one must have moved first;
    the plan lists every node it removes). None when there are more than the outbox keeps."""
    if len(plan.deletes) + len(plan.upserts) > MAX_IMAGES:
        return None
    gone = [[node_id] for node_id in sorted(plan.deletes)]
    written = [
        [node_id, parent_id, msgspec.Raw(data_json), row_version]
        for node_id, (parent_id, data_json, row_version) in plan.upserts.items()
    ]
    return _json_encoder.encode([*written, *gone])


async def _init_connection(conn: Any) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


async def prepare_connection(conn: Any) -> None:
    """Make an asyncpg connection of your own read graph rows as the store does: jsonb decoded the same
    way and rows rendered with the same session settings (the store's pool sets those at connect). For
    a reader that runs ``PostgresStore.snapshot_statement`` inside its own transaction."""
    await _init_connection(conn)
    for key, value in RENDERING.items():
        await conn.execute("SELECT set_config($1, $2, false)", key, value)


async def _keep_session(conn: Any) -> None:
    """Pool reset on release: nothing to send. The store leaves no session state behind (transactions
    end, advisory locks are transaction-scoped, LISTEN happens on the feeds' own connections), so
    asyncpg's default reset query would be one more round trip per call for nothing. A ``loader`` must
    not leave session state either (``SET LOCAL``, not ``SET``)."""


_GOODBYE_TIMEOUT = 1.0
"""Seconds a feed's connection gets to close politely before its socket is dropped."""

_XID_SPAN = 2**32
"""More xids than can separate a poll's lower bound from any committed row: live xids span under 2**31."""


def _poll_upper_bound(lower: int) -> int:
    """An upper bound for the poll's xid range that no row reaches. It changes no result; it makes the
    range two-sided, which the planner estimates as narrow (0.5%) even with no statistics, so the outbox
    is read by its xid index. One-sided, it estimated a third of an unanalysed outbox and seq-scanned it at
    every poll (seen: 1,477 scans reading 5.8M rows in one 30 s load test)."""
    return min(lower + _XID_SPAN, 2**63 - 1)


def _address(dsn: str) -> str:
    """``host:port`` of a ``postgresql://`` DSN, for messages; a DSN that does not parse is bad input."""
    if not isinstance(dsn, str):
        raise InvalidOperation(f"a DSN must be a str, not {type(dsn).__name__}")
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:
        raise InvalidOperation(f"not a PostgreSQL DSN: {dsn!r} ({exc})") from exc
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidOperation(f"a DSN must start with postgresql:// or postgres://, got {dsn!r}")
    try:
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    except ValueError:  # several hosts ("h1:5432,h2:5433"): name them all
        return parts.netloc.rpartition("@")[2]


@contextlib.contextmanager
def _seam(address: str) -> Iterator[None]:
    """The one place where asyncpg and OS errors become storage errors (``classify`` says which)."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        kind = classify(exc)
        if kind is None:  # not a driver or OS error: a bug, ours or a loader's
            raise
        if kind is InvalidOperation:  # before I/O: bad options, not an outage
            raise InvalidOperation(f"PostgreSQL client configuration for {address}: {exc}") from exc
        if kind is StoreUnavailable:
            raise StoreUnavailable(
                f"PostgreSQL at {address} is unavailable: {type(exc).__name__}: {exc}"
            ) from exc
        raise kind(f"PostgreSQL at {address} failed: {type(exc).__name__}: {exc}") from exc


class PostgresStore:
    """``GraphStore`` on PostgreSQL; create with ``await PostgresStore.connect(dsn)``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        dsn: str,
        sql: Sql,
        loader: Loader | None,
        spec: SpecSql | None,
        listen: bool,
        poll_interval: float,
        min_poll_interval: float,
        retention: float,
        timeout: float,
        max_data_bytes: int,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._sql = sql
        self._loader = loader
        self._spec = spec
        self._listen = listen
        self._poll_interval = poll_interval
        self._min_poll_interval = min_poll_interval
        self._retention = retention
        self._timeout = timeout
        self._max_data_bytes = max_data_bytes
        self.address = _address(dsn)
        self._feeds: set[PostgresFeed] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        schema: str = "graphcache",
        *,
        loader: Loader | None = None,
        graph: GraphSpec | None = None,
        listen: bool = True,
        poll_interval: float = 0.25,
        min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL,
        retention: float = 3600.0,
        command_timeout: float = 5.0,
        pool_size: int = 10,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    ) -> PostgresStore:
        """Open a pool, create/migrate ``schema`` and return the store.

        ``graph``: serve graphs kept in the service's own tables, described by a ``GraphSpec``. The spec
        is checked against the catalog (``SpecError`` names the problem) and its change tracking must be
        installed and current in ``schema`` (``track_graph`` or ``graphcache track`` installs it). Such a
        store is read-only: writes are plain SQL on those tables. ``loader``: load each graph with a
        function of your own, inside a REPEATABLE READ READ ONLY transaction.
        ``listen=False`` never LISTENs (the feed then relies on polling every ``poll_interval`` seconds);
        a feed's polls start at least ``min_poll_interval`` seconds apart (0: one poll per wake-up);
        outbox rows older than ``retention`` seconds are pruned by running feeds.
        """
        sql = Sql(schema)
        address = _address(dsn)
        poll_interval = check_seconds(poll_interval, name="poll_interval")
        min_poll_interval = check_seconds(min_poll_interval, name="min_poll_interval", allow_zero=True)
        retention = check_seconds(retention, name="retention")
        timeout = check_seconds(command_timeout, name="command_timeout")
        check_count(pool_size, name="pool_size")
        check_count(max_data_bytes, name="max_data_bytes")
        if graph is not None and loader is not None:
            raise InvalidOperation("pass a graph spec or a loader, not both: the spec generates the loader")
        if graph is not None and not isinstance(graph, GraphSpec):
            raise InvalidOperation(f"graph must be a GraphSpec, not {type(graph).__name__}")
        with _seam(address):
            pool = await asyncpg.create_pool(
                dsn,
                # No floor of idle connections: asyncpg would refill it in the background during an
                # outage, logging a traceback per attempt; calls open connections as they need them.
                min_size=0,
                max_size=pool_size,
                init=_init_connection,
                reset=_keep_session,
                server_settings=RENDERING,  # as the spec triggers render row images
                timeout=timeout,  # connecting
                command_timeout=timeout,  # every statement
            )
        store = cls(
            pool,
            dsn=dsn,
            sql=sql,
            loader=loader,
            spec=None,
            listen=listen,
            poll_interval=poll_interval,
            min_poll_interval=min_poll_interval,
            retention=retention,
            timeout=timeout,
            max_data_bytes=max_data_bytes,
        )
        try:
            with store._seam():
                async with store._connection() as conn:
                    if graph is not None:  # first: a spec that does not fit or is not tracked creates nothing
                        store._spec = await _checked_spec(conn, graph, sql, schema, address)
                    await migrate(conn, sql)
        except BaseException:
            await store.aclose()
            raise
        return store

    @property
    def snapshot_statement(self) -> str | None:
        """A graph spec store's one-statement snapshot loader (``$1``: a text[] of root ids; rows of
        root_id, version, id, parent_id, data), to run inside a transaction of your own on a connection
        set up with ``prepare_connection``; None for the built-in tables or a loader."""
        return None if self._spec is None else self._spec.graphs

    @property
    def graph(self) -> GraphSpec | None:
        """The graph spec this store serves (None: the built-in tables or a loader)."""
        return None if self._spec is None else self._spec.spec

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        shape = "" if self._spec is None else f" graph {self._spec.spec.schema}.{self._spec.spec.root}"
        return (
            f"<PostgresStore [{state} | {self.address} schema {self._sql.schema}{shape}"
            f" | pool: {self._pool.get_size()} connections, {self._pool.get_idle_size()} idle"
            f" | feeds: {len(self._feeds)}]>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def create_root(self, root_id: str, data: dict[str, Any]) -> int:
        """Create a graph holding only its root node, at version 1."""
        check_id(root_id, name="root_id")
        data_json = check_data(data, limit=self._max_data_bytes)
        self._check_writable("create_root")
        with self._seam():
            async with self._connection() as conn:
                created = await conn.fetchval(self._sql.create_root, root_id, data_json, self._sql.channel)
        if not created:
            raise RootExists(f"root {root_id!r} already exists")
        return 1

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int:
        """Apply ``ops`` in one transaction; the root's version goes up by exactly one."""
        check_id(root_id, name="root_id")
        expected = check_expected(expected_version, name="expected_version")
        checked = check_ops(root_id, ops, limit=self._max_data_bytes)
        self._check_writable("apply")
        sql = self._sql
        with self._seam():
            async with self._connection() as conn, conn.transaction():
                rows = await conn.fetch(sql.lock_structure, root_id)
                if not rows:
                    raise RootNotFound(f"root {root_id!r} not found")
                current: int = rows[0]["root_version"]
                if expected is not None and expected != current:
                    raise ConcurrencyConflict(
                        f"root {root_id!r} is at version {current}, expected {expected};"
                        " nothing was committed"
                    )
                structure = {
                    row["node_id"]: RowInfo(row["node_parent_id"], row["node_row_version"])
                    for row in rows
                    if row["node_id"] is not None
                }
                plan = plan_apply(root_id, structure, checked)
                version: int = current + 1
                ids = list(plan.upserts)
                written = plan.upserts.values()
                await conn.execute(
                    sql.write,
                    root_id,
                    list(plan.deletes),
                    ids,
                    [parent for parent, _, _ in written],
                    [data for _, data, _ in written],
                    [row_version for _, _, row_version in written],
                    version,
                    sql.channel,
                    _images_json(plan),
                )
        return version

    async def load(self, root_id: str) -> Graph:
        """One consistent snapshot of the graph: one statement, or the loader in a REPEATABLE READ one."""
        check_id(root_id, name="root_id")
        if self._loader is not None:
            return await self._load_with_loader(root_id, self._loader)
        if self._spec is not None:
            graphs, deleted = await self._load_spec(self._spec, [root_id])
            if root_id not in graphs:
                raise RootNotFound(f"root {root_id!r} not found", version=deleted.get(root_id))
            return graphs[root_id]
        with self._seam():
            # One statement sees one snapshot (also under READ COMMITTED): no BEGIN/COMMIT round trips.
            async with self._connection() as conn:
                rows = await conn.fetch(self._sql.graph, root_id)
        if not rows:
            raise RootNotFound(f"root {root_id!r} not found")
        nodes = {
            row["id"]: Node(row["id"], row["parent_id"], row["data"], row["row_version"])
            for row in rows
            if row["id"] is not None
        }
        return Graph(root_id, rows[0]["version"], nodes)

    async def load_many(self, root_ids: Sequence[str]) -> dict[str, Graph]:
        """Each root's graph; unknown roots are left out.

        The default reads them all in one statement (one snapshot, one round trip); a custom ``loader``
        loads each root in its own REPEATABLE READ transaction.
        """
        ids = check_ids(root_ids)
        if not ids:
            return {}
        if self._loader is not None:
            return await self._load_many_with_loader(ids, self._loader)
        if self._spec is not None:
            return (await self._load_spec(self._spec, ids))[0]
        with self._seam():
            async with self._connection() as conn:
                rows = await conn.fetch(self._sql.graphs, ids)
        versions: dict[str, int] = {}
        nodes: dict[str, dict[str, Node]] = {}
        for row in rows:
            root_id = row["root_id"]
            if root_id not in versions:
                versions[root_id] = row["version"]
                nodes[root_id] = {}
            node_id = row["id"]
            if node_id is not None:
                nodes[root_id][node_id] = Node(node_id, row["parent_id"], row["data"], row["row_version"])
        return {root_id: Graph(root_id, version, nodes[root_id]) for root_id, version in versions.items()}

    async def _load_spec(self, spec: SpecSql, ids: list[str]) -> tuple[dict[str, Graph], dict[str, int]]:
        """The spec's one statement for every root: the graphs found, and the committed version of each
        root whose row is gone (deleted, or never inserted though its children were)."""
        wanted = [root_id for root_id in ids if spec.root_id_is_canonical(root_id)]
        if not wanted:
            return {}, {}
        with self._seam():
            async with self._connection() as conn:
                rows = await conn.fetch(spec.graphs, wanted)
        versions: dict[str, int] = {}
        nodes: dict[str, dict[str, Node]] = {}
        for row in rows:
            root_id = row["root_id"]
            if row["id"] is None:
                versions[root_id] = row["version"]
                nodes[root_id] = {}
            else:
                nodes[root_id][row["id"]] = Node(row["id"], row["parent_id"], row["data"], 0)
        graphs = {}
        deleted = {}
        for root_id, version in versions.items():
            if spec.root_node(root_id) in nodes[root_id]:
                graphs[root_id] = Graph(root_id, version, nodes[root_id])
            else:
                deleted[root_id] = version
        return graphs, deleted

    async def _load_many_with_loader(self, ids: list[str], loader: Loader) -> dict[str, Graph]:
        graphs: dict[str, Graph] = {}
        errors: list[Exception] = []

        async def one(root_id: str) -> None:
            try:
                graphs[root_id] = await self._load_with_loader(root_id, loader)
            except RootNotFound:
                pass
            except Exception as exc:  # re-raised below as itself, not as an ExceptionGroup
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for root_id in ids:
                tg.start_soon(one, root_id)
        if errors:
            raise errors[0]
        return {root_id: graphs[root_id] for root_id in ids if root_id in graphs}

    async def _load_with_loader(self, root_id: str, loader: Loader) -> Graph:
        with self._seam():
            async with (
                self._connection() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                return await self._load_custom(conn, root_id, loader)

    async def _load_custom(self, conn: Any, root_id: str, loader: Loader) -> Graph:
        version = await conn.fetchval(self._sql.version, root_id)
        if version is None:
            raise RootNotFound(f"root {root_id!r} not found")
        try:
            graph = await loader(conn, root_id)
        except RootNotFound as exc:  # the loader found the root's row gone: say at which version
            if exc.version is not None:
                raise
            raise RootNotFound(str(exc), version=version) from exc
        if not graph.nodes:  # never cache an empty graph: the root's row is gone
            raise RootNotFound(f"root {root_id!r} not found: the loader found no rows", version=version)
        return msgspec.structs.replace(graph, root_id=root_id, version=version)

    async def version(self, root_id: str) -> int:
        """The root's committed version."""
        check_id(root_id, name="root_id")
        with self._seam():
            async with self._connection() as conn:
                version = await conn.fetchval(self._sql.version, root_id)
        if version is None:
            raise RootNotFound(f"root {root_id!r} not found")
        return int(version)

    async def cursor(self) -> int:
        """A cursor for "now": ``changes(after=cursor)`` delivers every change committed after this call."""
        with self._seam():
            async with self._connection() as conn:
                watermark: int = await conn.fetchval(self._sql.watermark)
        return watermark

    async def save_checkpoint(self, name: str, cursor: int, *, slots: Collection[int] | None = None) -> None:
        """Remember ``cursor`` under ``name`` (a durable upsert); ``load_checkpoint(name)`` returns it.
        ``slots``: the slots whose changes were routed up to it (None: all)."""
        check_id(name, name="name")
        check_cursor(cursor, name="cursor")
        try:
            wanted = check_slots(slots)
        except ValueError as exc:
            raise InvalidOperation(str(exc)) from None
        bitmap = None if wanted is None else slot_bitmap(wanted)
        with self._seam():
            async with self._connection() as conn:
                await conn.execute(self._sql.save_checkpoint, name, cursor, bitmap)

    async def load_checkpoint(self, name: str) -> Checkpoint | None:
        """The cursor last saved under ``name``, its age by the server's clock and whether the outbox
        still holds every change after it (``age < retention`` and pruning never deleted a row after the
        cursor); None if nothing was saved."""
        check_id(name, name="name")
        with self._seam():
            async with self._connection() as conn:
                row = await conn.fetchrow(self._sql.load_checkpoint, name)
        return None if row is None else self._checkpoint(row)

    async def checkpoints(self) -> list[tuple[str, Checkpoint]]:
        """Every saved checkpoint, by name (as ``load_checkpoint`` gives each)."""
        with self._seam():
            async with self._connection() as conn:
                rows = await conn.fetch(self._sql.checkpoints)
        return [(row["name"], self._checkpoint(row)) for row in rows]

    def _checkpoint(self, row: Any) -> Checkpoint:
        age: float = row["age"]
        slots = None if row["slots"] is None else slots_of_bitmap(row["slots"])
        return Checkpoint(row["cursor"], age, age < self._retention and row["kept"], slots)

    async def root_versions(self, *, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        """Committed ``(root_id, version)`` pairs with ``root_id > after``, by root id (code points), at
        most ``limit``: one index range scan. Page through every root by passing the last id as ``after``."""
        if after is not None:
            check_id(after, name="after")
        check_count(limit, name="limit", maximum=MAX_PAGE)
        with self._seam():
            async with self._connection() as conn:
                if after is None:
                    rows = await conn.fetch(self._sql.root_versions_first, limit)
                else:
                    rows = await conn.fetch(self._sql.root_versions_after, after, limit)
        return [(row["root_id"], row["version"]) for row in rows]

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> PostgresFeed:
        """The change feed from cursor ``after`` (None: from the feed's first poll on); see ``_feed.py``.
        With ``slots``, only the changes of roots in the slots it returns before each poll."""
        cursor = check_expected(after, name="after")
        if self._closed:
            raise StoreUnavailable(f"PostgresStore for {self.address} is closed")
        feed = PostgresFeed(
            _FeedOutbox(self),
            cursor,
            listen=self._listen,
            poll_interval=self._poll_interval,
            min_poll_interval=self._min_poll_interval,
            slots=slots,
        )
        self._feeds.add(feed)
        return feed

    def _forget(self, feed: PostgresFeed) -> None:
        self._feeds.discard(feed)

    async def prune_outbox(self) -> int:
        """Delete outbox rows older than the retention period; return how many went."""
        with self._seam():
            async with self._connection() as conn:
                pruned = await conn.fetchval(self._sql.prune, self._retention)
        return int(pruned)

    async def aclose(self) -> None:
        """Close the feeds (and their connections) and the pool."""
        self._closed = True
        for feed in list(self._feeds):
            await feed.aclose()
        try:
            with _seam(self.address), anyio.fail_after(self._timeout):
                await self._pool.close()
        except StoreError:  # server gone, a connection broken, a timeout: drop the sockets instead
            self._pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection (use inside the seam). One that a failure may have left unusable or in an
        unknown protocol state (asyncpg's "cannot switch to state ..." after a killed backend) is
        terminated rather than handed to the next caller; the pool opens a new one when needed."""
        async with self._pool.acquire() as conn:
            try:
                yield conn
            except Exception as exc:
                if breaks_connection(exc):
                    conn.terminate()
                raise

    def _check_writable(self, method: str) -> None:
        if self._spec is not None:
            spec = self._spec.spec
            raise InvalidOperation(
                f"{method}: this store serves graph spec {spec.source} from {spec.schema}'s tables;"
                " write to those tables with SQL"
            )

    def _seam(self) -> contextlib.AbstractContextManager[None]:
        if self._closed:
            raise StoreUnavailable(f"PostgresStore for {self.address} is closed")
        return _seam(self.address)


class _FeedOutbox:
    """The ``Outbox`` a ``PostgresStore`` hands each of its feeds: the feed's own connection (never pooled,
    so polls never queue behind writers) and the outbox statements, all through the store's seam."""

    __slots__ = ("_store",)

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    @property
    def retention(self) -> float:
        return self._store._retention

    async def connect(self, wake: Callable[..., None], *, listen: bool) -> Any:
        store = self._store
        with store._seam():
            conn = await asyncpg.connect(
                store._dsn,
                timeout=store._timeout,
                command_timeout=store._timeout,
                server_settings={"application_name": store._sql.feed_name},
            )
            try:
                conn.add_termination_listener(lambda *_: wake())
                if listen:
                    await conn.add_listener(store._sql.channel, wake)
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def disconnect(self, conn: Any) -> None:
        try:
            with anyio.fail_after(_GOODBYE_TIMEOUT):
                await conn.close()
        except Exception:  # any failure to say goodbye (server gone, timeout): drop the socket instead
            conn.terminate()

    async def poll(
        self, conn: Any, lower: int, extra: Sequence[int], slots: bytes | None = None
    ) -> PollResult:
        sql = self._store._sql
        with self._store._seam():
            rows = await conn.fetch(sql.poll, lower, list(extra), _poll_upper_bound(lower), slots)
        first = rows[0]
        # Images describe the built-in tables or a spec's; a loader's graphs are of its own making.
        keep_images = self._store._loader is None
        found = [
            (
                row["root_id"],
                row["version"],
                row["committed_at"],
                _decode_images(row["images"]) if keep_images and row["images"] else None,
            )
            for row in rows
            if row["root_id"] is not None
        ]
        return PollResult(first["xmin"], first["xmax"], list(first["xip"]), found)

    async def set_listening(self, conn: Any, wake: Callable[..., None], *, on: bool) -> None:
        channel = self._store._sql.channel
        with self._store._seam():
            if on:
                await conn.add_listener(channel, wake)
            else:
                await conn.remove_listener(channel, wake)

    async def prune(self) -> int:
        return await self._store.prune_outbox()

    def forget(self, feed: PostgresFeed) -> None:
        self._store._forget(feed)


async def install_change_tracking(
    conn: Any, table: str, root_column: str, *, schema: str = "graphcache"
) -> None:
    """Make every INSERT/UPDATE/DELETE on ``table`` bump the root named by ``root_column``.

    The root's version goes up exactly once per transaction however many rows it touches (a row moved
    between roots bumps both), an outbox row is written and the feed woken, all in the writer's
    transaction. Creates the store schema if needed; safe to run again.
    """
    sql = Sql(schema)
    statement = sql.install_trigger(table, root_column)
    quote_table(table)
    with _seam("the given connection"):
        await migrate(conn, sql)
        await conn.execute(statement)


async def _checked_spec(conn: Any, graph: GraphSpec, sql: Sql, schema: str, address: str) -> SpecSql:
    """The spec's SQL, after checking the spec against the catalog and its tracking against the spec."""
    spec_sql = SpecSql(graph, sql, await check_catalog(conn, graph))
    missing = [
        a for a in await plan_tracking(conn, spec_sql, schema=schema) if a.verb in ("create", "replace")
    ]
    if missing:
        raise SpecError(
            f"graph spec {graph.source}: change tracking is not installed or out of date in schema"
            f" {schema} on {address} ({missing[0]}{' and more' if len(missing) > 1 else ''}): run"
            f" graphcache track --graph {graph.source} --postgres DSN --schema {schema}"
        )
    return spec_sql


async def track_graph(
    conn: Any, graph: GraphSpec, *, schema: str = "graphcache", dry_run: bool = False
) -> list[TrackAction]:
    """Install or update the change tracking of ``graph`` (triggers on its tables, their functions and
    the store schema) in one transaction, after checking the spec against the catalog. Returns every
    step with its verb (``create``, ``replace``, ``remove``, ``unchanged``); with ``dry_run`` nothing is
    changed and the steps say what would be done. A second run finds every step unchanged."""
    if not isinstance(graph, GraphSpec):
        raise InvalidOperation(f"graph must be a GraphSpec, not {type(graph).__name__}")
    sql = Sql(schema)
    with _seam("the given connection"):
        spec_sql = SpecSql(graph, sql, await check_catalog(conn, graph))
        return await track(conn, spec_sql, schema=schema, dry_run=dry_run)
