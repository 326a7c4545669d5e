"""Embedding a node in a web service: ``graphcache.open_node``, ``graph_ttl``, ``Graph.to_json``."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

import graphcache
from graphcache.actors import InvalidArgument, InvalidNodeId, Node, NodeOptions, StaticMembership, graph_key
from graphcache.cache import MemoryCache, RedisCache
from graphcache.storage import Graph, InvalidOperation, MemoryStore, PostgresStore, StoreUnavailable, Upsert

pytestmark = pytest.mark.anyio

UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every task of the loop but the test's own."""
    return asyncio.all_tasks() - {asyncio.current_task()}


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of store and cache ``aclose``d, in order (the real ``aclose`` still runs)."""
    order: list[str] = []
    for kind in (MemoryStore, PostgresStore, MemoryCache, RedisCache):
        real = kind.aclose

        async def recording(self: Any, real: Any = real, name: str = kind.__name__) -> None:
            order.append(name)
            await real(self)

        monkeypatch.setattr(kind, "aclose", recording)
    return order


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def entry(node: Node, root_id: str) -> bytes:
    """The Redis key of ``root_id``'s cached graph (wire format 2)."""
    assert isinstance(node.cache, RedisCache)
    return node.cache.redis_keys(graph_key(root_id))[0]


# -- with the real servers --------------------------------------------------------------------------


async def test_open_node_serves_a_read_after_a_write_and_leaves_nothing_behind(
    postgres_dsn: str, pg_schema: str, redis_url: str, namespace: str, closed: list[str]
) -> None:
    """A write elsewhere, then get(min_version) returns it; exit closes cache then store, no task left."""
    before = other_tasks()
    async with graphcache.open_node(
        postgres=postgres_dsn, redis=redis_url, schema=pg_schema, namespace=namespace, node_id="web-1"
    ) as node:
        assert isinstance(node.store, PostgresStore)
        assert isinstance(node.cache, RedisCache)
        assert node.node_id == "web-1"
        await node.store.create_root("order-1", {"total": 0})
        version = await node.store.apply("order-1", [Upsert("line-1", "order-1", {"sku": "A", "qty": 2})])
        with anyio.fail_after(10):  # a hang guard
            graph = await node.get("order-1", min_version=version)
        assert graph.version == version
        assert set(graph.nodes) == {"order-1", "line-1"}
        assert node.problems() == []
        store, cache = node.store, node.cache
    assert closed == ["RedisCache", "PostgresStore"]
    assert "closed" in repr(store)
    assert "closed" in repr(cache)
    assert repr(node).startswith("<Node 'web-1' stopped")
    assert other_tasks() <= before


async def test_nodes_of_two_workers_meet_in_redis_membership(
    postgres_dsn: str, pg_schema: str, redis_url: str, namespace: str
) -> None:
    """membership="redis": a second worker's node sees the first at its first heartbeat."""
    common: dict[str, Any] = {
        "postgres": postgres_dsn,
        "redis": redis_url,
        "schema": pg_schema,
        "namespace": namespace,
        "membership": "redis",
    }
    async with (
        graphcache.open_node(node_id="host-1", **common) as first,
        graphcache.open_node(node_id="host-2", **common) as second,
    ):
        assert second.statistics().members == 2
        assert first.membership is not second.membership


async def test_graph_ttl_lands_on_the_redis_keys_pttl_for_read_throughs_and_rebuilds(
    redis_url: str, namespace: str, raw_redis: Redis
) -> None:
    """With ttl=60 every graph the node caches expires within 60 s: a read-through's and a rebuild's."""
    async with graphcache.open_node(redis=redis_url, namespace=namespace, ttl=60) as node:
        assert node.options.graph_ttl == 60.0
        await node.store.create_root("r", {})
        await node.get("r")  # a miss: read through
        assert 0 < await raw_redis.pttl(entry(node, "r")) <= 60_000
        await raw_redis.persist(entry(node, "r"))
        version = await node.apply("r", [Upsert("c", "r", {})])
        actor = node.actor("r")
        assert actor is not None
        with anyio.fail_after(10):  # a hang guard
            await actor.until_built(version)
        assert 0 < await raw_redis.pttl(entry(node, "r")) <= 60_000


async def test_without_graph_ttl_cached_graphs_do_not_expire(
    redis_url: str, namespace: str, raw_redis: Redis
) -> None:
    """By default a cached graph lives until it is replaced (PTTL -1)."""
    async with graphcache.open_node(redis=redis_url, namespace=namespace) as node:
        await node.store.create_root("r", {})
        await node.get("r")
        assert await raw_redis.pttl(entry(node, "r")) == -1


async def test_a_store_that_cannot_be_reached_closes_the_cache_created_before_it(closed: list[str]) -> None:
    """Start-up failing at the store: StoreUnavailable, and the cache already created is closed."""
    with pytest.raises(StoreUnavailable):
        async with graphcache.open_node(postgres=UNREACHABLE_POSTGRES, redis=UNREACHABLE_REDIS):
            pytest.fail("the node started without its store")  # pragma: no cover
    assert closed.count("RedisCache") == 1  # (the store closes its own pool when it cannot migrate)


# -- embedded: no servers ----------------------------------------------------------------------------


