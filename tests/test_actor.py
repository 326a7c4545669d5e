"""RootActor: coalescing, mailbox overflow, retries, passivation, stopping, state shown."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio
import pytest

from graphcache.actors import (
    ActorDead,
    ActorOptions,
    Changed,
    InvalidArgument,
    Refresh,
    RootActor,
    Stop,
    graph_key,
)
from graphcache.cache import MemoryCache
from graphcache.storage import Graph, MemoryStore, Upsert
from tests._actor_fakes import FlakyStore, GatedStore

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cache() -> AsyncIterator[MemoryCache]:
    async with MemoryCache() as cache:
        yield cache


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await store.create_root("r", {"name": "root"})
    yield store
    await store.aclose()


async def write(store: MemoryStore, child: str = "c") -> int:
    return await store.apply("r", [Upsert(child, "r", {"at": child})])


async def cached_version(cache: MemoryCache, root_id: str = "r") -> int | None:
    item = await cache.get(graph_key(root_id), type=Graph)
    return None if item is None else item.version


async def test_burst_during_slow_rebuild_costs_at_most_one_more(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """1000 notifications arriving during a slow rebuild cost one more rebuild; repeats and old ones none."""
    gated = GatedStore(store)
    actor = RootActor("r", store=gated, cache=cache)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        gated.hold(1)
        actor.tell(Changed("r", await write(store, "first")))
        await gated.entered.wait()  # the first rebuild holds an old snapshot
        versions = [await write(store, f"c{i}") for i in range(1000)]
        for version in versions:
            actor.tell(Changed("r", version))
        gated.release()
        await actor.until_built(versions[-1])
        assert (gated.loads, actor.statistics().rebuilds) == (2, 2)
        for version in (versions[-1], versions[0], 1):  # a duplicate and two old versions
            actor.tell(Changed("r", version))
        await anyio.wait_all_tasks_blocked()
        assert gated.loads == 2
        stats = actor.statistics()
        assert (stats.notifications, stats.coalesced, stats.rebuilds) == (1004, 1002, 2)
        actor.tell(Stop())
    assert await cached_version(cache) == versions[-1]


async def test_full_mailbox_neither_blocks_nor_loses_the_newest(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """With a one-slot mailbox, telling never waits and the newest version still gets cached."""
    gated = GatedStore(store)
    actor = RootActor("r", store=gated, cache=cache, mailbox_size=1)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        gated.hold(1)
        actor.tell(Changed("r", await write(store, "first")))
        await gated.entered.wait()
        newest = 0
        for i in range(50):
            newest = await write(store, f"c{i}")
            actor.tell(Changed("r", newest))  # synchronous: it cannot block the feed consumer
        assert actor.statistics().mailbox_depth == 1
        gated.release()
        await actor.until_built(newest)
        actor.tell(Stop())
    assert await cached_version(cache) == newest


async def test_transient_failures_are_retried_until_the_store_recovers(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """A store that fails 5 times then recovers ends with the right graph cached and 5 failures counted."""
    flaky = FlakyStore(store, failures=5)
    actor = RootActor("r", store=flaky, cache=cache, retry_initial=0.001, retry_max=0.005)
    version = await write(store)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        actor.tell(Changed("r", version))
        await actor.until_built(version)
        stats = actor.statistics()
        assert (stats.failures, stats.failing, stats.rebuilds, flaky.loads) == (5, False, 1, 6)
        actor.tell(Stop())
    item = await cache.get(graph_key("r"), type=Graph)
    assert item is not None
    assert item.value == await store.load("r")


async def test_permanent_failure_is_counted_and_the_actor_lives_on(cache: MemoryCache) -> None:
    """A root missing from the store is given up (one failure), and the actor still serves later work."""
    store = MemoryStore()
    actor = RootActor("late", store=store, cache=cache)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        actor.tell(Changed("late", 1))
        await anyio.wait_all_tasks_blocked()
        assert (actor.alive, actor.statistics().failures, actor.built) == (True, 1, 0)
        await store.create_root("late", {})
        actor.tell(Changed("late", 1))
        await actor.until_built(1)
        actor.tell(Stop())
    await store.aclose()
    assert await cached_version(cache, "late") == 1


async def test_refresh_rebuilds_without_a_newer_version(store: MemoryStore, cache: MemoryCache) -> None:
    """Refresh reloads the graph even when no newer version was announced."""
    actor = RootActor("r", store=store, cache=cache)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        actor.tell(Refresh("r"))
        await actor.until_built(1)
        assert actor.statistics().rebuilds == 1
        actor.tell(Stop())
    assert await cached_version(cache) == 1


async def test_idle_actor_passivates_and_wakes_waiters_with_actor_dead(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """An idle actor returns from run; it refuses messages and a waiter gets ActorDead, not a hang."""
    actor = RootActor("r", store=store, cache=cache, idle_timeout=0.01)
    outcome: list[str] = []

    async def wait_for_never_built() -> None:
        with pytest.raises(ActorDead):
            await actor.until_built(99)
        outcome.append("ActorDead")

    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.run)
        tg.start_soon(wait_for_never_built)
    assert outcome == ["ActorDead"]
    assert not actor.alive
    with pytest.raises(ActorDead):
        actor.tell(Changed("r", 2))


async def test_stop_finishes_the_rebuild_in_flight_then_stops(store: MemoryStore, cache: MemoryCache) -> None:
    """Stop during a rebuild lets that rebuild land, then run returns and the mailbox is closed."""
    gated = GatedStore(store)
    actor = RootActor("r", store=gated, cache=cache)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        gated.hold(1)
        actor.tell(Changed("r", 1))
        await gated.entered.wait()
        actor.tell(Stop())
        gated.release()
    assert (actor.alive, actor.built, await cached_version(cache)) == (False, 1, 1)


async def test_repr_and_statistics_show_live_state(store: MemoryStore, cache: MemoryCache) -> None:
    """repr and statistics() show state, versions, mailbox use and counters as they change."""
    gated = GatedStore(store)
    actor = RootActor("r", store=gated, cache=cache, mailbox_size=4)
    assert repr(actor) == (
        "<RootActor 'r' [alive | built: 0, wanted: 0 | mailbox: 0/4 | rebuilds: 0, coalesced: 0]>"
    )
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        gated.hold(1)
        actor.tell(Changed("r", 1))
        await gated.entered.wait()
        actor.tell(Changed("r", 1))
        assert repr(actor) == (
            "<RootActor 'r' [alive | built: 0, wanted: 1 | mailbox: 1/4 | rebuilds: 0, coalesced: 1]>"
        )
        gated.release()
        await actor.until_built(1)
        await anyio.wait_all_tasks_blocked()  # the actor has swallowed the stale wake-up
        stats = actor.statistics()
        assert stats._asdict() == {
            "root_id": "r",
            "alive": True,
            "built": 1,
            "wanted": 1,
            "mailbox_depth": 0,
            "notifications": 2,
            "coalesced": 1,
            "rebuilds": 1,
            "failures": 0,
            "failing": False,
        }
        actor.tell(Stop())
    assert repr(actor) == (
        "<RootActor 'r' [stopped | built: 1, wanted: 1 | mailbox: 0/4 | rebuilds: 1, coalesced: 1]>"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root_id": ""}, "root_id must not be empty"),
        ({"root_id": 7}, "root_id must be a str"),
        ({"mailbox_size": 0}, "mailbox_size must be an int >= 1"),
        ({"idle_timeout": 0}, "idle_timeout must be a finite number of seconds > 0, got 0"),
        ({"min_rebuild_interval": -0.1}, "min_rebuild_interval must be a finite number of seconds >= 0"),
        ({"built": -1}, "built must be in 0..2**63-1"),
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Malformed arguments raise InvalidArgument (a ValueError) naming the argument."""
    options: dict[str, object] = {"root_id": "r", "store": MemoryStore(), "cache": MemoryCache()} | kwargs
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        RootActor(**options)  # type: ignore[arg-type]


