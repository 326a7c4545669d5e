"""The GraphStore contract, run against MemoryStore and PostgresStore (shared server, own schema)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from graphcache.storage import (
    Change,
    Checkpoint,
    ConcurrencyConflict,
    Delete,
    Graph,
    GraphStore,
    InvalidOperation,
    MemoryStore,
    PostgresStore,
    RootExists,
    RootNotFound,
    StoreUnavailable,
    Upsert,
)

pytestmark = pytest.mark.anyio

Store = MemoryStore | PostgresStore


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, postgres_dsn: str) -> AsyncIterator[Store]:
    """Each backend; the memory one with simulated I/O latency so interleavings are real."""
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(latency=(0.0, 0.002), seed=7)
    else:
        schema = request.getfixturevalue("pg_schema")
        opened = await PostgresStore.connect(postgres_dsn, schema, poll_interval=0.1, pool_size=12)
    try:
        yield opened
    finally:
        await opened.aclose()


def counters(graph: Graph) -> int:
    return sum(node.data.get("n", 0) for node in graph.nodes.values())


async def make_counter_graph(store: Store, root_id: str, children: int) -> int:
    await store.create_root(root_id, {"kind": "counter"})
    ops = [Upsert(f"c{index}", root_id, {"n": 0}) for index in range(children)]
    return await store.apply(root_id, ops)


async def collect_until(feed: Any, want: dict[str, int], got: dict[str, list[int]]) -> list[Change]:
    """Read ``feed`` until each root in ``want`` reached its version, appending versions to ``got``."""
    seen: list[Change] = []
    with anyio.fail_after(30):  # a hang guard, not a performance bound
        while any(not got[root] or got[root][-1] < version for root, version in want.items()):
            change = await feed.__anext__()
            seen.append(change)
            got[change.root_id].append(change.version)
    return seen


async def test_both_backends_implement_the_protocol(store: Store) -> None:
    """Both stores are GraphStores."""
    assert isinstance(store, GraphStore)


async def test_create_root_starts_at_version_one(store: Store) -> None:
    """A new graph is at version 1 and holds only its root node."""
    assert await store.create_root("r", {"name": "root"}) == 1
    graph = await store.load("r")
    assert graph.version == 1
    assert list(graph.nodes) == ["r"]
    assert graph.nodes["r"].parent_id is None
    assert graph.nodes["r"].data == {"name": "root"}
    assert await store.version("r") == 1


async def test_create_root_twice_raises_root_exists(store: Store) -> None:
    """Creating an existing root fails and leaves it as it was."""
    await store.create_root("r", {"a": 1})
    with pytest.raises(RootExists):
        await store.create_root("r", {"a": 2})
    graph = await store.load("r")
    assert (graph.version, graph.nodes["r"].data) == (1, {"a": 1})


async def test_unknown_root_raises_root_not_found(store: Store) -> None:
    """load, version and apply on a missing root raise RootNotFound."""
    with pytest.raises(RootNotFound):
        await store.load("missing")
    with pytest.raises(RootNotFound):
        await store.version("missing")
    with pytest.raises(RootNotFound):
        await store.apply("missing", [Upsert("missing", None, {})])


async def test_apply_bumps_the_version_once_and_tracks_row_versions(store: Store) -> None:
    """Each apply adds exactly one to the version; a row's version counts its own writes."""
    await store.create_root("r", {})
    assert await store.apply("r", [Upsert("a", "r", {"v": 1}), Upsert("b", "a", {"v": 2})]) == 2
    assert await store.apply("r", [Upsert("a", "r", {"v": 3})]) == 3
    graph = await store.load("r")
    assert graph.version == 3
    assert {key: (node.parent_id, node.data, node.row_version) for key, node in graph.nodes.items()} == {
        "r": (None, {}, 1),
        "a": ("r", {"v": 3}, 2),
        "b": ("a", {"v": 2}, 1),
    }


async def test_delete_removes_the_whole_subtree(store: Store) -> None:
    """Deleting a node deletes its descendants and nothing else."""
    await store.create_root("r", {})
    await store.apply(
        "r",
        [Upsert("a", "r", {}), Upsert("a1", "a", {}), Upsert("a11", "a1", {}), Upsert("b", "r", {})],
    )
    await store.apply("r", [Delete("a")])
    assert sorted((await store.load("r")).nodes) == ["b", "r"]


