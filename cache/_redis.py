"""``RedisCache``: ``VersionedCache`` on Redis (single instance or Cluster).

Wire format 2 (documented in docs/wire-format.md), for a cache key ``K`` under namespace
``NS``: ``T = base64url(utf8(K))`` without padding, and all of K's state shares the hash tag ``{T}``::

    NS:{T}:e   hash    v = version (decimal), d = value (msgpack), fl = floor (decimal, only while no
                       item is stored), inc = incarnation (decimal); one expiry for all of it
    NS:{T}:l   string  "<token>:<fence>" of the lock holder; PEXPIRE = lock_timeout
    NS:{T}:c   string  the last fence granted (a fence is never below the server clock in microseconds)

Everything that decides a put lives in the one hash, so Redis keeps or loses it whole (see
``_scripts``). Reads are one HMGET; every compare-and-write is one Lua script over those keys only, so
each call touches one slot on a Cluster. redis-py errors are mapped in ``_mapped`` and nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import random
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import msgspec
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import _scripts as lua
from ._errors import (
    CacheError,
    CacheUnavailable,
    InvalidArgument,
    InvalidValue,
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
    check_keys,
    check_lease,
    check_limit,
    check_seconds,
    check_ttl,
    check_type,
    check_version,
    decode_value,
    encode_value,
    parse_version,
)

__all__ = ("RedisCache", "RedisCacheStatistics")

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # also BusyLoadingError (a server loading its data after a restart)
    rex.TimeoutError,
    rex.ClusterError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,  # a failover left this client on a replica
    rex.OutOfMemoryError,  # maxmemory reached under noeviction: may pass once memory is freed
    rex.RedisClusterException,  # topology changing under the client
    rex.MaxConnectionsError,
    OSError,
    TimeoutError,
    EOFError,  # a reply cut short (asyncio.IncompleteReadError)
)
_UNAVAILABLE_REPLIES = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MASTERDOWN",
    "MOVED",
    "ASK",
)
"""Error replies that retrying can cure, whatever class redis-py gave them."""
_LEASE_TTL = 600.0
"""Seconds a key that holds only an incarnation (a lease taken, nothing put yet) lives."""
_NAME_CACHE_SIZE = 4096
"""Keys whose Redis names are kept precomputed (the hot set of a cache is usually small)."""
_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.05


PutItem = tuple[str, Any, int] | tuple[str, Any, int, int | None]
"""``(key, value, version)`` or ``(key, value, version, lease)`` for ``put_many_if_newer``."""
_Call = tuple[lua.Script, tuple[bytes, ...], tuple[Any, ...]]


class _Names(NamedTuple):
    entry: bytes
    lock: bytes
    counter: bytes


class RedisCacheStatistics(NamedTuple):
    lock_waiters: int
    """Tasks inside ``get_and_lock(wait=...)`` backing off after finding the lock held."""
    poisoned: int = 0
    """Malformed stored entries found (served as misses and removed)."""


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
        self._floor_ms = _millis(check_seconds(floor_ttl, name="floor_ttl"))
        self._close_client = close_client
        self._address = address or _describe(client)
        self._closed = False
        self._lock_waiters = 0
        self._poisoned = 0
        self._lease_ms = _millis(_LEASE_TTL)
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
        check_seconds(floor_ttl, name="floor_ttl")
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "max_connections": max_connections,
            "retry": Retry(NoBackoff(), 0),
        }
        if not isinstance(url, str):
            raise InvalidArgument(f"a Redis URL must be a str, not {type(url).__name__}")
        client: Redis | RedisCluster
        try:  # parses the URL; connects nothing yet
            if cluster:
                client = RedisCluster.from_url(url, **options)
            else:
                pool = BlockingConnectionPool.from_url(
                    url, timeout=pool_timeout, health_check_interval=1, **options
                )
                client = Redis.from_pool(pool)
        except ValueError as exc:  # redis-py's word for a URL it cannot use
            raise InvalidArgument(f"not a usable Redis URL: {_redact(url)!r} ({exc})") from exc
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
        return await self._entry_item(key, names, await self._read(names.entry), decoder)

    async def get_many(self, keys: Sequence[str], *, type: Any = None) -> list[CacheItem | None]:
        """``get`` of each key, in order, in one pipelined round trip (a Cluster: one per master).

        Every key is checked first. A malformed entry is a miss (counted and removed, as in ``get``); a
        well-formed value that is not of ``type`` raises ``InvalidValue``, as in ``get``.
        """
        checked = check_keys(keys)
        decoder = check_type(type)
        names = [self._names(key) for key in checked]
        if not names:
            return []
        replies = await self._pipeline([("HMGET", name.entry, b"v", b"d") for name in names])
        found = []
        for key, name, reply in zip(checked, names, replies, strict=True):
            if isinstance(reply, Exception) and not _wrong_type(reply):
                with self._mapped():  # e.g. a Cluster node that failed mid-pipeline: not a miss
                    raise reply
            entry = None if isinstance(reply, Exception) else reply  # None: another Redis type there
            found.append(await self._entry_item(key, name, entry, decoder))
        return found

    async def _entry_item(
        self, key: str, names: _Names, reply: list[Any] | None, decoder: Any
    ) -> CacheItem | None:
        """The item an entry's HMGET ``v``, ``d`` reply holds (None for a key of another type): a miss if
        absent or malformed."""
        if reply is None:
            return await self._poisoned_entry(key, names, b"")
        raw, data = reply
        if raw is None and data is None:
            return None
        version = parse_version(raw)
        if version is None or data is None:
            return await self._poisoned_entry(key, names, raw)
        return await self._item(key, names, raw, data, decoder)

    async def get_if_newer(self, key: str, version: int, *, type: Any = None) -> CacheItem | None:
        names = self._names(key)
        check_version(version)
        decoder = check_type(type)
        reply = await self._run(lua.GET_IF_NEWER, (names.entry,), (version,))
        if reply[0] == lua.POISONED:
            return await self._poisoned_entry(key, names, reply[1] if len(reply) > 1 else b"")
        if len(reply) < 3:
            return None
        if reply[2] is None:
            return await self._poisoned_entry(key, names, reply[1])
        return await self._item(key, names, reply[1], reply[2], decoder)

    async def _item(self, key: str, names: _Names, raw: bytes, data: bytes, decoder: Any) -> CacheItem | None:
        try:
            return CacheItem(key, decode_value(key, data, decoder), int(raw))
        except InvalidValue:
            if decoder is not _UNTYPED and _decodes(data):
                raise  # well-formed msgpack that is not of the caller's type: the caller's to judge
            return await self._poisoned_entry(key, names, raw)

    async def versions(self, keys: Sequence[str]) -> list[int | None]:
        """The stored version of each key (None: absent or malformed), in one pipelined round trip."""
        entries = [self._names(key).entry for key in check_keys(keys)]
        if not entries:
            return []
        commands = [
            command for entry in entries for command in (("HGET", entry, b"v"), ("HEXISTS", entry, b"d"))
        ]
        replies = await self._pipeline(commands)
        found: list[int | None] = []
        for raw, has_value in zip(replies[::2], replies[1::2], strict=True):
            for reply in (raw, has_value):
                if isinstance(reply, Exception) and not _wrong_type(reply):
                    with self._mapped():  # e.g. a Cluster node that failed mid-pipeline: not a miss
                        raise reply
            found.append(None if isinstance(raw, Exception) or not has_value else parse_version(raw))
        return found

    async def discard(self, key: str, version: int) -> bool:
        """Drop ``key``'s whole state if its item is stored at exactly ``version`` (a malformed entry a
        reader found); like a loss, it ends the key's incarnation, so no put leased before succeeds."""
        names = self._names(key)
        check_version(version)
        return bool(await self._run(lua.DISCARD, (names.entry,), (version,)))

    # -- leases --------------------------------------------------------------------------------------

    async def lease(self, key: str) -> int:
        """The key's incarnation (created if absent); take it before loading what you will put."""
        names = self._names(key)
        return int(await self._run(lua.LEASE, (names.entry,), (_new_incarnation(), self._lease_ms)))

    async def lease_many(self, keys: Sequence[str]) -> list[int]:
        """``lease`` of each key, pipelined in one round trip."""
        entries = [self._names(key).entry for key in check_keys(keys)]
        if not entries:
            return []
        calls = [(lua.LEASE, (entry,), (_new_incarnation(), self._lease_ms)) for entry in entries]
        return [int(reply) for reply in await self._scripts(calls)]

    # -- writes ------------------------------------------------------------------------------------

    async def put_if_newer(
        self, key: str, value: Any, version: int, *, ttl: float | None = None, lease: int | None = None
    ) -> bool:
        names = self._names(key)
        check_version(version)
        ttl_ms = _millis(check_ttl(ttl))
        expected = _lease_arg(check_lease(lease))
        data = encode_value(value, limit=self._max_value_bytes)
        args = (version, data, ttl_ms, expected, _new_incarnation())
        return bool(await self._run(lua.PUT_IF_NEWER, (names.entry,), args) == lua.STORED)

    async def put_many_if_newer(
        self,
        items: Sequence[tuple[str, Any, int] | tuple[str, Any, int, int | None]],
        *,
        ttl: float | None = None,
    ) -> list[bool]:
        """``put_if_newer`` of each ``(key, value, version)`` or ``(key, value, version, lease)`` in
        order, pipelined in one round trip.

        Every item is checked and encoded before any I/O (a bad one raises and nothing is written);
        each put is atomic on its own, the batch is not a transaction.
        """
        ttl_ms = _millis(check_ttl(ttl))
        calls = []
        for key, value, version, lease in check_items(items):
            entry = self._names(key).entry
            data = encode_value(value, limit=self._max_value_bytes)
            args = (version, data, ttl_ms, _lease_arg(lease), _new_incarnation())
            calls.append((lua.PUT_IF_NEWER, (entry,), args))
        return [reply == lua.STORED for reply in await self._scripts(calls)]

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        names = self._names(key)
        ttl_ms = _millis(check_ttl(ttl))
        data = encode_value(value, limit=self._max_value_bytes)
        reply = await self._run(lua.ADD, (names.entry,), (data, ttl_ms, _new_incarnation()))
        return self._version_reply(key, None, reply)

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
        ttl_ms = _millis(check_ttl(ttl))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.entry, names.lock)
        args = (data, ttl_ms, expected, _owner(key, lock), _new_incarnation())
        reply = await self._run(lua.INSERT, keys, args)
        return self._version_reply(key, version, reply, lock)

    async def remove(self, key: str, *, version: int | None = None, lock: LockHandle | None = None) -> bool:
        names = self._names(key)
        expected = "" if version is None else check_version(version)
        keys = (names.entry, names.lock)
        args = (expected, _owner(key, lock), self._floor_ms, _new_incarnation())
        reply = await self._run(lua.REMOVE, keys, args)
        return self._version_reply(key, version, reply, lock) == 1

    async def invalidate(self, key: str, version: int, *, ttl: float = DEFAULT_INVALIDATE_TTL) -> None:
        names = self._names(key)
        check_version(version)
        ttl_ms = _millis(check_seconds(ttl, name="ttl"))
        await self._run(lua.INVALIDATE, (names.entry,), (version, ttl_ms, _new_incarnation()))

    # -- pessimistic locks -------------------------------------------------------------------------

    async def get_and_lock(
        self, key: str, *, lock_timeout: float, wait: float = 0, type: Any = None
    ) -> tuple[CacheItem | None, LockHandle]:
        names = self._names(key)
        decoder = check_type(type)
        timeout_ms = _millis(check_seconds(lock_timeout, name="lock_timeout"))
        deadline = time.monotonic() + check_seconds(wait, name="wait", allow_zero=True)
        keys = (names.entry, names.lock, names.counter)
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
        handle = LockHandle(key, token, int(reply[1]), expires_at)
        item = None
        if reply[2] != b"" and reply[3] is None:  # a version without a value: malformed
            self._poisoned += 1  # the lock's put_and_unlock replaces it
        elif reply[2] != b"":
            try:
                item = CacheItem(key, decode_value(key, reply[3], decoder), int(reply[2]))
            except InvalidValue:
                if decoder is _UNTYPED or not _decodes(reply[3]):
                    self._poisoned += 1  # the lock's put_and_unlock replaces it
                else:  # not of the caller's type: no handle reaches the caller, so do not keep the lock
                    with contextlib.suppress(CacheError):
                        await self.unlock(key, handle)
                    raise
        return item, handle

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
        ttl_ms = _millis(check_ttl(ttl))
        data = encode_value(value, limit=self._max_value_bytes)
        keys = (names.entry, names.lock)
        args = (data, ttl_ms, _owner(key, lock), _new_incarnation())
        reply = await self._run(lua.PUT_AND_UNLOCK, keys, args)
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
        return RedisCacheStatistics(lock_waiters=self._lock_waiters, poisoned=self._poisoned)

    async def eviction_warning(self) -> str | None:
        """A warning if Redis may evict keys of any kind (``allkeys-*`` under ``maxmemory``), else None.

        Guarantees hold under eviction (leases refuse what a loss would let through), but every evicted
        graph costs a rebuild or a read-through. None also when the server does not allow CONFIG GET.
        """
        try:
            with self._mapped():
                reply = await self._client.config_get("maxmemory-policy")
        except CacheError:
            return None
        policies = set(_policies(reply))
        evicting = sorted(p for p in policies if p.startswith("allkeys-"))
        if not evicting:
            return None
        return (
            f"Redis at {self._address} runs maxmemory-policy {', '.join(evicting)}: it may evict graphcache"
            " keys; correctness holds, but every evicted graph must be rebuilt (use noeviction or"
            " volatile-* for a cache that other data shares)"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"open, {self._lock_waiters} waiting for locks"
        kind = "Cluster" if isinstance(self._client, RedisCluster) else "Redis"
        return f"<RedisCache [{kind} {self._address} | namespace {self._namespace!r} | {state}]>"

    def redis_keys(self, key: str) -> tuple[bytes, bytes, bytes]:
        """The Redis keys holding ``key``'s entry hash, lock and last fence (wire format 2)."""
        return tuple(self._names(key))  # type: ignore[return-value]

    # -- helpers -----------------------------------------------------------------------------------

    def _names(self, key: str) -> _Names:
        """``key``'s Redis key names, validating ``key`` the first time it is seen."""
        names = self._name_cache.get(key) if type(key) is str else None
        if names is None:
            check_key(key)
            base = self._prefix + base64.urlsafe_b64encode(key.encode()).rstrip(b"=") + b"}:"
            names = _Names(base + b"e", base + b"l", base + b"c")
            if len(self._name_cache) >= _NAME_CACHE_SIZE:
                self._name_cache.clear()
            self._name_cache[key] = names
        return names

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable(f"RedisCache for {self._address} is closed")

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """The one seam where redis-py and OS errors become cache errors (``_classify`` decides which)."""
        try:
            yield
        except CacheError:
            raise
        except Exception as exc:  # broad on purpose: nothing foreign may escape the cache tier
            raise _classify(exc, self._address) from exc

    async def _read(self, entry: bytes) -> list[Any] | None:
        """The entry's version and data in one HMGET; None if the key holds another type (malformed)."""
        self._check_open()
        if not self._discovered:
            await self._discover()
        if self._limiter is None:
            return await self._hmget(entry)
        async with self._limiter:
            return await self._hmget(entry)

    async def _hmget(self, entry: bytes) -> list[Any] | None:
        with self._mapped():
            try:
                return await self._client.execute_command("HMGET", entry, b"v", b"d")  # type: ignore[no-any-return]
            except rex.ResponseError as exc:
                if _wrong_type(exc):
                    return None
                raise

    async def _poisoned_entry(self, key: str, names: _Names, raw: bytes | None) -> CacheItem | None:
        """Count a malformed entry and remove it (only if it is still the one read): a reader's miss."""
        self._poisoned += 1
        raw = raw or b""
        logger.warning("cache entry of %r is malformed (v=%r): served as a miss and removed", key, raw[:40])
        await self._run(lua.DISCARD, (names.entry,), (raw,))
        return None

    async def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run ``commands`` in one pipeline (not a transaction); each reply or its error, in order."""
        self._check_open()
        if not self._discovered:
            await self._discover()
        async with self._limiter if self._limiter is not None else contextlib.nullcontext():
            with self._mapped():
                pipe = self._client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _scripts(
        self, calls: Sequence[tuple[lua.Script, tuple[bytes, ...], tuple[Any, ...]]]
    ) -> list[Any]:
        """Each script call's reply, pipelined in one round trip (a lone call is a plain EVALSHA)."""
        if not calls:
            return []
        if len(calls) == 1:  # one EVALSHA costs less than a pipeline of one
            script, keys, args = calls[0]
            return [await self._run(script, keys, args)]
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
        replies = await self._pipeline(commands)
        answers = []
        for (script, keys, args), reply in zip(calls, replies, strict=True):
            answer = reply
            if isinstance(reply, rex.NoScriptError):  # the server lost its scripts: EVAL loads it again
                answer = await self._run(script, keys, args)
            elif isinstance(reply, Exception):
                with self._mapped():
                    raise reply
            answers.append(answer)
        return answers

    async def _run(self, script: lua.Script, keys: tuple[bytes, ...], args: tuple[Any, ...]) -> Any:
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

    async def _eval(self, script: lua.Script, keys: tuple[bytes, ...], args: tuple[Any, ...]) -> Any:
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
        raise InvalidArgument(f"namespace must match [A-Za-z0-9_.-]+, got {namespace!r}")
    return namespace


def _classify(exc: Exception, address: str) -> CacheError:
    """The one place that decides whether a foreign error may pass (``CacheUnavailable``) or not."""
    # Not repr(exc): redis-py 8 renders its errors' repr as a category ("network:ConnectionError"),
    # which drops the message that says what happened.
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, rex.ResponseError) and not isinstance(exc, _UNAVAILABLE):
        if str(exc).startswith(_UNAVAILABLE_REPLIES):
            return CacheUnavailable(f"Redis at {address} is unavailable: {text}")
        return CacheError(f"Redis at {address} failed: {text}")
    if isinstance(exc, _UNAVAILABLE):
        return CacheUnavailable(f"Redis at {address} is unavailable: {text}")
    if isinstance(exc, rex.RedisError):
        return CacheError(f"Redis at {address} failed: {text}")
    # redis-py's own state errors (an AttributeError on a connection torn down by a Cluster failover,
    # say) come from a client caught mid-reconnect: the next call gets a fresh connection.
    return CacheUnavailable(f"Redis client for {address} failed internally: {text}")


def _policies(reply: Any) -> list[str]:
    """The maxmemory-policy values in a CONFIG GET reply (a Cluster answers per node, nested)."""
    if not isinstance(reply, dict):
        return []
    found = []
    for name, value in reply.items():
        if isinstance(value, dict):
            found.extend(_policies(value))
        elif name in ("maxmemory-policy", b"maxmemory-policy"):
            found.append(value.decode() if isinstance(value, bytes) else str(value))
    return found


def _wrong_type(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a command on a key of another type (a malformed entry)."""
    return isinstance(exc, rex.ResponseError) and str(exc).startswith("WRONGTYPE")


def _lease_arg(lease: int | None) -> str | int:
    """A lease as a script argument ("" for none)."""
    return "" if lease is None else lease


def _new_incarnation() -> int:
    """A random incarnation for a key the script may create (used only if the key has none)."""
    return secrets.randbits(63) or 1


_UNTYPED = check_type(None)
_probe = msgspec.msgpack.Decoder()


def _decodes(data: bytes) -> bool:
    """Whether ``data`` is well-formed msgpack at all (else the entry is malformed, not mistyped)."""
    try:
        _probe.decode(data)
    except msgspec.DecodeError:
        return False
    return True


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
