"""Shared fixtures: the machine's Redis and PostgreSQL under a namespace/schema of this run's own.

Tests never flush, stop or restart the shared servers. A test that kills, restarts or floods a server
starts a private one (see ``tests/_redis_servers.py`` and ``tests/_pg_servers.py``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
import redis

from tests._pg_servers import *  # noqa: F403  (fixtures)
from tests._redis_servers import *  # noqa: F403  (fixtures)
from tests._servers import require_binaries
from tests._shared_fixtures import *  # noqa: F403  (fixtures)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN_ID = uuid.uuid4().hex[:10]


def pytest_sessionstart(session: pytest.Session) -> None:
    # Fail loudly (never skip) when a server binary the suite needs is missing.
    require_binaries()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the shared Redis (``REDIS_URL`` overrides)."""
    return REDIS_URL


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A Redis key namespace no other test (or run) uses; its keys are deleted afterwards."""
    name = f"gct{RUN_ID}{uuid.uuid4().hex[:8]}"
    yield name
    _delete_namespace(redis_url, name)


def _delete_namespace(url: str, name: str) -> None:
    # Only this test's own prefix, found by SCAN: never a flush of the shared server.
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of the shared PostgreSQL (``POSTGRES_DSN`` overrides)."""
    return POSTGRES_DSN


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A PostgreSQL schema name of this test's own, dropped afterwards."""
    name = f"gct_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    yield name
    _drop_schema(postgres_dsn, name)


def _drop_schema(dsn: str, schema: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())
