"""The sidecar's HTTP API (Starlette on uvicorn) against real PostgreSQL and Redis: in process through
httpx.ASGITransport, and once as the real ``run.py serve`` process."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import redis
from openapi_spec_validator import validate

from graphcache.actors import Node, StaticMembership
from graphcache.cache import RedisCache
from graphcache.sidecar import build_app, openapi_document
from graphcache.storage import Graph, PostgresStore, Upsert
from tests._sidecar_procs import ROOT_DIR, Servers, serve_command, sidecar

PROBLEM = "application/problem+json"
TOKEN = "s3cret-token"


class _State:
    def __init__(self, node: Node | None) -> None:
        self.node = node
        self.membership = None

    async def problems(self) -> list[str]:
        return [] if self.node is not None else ["starting"]


class Api:
    def __init__(
        self, client: httpx.AsyncClient, store: PostgresStore, namespace: str, redis_url: str
    ) -> None:
        self.client = client
        self.store = store
        self.namespace = namespace
        self.redis_url = redis_url

    def keys(self) -> list[bytes]:
        with redis.Redis.from_url(self.redis_url) as client:
            return list(client.scan_iter(match=f"{self.namespace}:*", count=1000))


@pytest.fixture
async def api(postgres_dsn: str, pg_schema: str, redis_url: str, namespace: str) -> AsyncIterator[Api]:
    membership = StaticMembership(["a"])
    async with (
        await PostgresStore.connect(postgres_dsn, schema=pg_schema) as store,
        RedisCache.from_url(redis_url, namespace=namespace) as cache,
        Node(store=store, cache=cache, node_id="a", membership=membership) as node,
    ):
        app = build_app(_State(node), read_timeout=1.0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield Api(client, store, namespace, redis_url)


async def _tree(store: PostgresStore, root: str) -> int:
    await store.create_root(root, {"name": root})
    return await store.apply(root, [Upsert("child", root, {"n": 1})])


def _is_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert "Traceback" not in response.text
    return body


@pytest.mark.anyio
async def test_get_answers_the_graph_as_json_with_its_etag(api: Api) -> None:
    version = await _tree(api.store, "r1")
    response = await api.client.get(f"/v1/graphs/r1?min_version={version}")  # newer than the create's
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"] == f'"{version}"'
    body = response.json()
    assert body["root_id"] == "r1"
    assert body["version"] == version
    assert set(body["nodes"]) == {"r1", "child"}
    assert body["nodes"]["child"]["data"] == {"n": 1}
    again = await api.client.get(
        f"/v1/graphs/r1?min_version={version}", headers={"If-None-Match": response.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    stale = await api.client.get("/v1/graphs/r1", headers={"If-None-Match": '"0"'})
    assert stale.status_code == 200


@pytest.mark.anyio
async def test_accept_msgpack_answers_bytes_that_decode_to_the_graph(api: Api) -> None:
    version = await _tree(api.store, "r2")
    response = await api.client.get(
        f"/v1/graphs/r2?min_version={version}", headers={"Accept": "application/msgpack"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/msgpack"
    graph = msgspec.msgpack.decode(response.content, type=Graph)
    assert graph == await api.store.load("r2")
    assert graph.version == version


@pytest.mark.anyio
async def test_an_unknown_root_is_404_problem(api: Api) -> None:
    _is_problem(await api.client.get("/v1/graphs/nope"), 404)


@pytest.mark.anyio
async def test_min_version_above_committed_is_504_within_the_timeout(api: Api) -> None:
    version = await _tree(api.store, "r3")
    started = time.monotonic()
    response = await api.client.get(f"/v1/graphs/r3?min_version={version + 5}")
    assert time.monotonic() - started < 3.0
    _is_problem(response, 504)
    ok = await api.client.get(f"/v1/graphs/r3?min_version={version}")
    assert ok.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "/v1/graphs/bad?min_version=-1",
        "/v1/graphs/bad?min_version=abc",
        f"/v1/graphs/bad?min_version={2**64}",
        f"/v1/graphs/bad?min_version={2**63}",
        "/v1/graphs/" + "x" * 1001,
        "/v1/graphs/%FF%FE",
        "/v1/graphs/ok%C3",
    ],
    ids=["negative", "not-a-number", "2**64", "2**63", "too-long", "not-utf8", "truncated-utf8"],
)
async def test_bad_input_is_400_problem_and_writes_nothing(api: Api, path: str) -> None:
    _is_problem(await api.client.get(path), 400)
    if "min_version" not in path:
        _is_problem(await api.client.post(path + "/refresh"), 400)
    await anyio.sleep(0.1)
    assert api.keys() == []


@pytest.mark.anyio
async def test_refresh_is_202(api: Api) -> None:
    await _tree(api.store, "r4")
    response = await api.client.post("/v1/graphs/r4/refresh")
    assert response.status_code == 202
    _is_problem(await api.client.delete("/v1/graphs/r4"), 405)
    _is_problem(await api.client.get("/v1/nothing"), 404)


@pytest.mark.anyio
async def test_the_bearer_token_guards_v1_only(postgres_dsn: str, pg_schema: str, redis_url: str) -> None:
    app = build_app(_State(None), api_token=TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as client:
        _is_problem(await client.get("/v1/graphs/r"), 401)
        _is_problem(await client.get("/v1/graphs/r", headers={"Authorization": "Bearer wrong"}), 401)
        _is_problem(await client.post("/v1/graphs/r/refresh", headers={"Authorization": TOKEN}), 401)
        # the right token passes the guard (the node is not running yet: 503)
        _is_problem(await client.get("/v1/graphs/r", headers={"Authorization": f"Bearer {TOKEN}"}), 503)
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200


def test_openapi_is_valid_3_1() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    validate(document)
    assert set(document["paths"]) == {
        "/v1/graphs/{root_id}",
        "/v1/graphs/{root_id}/refresh",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }


@pytest.mark.anyio
async def test_every_documented_route_answers_with_a_documented_status(api: Api) -> None:
    await _tree(api.store, "doc")
    document = (await api.client.get("/openapi.json")).json()
    assert document == openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            url = path.replace("{root_id}", "doc")
            response = await api.client.request(method.upper(), url)
            assert str(response.status_code) in operation["responses"], (method, path, response.status_code)


def test_a_non_loopback_host_without_a_token_exits_2_with_one_line() -> None:
    import subprocess  # noqa: PLC0415

    command = [sys.executable, str(ROOT_DIR / "run.py"), "serve", "--host", "0.0.0.0", "--port", "0"]  # noqa: S104
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT_DIR, timeout=30, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--api-token" in lines[0]
    assert "loopback" in lines[0]


@pytest.mark.anyio
async def test_the_real_server_serves_the_api(
    tmp_path: Path, redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str
) -> None:
    servers = Servers(redis_url, postgres_dsn, namespace, pg_schema)
    async with await PostgresStore.connect(postgres_dsn, schema=pg_schema) as store:
        version = await _tree(store, "real")
        command = serve_command("n1", servers, ["--membership", "static", "--api-token", TOKEN])
        async with sidecar(command, tmp_path / "n1.log") as node:
            assert node.base_url.startswith("http://127.0.0.1:")
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=node.base_url, timeout=10) as client:
                response = await client.get(f"/v1/graphs/real?min_version={version}", headers=auth)
                assert response.status_code == 200
                assert response.json()["version"] == version
                _is_problem(await client.get("/v1/graphs/real"), 401)
                _is_problem(await client.get("/v1/graphs/%FF", headers=auth), 400)
                assert (await client.get("/readyz")).status_code in (200, 503)
                assert "graphcache_reads" in (await client.get("/metrics")).text
            assert await node.stop() == 0
        assert TOKEN not in (tmp_path / "n1.log").read_text()