async def test_data_round_trips_unchanged(store: Store) -> None:
    """JSON-compatible data comes back equal, unicode and nesting included."""
    data = {
        "s": "ünï\u2603 {}:*\n\"'\\",
        "i": -(2**70),
        "floats": [0.1, 1e-7, 9.99e15, 5e-324, -2.5, 1.0, -0.5e-300],
        "b": True,
        "z": None,
        "l": [1, [2, {"x": []}]],
        "": {"": ""},
    }
    await store.create_root("r", {})
    await store.apply("r", [Upsert("a", "r", data)])
    assert (await store.load("r")).nodes["a"].data == data


async def test_stale_expected_version_raises_and_commits_nothing(store: Store) -> None:
    """apply with an old expected_version raises ConcurrencyConflict and changes nothing."""
    await store.create_root("r", {})
    await store.apply("r", [Upsert("a", "r", {"n": 1})])
    before = await store.load("r")
    with pytest.raises(ConcurrencyConflict):
        await store.apply("r", [Upsert("a", "r", {"n": 2}), Upsert("b", "r", {})], expected_version=1)
    assert await store.load("r") == before
    assert await store.apply("r", [Upsert("a", "r", {"n": 2})], expected_version=2) == 3


async def test_row_version_conflict_commits_nothing(store: Store) -> None:
    """A mismatching expected_row_version in any op rolls back every op of the call."""
    await store.create_root("r", {})
    await store.apply("r", [Upsert("a", "r", {"n": 1})])
    before = await store.load("r")
    ops = [Upsert("b", "r", {}), Upsert("a", "r", {"n": 9}, expected_row_version=7)]
    with pytest.raises(ConcurrencyConflict):
        await store.apply("r", ops)
    with pytest.raises(ConcurrencyConflict):
        await store.apply("r", [Delete("a", expected_row_version=2)])
    with pytest.raises(ConcurrencyConflict):
        await store.apply("r", [Upsert("a", "r", {}, expected_row_version=0)])  # 0: must not exist yet
    assert await store.load("r") == before


@pytest.mark.parametrize(
    ("ops", "expected_version"),
    [
        ([Upsert("x", "nowhere", {})], None),  # parent not in the graph
        ([Upsert("a", "b", {}), Upsert("b", "a", {})], None),  # a cycle off the root
        ([Upsert("a", "a1", {})], None),  # moving a node under its own child
        ([Delete("zzz")], None),  # deleting a node that is not there
        ([Delete("a"), Upsert("a2", "a1", {})], None),  # parent deleted earlier in the same call
        ([Delete("r")], None),
        ([Upsert("r", "a", {})], None),
        ([Upsert("x", None, {})], None),
        ([Upsert("", "r", {})], None),
        ([Upsert("x", "r", {"f": float("nan")})], None),
        ([Upsert("x", "r", {"f": [1e300]})], None),  # would come back from jsonb as an int
        ([Upsert("x", "r", {1: "int key"})], None),  # type: ignore[dict-item]
        ([Upsert("x", "r", {"t": (1, 2)})], None),
        ([Upsert("x", "r", {"nul": "a\x00b"})], None),
        ([Upsert("x", "r", {"big": "x" * (1024 * 1024)})], None),
        ([Upsert("x", "r", {}, expected_row_version=-1)], None),
        ([Upsert("x", "r", {}, expected_row_version=True)], None),
        ([], None),
        ("not ops", None),
        ([{"node_id": "x"}], None),
        ([Upsert("x", "r", {})], -1),
        ([Upsert("x", "r", {})], 1.0),
    ],
)
async def test_bad_input_raises_invalid_operation_and_commits_nothing(
    store: Store, ops: Any, expected_version: Any
) -> None:
    """Malformed ops, ids, data and versions raise InvalidOperation (a ValueError); nothing changes."""
    await store.create_root("r", {})
    await store.apply("r", [Upsert("a", "r", {}), Upsert("a1", "a", {})])
    before = await store.load("r")
    with pytest.raises(InvalidOperation) as caught:
        await store.apply("r", ops, expected_version=expected_version)
    assert isinstance(caught.value, ValueError)
    assert await store.load("r") == before


@pytest.mark.parametrize("root_id", ["", 5, "x" * 600, "a\x00b", None])
async def test_bad_root_ids_raise_invalid_operation(store: Store, root_id: Any) -> None:
    """Every method refuses a root id that is not a non-empty str of at most 512 bytes without NUL."""
    with pytest.raises(InvalidOperation):
        await store.create_root(root_id, {})
    with pytest.raises(InvalidOperation):
        await store.load(root_id)
    with pytest.raises(InvalidOperation):
        await store.version(root_id)
    with pytest.raises(InvalidOperation):
        await store.apply(root_id, [Upsert("x", "y", {})])


