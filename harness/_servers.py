"""The real servers a harness run writes to: checked up front, and left as they were found.

A run (``loadtest``, ``demo``, ``bench``) first checks that each server answers, so an unreachable one is
one line naming the flag, before anything is created. Whatever it then creates lives under a fresh Redis
key namespace and PostgreSQL schema of its own, which `removed_afterwards` deletes however the run ends:
success, an exception, Ctrl-C, a server gone mid-way. Only this run's namespace and schema are touched,
never a flush of the shared server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import asyncpg
import redis.asyncio
import redis.exceptions

from .._cli import CommandError, UsageError, redact

__all__ = (
    "Unreachable",
    "drop_schema",
    "reach",
    "reach_postgres",
    "reach_redis",
    "remove_namespace",
    "removed_afterwards",
)

REACH_PATIENCE = 5.0
"""Seconds a server gets to answer the first question before the run gives up on it."""
CLEANUP_PATIENCE = 10.0
"""Seconds each clean-up step may take: a run that failed because a server hangs must still end."""


class Unreachable(CommandError):
    """A server did not answer; the message names the flag and the (password-masked) address."""


async def reach_redis(url: str, *, flag: str = "--redis", within: float = REACH_PATIENCE) -> None:
    """PING ``url``; `Unreachable` (exit 1) if no answer comes within ``within`` seconds."""
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=within, socket_timeout=within)
    try:
        with anyio.fail_after(within):
            await client.ping()
    except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach Redis ({flag} {redact(url)}): {_reason(exc)}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def reach_postgres(dsn: str, *, flag: str = "--postgres", within: float = REACH_PATIENCE) -> None:
    """Connect to ``dsn`` and close again; `Unreachable` (exit 1) if that fails within ``within`` s."""
    try:
        with anyio.fail_after(within):
            conn = await asyncpg.connect(dsn, timeout=within)
    except ValueError as exc:  # a DSN asyncpg cannot use (e.g. an unknown sslmode): bad input
        raise UsageError(f"{flag} {redact(dsn)}: {exc}") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach PostgreSQL ({flag} {redact(dsn)}): {_reason(exc)}") from exc
    with anyio.CancelScope(shield=True):
        await conn.close()


async def reach(redis_url: str | None, postgres: str | None) -> None:
    """`reach_redis` and `reach_postgres`, for the ones given."""
    if redis_url is not None:
        await reach_redis(redis_url)
    if postgres is not None:
        await reach_postgres(postgres)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def remove_namespace(url: str, namespace: str) -> None:
    """Delete every key under ``namespace:`` (found by SCAN; never a flush)."""
    client = redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=CLEANUP_PATIENCE, socket_timeout=CLEANUP_PATIENCE
    )
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


async def drop_schema(dsn: str, schema: str) -> None:
    """``DROP SCHEMA ... CASCADE`` of this run's own schema."""
    conn = await asyncpg.connect(dsn, timeout=CLEANUP_PATIENCE)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def removed_afterwards(
    *,
    redis_url: str | None = None,
    namespace: str | None = None,
    postgres: str | None = None,
    schema: str | None = None,
) -> AsyncIterator[None]:
    """Remove ``namespace``'s keys and ``schema`` when the body ends, however it ends.

    The clean-up is shielded (a cancelled run still cleans up) and each step is bounded and attempted on
    its own (Redis being down must not keep the schema). A step that fails is added as a note to the
    body's exception, or, if the body succeeded, raised as a `CommandError` (exit 1).
    """
    try:
        yield
    except BaseException as exc:
        for problem in await _remove(redis_url, namespace, postgres, schema):
            exc.add_note(problem)
        raise
    problems = await _remove(redis_url, namespace, postgres, schema)
    if problems:
        raise CommandError("; ".join(problems))


async def _remove(
    redis_url: str | None, namespace: str | None, postgres: str | None, schema: str | None
) -> list[str]:
    problems: list[str] = []
    with anyio.CancelScope(shield=True):
        if redis_url is not None and namespace is not None:
            try:
                with anyio.fail_after(CLEANUP_PATIENCE):
                    await remove_namespace(redis_url, namespace)
            except Exception as exc:
                problems.append(f"could not remove the Redis keys {namespace}:*: {_reason(exc)}")
        if postgres is not None and schema is not None:
            try:
                with anyio.fail_after(CLEANUP_PATIENCE):
                    await drop_schema(postgres, schema)
            except Exception as exc:
                problems.append(f"could not drop the PostgreSQL schema {schema}: {_reason(exc)}")
    return problems
