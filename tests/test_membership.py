"""Membership: a fixed view, and heartbeats with expiry in Redis (join, leave, crash, outage)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis

from graphcache.actors import InvalidMembershipConfig, InvalidNodeId, RedisMembership, StaticMembership
from tests._redis_servers import PrivateRedis

pytestmark = pytest.mark.anyio

FAST = {"heartbeat": 0.1, "ttl": 1.0}
DEADLINE = 20.0  # hang protection only; the properties below are "eventually"
REPO = Path(__file__).resolve().parent.parent

# A member in its own OS process, so the test can SIGKILL it: no leave, no shielded cleanup.
CRASHING_MEMBER = """
import sys, anyio
from graphcache.actors import RedisMembership

async def main():
    url, namespace, node_id = sys.argv[1:]
    membership = RedisMembership(url, namespace=namespace, heartbeat=0.1, ttl=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(membership.run, node_id)
        print("joined", flush=True)

anyio.run(main)
"""


async def _run_member(
    membership: RedisMembership,
    node_id: str,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await membership.run(node_id, task_status=task_status)


@asynccontextmanager
async def members_running(
    memberships: dict[str, RedisMembership],
) -> AsyncIterator[dict[str, anyio.CancelScope]]:
    """Start each membership as its node (one after another); yield a cancel scope per node."""
    async with anyio.create_task_group() as tg:
        scopes = {node_id: anyio.CancelScope() for node_id in memberships}
        for node_id, membership in memberships.items():
            await tg.start(_run_member, membership, node_id, scopes[node_id])
        yield scopes
        tg.cancel_scope.cancel()


async def view_where(
    membership: RedisMembership, predicate: Callable[[frozenset[str]], bool]
) -> frozenset[str]:
    """The first view of ``membership`` that satisfies ``predicate``."""
    with anyio.fail_after(DEADLINE):
        async with aclosing(membership.views()) as views:  # type: ignore[type-var]
            async for view in views:
                if predicate(view):
                    return view
    raise AssertionError("views() ended")


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds (used only for "eventually" properties)."""
    with anyio.fail_after(DEADLINE):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


def trio(url: str, namespace: str, **timing: float) -> dict[str, RedisMembership]:
    return {node: RedisMembership(url, namespace=namespace, **timing) for node in ("a", "b", "c")}


async def test_three_members_see_each_other(redis_url: str, namespace: str) -> None:
    """Each of three members ends up with the view {a, b, c}."""
    memberships = trio(redis_url, namespace, **FAST)
    async with members_running(memberships):
        for membership in memberships.values():
            assert await view_where(membership, lambda v: len(v) == 3) == {"a", "b", "c"}


async def test_a_leaving_member_is_dropped_long_before_its_ttl(redis_url: str, namespace: str) -> None:
    """Cancelling a member deregisters it at once: others drop it although its ttl is 60 s."""
    memberships = trio(redis_url, namespace, heartbeat=0.1, ttl=60.0)
    async with members_running(memberships) as scopes:
        await view_where(memberships["a"], lambda v: len(v) == 3)
        scopes["c"].cancel()
        assert await view_where(memberships["a"], lambda v: "c" not in v) == {"a", "b"}
        assert await view_where(memberships["b"], lambda v: "c" not in v) == {"a", "b"}


async def test_the_score_is_the_expiry_by_the_redis_servers_clock(redis_url: str, namespace: str) -> None:
    """The members set scores each node with the server's TIME of its last heartbeat plus ttl, in ms."""
    membership = RedisMembership(redis_url, namespace=namespace, heartbeat=0.1, ttl=30.0)
    async with members_running({"a": membership}), aioredis.Redis.from_url(redis_url) as client:
        seconds, micros = await client.time()
        score = await client.zscore(membership.key, "a")
        assert score is not None
        assert 0 < score - (seconds * 1000 + micros // 1000) <= 30_000
        assert 0 < await client.pttl(membership.key) <= 30_000


async def test_the_members_key_is_gone_when_everyone_left(redis_url: str, namespace: str) -> None:
    """After every member left, no key of the namespace remains in Redis."""
    memberships = trio(redis_url, namespace, **FAST)
    async with members_running(memberships):
        await view_where(memberships["a"], lambda v: len(v) == 3)
    async with aioredis.Redis.from_url(redis_url) as client:
        assert await client.keys(f"{namespace}:*") == []


async def test_a_crashed_member_drops_out_after_its_ttl(redis_url: str, namespace: str) -> None:
    """A member killed with SIGKILL (no leave) disappears from the others' views by expiry."""
    memberships = {node: RedisMembership(redis_url, namespace=namespace, **FAST) for node in ("a", "b")}
    async with members_running(memberships):
        command = [sys.executable, "-c", CRASHING_MEMBER, redis_url, namespace, "c"]
        async with await anyio.open_process(command, cwd=REPO) as process:
            assert process.stdout is not None
            with anyio.fail_after(DEADLINE):
                assert b"joined" in await process.stdout.receive()
            await view_where(memberships["a"], lambda v: "c" in v)
            process.kill()
            await process.wait()
        for membership in memberships.values():
            assert await view_where(membership, lambda v: "c" not in v) == {"a", "b"}


async def test_members_joining_and_leaving_concurrently_converge(redis_url: str, namespace: str) -> None:
    """Eight in-process members and two member processes, all joining at once, see all ten; after
    four leave and both processes are killed at once, the four that stay see exactly themselves."""
    names = [f"m{index}" for index in range(8)]
    memberships = {name: RedisMembership(redis_url, namespace=namespace, **FAST) for name in names}
    scopes = {name: anyio.CancelScope() for name in names}
    everyone = {*names, "p0", "p1"}
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(_run_member, memberships[name], name, scopes[name])
        command = [sys.executable, "-c", CRASHING_MEMBER, redis_url, namespace]
        async with (
            await anyio.open_process([*command, "p0"], cwd=REPO) as p0,
            await anyio.open_process([*command, "p1"], cwd=REPO) as p1,
        ):
            for membership in memberships.values():
                assert await view_where(membership, lambda v: v == everyone) == everyone
            for process in (p0, p1):
                process.kill()
            for name in names[4:]:
                scopes[name].cancel()
            for process in (p0, p1):
                await process.wait()
        for name in names[:4]:
            assert await view_where(memberships[name], lambda v: v == set(names[:4])) == set(names[:4])
        tg.cancel_scope.cancel()


async def test_an_outage_keeps_the_last_view_and_heartbeats_resume(private_redis: PrivateRedis) -> None:
    """While Redis is down members keep their view and keep running; afterwards they re-register."""
    memberships = {node: RedisMembership(private_redis.url, namespace="gc", **FAST) for node in ("a", "b")}
    seen: list[frozenset[str]] = []

    async def record(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with aclosing(memberships["a"].views()) as views:  # type: ignore[type-var]
            task_status.started()
            async for view in views:
                seen.append(view)

    async with members_running(memberships), anyio.create_task_group() as tg:
        await view_where(memberships["a"], lambda v: len(v) == 2)
        await tg.start(record)
        await anyio.to_thread.run_sync(private_redis.stop)
        await until(lambda: not memberships["a"].statistics().connected)
        assert memberships["a"].members() == {"a", "b"}
        await anyio.to_thread.run_sync(private_redis.start)
        async with aioredis.Redis.from_url(private_redis.url) as client:
            await until(lambda: all(m.statistics().connected for m in memberships.values()))
            assert set(await client.zrange("gc:members", 0, -1)) == {b"a", b"b"}
        tg.cancel_scope.cancel()
    assert seen == [{"a", "b"}]


async def test_a_member_started_while_redis_is_down_joins_when_it_returns(
    private_redis: PrivateRedis,
) -> None:
    """run() starts at once with a view of itself alone while Redis is down, and joins when it returns."""
    await anyio.to_thread.run_sync(private_redis.stop)
    membership = RedisMembership(private_redis.url, namespace="gc", **FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(membership.run, "a")
        assert membership.members() == frozenset({"a"})
        assert membership.statistics().connected is False
        await until(lambda: membership.statistics().failures >= 2)
        await anyio.to_thread.run_sync(private_redis.start)
        await until(lambda: membership.statistics().connected)
        async with aioredis.Redis.from_url(private_redis.url) as client:
            assert await client.zrange("gc:members", 0, -1) == [b"a"]
        tg.cancel_scope.cancel()


async def test_members_see_each_other_on_a_redis_cluster(redis_cluster: object, namespace: str) -> None:
    """On a 3-master Redis Cluster (one key, one slot) three members see each other."""
    async with aioredis.RedisCluster.from_url(redis_cluster.url) as client:  # type: ignore[attr-defined]
        memberships = {node: RedisMembership(client, namespace=namespace, **FAST) for node in ("a", "b", "c")}
        async with members_running(memberships):
            for membership in memberships.values():
                assert await view_where(membership, lambda v: len(v) == 3) == {"a", "b", "c"}
        assert await client.exists(f"{namespace}:members") == 0


async def test_statistics_and_repr_show_live_state(redis_url: str, namespace: str) -> None:
    """statistics() counts members and heartbeats; repr names the key, node and connection state,
    before, while and after running (the last view is kept)."""
    membership = RedisMembership(redis_url, namespace=namespace, heartbeat=0.1, ttl=1.0)
    assert repr(membership) == (
        f"<RedisMembership key='{namespace}:members' node=None members=0 disconnected heartbeat=0.1 ttl=1.0>"
    )
    async with members_running({"a": membership}):
        stats = membership.statistics()
        assert (stats.members, stats.failures, stats.connected) == (1, 0, True)
        assert stats.heartbeats >= 1
        assert repr(membership) == (
            f"<RedisMembership key='{namespace}:members' node='a' members=1 connected heartbeat=0.1 ttl=1.0>"
        )
    assert repr(membership) == (
        f"<RedisMembership key='{namespace}:members' node=None members=1 disconnected heartbeat=0.1 ttl=1.0>"
    )


async def test_running_one_membership_twice_is_refused(redis_url: str, namespace: str) -> None:
    """A RedisMembership serves one node at a time: a second run() raises RuntimeError."""
    membership = RedisMembership(redis_url, namespace=namespace, **FAST)
    async with members_running({"a": membership}):
        with pytest.raises(RuntimeError, match="already running"):
            await membership.run("b")


@pytest.mark.parametrize(
    ("timing", "message"),
    [
        ({"heartbeat": 1.0, "ttl": 1.0}, "ttl > heartbeat > 0"),
        ({"heartbeat": 0.0, "ttl": 1.0}, "ttl > heartbeat > 0"),
        ({"heartbeat": -1.0, "ttl": 1.0}, "ttl > heartbeat > 0"),
        ({"heartbeat": True, "ttl": 3.0}, "finite number"),
        ({"heartbeat": float("nan"), "ttl": 3.0}, "finite number"),
        ({"heartbeat": 1.0, "ttl": "3"}, "finite number"),
    ],
)
def test_bad_timing_is_refused(timing: dict[str, object], message: str) -> None:
    """ttl must exceed heartbeat, heartbeat must be positive, both finite numbers."""
    with pytest.raises(InvalidMembershipConfig, match=message):
        RedisMembership("redis://127.0.0.1:1/0", **timing)  # type: ignore[arg-type]


@pytest.mark.parametrize(("client", "namespace"), [(42, "gc"), ("redis://127.0.0.1:1/0", "")])
def test_bad_client_or_namespace_is_refused(client: object, namespace: str) -> None:
    """A client that is neither a redis.asyncio client nor a URL, or an empty namespace, is refused."""
    with pytest.raises(InvalidMembershipConfig):
        RedisMembership(client, namespace=namespace)  # type: ignore[arg-type]


async def test_an_empty_node_id_is_refused_before_any_io() -> None:
    """run("") raises InvalidNodeId at once, without trying the (unreachable) server."""
    membership = RedisMembership("redis://127.0.0.1:1/0", **FAST)
    with anyio.fail_after(DEADLINE), pytest.raises(InvalidNodeId):
        await membership.run("")
    assert membership.statistics().failures == 0


async def test_a_static_view_is_fixed() -> None:
    """StaticMembership reports its view, starts at once and yields the view to views()."""
    membership = StaticMembership(["a", "b", "a"])
    assert membership.members() == {"a", "b"}
    assert repr(membership) == "<StaticMembership members=['a', 'b']>"
    async with anyio.create_task_group() as tg:
        await tg.start(membership.run, "a")
        async with aclosing(membership.views()) as views:  # type: ignore[type-var]
            assert await anext(views) == {"a", "b"}
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("nodes", [[], ["a", ""], ["a", None]])
def test_a_bad_static_view_is_refused(nodes: list[object]) -> None:
    """A static view must hold at least one node id, each a non-empty str."""
    with pytest.raises(ValueError, match="node id"):
        StaticMembership(nodes)  # type: ignore[arg-type]