@pytest.mark.parametrize("data", [None, [], "x", {"k": object()}, {"k": float("inf")}])
async def test_create_root_refuses_bad_data(store: Store, data: Any) -> None:
    """create_root with data that is not a JSON-compatible dict creates nothing."""
    with pytest.raises(InvalidOperation):
        await store.create_root("r", data)
    with pytest.raises(RootNotFound):
        await store.version("r")


async def test_no_torn_reads_under_concurrent_writers(store: Store) -> None:
    """50 writers and 20 loaders: every loaded graph's counters sum to its version minus the base."""
    base = await make_counter_graph(store, "r", children=10)
    conflicts = 0
    done = anyio.Event()
    loaded: list[list[Graph]] = [[] for _ in range(20)]

    async def writer(seed: int) -> None:
        nonlocal conflicts
        rng = random.Random(seed)
        for _ in range(4):
            while True:
                graph = await store.load("r")
                child = graph.nodes[f"c{rng.randrange(10)}"]
                op = Upsert(child.id, "r", {"n": child.data["n"] + 1}, expected_row_version=child.row_version)
                try:
                    await store.apply("r", [op])
                    break
                except ConcurrencyConflict:
                    conflicts += 1

    async def loader(history: list[Graph]) -> None:
        while not done.is_set():
            history.append(await store.load("r"))

    async with anyio.create_task_group() as loaders:
        for history in loaded:
            loaders.start_soon(loader, history)
        async with anyio.create_task_group() as writers:
            for seed in range(50):
                writers.start_soon(writer, seed)
        done.set()

    final = await store.load("r")
    assert final.version == base + 200
    assert counters(final) == 200
    for history in loaded:
        assert history, "every loader loaded at least once"
        assert all(counters(graph) == graph.version - base for graph in history)
        versions = [graph.version for graph in history]
        assert versions == sorted(versions)


async def test_load_many_returns_what_load_returns_and_leaves_unknown_roots_out(store: Store) -> None:
    """load_many gives each known root's graph as load does; unknown and repeated ids cost nothing."""
    for root_id in ("a", "b", "c"):
        await make_counter_graph(store, root_id, children=3)
    await store.apply("b", [Upsert("c0", "b", {"n": 5}), Delete("c2")])
    graphs = await store.load_many(["b", "ghost", "a", "b"])
    assert list(graphs) == ["b", "a"]
    assert graphs == {"a": await store.load("a"), "b": await store.load("b")}
    assert graphs["b"].version == 3
    assert set(graphs["b"].nodes) == {"b", "c0", "c1"}
    assert await store.load_many([]) == {}
    assert await store.load_many(("ghost",)) == {}


@pytest.mark.parametrize("root_ids", ["ab", b"ab", None, 5, {"a"}, ["a", ""], ["a", 5], ["x" * 600]])
async def test_load_many_refuses_bad_input(store: Store, root_ids: Any) -> None:
    """load_many wants a sequence (not a str) of valid root ids; anything else is InvalidOperation."""
    await store.create_root("a", {})
    with pytest.raises(InvalidOperation):
        await store.load_many(root_ids)


