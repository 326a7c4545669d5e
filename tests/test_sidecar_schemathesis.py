"""The sidecar against its own /openapi.json (schemathesis), on a real ``run.py serve`` process over real
Redis and PostgreSQL: every documented operation, with generated requests (valid and invalid) and
hand-picked ones, answers only documented statuses, content types, headers and bodies, and never a 5xx
but the documented 504 for a ``min_version`` the store has not committed."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import anyio
import hypothesis
import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup

from graphcache.storage import PostgresStore, Upsert
from tests._sidecar_procs import Servers, serve_command, sidecar

pytestmark = pytest.mark.anyio

GRAPHS = "/v1/graphs/{root_id}"
REFRESH = "/v1/graphs/{root_id}/refresh"
SEEDED = ("order-1", "tenant/a b", "ünï-ροοτ")
"""Roots committed before the sidecar starts: plain, one needing percent-encoding, one not ASCII."""
EXAMPLES = 40
"""Generated requests per operation and generation mode (and per seeded root for graph reads)."""
OPENMETRICS = "application/openmetrics-text"
AnyCase = schemathesis.Case[Any]


@schemathesis.deserializer("application/msgpack")
def _msgpack(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    """msgpack bodies are validated against their schema like JSON ones (the graph is the same object)."""
    return msgspec.msgpack.decode(response.content)


@dataclass
class Run:
    """What the requests met: (operation, status, content type) counts, and each operation's failure."""

    seen: collections.Counter[tuple[str, int, str]] = field(default_factory=collections.Counter)
    failures: dict[str, str] = field(default_factory=dict)

    def statuses(self, label: str) -> set[tuple[int, str]]:
        return {(status, media) for (op, status, media) in self.seen if op == label}


async def _seed(store: PostgresStore) -> dict[str, int]:
    """Each seeded root with two children; root id -> committed version."""
    versions = {}
    for root in SEEDED:
        await store.create_root(root, {"name": root})
        versions[root] = await store.apply(
            root, [Upsert("c1", root, {"n": 1}), Upsert("c2", "c1", {"tags": ["x", "ÿ"], "big": 2**62})]
        )
    return versions


def _server_error_check(versions: dict[str, int]) -> Callable[..., None]:
    """A 5xx only where documented and expected here: 504 for a min_version above the root's version (the
    store and the cache stay up, so a 503 is a failure too)."""

    def no_server_error(ctx: Any, response: schemathesis.Response, case: AnyCase) -> None:
        if response.status_code < 500:
            return
        root = unquote(str((case.path_parameters or {}).get("root_id")))
        floor = (case.query or {}).get("min_version")
        if (
            response.status_code == 504
            and case.operation.path == GRAPHS
            and root in versions
            and isinstance(floor, int)
            and floor > versions[root]
        ):
            return
        raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")

    return no_server_error


def _explicit(schema: Any, versions: dict[str, int]) -> Iterator[AnyCase]:
    """Requests generation would rarely make: seeded roots (200, 304, msgpack, 504), OpenMetrics."""
    graphs = schema[GRAPHS]["GET"]
    for root, version in versions.items():
        path = {"root_id": quote(root, safe="")}  # generated ones are percent-encoded by schemathesis
        etag = f'"{version}"'
        yield graphs.Case(path_parameters=path)
        yield graphs.Case(path_parameters=path, query={"min_version": version})
        yield graphs.Case(path_parameters=path, query={"min_version": version + 1})
        yield graphs.Case(path_parameters=path, headers={"Accept": "application/msgpack"})
        yield graphs.Case(path_parameters=path, headers={"If-None-Match": etag})
        yield graphs.Case(path_parameters=path, headers={"If-None-Match": f'W/"0", {etag}'})
        yield graphs.Case(path_parameters=path, headers={"If-None-Match": "*"})
        yield schema[REFRESH]["POST"].Case(path_parameters=path)
    yield graphs.Case(path_parameters={"root_id": "never-created"})
    yield graphs.Case(path_parameters={"root_id": "x" * 1001})
    yield graphs.Case(path_parameters={"root_id": "r"}, query={"min_version": "-1"})
    yield schema["/metrics"]["GET"].Case(headers={"Accept": OPENMETRICS})


