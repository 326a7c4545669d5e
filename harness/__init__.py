"""graphcache.harness: load generator, history recorder, consistency checker, benchmarks."""

__all__ = ()
