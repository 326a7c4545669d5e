"""Who is in the cluster: a fixed list, or heartbeats with expiry in Redis.

`RedisMembership` keeps the whole view in ONE sorted set, ``<namespace>:members`` (one key, so one
Redis Cluster slot): member = node id, score = the member's expiry in milliseconds by the Redis
server's clock. One Lua script does a heartbeat in a single step: read ``TIME``, drop the expired
members, (re)add this node with expiry ``now + ttl``, return the live members. Node clocks never
matter and no node needs to know its siblings' addresses. The key itself expires ``ttl`` after the
last heartbeat, so a cluster that is gone leaves nothing behind.

Timing: a node sees joins and leaves at its next heartbeat (within ``heartbeat`` seconds); a node that
stops heartbeating (crash, partition) drops out of every view within ``ttl + heartbeat`` seconds of
its last heartbeat. While Redis is unreachable a node keeps its last view, logs once per outage and
keeps retrying every ``heartbeat`` seconds; it never crashes because of Redis. For ``ttl`` after an
outage it keeps the members of its last view too, so a Redis restarted empty does not make every
node briefly see itself alone while the others re-register.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import NamedTuple, Protocol

import anyio
import anyio.abc
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ._errors import InvalidArgument
from ._ring import validate_node_id

__all__ = (
    "InvalidMembershipConfig",
    "Membership",
    "MembershipStatistics",
    "RedisMembership",
    "StaticMembership",
)

logger = logging.getLogger(__name__)

RedisClient = aioredis.Redis | aioredis.RedisCluster

# KEYS[1] = the members set; ARGV[1] = node id, ARGV[2] = ttl in ms. Returns the live members.
_HEARTBEAT_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now))
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class InvalidMembershipConfig(InvalidArgument):
    """A membership argument is out of range (e.g. not ``ttl > heartbeat > 0``)."""


class Membership(Protocol):
    """The current set of live node ids, and its changes."""

    async def run(
        self, node_id: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Join as ``node_id``, call ``task_status.started()`` once the first view is known, keep
        heartbeating / watching until cancelled, then leave (deregister, shielded, best effort)."""

    def members(self) -> frozenset[str]:
        """The current view (empty until the first view is known)."""

    def views(self) -> AsyncIterator[frozenset[str]]:
        """Yield the current view once it is known, then every changed view. A slow consumer may
        skip intermediate views but always gets the latest."""


class MembershipStatistics(NamedTuple):
    members: int
    heartbeats: int
    failures: int
    connected: bool


def _validate_static_view(nodes: Iterable[str]) -> frozenset[str]:
    view = frozenset(validate_node_id(node) for node in nodes)
    if not view:
        raise InvalidMembershipConfig("a static view needs at least one node id")
    return view


