"""The PostgreSQL schema, created and migrated idempotently on connect.

Layout (``{s}`` is the store's schema, quoted):

    {s}.schema_version (version)                   one row: the migration level
    {s}.roots  (root_id PK, version, last_xid)      one row per graph; ``last_xid`` makes change tracking
                                                    bump a root once per transaction
    {s}.nodes  (root_id, id, parent_id, data jsonb, row_version)   PK (root_id, id)
    {s}.outbox (id, xid, root_id, version, committed_at, images, slot)   the change feed, pruned after
                                                    retention; ``images``: the nodes the transaction wrote
                                                    (or NULL); ``slot``: ``slot_of(root_id)``
    {s}.bump_root(root_id[, image]), {s}.track_change()   the triggers of ``install_change_tracking``
                                                    and of graph specs
    {s}.lock_structure(root_id)                     apply's first step: lock the root, then read its
                                                    structure in a fresh snapshot (one round trip)
    {s}.checkpoints (name PK, cursor, saved_at)     durable feed positions (``save_checkpoint``)
    {s}.outbox_pruned (max_xid)                     one row: the highest xid pruning ever deleted; a
                                                    checkpoint at or below it lost a change after it
    {s}.roots_by_code_point                         roots by id in code-point order (``root_versions``)

``outbox.xid`` is the writing transaction's id (``pg_current_xact_id()``); the feed uses it with snapshot
xmin/xip to deliver a row whose transaction committed late (see ``_feed.py``). Migrations run under a
transaction-scoped advisory lock keyed on the schema name, so concurrent connects never race.
"""

# ruff: noqa: S608  (identifiers are checked and quoted by quote_ident; values are always bind parameters)
from __future__ import annotations

import re
from typing import Any

from ._errors import InvalidOperation, StoreError

__all__ = ("IDENT", "SCHEMA_VERSION", "Sql", "channel_name", "migrate", "quote_ident", "quote_table")

