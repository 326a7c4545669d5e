"""graphcache.actors: mailbox actors, the consistent-hash ring, membership and the Node."""

from ._keys import graph_key

__all__ = ("graph_key",)
