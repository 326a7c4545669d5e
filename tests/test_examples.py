"""Other languages read graphcache's graphs: the Node.js examples read one straight from Redis and through
the sidecar's HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from graphcache.actors import graph_key
from graphcache.cache import RedisCache
from graphcache.storage import Graph, Node
from tests._sidecar_procs import Servers, serve_command, sidecar

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


BIG_VERSION = 2**63 - 7
"""A version a JavaScript number cannot hold: 2**63-7 becomes 9223372036854775808 as a double."""


async def cache_order(redis_url: str, namespace: str, data: dict[str, Any] | None = None) -> None:
    """Cache root o-1's graph at BIG_VERSION, as a node's rebuild would (under a lease)."""
    nodes = {
        "o-1": Node("o-1", None, {"customer": "ada"}, 1),
        "line-1": Node("line-1", "o-1", data or {"sku": "x", "qty": 2}, BIG_VERSION),
    }
    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        lease = await cache.lease(graph_key("o-1"))
        graph = Graph("o-1", BIG_VERSION, nodes)
        assert await cache.put_if_newer(graph_key("o-1"), graph, BIG_VERSION, lease=lease)


async def test_the_node_reader_reads_a_graph_at_a_64_bit_version_exactly(
    node_examples: Path, redis_url: str, namespace: str
) -> None:
    """A graph cached at version 2**63-7 is read by Node.js with its version exact (BigInt) and its nodes."""
    version = BIG_VERSION
    await cache_order(redis_url, namespace)
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


TOKEN = "example-token"


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str) -> Servers:
    return Servers(redis_url, postgres_dsn, namespace, pg_schema)


async def http_client(examples: Path, base_url: str, root_id: str, *options: str, token: str = TOKEN) -> Any:
    """Run http-client.mjs; its one JSON line, and the exit status under "exit"."""
    done = await anyio.run_process(
        ["node", "http-client.mjs", base_url, root_id, *options],
        cwd=examples,
        env={**os.environ, "GRAPHCACHE_API_TOKEN": token},
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr.decode()
    assert done.stderr == b"", done.stderr.decode()
    result = json.loads(done.stdout)
    result["exit"] = done.returncode
    return result


async def test_the_node_http_client_reads_a_64_bit_version_exactly_as_json_and_as_msgpack(
    node_examples: Path, tmp_path: Path, servers: Servers
) -> None:
    """Through a real sidecar, http-client.mjs prints version 2**63-7 and every node exactly, the same in
    JSON and msgpack mode; a matching ETag is 304, an unknown root 404, a missing token 401."""
    data = {"sku": "x", "qty": 2, "price": 1.5, "mid": 2**40, "big": 2**60, "code": "12345678901234567890"}
    await cache_order(servers.redis_url, servers.namespace, data)
    etag = f'"{BIG_VERSION}"'
    expected = {
        "status": 200,
        "root_id": "o-1",
        "version": str(BIG_VERSION),
        "etag": etag,
        "nodes": {
            "o-1": {"parent_id": None, "data": {"customer": "ada"}, "row_version": "1"},
            "line-1": {
                "parent_id": "o-1",
                "data": {**data, "big": str(2**60)},  # above 2**53: exact, as a decimal string
                "row_version": str(BIG_VERSION),
            },
        },
        "exit": 0,
    }
    command = serve_command("http", servers, ["--membership", "static", "--api-token", TOKEN])
    async with sidecar(command, tmp_path / "serve.log") as node:
        url = node.base_url
        assert await http_client(node_examples, url, "o-1") == expected
        assert await http_client(node_examples, url, "o-1", "--msgpack") == expected
        assert await http_client(node_examples, url, "o-1", "--min-version", str(BIG_VERSION)) == expected
        assert await http_client(node_examples, url, "o-1", "--if-none-match", etag) == {
            "status": 304,
            "root_id": "o-1",
            "etag": etag,
            "exit": 0,
        }
        stale = await http_client(node_examples, url, "o-1", "--msgpack", "--if-none-match", '"7"')
        assert stale == expected
        unknown = await http_client(node_examples, url, "no/such root")
        assert unknown["status"] == 404
        assert unknown["title"] == "Not Found"
        assert "no/such root" in unknown["detail"]
        assert unknown["exit"] == 1
        refused = await http_client(node_examples, url, "o-1", token="")
        assert (refused["status"], refused["exit"]) == (401, 1)
        assert await node.stop() == 0