async def test_without_servers_the_node_runs_on_memory_store_and_cache(closed: list[str]) -> None:
    """No postgres, no redis: a MemoryStore and a MemoryCache, closed cache first on exit."""
    before = other_tasks()
    async with graphcache.open_node(node_id="solo", consistency="strict", sweep_interval=30) as node:
        assert isinstance(node.store, MemoryStore)
        assert isinstance(node.cache, MemoryCache)
        assert isinstance(node.membership, StaticMembership)
        assert (node.options.consistency, node.options.sweep_interval) == ("strict", 30.0)
        await node.store.create_root("r", {"n": 1})
        version = await node.apply("r", [Upsert("c", "r", {})])
        assert (await node.get("r", min_version=version)).version == version
    assert closed == ["MemoryCache", "MemoryStore"]
    assert other_tasks() <= before


async def test_a_node_that_fails_to_start_closes_the_cache_and_the_store(
    closed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up failing in the node itself (its membership refuses to join): both are closed, in reverse."""

    async def refuse(self: StaticMembership, node_id: str, **_: Any) -> None:
        raise RuntimeError("membership refused to join")

    monkeypatch.setattr(StaticMembership, "run", refuse)
    with pytest.raises(ExceptionGroup) as caught:  # the node's service task group reports it
        async with graphcache.open_node():
            pytest.fail("the node started without its membership")  # pragma: no cover
    assert caught.group_contains(RuntimeError, match="membership refused to join", depth=None)
    assert closed == ["MemoryCache", "MemoryStore"]


def test_the_default_node_id_is_the_host_name_and_the_process_id() -> None:
    """ "<hostname>-<pid>": two workers of one host get different ids."""
    assert graphcache.default_node_id() == f"{socket.gethostname()}-{os.getpid()}"
    code = "import graphcache; print(graphcache.default_node_id())"
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert child.stdout.strip().startswith(f"{socket.gethostname()}-")
    assert child.stdout.strip() != graphcache.default_node_id()


# -- bad arguments: refused before any I/O ------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"membership": "gossip"}, InvalidArgument, "membership must be one of ('static', 'redis')"),
        ({"membership": "redis", "redis": None}, InvalidArgument, "membership='redis' needs redis=URL"),
        ({"postgres": 5432}, InvalidArgument, "postgres must be a URL"),
        ({"ttl": 0}, InvalidArgument, "graph_ttl must be a finite number of seconds > 0 or None, got 0"),
        ({"ttl": 5, "graph_ttl": 5}, InvalidArgument, "ttl and graph_ttl are one option"),
        ({"node_id": ""}, InvalidNodeId, "node_id must be a non-empty str"),
        ({"idle_timeout": -1}, InvalidArgument, "idle_timeout must be a finite number of seconds > 0"),
        ({"store": MemoryStore()}, InvalidArgument, "unknown option 'store'"),
        ({"sweep_intervall": 5}, InvalidArgument, "unknown option 'sweep_intervall'"),
    ],
)
def test_bad_arguments_are_refused_when_open_node_is_called(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    """A bad node option or a contradiction raises at the call, before anything is created."""
    servers = {"postgres": UNREACHABLE_POSTGRES, "redis": UNREACHABLE_REDIS}
    with pytest.raises(error, match=re.escape(message)):
        graphcache.open_node(**(servers | arguments))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"namespace": "a:b"}, ValueError, "namespace must match"),
        ({"redis": "http://127.0.0.1:1"}, ValueError, "not a usable Redis URL"),
        ({"schema": "no such; schema"}, InvalidOperation, "schema"),
        ({"postgres": "mysql://127.0.0.1:1/x"}, InvalidOperation, "postgresql://"),
    ],
)
async def test_bad_server_arguments_are_refused_before_any_connection(
    arguments: dict[str, Any], error: type[Exception], message: str, closed: list[str]
) -> None:
    """A bad URL, namespace or schema raises on entry, before a connection to the unreachable servers."""
    servers = {"postgres": UNREACHABLE_POSTGRES, "redis": UNREACHABLE_REDIS}
    opening = graphcache.open_node(**(servers | arguments))
    with anyio.fail_after(1), pytest.raises(error, match=re.escape(message)):
        async with opening:
            pytest.fail("a node started on bad arguments")  # pragma: no cover
    assert "PostgresStore" not in closed


# -- Graph.to_json ------------------------------------------------------------------------------------


async def test_graph_to_json_is_the_graph_as_a_web_response_body() -> None:
    """to_json() is JSON bytes with root_id, version and nodes, and decodes back to the same Graph."""
    async with MemoryStore() as store:
        await store.create_root("r", {"name": "root", "tags": ["a", "é"]})
        await store.apply("r", [Upsert("c", "r", {"n": 1.5, "none": None})])
        graph = await store.load("r")
    body = graph.to_json()
    assert isinstance(body, bytes)
    document = msgspec.json.decode(body)
    assert set(document) == {"root_id", "version", "nodes"}
    assert document["nodes"]["c"] == {
        "id": "c",
        "parent_id": "r",
        "data": {"n": 1.5, "none": None},
        "row_version": 1,
    }
    assert msgspec.json.decode(body, type=Graph) == graph


async def test_a_node_built_from_checked_options_is_the_node_the_keywords_build() -> None:
    """Node.from_options(NodeOptions.create(...)) configures a node as Node(**same keywords) does."""
    options = NodeOptions.create(node_id="n", graph_ttl=30, mailbox_size=4, handoff=0)
    async with MemoryStore() as store, MemoryCache() as cache:
        built = Node.from_options(options, store=store, cache=cache)
        keyworded = Node(store=store, cache=cache, node_id="n", graph_ttl=30, mailbox_size=4, handoff=0)
        assert built.options == keyworded.options == options
        assert built.options.actor.mailbox_size == 4
        assert built.store is store
        assert built.cache is cache
