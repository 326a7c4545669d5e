"""bench cache runs end to end on the shared Redis and leaves no key behind."""

from __future__ import annotations

import argparse

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from graphcache import _cli
from graphcache.harness import _bench_cache


def test_bench_cache_reports_every_ratio_and_cleans_up(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny run prints ops/s for each phase and the three ratios, then deletes its namespace."""
    parser = argparse.ArgumentParser()
    _bench_cache.add_arguments(parser)
    args = parser.parse_args(
        [
            "--redis",
            redis_url,
            "--namespace",
            namespace,
            "--ops",
            "200",
            "--rounds",
            "1",
            "--concurrency",
            "4",
        ]
    )
    assert _bench_cache.run(args) == 0
    out = capsys.readouterr().out
    for phase in ("raw SET", "put_if_newer", "raw GET", "raw HGET", "get"):
        assert f"\n{phase} " in out
    for pair in ("put_if_newer / raw SET", "get / raw GET", "get / raw HGET"):
        assert f"{pair}: throughput " in out
    with Redis.from_url(redis_url) as client:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []


def test_bench_cache_refuses_a_namespace_that_holds_keys(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bench deletes its namespace afterwards, so one that holds keys is refused (exit 2), untouched."""
    with Redis.from_url(redis_url) as client:
        client.set(f"{namespace}:someone-elses", b"1")
    assert _cli.main(["bench", "cache", "--redis", redis_url, "--namespace", namespace, "--ops", "1"]) == 2
    assert capsys.readouterr().err.startswith("graphcache bench cache: --namespace")
    with Redis.from_url(redis_url) as client:
        assert client.get(f"{namespace}:someone-elses") == b"1"


def test_a_failed_bench_cache_leaves_no_key(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that fails after writing exits 1 with one line, and its namespace is empty again."""

    async def fail_after_writing(args: object, client: object, cache: object, space: str) -> None:
        assert isinstance(client, AsyncRedis)
        await client.set(f"{space}:written", b"1")
        raise ConnectionResetError("Redis closed the connection")

    monkeypatch.setattr(_bench_cache, "_measure", fail_after_writing)
    assert _cli.main(["bench", "cache", "--redis", redis_url, "--namespace", namespace]) == 1
    err = capsys.readouterr().err
    assert err == "graphcache bench cache: Redis closed the connection\n"
    with Redis.from_url(redis_url) as client:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []
