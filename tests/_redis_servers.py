"""Private redis-server processes (single and 3-master Cluster) for tests that stop or flood Redis."""

__all__: list[str] = []
