"""bench cache runs end to end on the shared Redis and leaves no key behind."""

from __future__ import annotations

import argparse

import pytest
from redis import Redis

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