SCHEMA_VERSION = 4
MAX_IMAGES = 1000
"""Row images one outbox row carries at most; a transaction that writes more rows of one graph logs none
(its change is loaded from a snapshot instead)."""
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE {s}.roots (
    root_id  text PRIMARY KEY,
    version  bigint NOT NULL,
    last_xid bigint
);
CREATE TABLE {s}.nodes (
    root_id     text   NOT NULL,
    id          text   NOT NULL,
    parent_id   text,
    data        jsonb  NOT NULL,
    row_version bigint NOT NULL,
    PRIMARY KEY (root_id, id)
);
CREATE TABLE {s}.outbox (
    id           bigserial PRIMARY KEY,
    xid          bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    root_id      text   NOT NULL,
    version      bigint NOT NULL,
    committed_at double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
CREATE INDEX ON {s}.outbox (xid);
CREATE INDEX ON {s}.outbox USING brin (committed_at);

CREATE FUNCTION {s}.bump_root(rid text) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    current_xid bigint := pg_current_xact_id()::text::bigint;
    new_version bigint;
BEGIN
    INSERT INTO {s}.roots AS r (root_id, version, last_xid) VALUES (rid, 1, current_xid)
    ON CONFLICT (root_id) DO UPDATE SET version = r.version + 1, last_xid = excluded.last_xid
        WHERE r.last_xid IS DISTINCT FROM excluded.last_xid
    RETURNING r.version INTO new_version;
    IF FOUND THEN
        INSERT INTO {s}.outbox (root_id, version) VALUES (rid, new_version);
        PERFORM pg_notify({channel}, '');
    END IF;
END
$fn$;

CREATE FUNCTION {s}.track_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    new_root text;
    old_root text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_root := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_root := to_jsonb(OLD) ->> TG_ARGV[0];
    END IF;
    IF new_root IS NOT NULL THEN
        PERFORM {s}.bump_root(new_root);
    END IF;
    IF old_root IS NOT NULL AND old_root IS DISTINCT FROM new_root THEN
        PERFORM {s}.bump_root(old_root);
    END IF;
    RETURN NULL;
END
$fn$;
""",
    # apply's lock and structure read in one round trip: the root row's lock is held from here to COMMIT,
    # so every round trip after it lengthens the queue of writers waiting for a hot root.
    2: """
CREATE FUNCTION {s}.lock_structure(rid text)
RETURNS TABLE (root_version bigint, node_id text, node_parent_id text, node_row_version bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    locked bigint;
BEGIN
    SELECT r.version INTO locked FROM {s}.roots AS r WHERE r.root_id = rid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- A VOLATILE function's next statement takes a fresh snapshot (READ COMMITTED), so it sees the
    -- structure exactly as the lock's previous holder committed it, never the one from before the wait.
    RETURN QUERY
        SELECT locked, NULL::text, NULL::text, NULL::bigint
        UNION ALL
        SELECT locked, n.id, n.parent_id, n.row_version FROM {s}.nodes AS n WHERE n.root_id = rid;
END
$fn$;
""",
    # Durable feed positions (and what pruning took, to tell whether one is still resumable), and root
    # ids in code-point order (COLLATE "C": UTF-8 byte order) whatever the database's collation, so a
    # sweep pages through roots in the order Python compares str. Idempotent: a schema set back to an
    # older level by hand is upgraded again.
    3: """
CREATE TABLE IF NOT EXISTS {s}.checkpoints (
    name     text        PRIMARY KEY,
    cursor   bigint      NOT NULL,
    saved_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.outbox_pruned (max_xid bigint NOT NULL);
INSERT INTO {s}.outbox_pruned (max_xid) SELECT -1 WHERE NOT EXISTS (SELECT FROM {s}.outbox_pruned);
CREATE INDEX IF NOT EXISTS roots_by_code_point ON {s}.roots (root_id COLLATE "C");
""",
    # Row images: each outbox row carries the nodes its transaction wrote or deleted (NULL: not known),
    # so a live actor patches its graph instead of loading it. bump_root(rid, image) adds one image to
    # the transaction's outbox row of the root (a NULL image makes the whole change unknown); the
    # one-argument bump_root of install_change_tracking logs no images.
    4: """
ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS images jsonb;
-- The slots a checkpoint covers (a bitmap; NULL: all), so a slot's new owner resumes where the old one
-- stopped.
ALTER TABLE {s}.checkpoints ADD COLUMN IF NOT EXISTS slots bytea;

-- The root's slot (storage/_slots.py computes the same): a feed reads only the slots its node owns.
CREATE OR REPLACE FUNCTION {s}.slot_of(rid text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT ((get_byte(d, 0) << 8) | get_byte(d, 1)) & 16383 FROM sha256(convert_to(rid, 'UTF8')) AS d
$fn$;
ALTER TABLE {s}.outbox
    ADD COLUMN IF NOT EXISTS slot integer GENERATED ALWAYS AS ({s}.slot_of(root_id)) STORED;

CREATE OR REPLACE FUNCTION {s}.bump_root(rid text, image jsonb) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    current_xid bigint := pg_current_xact_id()::text::bigint;
    new_version bigint;
BEGIN
    INSERT INTO {s}.roots AS r (root_id, version, last_xid) VALUES (rid, 1, current_xid)
    ON CONFLICT (root_id) DO UPDATE SET version = r.version + 1, last_xid = excluded.last_xid
        WHERE r.last_xid IS DISTINCT FROM excluded.last_xid
    RETURNING r.version INTO new_version;
    IF FOUND THEN
        INSERT INTO {s}.outbox (root_id, version, images)
        VALUES (rid, new_version, CASE WHEN image IS NULL THEN NULL ELSE jsonb_build_array(image) END);
        PERFORM pg_notify({channel}, '');
    ELSE
        UPDATE {s}.outbox AS o
        SET images = CASE WHEN image IS NULL OR jsonb_array_length(o.images) >= {max_images} THEN NULL
                          ELSE o.images || jsonb_build_array(image) END
        WHERE o.xid = current_xid AND o.root_id = rid AND o.images IS NOT NULL;
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.bump_root(rid text) RETURNS void LANGUAGE sql AS $fn$
    SELECT {s}.bump_root(rid, NULL::jsonb);
$fn$;
""",
}


def quote_ident(name: str, *, what: str = "identifier") -> str:
    """``name`` double-quoted, if it is a plain SQL identifier (letters, digits, _ and $; at most 63)."""
    if not isinstance(name, str) or not IDENT.fullmatch(name):
        raise InvalidOperation(
            f"{what} must be a plain SQL identifier ([A-Za-z_][A-Za-z0-9_$]*), got {name!r}"
        )
    return f'"{name}"'


def quote_table(name: str) -> str:
    """``table`` or ``schema.table``, each part checked and quoted."""
    parts = name.split(".") if isinstance(name, str) else [name]
    if len(parts) > 2:
        raise InvalidOperation(f"table must be 'table' or 'schema.table', got {name!r}")
    return ".".join(quote_ident(part, what="table") for part in parts)


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a store schema (wake-ups only)."""
    return f"graphcache_{schema}"[:63]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Sql:
    """Every statement of one store schema, rendered once with the schema quoted."""

    def __init__(self, schema: str) -> None:
        s = quote_ident(schema, what="schema")
        self.schema = s
        self.channel = channel_name(schema)
        self.trigger_name = f"graphcache_track_{self.channel}"[:63]  # on every tracked table
        self.feed_name = f"graphcache feed {schema}"[:63]  # application_name of feed connections
        self.lock_structure = f"SELECT * FROM {s}.lock_structure($1)"
        self.write = f"""
WITH gone AS (
    DELETE FROM {s}.nodes WHERE root_id = $1 AND id = ANY($2::text[])
), written AS (
    INSERT INTO {s}.nodes (root_id, id, parent_id, data, row_version)
    SELECT $1, t.id, t.parent_id, t.data, t.row_version
    FROM unnest($3::text[], $4::text[], $5::jsonb[], $6::bigint[]) AS t(id, parent_id, data, row_version)
    ON CONFLICT (root_id, id) DO UPDATE
        SET parent_id = excluded.parent_id, data = excluded.data, row_version = excluded.row_version
), bumped AS (
    UPDATE {s}.roots SET version = $7, last_xid = pg_current_xact_id()::text::bigint WHERE root_id = $1
), logged AS (
    INSERT INTO {s}.outbox (root_id, version, images) VALUES ($1, $7, $9::jsonb)
)
SELECT pg_notify($8, '')"""
        self.create_root = f"""
WITH made AS (
    INSERT INTO {s}.roots (root_id, version, last_xid)
    VALUES ($1, 1, pg_current_xact_id()::text::bigint)
    ON CONFLICT (root_id) DO NOTHING
    RETURNING root_id
), node AS (
    INSERT INTO {s}.nodes (root_id, id, parent_id, data, row_version)
    SELECT root_id, root_id, NULL, $2::jsonb, 1 FROM made
), logged AS (
    INSERT INTO {s}.outbox (root_id, version, images)
    SELECT root_id, 1, jsonb_build_array(jsonb_build_array(root_id, NULL, $2::jsonb, 1)) FROM made
)
SELECT count(*) AS created, pg_notify($3, '') FROM made"""
        self.version = f"SELECT version FROM {s}.roots WHERE root_id = $1"
        self.graph = (
            f"SELECT r.version, n.id, n.parent_id, n.data, n.row_version FROM {s}.roots AS r"
            f" LEFT JOIN {s}.nodes AS n ON n.root_id = r.root_id WHERE r.root_id = $1"
        )
        # Driven by unnest, the planner looks each root up by index; "root_id = ANY($1)" made it hash
        # every row of nodes once a batch had more than a few roots.
        self.graphs = (
            f"SELECT r.root_id, r.version, n.id, n.parent_id, n.data, n.row_version"
            f" FROM unnest($1::text[]) AS u(root_id) JOIN {s}.roots AS r ON r.root_id = u.root_id"
            f" LEFT JOIN {s}.nodes AS n ON n.root_id = r.root_id"
        )
        self.poll = f"""
WITH snap AS MATERIALIZED (  -- once, not once per row
    SELECT pg_snapshot_xmin(c)::text::bigint AS xmin,
           pg_snapshot_xmax(c)::text::bigint AS xmax,
           ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(c) AS x) AS xip
    FROM pg_current_snapshot() AS c
)
SELECT snap.xmin, snap.xmax, snap.xip, o.root_id, o.version, o.committed_at, o.images::text AS images
FROM snap
LEFT JOIN {s}.outbox AS o ON ((o.xid >= $1 AND o.xid < $3) OR o.xid = ANY($2::bigint[]))
    AND ($4::bytea IS NULL OR get_bit($4::bytea, o.slot) = 1)
ORDER BY o.xid, o.id"""
        self.watermark = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
        self.prune = f"""
WITH gone AS (
    DELETE FROM {s}.outbox WHERE committed_at < extract(epoch FROM clock_timestamp()) - $1 RETURNING xid
), marked AS (
    UPDATE {s}.outbox_pruned SET max_xid = greatest(max_xid, (SELECT max(xid) FROM gone))
    WHERE EXISTS (SELECT FROM gone)
), stale AS (  -- a checkpoint unsaved for the retention period can no longer resume: forget it
    DELETE FROM {s}.checkpoints WHERE saved_at < now() - make_interval(secs => $1)
)
SELECT count(*) FROM gone"""
        self.save_checkpoint = (
            f"INSERT INTO {s}.checkpoints (name, cursor, saved_at, slots) VALUES ($1, $2, now(), $3)"
            f" ON CONFLICT (name) DO UPDATE"
            f" SET cursor = excluded.cursor, saved_at = excluded.saved_at, slots = excluded.slots"
        )
        # Age by the server's clock only: the client's may differ; never negative if the clock steps back.
        # "kept": pruning never deleted a row the cursor would deliver (xid >= cursor).
        self.load_checkpoint = (
            f"SELECT c.name, c.cursor, greatest(extract(epoch FROM now() - c.saved_at), 0)::float8 AS age,"
            f" c.cursor > coalesce((SELECT max(p.max_xid) FROM {s}.outbox_pruned AS p), -1) AS kept, c.slots"
            f" FROM {s}.checkpoints AS c WHERE c.name = $1"
        )
        self.checkpoints = self.load_checkpoint.replace(" WHERE c.name = $1", " ORDER BY c.name")
        by_code_point = 'root_id COLLATE "C"'  # matches the roots_by_code_point index
        self.root_versions_first = f"SELECT root_id, version FROM {s}.roots ORDER BY {by_code_point} LIMIT $1"
        self.root_versions_after = (
            f"SELECT root_id, version FROM {s}.roots WHERE {by_code_point} > $1"
            f" ORDER BY {by_code_point} LIMIT $2"
        )

    def install_trigger(self, table: str, root_column: str) -> str:
        """The statement that installs change tracking on ``table`` (checked identifiers only)."""
        quote_ident(root_column, what="root_column")
        name = quote_ident(self.trigger_name, what="trigger name")
        return (
            f"CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {quote_table(table)}"
            f" FOR EACH ROW EXECUTE FUNCTION {self.schema}.track_change({_literal(root_column)})"
        )


async def migrate(conn: Any, sql: Sql) -> None:
    """Create or upgrade the schema to ``SCHEMA_VERSION``; safe to run from many connects at once."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"graphcache:{sql.schema}"
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {sql.schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {sql.schema}.schema_version (version integer NOT NULL)"
        )
        level = await conn.fetchval(f"SELECT max(version) FROM {sql.schema}.schema_version")
        level = 0 if level is None else int(level)
        if level > SCHEMA_VERSION:
            raise StoreError(
                f"schema {sql.schema} is at version {level}, newer than this code ({SCHEMA_VERSION})"
            )
        for step in range(level + 1, SCHEMA_VERSION + 1):
            await conn.execute(
                _MIGRATIONS[step].format(s=sql.schema, channel=_literal(sql.channel), max_images=MAX_IMAGES)
            )
        if level < SCHEMA_VERSION:
            await conn.execute(f"DELETE FROM {sql.schema}.schema_version")
            await conn.execute(f"INSERT INTO {sql.schema}.schema_version VALUES ({SCHEMA_VERSION})")
