"""Put acknowledgements: nodes report each graph the cache stored, for the load test's visibility lag."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphcache import _cli
from graphcache.actors import Node, Rebuilder, graph_key
from graphcache.cache import MemoryCache
from graphcache.harness import Event, read_history
from graphcache.sidecar._serve import _PutLog
from graphcache.storage import MemoryStore, Upsert

pytestmark = pytest.mark.anyio


async def test_a_node_reports_each_put_it_stored_rebuilt_or_read_through() -> None:
    """Node(on_stored=...) hears of a read-through's put and of a rebuild's put, with the stored version."""
    stored: list[tuple[str, int]] = []
    async with MemoryStore() as store, MemoryCache() as cache:
        await store.create_root("a", {})
        await store.create_root("b", {})
        node = Node(store=store, cache=cache, node_id="n", on_stored=lambda r, v: stored.append((r, v)))
        async with node:
            graph = await node.get("b")  # a miss: one load, one put
            assert stored == [("b", graph.version)]
            version = await node.apply("a", [Upsert("a/c", "a", {"n": 1})])
            actor = node.actor("a")
            assert actor is not None
            await actor.until_built(version)
    assert ("a", version) in stored


async def test_a_listener_that_fails_does_not_fail_the_put() -> None:
    """A broken on_stored is logged; the rebuild still reports its put as stored."""

    def broken(root_id: str, version: int) -> None:
        raise RuntimeError("listener bug")

    async with MemoryStore() as store, MemoryCache() as cache:
        await store.create_root("a", {})
        graph, stored = await Rebuilder(store, cache, on_stored=broken).rebuild("a")
        assert (graph.version, stored) == (1, True)
        item = await cache.get(graph_key("a"))
        assert item is not None
        assert item.version == 1


def test_the_sidecar_records_puts_as_history_events(tmp_path: Path) -> None:
    """serve --record-puts writes lines the harness reads as "rebuild" ok events of the node."""
    path = tmp_path / "node-0.jsonl"
    log = _PutLog(str(path), "node-0")
    log("root-1", 7)
    log.close()
    (event,) = read_history(path)
    assert event == Event("node-0", "ok", "rebuild", "root-1", event.time, version=7)


def test_record_puts_is_not_in_the_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--record-puts is the load test's hook, not an operator's option: --help does not list it."""
    with pytest.raises(SystemExit):
        _cli.main(["serve", "--help"])
    assert "--record-puts" not in capsys.readouterr().out
