"""A node inside a web service: ``open_node`` opens what a node needs, starts it, and closes it all.

One call in the service's lifespan (ASGI, aiohttp's cleanup context, a worker's main)::

    async with graphcache.open_node(postgres=DSN, redis=URL, membership="redis") as node:
        ...  # serve requests
        graph = await node.get("order-42", min_version=version_the_client_wrote)
        return Response(graph.to_json(), media_type="application/json")

Without ``postgres`` the store is a ``MemoryStore``, without ``redis`` the cache a ``MemoryCache`` (one
process, nothing to run beside it: for tests and demos). ``node.store`` and ``node.cache`` are what it
opened, for writes (``node.apply``) and batched reads (``node.cache.get_many``).

Every argument is checked before anything is opened, most of them when ``open_node`` is called; a node
option takes the same keyword as ``Node`` (``consistency="strict"``, ``sweep_interval=30``, ...). What
was opened is closed in reverse order on exit (node, cache, store), and also when start-up fails half-way,
so a failed start leaves no pool, connection or task behind. A Redis that may evict graphcache's keys
(an ``allkeys-*`` policy) is reported at start-up as a warning, as ``graphcache serve`` does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio

from .actors import InvalidArgument, Membership, Node, NodeOptions, RedisMembership, StaticMembership
from .cache import MemoryCache, RedisCache, VersionedCache
from .storage import GraphStore, MemoryStore, PostgresStore

__all__ = ("default_node_id", "open_node")

logger = logging.getLogger(__name__)

MembershipKind = Literal["static", "redis"]
_MEMBERSHIPS = ("static", "redis")


def default_node_id() -> str:
    """``"<hostname>-<pid>"``: unique per process, not only per host.

    A web service runs several worker processes per host, and each one embeds a node. Two nodes that share
    an id would be one member to the ring and to Redis membership (so both would own the same roots, and
    when one left, the other would vanish from every view with it) and would overwrite each other's
    durable feed checkpoint, which is saved under the node id. The price of a per-process id is that a
    restarted worker has a new one, so it does not resume from its predecessor's checkpoint: the
    reconcile sweep at start-up catches it up instead. Pass a stable ``node_id`` per worker slot to resume.
    """
    return f"{socket.gethostname()}-{os.getpid()}"


def open_node(
    *,
    postgres: str | None = None,
    redis: str | None = None,
    node_id: str | None = None,
    schema: str = "graphcache",
    namespace: str = "gc",
    membership: MembershipKind = "static",
    ttl: float | None = None,
    **node_options: Any,
) -> contextlib.AbstractAsyncContextManager[Node]:
    """Open the store, the cache and the membership, start a ``Node`` on them, and close it all on exit.

    ``postgres`` is a ``postgresql://`` DSN (``schema`` holds graphcache's tables), ``redis`` a
    ``redis://`` URL (``namespace`` prefixes every key); None for either means the in-process one.
    ``membership="static"`` makes this node the only member (it rebuilds every root); ``"redis"`` (needs
    ``redis``) joins the nodes of every worker and host sharing the Redis and namespace, so each root is
    rebuilt by one of them. ``node_id`` defaults to ``default_node_id()`` (why: see there). ``ttl`` is how
    many seconds a cached graph lives (the node's ``graph_ttl``; None: until replaced). Any other keyword is
    a ``Node`` option. A bad argument raises its ``ValueError`` before anything is opened.
    """
    if membership not in _MEMBERSHIPS:
        raise InvalidArgument(f"membership must be one of {_MEMBERSHIPS}, got {membership!r}")
    if membership == "redis" and redis is None:
        raise InvalidArgument("membership='redis' needs redis=URL: the members meet in Redis")
    for name, value in (("postgres", postgres), ("redis", redis)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a URL (str) or None, not {type(value).__name__}")
    if ttl is not None and "graph_ttl" in node_options:
        raise InvalidArgument("ttl and graph_ttl are one option: pass one of them")
    if ttl is not None:
        node_options["graph_ttl"] = ttl
    options = NodeOptions.create(node_id=default_node_id() if node_id is None else node_id, **node_options)
    return _open(options, postgres=postgres, redis=redis, schema=schema, namespace=namespace, kind=membership)


@contextlib.asynccontextmanager
async def _open(
    options: NodeOptions,
    *,
    postgres: str | None,
    redis: str | None,
    schema: str,
    namespace: str,
    kind: MembershipKind,
) -> AsyncIterator[Node]:
    # The cache is created first, though it is opened second: creating it checks the URL and the namespace
    # and connects nothing (a RedisCache connects at first use), so a bad one is refused before any I/O.
    cache: VersionedCache = (
        MemoryCache() if redis is None else RedisCache.from_url(redis, namespace=namespace)
    )
    try:
        store = await _open_store(postgres, schema)
    except BaseException:
        await _close(cache)
        raise
    async with _closing(store), _closing(cache):  # left in reverse: the cache, then the store
        if isinstance(cache, RedisCache) and (warning := await cache.eviction_warning()) is not None:
            logger.warning("%s", warning)  # correctness holds under eviction; hit rates do not
        members: Membership
        if kind == "redis" and redis is not None:
            members = RedisMembership(redis, namespace=namespace)
        else:
            members = StaticMembership([options.node_id])
        async with Node.from_options(options, store=store, cache=cache, membership=members) as node:
            yield node


async def _open_store(postgres: str | None, schema: str) -> GraphStore:
    if postgres is None:
        return MemoryStore()
    return await PostgresStore.connect(postgres, schema=schema)


@contextlib.asynccontextmanager
async def _closing(resource: GraphStore | VersionedCache) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await _close(resource)


async def _close(resource: GraphStore | VersionedCache) -> None:
    # Shielded: a service shutting down cancels its lifespan, and a close cut short leaves sockets open.
    with anyio.CancelScope(shield=True):
        await resource.aclose()
