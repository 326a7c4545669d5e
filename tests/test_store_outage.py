"""PostgreSQL down, unreachable or silent: StoreUnavailable with the address, then recovery by itself."""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from graphcache.storage import InvalidOperation, PostgresStore, StoreUnavailable, Upsert
from tests._pg_servers import PrivatePostgres
from tests.test_store_contract import collect_until

pytestmark = pytest.mark.anyio


class _OnLog(logging.Handler):
    """Sets ``event`` when a log record starting with ``prefix`` is emitted."""

    def __init__(self, prefix: str, event: anyio.Event) -> None:
        super().__init__()
        self.prefix, self.event = prefix, event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections into its backlog and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_connect_to_nothing_names_the_address() -> None:
    """Connecting where no server listens raises StoreUnavailable naming host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        await PostgresStore.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")


async def test_a_silent_server_times_out_as_unavailable(silent_port: int) -> None:
    """A server that never answers costs command_timeout, then StoreUnavailable, not a hang."""
    with anyio.fail_after(30), pytest.raises(StoreUnavailable, match=f"127.0.0.1:{silent_port}"):
        await PostgresStore.connect(
            f"postgresql://postgres@127.0.0.1:{silent_port}/postgres", command_timeout=0.5
        )


async def test_calls_fail_while_down_and_work_again_after_restart(private_postgres: PrivatePostgres) -> None:
    """Stop: every call raises StoreUnavailable with the address. Start: the same store works again."""
    store = await PostgresStore.connect(private_postgres.dsn, "outage_calls", command_timeout=5)
    async with store:
        await store.create_root("r", {})
        await anyio.to_thread.run_sync(private_postgres.stop)
        try:
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{private_postgres.port}"):
                await store.version("r")
            with pytest.raises(StoreUnavailable):
                await store.apply("r", [Upsert("a", "r", {})])
            with pytest.raises(StoreUnavailable):
                await store.load("r")
        finally:
            await anyio.to_thread.run_sync(private_postgres.start)
        assert await store.apply("r", [Upsert("a", "r", {})]) == 2
        assert (await store.load("r")).version == 2


async def test_the_feed_resumes_without_loss_after_a_restart(private_postgres: PrivatePostgres) -> None:
    """A feed running across a stop/start delivers every root's latest version, before and after."""
    store = await PostgresStore.connect(private_postgres.dsn, "outage_feed", poll_interval=0.05)
    got: dict[str, list[int]] = defaultdict(list)
    async with store:
        feed = store.changes(after=await store.cursor())
        async with feed:
            for root in ("a", "b"):
                await store.create_root(root, {})
                await store.apply(root, [Upsert("x", root, {"before": True})])
            await collect_until(feed, {"a": 2, "b": 2}, got)
            async with anyio.create_task_group() as group:
                group.start_soon(collect_until, feed, {"a": 4, "b": 3}, got)
                poll_failed = anyio.Event()
                watch = _OnLog("change feed poll failed", poll_failed)
                logging.getLogger("graphcache.storage._feed").addHandler(watch)
                await anyio.to_thread.run_sync(private_postgres.stop)
                try:
                    with anyio.fail_after(30):  # a hang guard
                        await poll_failed.wait()
                finally:
                    logging.getLogger("graphcache.storage._feed").removeHandler(watch)
                    await anyio.to_thread.run_sync(private_postgres.start)
                for root in ("a", "b"):
                    await store.apply(root, [Upsert("x", root, {"before": False})])
                await store.apply("a", [Upsert("y", "a", {})])
            statistics = feed.statistics()
    assert dict(got) == {"a": [1, 2, 3, 4], "b": [1, 2, 3]}
    assert statistics.failed >= 1
    assert statistics.connects >= 2


@pytest.mark.parametrize(
    "options",
    [
        {"dsn": "nonsense"},
        {"dsn": "postgresql://[bad"},
        {"dsn": 5},
        {"schema": "bad-name"},
        {"schema": 'x"; DROP SCHEMA public; --'},
        {"poll_interval": 0},
        {"min_poll_interval": -0.01},
        {"min_poll_interval": float("inf")},
        {"retention": float("nan")},
        {"command_timeout": -1},
        {"pool_size": 0},
        {"max_data_bytes": True},
    ],
)
async def test_bad_connect_options_raise_invalid_operation_before_any_io(options: dict[str, object]) -> None:
    """A malformed DSN, schema name or option is InvalidOperation, without touching a server."""
    arguments: dict[str, Any] = {"dsn": "postgresql://postgres@127.0.0.1:1/postgres", **options}
    with pytest.raises(InvalidOperation):
        await PostgresStore.connect(**arguments)