async def test_load_many_reads_one_snapshot_of_all_its_roots(store: Store) -> None:
    """Writers commit to "a" and then to "b"; no load_many([a, b]) ever sees b ahead of a, nor a torn graph.

    Loading the roots one after another would: "a" read before a commit, "b" read after the next one.
    """
    base = {root_id: await make_counter_graph(store, root_id, children=5) for root_id in ("a", "b")}
    done = anyio.Event()
    seen: list[dict[str, Graph]] = []

    async def writer() -> None:
        for step in range(40):
            for root_id in ("a", "b"):
                await store.apply(root_id, [Upsert(f"c{step % 5}", root_id, {"n": step // 5 + 1})])

    async def loader() -> None:
        while not done.is_set():
            seen.append(await store.load_many(["a", "b"]))

    async with anyio.create_task_group() as loaders:
        for _ in range(8):
            loaders.start_soon(loader)
        await writer()
        done.set()
    assert len(seen) >= 8
    ahead = [g for g in seen if g["b"].version - base["b"] > g["a"].version - base["a"]]
    assert not ahead, (
        f"{len(ahead)} loads saw b ahead of a, e.g. {ahead[0]['a'].version, ahead[0]['b'].version}"
    )
    for graphs in seen:
        for root_id, graph in graphs.items():
            values = [graph.nodes[f"c{index}"].data["n"] for index in range(5)]
            assert values == _replay(graph.version - base[root_id]), f"torn graph of {root_id!r}"


def _replay(steps: int) -> list[int]:
    """The children's counters after the writer's first ``steps`` applies to one root."""
    values = [0] * 5
    for step in range(steps):
        values[step % 5] = step // 5 + 1
    return values


async def test_feed_delivers_every_roots_latest_version_in_increasing_order(store: Store) -> None:
    """After a burst of concurrent commits, per root the feed reaches the committed version, increasing."""
    feed = store.changes(after=await store.cursor())
    roots = [f"root{index}" for index in range(5)]
    for root in roots:
        await store.create_root(root, {})
    got: dict[str, list[int]] = defaultdict(list)

    async def burst() -> None:
        async with anyio.create_task_group() as group:
            for seed in range(20):
                group.start_soon(writer_on_own_root, store, roots, seed)

    async with feed:
        await burst()
        want = {root: await store.version(root) for root in roots}
        await collect_until(feed, want, got)
    assert {root: got[root][-1] for root in roots} == want
    for root in roots:
        assert got[root] == sorted(set(got[root])), f"{root}: {got[root]}"
    assert sum(want.values()) == len(roots) + 200


async def writer_on_own_root(store: Store, roots: list[str], seed: int) -> None:
    """Ten commits, each to a random root, writing this writer's own child there."""
    rng = random.Random(seed)
    for step in range(10):
        root = rng.choice(roots)
        await store.apply(root, [Upsert(f"w{seed}", root, {"step": step})])


async def test_feed_resumes_from_a_cursor_without_loss(store: Store) -> None:
    """A feed resumed from a delivered cursor re-delivers nothing older than it and misses nothing after."""
    roots = ["a", "b", "c"]
    first = store.changes(after=await store.cursor())
    for root in roots:
        await store.create_root(root, {})
    async with anyio.create_task_group() as group:
        for seed in range(5):
            group.start_soon(writer_on_own_root, store, roots, seed)
    got: dict[str, list[int]] = defaultdict(list)
    async with first:
        seen = await collect_until(first, {root: await store.version(root) for root in roots}, got)
    cursor = seen[-1].cursor
    before = {root: await store.version(root) for root in roots}

    async with anyio.create_task_group() as group:
        for seed in range(5, 10):
            group.start_soon(writer_on_own_root, store, roots, seed)
    after = {root: await store.version(root) for root in roots}
    resumed_got: dict[str, list[int]] = defaultdict(list)
    async with store.changes(after=cursor) as resumed:
        resumed_seen = await collect_until(resumed, after, resumed_got)
    assert all(change.cursor >= cursor for change in resumed_seen)
    for root in roots:
        assert resumed_got[root][-1] == after[root]
        assert resumed_got[root] == sorted(set(resumed_got[root]))
        if isinstance(
            store, MemoryStore
        ):  # exactly once here; PostgreSQL's exact check is in test_store_feed
            assert resumed_got[root] == list(range(before[root] + 1, after[root] + 1))


async def test_feed_from_cursor_delivers_what_commits_after_it(store: Store) -> None:
    """changes(after=cursor()) delivers what commits after the cursor was taken (at least once)."""
    await store.create_root("old", {})
    await store.apply("old", [Upsert("x", "old", {})])
    cursor = await store.cursor()
    await store.create_root("new", {})
    async with store.changes(after=cursor) as feed:
        seen = await collect_until(feed, {"new": 1}, defaultdict(list))
    assert (seen[-1].root_id, seen[-1].version) == ("new", 1)
    if isinstance(store, MemoryStore):  # exact; PostgreSQL's cursor is a watermark that may re-deliver
        assert len(seen) == 1


async def test_a_checkpoint_round_trips_and_a_later_save_replaces_it(store: Store) -> None:
    """load_checkpoint gives the cursor last saved under that name (None before any), fresh and resumable."""
    assert await store.load_checkpoint("node-a") is None
    await store.save_checkpoint("node-a", 0)
    await store.save_checkpoint("node-b", 2**63 - 1)
    await store.save_checkpoint("node-a", 17)
    first, second = await store.load_checkpoint("node-a"), await store.load_checkpoint("node-b")
    assert isinstance(first, Checkpoint)
    assert (first.cursor, first.resumable) == (17, True)
    assert first.age >= 0.0
    assert second is not None
    assert second.cursor == 2**63 - 1
    assert await store.load_checkpoint("node-c") is None


async def test_a_saved_feed_cursor_resumes_the_feed_without_loss(store: Store) -> None:
    """A cursor the feed delivered, saved and loaded again, resumes the feed with everything after it."""
    feed = store.changes(after=await store.cursor())
    async with feed:
        await store.create_root("r", {})
        seen = await collect_until(feed, {"r": 1}, defaultdict(list))
    await store.save_checkpoint("node", seen[-1].cursor)
    for step in range(3):
        await store.apply("r", [Upsert("x", "r", {"step": step})])
    checkpoint = await store.load_checkpoint("node")
    assert checkpoint is not None
    assert checkpoint.resumable
    got: dict[str, list[int]] = defaultdict(list)
    async with store.changes(after=checkpoint.cursor) as resumed:
        await collect_until(resumed, {"r": 4}, got)
    assert [version for version in got["r"] if version > 1] == [2, 3, 4]


@pytest.mark.parametrize(
    ("name", "cursor"),
    [
        ("", 1),
        (5, 1),
        (None, 1),
        ("x" * 600, 1),
        ("a\x00b", 1),
        ("ok", -1),
        ("ok", True),
        ("ok", 1.0),
        ("ok", None),
        ("ok", "1"),
        ("ok", 2**63),
    ],
)
async def test_bad_checkpoint_input_raises_invalid_operation_before_any_io(
    store: Store, name: Any, cursor: Any
) -> None:
    """A bad checkpoint name or cursor is InvalidOperation even on a closed store: nothing was sent."""
    await store.aclose()
    with pytest.raises(InvalidOperation):
        await store.save_checkpoint(name, cursor)
    if not isinstance(name, str) or name != "ok":
        with pytest.raises(InvalidOperation):
            await store.load_checkpoint(name)
    with pytest.raises(StoreUnavailable):  # and a good call on the closed store would have been I/O
        await store.save_checkpoint("ok", 1)


async def test_root_versions_pages_through_every_root_in_code_point_order(store: Store) -> None:
    """root_versions lists committed (root_id, version) by root id as Python orders str, page by page."""
    ids = ["b", "a", "ä", "B", "a1", "z", "é", "🙂", "a b", "Z9"]
    for root_id in ids:
        await store.create_root(root_id, {})
    await store.apply("a1", [Upsert("x", "a1", {})])
    await store.apply("🙂", [Upsert("x", "🙂", {})])
    await store.apply("🙂", [Upsert("y", "🙂", {})])
    expected = [(root_id, {"a1": 2, "🙂": 3}.get(root_id, 1)) for root_id in sorted(ids)]
    assert await store.root_versions() == expected
    pages: list[list[tuple[str, int]]] = []
    after: str | None = None
    while page := await store.root_versions(after=after, limit=3):
        pages.append(page)
        after = page[-1][0]
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [pair for page in pages for pair in page] == expected
    assert await store.root_versions(after="a0", limit=2) == [("a1", 2), ("b", 1)]  # "a0" is no root
    assert await store.root_versions(after="🙂") == []
    assert await store.root_versions(after="\ue000" * 3) == [("🙂", 3)]


async def test_root_versions_of_an_empty_store_is_empty(store: Store) -> None:
    """No roots, no pairs."""
    assert await store.root_versions() == []
    assert await store.root_versions(after="x", limit=100_000) == []


@pytest.mark.parametrize(
    ("after", "limit"),
    [
        (None, 0),
        (None, -1),
        (None, 100_001),
        (None, True),
        (None, 1.5),
        (None, None),
        (None, "10"),
        ("", 10),
        (5, 10),
        ("x" * 600, 10),
        ("a\x00b", 10),
    ],
)
async def test_bad_root_versions_input_raises_invalid_operation_before_any_io(
    store: Store, after: Any, limit: Any
) -> None:
    """A bad after or limit is InvalidOperation even on a closed store: nothing was sent."""
    await store.aclose()
    with pytest.raises(InvalidOperation):
        await store.root_versions(after=after, limit=limit)
    with pytest.raises(StoreUnavailable):
        await store.root_versions()