async def test_an_actor_built_from_checked_options_uses_them(store: MemoryStore, cache: MemoryCache) -> None:
    """RootActor.from_options(ActorOptions.create(...)) works as RootActor(**the same keywords)."""
    options = ActorOptions.create(mailbox_size=2, idle_timeout=60)
    actor = RootActor.from_options("r", options, store=store, cache=cache, built=1)
    keyworded = RootActor("r", store=store, cache=cache, mailbox_size=2, idle_timeout=60, built=1)
    shown = "<RootActor 'r' [alive | built: 1, wanted: 1 | mailbox: 0/2 | rebuilds: 0, coalesced: 0]>"
    assert repr(actor) == repr(keyworded) == shown
    keyworded.close()  # never run: close its mailbox
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        version = await write(store)
        actor.tell(Changed("r", version))
        with anyio.fail_after(10):  # a hang guard
            await actor.until_built(version)
        actor.tell(Stop())
    assert await cached_version(cache) == version


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mailbox_size": 0}, "mailbox_size must be an int >= 1, got 0"),
        ({"retry_max": -1}, "retry_max must be a finite number of seconds > 0, got -1"),
        ({"idle_timeout": None}, "idle_timeout must be a finite number of seconds > 0, got None"),
        ({"handoff": 1}, "unknown option 'handoff'"),
    ],
)
def test_bad_actor_options_are_refused_naming_the_option(values: dict[str, object], message: str) -> None:
    """ActorOptions.create checks every value in one conversion; the error names the option."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        ActorOptions.create(**values)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Changed("other", 1), "message for 'other' told to the actor of 'r'"),
        (Changed("r", -1), "version must be in 0..2\\*\\*63-1"),
        (Changed("r", True), "version must be an int, not bool"),
        (Refresh("other"), "message for 'other'"),
    ],
)
async def test_bad_messages_are_refused_without_changing_state(
    message: Changed | Refresh, error: str, store: MemoryStore, cache: MemoryCache
) -> None:
    """A message for another root or with a bad version raises InvalidArgument and leaves no trace."""
    actor = RootActor("r", store=store, cache=cache)
    with pytest.raises(InvalidArgument, match=error):
        actor.tell(message)
    assert actor.statistics()[1:] == (True, 0, 0, 0, 0, 0, 0, 0, False)
    actor.close()


async def test_first_rebuild_after_a_quiet_period_is_not_paced(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """With an hour between rebuilds, the first notification is still rebuilt at once."""
    actor = RootActor("r", store=store, cache=cache, min_rebuild_interval=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        version = await write(store)
        actor.tell(Changed("r", version))
        with anyio.fail_after(30):  # a safety net only: a paced first rebuild would wait an hour
            await actor.until_built(version)
        assert await cached_version(cache) == version
        actor.tell(Stop())


async def test_stop_cuts_a_pacing_pause_short(store: MemoryStore, cache: MemoryCache) -> None:
    """A stop told while the next rebuild waits out its interval ends the actor without that rebuild."""
    actor = RootActor("r", store=store, cache=cache, min_rebuild_interval=3600)
    with anyio.fail_after(30):  # a safety net only: without the cut the pause lasts an hour
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            first = await write(store, "first")
            actor.tell(Changed("r", first))
            await actor.until_built(first)
            actor.tell(Changed("r", await write(store, "second")))
            await anyio.wait_all_tasks_blocked()  # the actor now waits out its interval
            actor.tell(Stop())
    assert (actor.alive, actor.built, actor.statistics().rebuilds) == (False, first, 1)


async def test_rebuilds_of_a_busy_root_start_at_least_the_interval_apart(
    store: MemoryStore, cache: MemoryCache
) -> None:
    """Under a steady stream of notifications, n rebuilds span at least (n - 1) intervals; all are covered."""
    interval = 0.05
    actor = RootActor("r", store=store, cache=cache, min_rebuild_interval=interval)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        began = anyio.current_time()
        versions = []
        for i in range(300):
            versions.append(await write(store, f"c{i}"))
            actor.tell(Changed("r", versions[-1]))
            await anyio.sleep(0.001)  # a steady stream: unpaced, nearly every write would rebuild
        await actor.until_built(versions[-1])
        ended = anyio.current_time()
        stats = actor.statistics()
        assert stats.rebuilds >= 2
        assert (stats.rebuilds - 1) * interval <= ended - began
        assert stats.notifications == stats.coalesced + stats.rebuilds == 300
        assert await cached_version(cache) == versions[-1]
        actor.tell(Stop())
