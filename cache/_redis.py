"""``RedisCache``: ``VersionedCache`` on Redis (single instance or Cluster).

Wire layout of one cache key ``K`` under namespace ``NS`` (documented in README.md, "Wire format (Redis)"):
``T = base64url(utf8(K))`` without padding, and all of K's state shares the hash tag ``{T}``::

    NS:{T}:i   hash  v = version (decimal string), d = value (msgpack); PEXPIRE = the item's ttl
    NS:{T}:f   string  the floor version (decimal); PEXPIRE = the invalidation ttl
    NS:{T}:l   string  "<token>:<fence>" of the lock holder; PEXPIRE = lock_timeout
    NS:{T}:c   string  fence counter (INCR), never expires so fences never repeat

Reads are one HMGET; every compare-and-write is one Lua script (see ``_scripts``) over those keys only,
so each call touches one slot on a Cluster. redis-py errors are mapped in ``_mapped`` and nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import random
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import _scripts as lua
from ._errors import (
    CacheError,
    CacheUnavailable,
    InvalidVersion,
    KeyExists,
    LockLost,
    ObjectLocked,
    VersionMismatch,
)
from ._types import DEFAULT_INVALIDATE_TTL, CacheItem, LockHandle
from ._validate import (
    DEFAULT_MAX_VALUE_BYTES,
    check_items,
    check_key,
    check_limit,
    check_seconds,
    check_type,
    check_version,
    check_wait,
    decode_value,
    encode_value,
)

__all__ = ("RedisCache", "RedisCacheStatistics")

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")
_UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.ClusterError, rex.RedisClusterException, OSError)
_NAME_CACHE_SIZE = 4096
"""Keys whose Redis names are kept precomputed (the hot set of a cache is usually small)."""
_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.05


class _Names(NamedTuple):
    item: bytes
    floor: bytes
    lock: bytes
    counter: bytes


class RedisCacheStatistics(NamedTuple):
    lock_waiters: int
    """Tasks inside ``get_and_lock(wait=...)`` backing off after finding the lock held."""


class RedisCache:
    """Versioned cache on Redis; see DESIGN.md for the semantics of each method.

    Build it with ``RedisCache.from_url(url, namespace="gc")`` (``cluster=True`` for a Redis Cluster),
    or wrap an existing ``redis.asyncio.Redis`` / ``RedisCluster`` client (left open by ``aclose``
    unless ``close_client=True``). The client must not decode responses.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        namespace: str = "gc",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        floor_ttl: float = DEFAULT_INVALIDATE_TTL,
        close_client: bool = False,
        address: str | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        self._client = client
        self._namespace = _check_namespace(namespace)
        self._prefix = f"{namespace}:{{".encode()
        self._max_value_bytes = check_limit(max_value_bytes)
        self._floor_ms = _millis(check_seconds(floor_ttl, name="floor_ttl", allow_none=False))
        self._close_client = close_client
        self._address = address or _describe(client)
        self._closed = False
        self._lock_waiters = 0
        self._name_cache: dict[str, _Names] = {}
        # A RedisCluster client raises instead of queueing when a node's pool is exhausted: queue here.
        self._limiter = None if max_concurrency is None else anyio.CapacityLimiter(max_concurrency)
        # redis-py's RedisCluster races when many tasks trigger its lazy topology discovery at once
        # (connections are closed under each other): discover once, under a lock, before the first call.
        self._discovered = not isinstance(client, RedisCluster)
        self._discovery = anyio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "gc",
        cluster: bool = False,
        connect_timeout: float = 2.0,
        socket_timeout: float = 2.0,
        max_connections: int = 64,
        pool_timeout: float = 10.0,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        floor_ttl: float = DEFAULT_INVALIDATE_TTL,
    ) -> RedisCache:
        """Connect lazily to ``url``; every call is bounded by the connect and socket timeouts.

        At most ``max_connections`` calls run at once (per node on a Cluster); the others queue for up
        to ``pool_timeout`` seconds. No automatic retries: a script such as ``insert`` is not
        idempotent, so a failed call raises ``CacheUnavailable`` and the caller decides. Dead pooled
        connections are replaced by themselves once Redis is back.
        """
        # Check the cache's own arguments before a client (and its pool) exists.
        _check_namespace(namespace)
        check_limit(max_value_bytes)
        check_seconds(floor_ttl, name="floor_ttl", allow_none=False)
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "max_connections": max_connections,
            "retry": Retry(NoBackoff(), 0),
        }
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **options)
        else:
            pool = BlockingConnectionPool.from_url(
                url, timeout=pool_timeout, health_check_interval=1, **options
            )
            client = Redis.from_pool(pool)
        return cls(
            client,
            namespace=namespace,
            max_value_bytes=max_value_bytes,
            floor_ttl=floor_ttl,
            close_client=True,
            address=_redact(url),
            max_concurrency=max_connections if cluster else None,
        )

    # -- reads -------------------------------------------------------------------------------------

    async def get(self, key: str, *, type: Any = None) -> CacheItem | None:
        names = self._names(key)
        decoder = check_type(type)
        reply = await self._read(names.item)
        if reply[1] is None:
            return None
        return CacheItem(key, decode_value(key, reply[1], decoder), int(reply[0]))

    async def get_if_newer(self, key: str, version: int, *, type: Any = None) -> CacheItem | None:
        names = self._names(key)
        check_version(version)
        decoder = check_type(type)
        reply = await self._run(lua.GET_IF_NEWER, (names.item,), (version,))
        if len(reply) < 3:
            return None
        return CacheItem(key, decode_value(key, reply[2], decoder), int(reply[1]))

    # -- writes ------------------------------------------------------------------------------------

    async def put_if_newer(self, key: str, value: Any, version: int, *, ttl: float | None = None) -> bool:
        names = self._names(key)
        check_version(version)
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.item, names.floor)
        return bool(await self._run(lua.PUT_IF_NEWER, keys, (version, data, ttl_ms)))

    async def put_many_if_newer(
        self, items: Sequence[tuple[str, Any, int]], *, ttl: float | None = None
    ) -> list[bool]:
        """``put_if_newer`` of each ``(key, value, version)`` in order, pipelined in one round trip.

        Every item is checked and encoded before any I/O (a bad one raises and nothing is written);
        each put is atomic on its own, the batch is not a transaction.
        """
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        calls = []
        for key, value, version in check_items(items):
            names = self._names(key)
            data = encode_value(value, limit=self._max_value_bytes)
            calls.append(((names.item, names.floor), (version, data, ttl_ms)))
        if not calls:
            return []
        if len(calls) == 1:  # one EVALSHA costs less than a pipeline of one
            keys, args = calls[0]
            return [bool(await self._run(lua.PUT_IF_NEWER, keys, args))]
        self._check_open()
        if not self._discovered:
            await self._discover()
        async with self._limiter if self._limiter is not None else contextlib.nullcontext():
            with self._mapped():
                pipe = self._client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.execute_command("EVALSHA", lua.PUT_IF_NEWER.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        stored = []
        for (keys, args), reply in zip(calls, replies, strict=True):
            answer = reply
            if isinstance(reply, rex.NoScriptError):  # the server lost its scripts: EVAL loads it again
                answer = await self._run(lua.PUT_IF_NEWER, keys, args)
            elif isinstance(reply, Exception):
                with self._mapped():
                    raise reply
            stored.append(bool(answer))
        return stored

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        names = self._names(key)
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.item, names.floor)
        return self._version_reply(key, None, await self._run(lua.ADD, keys, (data, ttl_ms)))

    async def insert(
        self,
        key: str,
        value: Any,
        *,
        version: int | None = None,
        lock: LockHandle | None = None,
        ttl: float | None = None,
    ) -> int:
        names = self._names(key)
        expected = "" if version is None else check_version(version)
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.item, names.floor, names.lock)
        reply = await self._run(lua.INSERT, keys, (data, ttl_ms, expected, _owner(key, lock)))
        return self._version_reply(key, version, reply, lock)

    async def remove(self, key: str, *, version: int | None = None, lock: LockHandle | None = None) -> bool:
        names = self._names(key)
        expected = "" if version is None else check_version(version)
        keys = (names.item, names.floor, names.lock)
        reply = await self._run(lua.REMOVE, keys, (expected, _owner(key, lock), self._floor_ms))
        return self._version_reply(key, version, reply, lock) == 1

    async def invalidate(self, key: str, version: int, *, ttl: float = DEFAULT_INVALIDATE_TTL) -> None:
        names = self._names(key)
        check_version(version)
        ttl_ms = _millis(check_seconds(ttl, name="ttl", allow_none=False))
        keys = (names.item, names.floor)
        await self._run(lua.INVALIDATE, keys, (version, ttl_ms))

    # -- pessimistic locks -------------------------------------------------------------------------

    async def get_and_lock(
        self, key: str, *, lock_timeout: float, wait: float = 0
    ) -> tuple[CacheItem | None, LockHandle]:
        names = self._names(key)
        timeout_ms = _millis(check_seconds(lock_timeout, name="lock_timeout", allow_none=False))
        deadline = time.monotonic() + check_wait(wait)
        keys = (names.item, names.lock, names.counter)
        token = secrets.token_hex(16)
        expires_at = time.time() + int(timeout_ms) / 1000
        reply = await self._run(lua.GET_AND_LOCK, keys, (token, timeout_ms))
        if reply[0] != lua.OK:
            self._lock_waiters += 1
            try:
                reply = await self._retry_lock(key, keys, (token, timeout_ms), deadline=deadline, reply=reply)
            finally:
                self._lock_waiters -= 1
            expires_at = time.time() + int(timeout_ms) / 1000
        item = None if reply[2] == b"" else CacheItem(key, decode_value(key, reply[3]), int(reply[2]))
        return item, LockHandle(key, token, int(reply[1]), expires_at)

    async def _retry_lock(
        self, key: str, keys: tuple[bytes, ...], args: tuple[str, str], *, deadline: float, reply: Any
    ) -> Any:
        """Retry with jittered exponential backoff; never sleep past ``deadline`` or the holder's expiry."""
        backoff = _FIRST_BACKOFF
        while reply[0] != lua.OK:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ObjectLocked(f"key {key!r} is locked (expires in {int(reply[1])} ms)")
            pause = min(remaining, backoff * random.uniform(0.5, 1.0), max(int(reply[1]), 1) / 1000)
            await anyio.sleep(pause)
            backoff = min(backoff * 2, _MAX_BACKOFF)
            reply = await self._run(lua.GET_AND_LOCK, keys, args)
        return reply

    async def put_and_unlock(
        self, key: str, value: Any, lock: LockHandle, *, ttl: float | None = None
    ) -> int:
        names = self._names(key)
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.item, names.floor, names.lock)
        reply = await self._run(lua.PUT_AND_UNLOCK, keys, (data, ttl_ms, _owner(key, lock)))
        return self._version_reply(key, None, reply, lock)

    async def unlock(self, key: str, lock: LockHandle) -> None:
        names = self._names(key)
        reply = await self._run(lua.UNLOCK, (names.lock,), (_owner(key, lock),))
        self._version_reply(key, None, reply, lock)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_client:
            with self._mapped():
                await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def statistics(self) -> RedisCacheStatistics:
        """This client's live state (the rest lives in Redis)."""
        return RedisCacheStatistics(lock_waiters=self._lock_waiters)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"open, {self._lock_waiters} waiting for locks"
        kind = "Cluster" if isinstance(self._client, RedisCluster) else "Redis"
        return f"<RedisCache [{kind} {self._address} | namespace {self._namespace!r} | {state}]>"

    def redis_keys(self, key: str) -> tuple[bytes, bytes, bytes, bytes]:
        """The Redis keys holding ``key``'s item, floor, lock and fence counter (the wire format)."""
        return tuple(self._names(key))  # type: ignore[return-value]

    # -- helpers -----------------------------------------------------------------------------------

    def _names(self, key: str) -> _Names:
        """``key``'s Redis key names, validating ``key`` the first time it is seen."""
        names = self._name_cache.get(key) if type(key) is str else None
        if names is None:
            check_key(key)
            base = self._prefix + base64.urlsafe_b64encode(key.encode()).rstrip(b"=") + b"}:"
            names = _Names(base + b"i", base + b"f", base + b"l", base + b"c")
            if len(self._name_cache) >= _NAME_CACHE_SIZE:
                self._name_cache.clear()
            self._name_cache[key] = names
        return names

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable(f"RedisCache for {self._address} is closed")

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """The one seam where redis-py and OS errors become cache errors."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise CacheUnavailable(f"Redis at {self._address} is unavailable: {exc!r}") from exc
        except rex.RedisError as exc:
            raise CacheError(f"Redis at {self._address} failed: {exc!r}") from exc

    async def _read(self, item_key: bytes) -> list[Any]:
        """The item hash's version and data in one HMGET."""
        self._check_open()
        if not self._discovered:
            await self._discover()
        if self._limiter is None:
            with self._mapped():
                return await self._client.execute_command("HMGET", item_key, b"v", b"d")  # type: ignore[no-any-return]
        async with self._limiter:
            with self._mapped():
                return await self._client.execute_command("HMGET", item_key, b"v", b"d")  # type: ignore[no-any-return]

    async def _run(
        self, script: lua.Script, keys: tuple[bytes, ...], args: tuple[bytes | str | int, ...]
    ) -> Any:
        self._check_open()
        if not self._discovered:
            await self._discover()
        if self._limiter is None:
            return await self._eval(script, keys, args)
        async with self._limiter:
            return await self._eval(script, keys, args)

    async def _discover(self) -> None:
        async with self._discovery:
            if not self._discovered:
                assert isinstance(self._client, RedisCluster)
                with self._mapped():
                    await self._client.initialize()
                self._discovered = True

    async def _eval(
        self, script: lua.Script, keys: tuple[bytes, ...], args: tuple[bytes | str | int, ...]
    ) -> Any:
        with self._mapped():
            try:
                return await self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except rex.NoScriptError:
                # The server lost its script cache (restart, SCRIPT FLUSH, failover): EVAL loads it again.
                return await self._client.execute_command("EVAL", script.source, len(keys), *keys, *args)

    def _version_reply(
        self, key: str, expected: int | None, reply: Any, lock: LockHandle | None = None
    ) -> int:
        """Turn a script's ``{status, value}`` reply into the new version or the matching error."""
        status = reply[0]
        if status == lua.OK:
            return int(reply[1])
        if status == lua.MISMATCH:
            current = None if reply[1] == b"" else int(reply[1])
            raise VersionMismatch(key, expected if expected is not None else -1, current)
        if status == lua.EXISTS:
            raise KeyExists(f"key {key!r} already holds an item")
        if status == lua.LOCKED:
            raise ObjectLocked(f"key {key!r} is locked by another handle")
        if status == lua.LOST:
            fence = "none" if lock is None else lock.fence
            raise LockLost(f"lock on {key!r} (fence {fence}) expired or is not this handle's")
        if status == lua.OVERFLOW:
            raise InvalidVersion(f"key {key!r} is at version 2**63-1 and cannot be versioned higher")
        raise CacheError(f"unexpected reply from Redis at {self._address}: {reply!r}")


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must match [A-Za-z0-9_.-]+, got {namespace!r}")
    return namespace


def _owner(key: str, lock: LockHandle | None) -> str:
    """The lock value a handle proves; a handle for another key proves nothing."""
    if lock is None:
        return ""
    if lock.key != key:
        return "-"
    return f"{lock.token}:{lock.fence}"


def _millis(seconds: float | None) -> str:
    """Milliseconds for PEXPIRE/PX ("" for no expiry), at least 1 so a tiny ttl still expires."""
    if seconds is None:
        return ""
    return str(max(1, round(seconds * 1000)))


def _describe(client: Redis | RedisCluster) -> str:
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes() or []
        return ",".join(f"{n.host}:{n.port}" for n in nodes) or "a Redis Cluster"
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
