"""Fixtures several test modules share: the cache backends and PostgreSQL stores on this test's schema.

A module that needs another variant defines a fixture of the same name, which takes precedence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from graphcache.cache import VersionedCache
from graphcache.storage import PostgresStore
from tests._cache_backends import BACKENDS, Backend, open_backend

__all__ = ("Connect", "backend", "cache", "connect", "raw")

Connect = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Backend]:
    """Each cache backend in turn: MemoryCache, RedisCache, RedisCache on a Cluster."""
    async for opened in open_backend(request.param, request, namespace):
        yield opened


@pytest.fixture
def cache(backend: Backend) -> VersionedCache:
    return backend.cache


@pytest.fixture
async def connect(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Connect]:
    """Open PostgresStores on this test's schema; all are closed afterwards."""
    opened: list[PostgresStore] = []

    async def open_store(**options: Any) -> PostgresStore:
        options.setdefault("poll_interval", 0.1)
        store = await PostgresStore.connect(postgres_dsn, pg_schema, **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.aclose()


@pytest.fixture
async def raw(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the shared server."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()