def _strategies(
    operation: Any, versions: dict[str, int]
) -> Iterator[tuple[GenerationMode, st.SearchStrategy[AnyCase]]]:
    """Valid and invalid requests; for the graph routes, valid ones on each seeded root too."""
    for mode in GenerationMode:
        yield mode, operation.as_strategy(generation_mode=mode)
    if operation.path in (GRAPHS, REFRESH):
        for root in versions:
            yield GenerationMode.POSITIVE, operation.as_strategy(path_parameters={"root_id": root})


def _fuzz(base_url: str, versions: dict[str, int]) -> Run:
    """Every operation of the served document, each request checked; blocking (run in a thread)."""
    # The served document, loaded as a dict: from_url would leave out the operation that serves it.
    served = requests.get(f"{base_url}/openapi.json", timeout=10)
    served.raise_for_status()
    schema = schemathesis.openapi.from_dict(served.json())
    checks = [
        _server_error_check(versions),
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    run = Run()
    with requests.Session() as session:  # one keep-alive connection
        session.headers.clear()  # schemathesis would let its defaults (Accept: */*) override a case's

        def check(case: AnyCase) -> None:
            response = case.call(base_url=base_url, session=session, timeout=10)
            media = response.headers.get("content-type", [""])[0].split(";")[0]
            run.seen[(case.operation.label, response.status_code, media)] += 1
            case.validate_response(response, checks=checks)

        for case in _explicit(schema, versions):
            try:
                check(case)
            except (Exception, FailureGroup) as exc:  # every failure is reported, not just the first
                run.failures.setdefault(f"{case.operation.label} {case.as_curl_command()}", str(exc))
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), f"the served document has an invalid operation: {result.err()}"
            operation = result.ok()
            for number, (mode, strategy) in enumerate(_strategies(operation, versions)):
                fuzz = hypothesis.settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=(Phase.generate, Phase.shrink),
                    suppress_health_check=list(HealthCheck),
                )(hypothesis.given(case=strategy)(check))
                try:
                    fuzz()
                except hypothesis.errors.Unsatisfiable:
                    if mode is GenerationMode.POSITIVE:
                        raise
                    # nothing to get wrong: no parameter (or only a root id, where any string is one)
                except (Exception, FailureGroup) as exc:
                    run.failures.setdefault(f"{operation.label} (strategy {number})", str(exc))
    return run


async def test_every_operation_answers_as_its_openapi_document_says(
    tmp_path: Path, redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str
) -> None:
    """No undocumented status, content type, header or body, and no 5xx but the documented 504, for
    generated and hand-picked requests to every operation; 200, 304, msgpack, 404, 400 and 504 are met."""
    async with await PostgresStore.connect(postgres_dsn, schema=pg_schema) as store:
        versions = await _seed(store)
    servers = Servers(redis_url, postgres_dsn, namespace, pg_schema)
    command = serve_command("fuzz", servers, ["--membership", "static", "--read-timeout", "5"])
    async with sidecar(command, tmp_path / "fuzz.log") as node:
        run = await anyio.to_thread.run_sync(functools.partial(_fuzz, node.base_url, versions))
        assert await node.stop() == 0
    assert run.failures == {}, "\n\n".join(f"{where}:\n{why}" for where, why in run.failures.items())
    assert run.statuses(f"GET {GRAPHS}") >= {
        (200, "application/json"),
        (200, "application/msgpack"),
        (304, ""),
        (400, "application/problem+json"),
        (404, "application/problem+json"),
        (504, "application/problem+json"),
    }
    assert (202, "application/json") in run.statuses(f"POST {REFRESH}")
    assert (200, OPENMETRICS) in run.statuses("GET /metrics")
    for label in ("GET /healthz", "GET /readyz", "GET /openapi.json", "GET /metrics"):
        assert any(status == 200 for status, _ in run.statuses(label)), (label, run.seen)
