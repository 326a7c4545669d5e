"""graphcache.actors: mailbox actors, the consistent-hash ring, membership and the Node."""

from ._actor import RootActor
from ._errors import ActorDead, ActorError, InvalidArgument, NodeNotRunning, ReadTimeout, VersionNotReached
from ._keys import graph_key
from ._membership import (
    InvalidMembershipConfig,
    Membership,
    MembershipStatistics,
    RedisMembership,
    StaticMembership,
)
from ._ring import EmptyRing, InvalidNodeId, InvalidRingConfig, Ring

__all__ = (
    "EmptyRing",
    "InvalidMembershipConfig",
    "InvalidNodeId",
    "InvalidRingConfig",
    "Membership",
    "MembershipStatistics",
    "RedisMembership",
    "Ring",
    "StaticMembership",
    "graph_key",
)