class StaticMembership:
    """A fixed view: ``StaticMembership(["a", "b", "c"])``. ``run`` just waits until cancelled."""

    def __init__(self, nodes: Iterable[str]) -> None:
        self._view = _validate_static_view(nodes)

    async def run(
        self, node_id: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        validate_node_id(node_id)
        task_status.started()
        await anyio.sleep_forever()

    def members(self) -> frozenset[str]:
        return self._view

    async def views(self) -> AsyncIterator[frozenset[str]]:
        yield self._view
        await anyio.sleep_forever()

    def __repr__(self) -> str:
        return f"<StaticMembership members={sorted(self._view)}>"


class _ViewBroadcast:
    """The latest view, and an event per change so any number of `views()` iterators can wait."""

    def __init__(self) -> None:
        self.current: frozenset[str] | None = None
        self._changed = anyio.Event()

    def publish(self, view: frozenset[str]) -> bool:
        if view == self.current:
            return False
        self.current = view
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return True

    async def views(self) -> AsyncIterator[frozenset[str]]:
        seen: frozenset[str] | None = None
        while True:
            view, changed = self.current, self._changed
            if view is not None and view != seen:
                seen = view
                yield view
            await changed.wait()


def _validate_seconds(heartbeat: float, ttl: float) -> tuple[float, float]:
    for name, value in (("heartbeat", heartbeat), ("ttl", ttl)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidMembershipConfig(f"{name} must be a finite number of seconds, got {value!r}")
    if not ttl > heartbeat > 0:
        raise InvalidMembershipConfig(f"need ttl > heartbeat > 0, got heartbeat={heartbeat!r} ttl={ttl!r}")
    return float(heartbeat), float(ttl)


def _validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise InvalidMembershipConfig(f"namespace must be a non-empty str, got {namespace!r}")
    return namespace


def _decode_view(raw: list[bytes | str]) -> frozenset[str]:
    return frozenset(item.decode() if isinstance(item, bytes) else item for item in raw)


class RedisMembership:
    """Heartbeats with expiry in Redis: ``RedisMembership("redis://...", namespace="gc")``.

    ``client_or_url`` is a ``redis.asyncio`` client (``Redis`` or ``RedisCluster``; the caller closes
    it) or a URL (a client is opened by `run` and closed when it returns).
    """

    def __init__(
        self,
        client_or_url: RedisClient | str,
        *,
        namespace: str = "gc",
        heartbeat: float = 1.0,
        ttl: float = 3.0,
    ) -> None:
        if not isinstance(client_or_url, str | aioredis.Redis | aioredis.RedisCluster):
            raise InvalidMembershipConfig(f"need a redis.asyncio client or a URL, got {client_or_url!r}")
        self._client_or_url = client_or_url
        self._key = f"{_validate_namespace(namespace)}:members"
        self._heartbeat, self._ttl = _validate_seconds(heartbeat, ttl)
        self._broadcast = _ViewBroadcast()
        self._node_id: str | None = None
        self._heartbeats = 0
        self._failures = 0
        self._connected = False
        self._grace_until = 0.0  # monotonic time until which an outage's last view is kept

    @property
    def key(self) -> str:
        """The Redis key holding the members set."""
        return self._key

    async def run(
        self, node_id: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        validate_node_id(node_id)
        if self._node_id is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._node_id = node_id
        client = (
            aioredis.Redis.from_url(self._client_or_url)
            if isinstance(self._client_or_url, str)
            else self._client_or_url
        )
        try:
            await self._heartbeat_forever(client, node_id, task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave(client, node_id)
                if isinstance(self._client_or_url, str):
                    await client.aclose()
                self._node_id = None
                self._connected = False

    async def _heartbeat_forever(
        self, client: RedisClient, node_id: str, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        script = client.register_script(_HEARTBEAT_LUA)
        view_known = False
        next_beat = anyio.current_time()
        while True:
            reached = await self._beat(script, node_id)
            if not view_known:
                # Redis down at start: begin alone rather than hang the node's startup. Owning every
                # root is safe (versioned puts decide, placement only buys speed); the shared view is
                # merged in at the first heartbeat that reaches Redis.
                if not reached:
                    self._broadcast.publish(frozenset({node_id}))
                view_known = True
                task_status.started()
            # A fixed rate, so a slow heartbeat does not stretch the gap between two beats past ``ttl``;
            # after a stall (a blocked loop) start afresh rather than beating in a burst.
            next_beat = max(next_beat + self._heartbeat, anyio.current_time())
            await anyio.sleep_until(next_beat)

    async def _beat(self, script: AsyncScript, node_id: str) -> bool:
        """One heartbeat; True if it reached Redis. Failures are logged, never raised."""
        started = time.monotonic()
        try:
            with anyio.fail_after(self._heartbeat):
                raw = await script(keys=[self._key], args=[node_id, int(self._ttl * 1000)])
        # Broad on purpose: besides RedisError and OS errors, redis-py raises its own internal errors
        # (AttributeError, ...) while a connection is torn down under it; none may end the heartbeats.
        except Exception as exc:
            self._on_failure(exc, time.monotonic() - started)
            return False
        if not self._connected:
            logger.info("membership %s: heartbeats reach Redis (%s)", node_id, self._key)
            if self._broadcast.current is not None:
                self._grace_until = time.monotonic() + self._ttl
        self._connected = True
        self._heartbeats += 1
        if self._broadcast.publish(self._merge_view(_decode_view(raw))):
            logger.info("membership %s: view is now %s", node_id, sorted(self._broadcast.current or ()))
        return True

    def _merge_view(self, fetched: frozenset[str]) -> frozenset[str]:
        """The view to publish. For ``ttl`` after an outage, members of the last view are kept: a
        restarted Redis may have lost the set, and the live members re-register within a heartbeat."""
        last = self._broadcast.current
        if last is None or time.monotonic() >= self._grace_until:
            return fetched
        return fetched | last

    def _on_failure(self, exc: BaseException, elapsed: float) -> None:
        self._failures += 1
        if self._connected or self._failures == 1:
            logger.warning(
                "membership %s: heartbeat failed after %.2fs, keeping the last view and retrying: %r",
                self._node_id,
                elapsed,
                exc,
            )
        self._connected = False

    async def _leave(self, client: RedisClient, node_id: str) -> None:
        """Deregister at once (best effort: if Redis is away, expiry removes us after ``ttl``)."""
        try:
            with anyio.fail_after(self._heartbeat):
                await client.zrem(self._key, node_id)
        except Exception as exc:  # broad on purpose: leaving is best effort (see _beat)
            logger.warning("membership %s: could not leave, expiry will remove it: %r", node_id, exc)

    def members(self) -> frozenset[str]:
        return self._broadcast.current or frozenset()

    def views(self) -> AsyncIterator[frozenset[str]]:
        return self._broadcast.views()

    def statistics(self) -> MembershipStatistics:
        return MembershipStatistics(
            members=len(self.members()),
            heartbeats=self._heartbeats,
            failures=self._failures,
            connected=self._connected,
        )

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return (
            f"<RedisMembership key={self._key!r} node={self._node_id!r} members={len(self.members())} "
            f"{state} heartbeat={self._heartbeat} ttl={self._ttl}>"
        )
