"""Other languages read the cache directly: the Node.js example reads a graph cached by graphcache."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from graphcache.actors import graph_key
from graphcache.cache import RedisCache
from graphcache.storage import Graph, Node

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE_PACKAGE = "nodejs and npm (Debian: apt-get install nodejs npm)"


@pytest.fixture(scope="module")
def node_examples() -> Path:
    """examples/node with its dependencies installed from the committed lockfile (``npm ci``)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"node or npm not found on PATH: install {NODE_PACKAGE}", pytrace=False)
    done = subprocess.run(
        [npm, "ci", "--silent", "--no-audit", "--no-fund"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return EXAMPLES


def read_graph(examples: Path, redis_url: str, namespace: str, root_id: str) -> dict[str, object]:
    done = subprocess.run(
        ["node", "read-graph.mjs", redis_url, namespace, root_id],
        cwd=examples,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


async def test_the_node_reader_reads_a_graph_at_a_64_bit_version_exactly(
    node_examples: Path, redis_url: str, namespace: str
) -> None:
    """A graph cached at version 2**63-7 is read by Node.js with its version exact (BigInt) and its nodes."""
    version = 2**63 - 7
    nodes = {
        "o-1": Node("o-1", None, {"customer": "ada"}, 1),
        "line-1": Node("line-1", "o-1", {"sku": "x", "qty": 2}, version),
    }
    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        lease = await cache.lease(graph_key("o-1"))
        assert await cache.put_if_newer(graph_key("o-1"), Graph("o-1", version, nodes), version, lease=lease)
    result = read_graph(node_examples, redis_url, namespace, "o-1")
    assert result == {"root_id": "o-1", "version": str(version), "nodes": ["line-1", "o-1"]}


async def test_the_node_reader_reports_a_miss_and_a_malformed_graph(
    node_examples: Path, redis_url: str, namespace: str
) -> None:
    """An uncached root is a miss; a graph stored under another root's key is reported malformed."""
    assert read_graph(node_examples, redis_url, namespace, "nowhere") == {"root_id": "nowhere", "miss": True}
    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        assert await cache.put_if_newer(graph_key("o-2"), Graph("o-3", 4, {}), 4)
    assert read_graph(node_examples, redis_url, namespace, "o-2") == {
        "root_id": "o-2",
        "miss": True,
        "malformed": True,
    }
